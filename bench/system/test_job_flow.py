"""The README's cluster job flow, end to end, against a real Ray head with token authentication.

A head is started with ``ray start --head --block`` as a subprocess of its own (its own ports and temp
directory, so the session Ray of the other tests is untouched; the test process never connects to it), then
the pipeline goes in through the Jobs API exactly as README.md "Cluster" writes it (``ray job submit
--working-dir . -- python -m pipelines run ... --no-block`` with ``RAY_AUTH_MODE=token`` and the head's token in
``RAY_AUTH_TOKEN``), and the endpoint the finished job left serving answers a real HTTP prediction.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray  # noqa: F401  (only for its vendored psutil; this process never connects to the head)
import requests

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free now (all sockets held open together, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _token_env(token: str) -> dict[str, str]:
    """This environment minus any Ray address or token (the session Ray's), plus token mode and ``token``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """End the head and every process it started, by their ids (``ray stop`` would end every Ray on the machine).

    Its processes are ``ray start``'s descendants (GCS, raylet, dashboard, and the raylet's workers: the job's
    driver, Train, Serve), plus any that names its temp dir; each gets SIGTERM, then SIGKILL after 1 s (the head
    is thrown away, a graceful shutdown would only cost time).
    """
    import psutil  # Ray's vendored copy: `import ray` above put it on sys.path

    procs = []
    try:
        root = psutil.Process(head.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter(["cmdline"]):
        if proc not in procs and any(temp_dir in part for part in proc.info["cmdline"] or ()):
            procs.append(proc)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=1)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    head.wait(timeout=10)


@pytest.fixture
def token_head(tmp_path):
    """A Ray head with token authentication, on ports and a temp dir of its own; yields (dashboard URL, token)."""
    token = secrets.token_hex(32)
    gcs, dashboard, client, agent, agent_grpc, runtime_env_agent, metrics = free_ports(7)
    # Not under tmp_path: Ray's Unix sockets (<temp-dir>/session_<date>_<pid>/sockets/plasma_store) must stay
    # under 107 characters, which pytest's long temporary paths can exceed.
    temp_dir = tempfile.mkdtemp(prefix="rjf-", dir="/tmp")
    log = (tmp_path / "ray-start.log").open("wb")
    env = _token_env(token)  # RAY_AUTH_MODE=token and the token, as cluster nodes would have them
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--num-gpus=0",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if head.poll() is not None:
                raise AssertionError(f"ray start exited with {head.returncode}:\n"
                                     + (tmp_path / "ray-start.log").read_text(errors="replace")[-4000:])
            try:
                if requests.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"},
                                timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the head's dashboard did not answer within 90 s:\n"
                                     + (tmp_path / "ray-start.log").read_text(errors="replace")[-4000:])
            time.sleep(0.5)
        yield url, token
    finally:
        _stop_head(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_readme_job_flow_on_a_token_authenticated_head(token_head, tmp_path):
    url, token = token_head
    # The head refuses clients without the token: the failure the README's job flow ran into.
    assert requests.get(f"{url}/api/jobs/", timeout=10).status_code == 401

    serve_port = free_ports(1)[0]
    workdir = tmp_path / "runs"
    overrides = [
        "name=jobflow", f"workdir={workdir}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "ray.address=auto", "train.models=[lenet5]", "train.epochs=1", "data.image_size=16",
        "data.train_subset=300", "train.cpus_per_worker=1", "search.phis=[]",
        f"serve.port={serve_port}", "serve.num_cpus=0.25",
    ]
    entrypoint = [sys.executable, "-m", "pipelines", "run", "--stages", "train,serve", "--no-block"]
    for item in overrides:
        entrypoint += ["--set", item]
    started = time.monotonic()
    try:
        submitted = subprocess.run(
            [RAY, "job", "submit", "--address", url, "--working-dir", ".", "--", *entrypoint],
            cwd=REPO, env=_token_env(token), capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:  # its output may come back as bytes despite text=True
        so_far = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                         for x in (err.stdout, err.stderr))
        pytest.fail(f"the job did not finish within 300 s; its output so far:\n{so_far[-8000:]}")
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, f"ray job submit exited with {submitted.returncode}:\n{output[-8000:]}"
    assert "succeeded" in output, output[-8000:]
    print(f"job submitted and finished in {time.monotonic() - started:.1f} s")

    # The job returned once serving started; the endpoint outlives it. Loopback binding: no bearer token.
    samples = sorted((workdir / "jobflow" / "serve").glob("sample-*.png"))
    assert samples, f"the serve stage wrote no sample image:\n{output[-4000:]}"
    response = requests.post(f"http://127.0.0.1:{serve_port}/predict", params={"top_k": 10},
                             data=samples[0].read_bytes(), headers={"Content-Type": "image/png"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "lenet5" and body["requested"] == "champion"
    assert sorted(p["label"] for p in body["predictions"]) == [str(d) for d in range(10)]
    assert abs(sum(p["score"] for p in body["predictions"]) - 1.0) < 1e-3
