"""A simulated multi-node cluster (``ray.cluster_utils.Cluster``): DDP workers spread over nodes, fractional GPU
shares, and a trial that loses its node mid-run.

These tests start a Ray cluster of their own, so they run first in the session (``conftest.py``), before the
shared local Ray starts: with another Ray instance alive on the machine this one ran 25-40% slower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

#: This checkout: the simulated cluster's worker setup hook imports `pipelines` before Ray puts the driver's
#: directory on the workers' path, so without it on PYTHONPATH they would import an installed copy instead.
ROOT = Path(__file__).resolve().parents[1]


NO_OP_GPU_LOOP = '''
import glob, json, os, time

def install():
    """Worker process setup hook: GPU runs train with a no-op loop (no CUDA here) that records where and
    when it ran; CPU runs keep the real loop."""
    import pipelines.worker

    real = pipelines.worker.train_loop_per_worker

    def loop(config):
        run = config["run"]
        return hold_a_gpu_share(run) if run.workers.use_gpu else real(config)

    pipelines.worker.train_loop_per_worker = loop


def hold_a_gpu_share(run):
    import ray, ray.train

    started = time.time()
    # Hold the share until the other run has started too (or 60 s): start-ups skew by seconds on a busy
    # machine, and runs that cannot share the GPU never overlap, however long each holds it.
    marker = f"{os.environ['GPU_SHARE_LOG']}.{run.model_name}.started"
    open(marker, "w").close()
    while time.time() - started < 60 and len(glob.glob(f"{os.environ['GPU_SHARE_LOG']}.*.started")) < 2:
        time.sleep(0.2)
    time.sleep(1)
    record = {"model": run.model_name, "node": ray.get_runtime_context().get_node_id(),
              "gpus": ray.get_gpu_ids(), "start": started, "end": time.time()}
    with open(os.environ["GPU_SHARE_LOG"], "a") as f:
        f.write(json.dumps(record) + "\\n")
    ray.train.report({"val_acc": 0.5, "epoch": 0})
'''


@pytest.fixture(scope="module")
def simulated_cluster(tmp_path_factory):
    """One real multi-node Ray (ray.cluster_utils.Cluster) for the three tests below: a 2-CPU head and a
    2-CPU node that declares one GPU. It trains lenet5 with 2 DDP workers spread over both nodes, then runs
    two single-worker runs at train.gpus_per_worker=0.5 with a no-op loop. Then a 1-CPU node that declares the
    trial-driver resource joins, lenet5 trains again, and that node (where its trial driver runs) is killed
    once the run has a checkpoint, as a spot node goes; a replacement node joins."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    (tmp_path / "gpu_share_hook.py").write_text(NO_OP_GPU_LOOP)
    log = tmp_path / "placed.jsonl"
    script = textwrap.dedent(f"""
        import glob, json, threading, time, ray
        from ray import tune
        from ray.cluster_utils import Cluster
        from pipelines.config import load_config
        from pipelines.data import describe_dataset
        from pipelines.planning import ModelChoice, plan_model_runs
        from pipelines.runtime import concurrency_for, free_resources
        from pipelines.train import train_stage
        from pipelines.trials import DRIVER_NODE_RESOURCE, run_model_trials, trial_resources

        def kill_once_checkpointed(cfg, victim, trainer):
            # The trial driver can only be on `victim`, the one node that declares the driver resource. Once the
            # run has committed a checkpoint, the victim dies without a graceful shutdown, as a reclaimed spot
            # node does. (Here, in the main thread: Ray's Cluster starts and stops nodes from there only.)
            while trainer.is_alive():
                for path in glob.glob(f"{{cfg.paths.storage}}/{{cfg.name}}-train-lenet5-*/"
                                      "checkpoint_manager_snapshot.json"):
                    try:
                        committed = bool(json.load(open(path)).get("checkpoint_results"))
                    except ValueError:  # being written
                        committed = False
                    if committed:
                        cluster.remove_node(victim, allow_graceful=False)
                        return victim.node_id
                time.sleep(0.1)
            return None

        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2}})
        gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", runtime_env={{
            "worker_process_setup_hook": "gpu_share_hook.install",
            "env_vars": {{"PYTHONPATH": "{tmp_path}:{ROOT}", "GPU_SHARE_LOG": "{log}"}}}})
        try:
            cfg = load_config(None, ["workdir={tmp_path}", "name=twonode", f"ray.address={{cluster.address}}",
                                     "train.models=[lenet5]",
                                     "train.epochs=1", "train.num_workers=2", "train.cpus_per_worker=1",
                                     "train.placement_strategy=SPREAD", "data.train_subset=100"])
            stage = train_stage(cfg)
            nodes = {{n["NodeID"] for n in ray.nodes() if n["Alive"]}}
            placed = json.loads(stage.results["lenet5"].history[-1]["worker_nodes"]) if stage.ok else []

            cfg = load_config(None, ["workdir={tmp_path}", "name=shares", "ray.address=auto", "train.use_gpu=true",
                                     "train.gpus_per_worker=0.5", "train.cpus_per_worker=0.5", "train.epochs=1"])
            choices = [ModelChoice(f"lenet5_{{i}}", "lenet5") for i in range(2)]
            runs = plan_model_runs(cfg, describe_dataset(cfg.data), choices, cluster_cpus=4)
            concurrency = concurrency_for("auto", trial_resources(runs[0]), len(runs), free_resources())
            grid = run_model_trials(cfg.paths, experiment="shares", callbacks=[], max_concurrent=concurrency,
                                    param_space={{"run": tune.grid_search([r.to_dict() for r in runs])}})

            lost = {{}}
            try:
                victim = cluster.add_node(num_cpus=1, resources={{DRIVER_NODE_RESOURCE: 1000}})
                cluster.wait_for_nodes()
                # A Train run that cannot replace anything itself (max_failures=0): only Tune's retry can save it.
                cfg = load_config(None, ["workdir={tmp_path}", "name=nodeloss", f"ray.address={{cluster.address}}",
                                         "train.models=[lenet5]",
                                         "train.epochs=3", "train.cpus_per_worker=1", "train.max_failures=0",
                                         "train.trial_retries=1", "data.train_subset=200", "data.image_size=16"])
                outcome = {{}}

                def train_in_background():
                    try:
                        outcome["stage"] = train_stage(cfg)
                    except Exception as error:
                        outcome["error"] = repr(error)

                trainer = threading.Thread(target=train_in_background, daemon=True)
                started = time.time()
                trainer.start()
                lost["killed"] = kill_once_checkpointed(cfg, victim, trainer)
                if lost["killed"]:  # a node that declares the resource, for Tune's retry to land on
                    lost["replacement"] = cluster.add_node(num_cpus=1, resources={{DRIVER_NODE_RESOURCE: 1000}}).node_id
                trainer.join(timeout=400)
                retried = outcome.get("stage")
                result = retried.results.get("lenet5") if retried else None
                lost.update(ok=bool(retried and retried.ok), seconds=round(time.time() - started, 1),
                            stage_error=outcome.get("error"),
                            history=[{{"epoch": h["epoch"], "start_epoch": h["start_epoch"]}} for h in result.history]
                            if result else [])
            except Exception as error:  # reported by its own test, so the other tests still run
                lost["error"] = repr(error)
            print(json.dumps({{"ok": stage.ok, "nodes": len(nodes), "placed": placed, "concurrency": concurrency,
                              "errors": [str(r.error) for r in grid if r.error], "gpu_node": gpu_node.node_id,
                              "node_loss": lost}}))
        finally:
            ray.shutdown()
            cluster.shutdown()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    summary["gpu_runs"] = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return summary


def test_simulated_two_node_cluster_places_ddp_workers_on_both_nodes(simulated_cluster):
    summary = simulated_cluster
    assert summary["ok"] and summary["nodes"] == 2
    assert len(set(summary["placed"])) == 2  # rank 0 and rank 1 on different nodes


def test_fractional_gpu_shares_put_two_runs_on_one_gpu_at_once(simulated_cluster):
    """Two single-worker runs at train.gpus_per_worker=0.5 both land on the one GPU, at the same time."""
    summary = simulated_cluster
    assert summary["concurrency"] == 2 and not summary["errors"], summary
    placed = summary["gpu_runs"]
    assert len(placed) == 2
    assert {p["node"] for p in placed} == {summary["gpu_node"]} and all(p["gpus"] == [0] for p in placed)
    assert max(p["start"] for p in placed) < min(p["end"] for p in placed), placed  # held it together


def test_a_trial_lost_with_its_node_is_retried_and_resumes_from_its_checkpoint(simulated_cluster):
    """The node that runs a trial's driver dies mid-training: Tune starts the trial again on a node that
    declares the driver resource, its Train run resumes from the last checkpoint, and the stage ends."""
    lost = simulated_cluster["node_loss"]
    assert "error" not in lost and not lost["stage_error"], lost
    assert lost["killed"] and lost["replacement"], lost  # killed once a checkpoint was committed
    assert lost["ok"], lost
    history = lost["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2], lost
    # Resumed, not retrained: the later epochs ran in an attempt that started from the checkpoint. That also
    # shows the driver was on the killed node (the only one with the driver resource): anywhere else the
    # kill would not have touched the run and every epoch would have start_epoch 0.
    assert history[0]["start_epoch"] == 0 and history[-1]["start_epoch"] >= 1, lost


class FakeInstanceMetadata:
    """EC2's instance metadata service as a spot instance sees it (IMDSv2): no notice for the first
    ``quiet_polls`` reads, then an interruption ``notice_in_s`` from then. Reads without the session token
    are refused, as EC2 refuses them."""

    def __init__(self, quiet_polls: int = 2, notice_in_s: float = 3.0) -> None:
        import http.server
        import threading
        import time

        polls = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: str = "") -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self):
                ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                self._answer(200, "session-token") if ok else self._answer(400)

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != "session-token":
                    return self._answer(401)
                if self.path != "/latest/meta-data/spot/instance-action":
                    return self._answer(404)
                polls.append(time.time())
                if len(polls) <= quiet_polls:
                    return self._answer(404)
                fake.announced = fake.announced or time.time() + notice_in_s
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(fake.announced))
                self._answer(200, json.dumps({"action": "terminate", "time": when}))

        self.announced = None
        self.polls = polls
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_a_spot_interruption_notice_drains_the_node_so_ray_reports_its_workers_preempted():
    """Nothing read EC2's two-minute spot notice: a reclaimed node just died, and Ray Train counted each loss
    against train.max_failures (the fourth failed the model). `pipelines.spot_notice` (cluster.yaml starts it on
    every worker) drains the node as preempted: Ray Train's preemption watcher sees the drain, and a worker
    that dies with the node is reported preempted, which Ray Train counts apart, without a limit."""
    metadata = FakeInstanceMetadata(quiet_polls=2, notice_in_s=12.0)
    script = textwrap.dedent(f"""
        import json, subprocess, sys, time, ray
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 0, "include_dashboard": False}})
        spot = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="WARNING")

        @ray.remote(num_cpus=1)
        class Worker:
            def node(self):
                return ray.get_runtime_context().get_node_id()

        worker = Worker.remote()
        result = {{"on_spot_node": ray.get(worker.node.remote()) == spot.node_id, "spot": spot.node_id}}
        watcher = subprocess.run([sys.executable, "-m", "pipelines.spot_notice", "--address", cluster.gcs_address,
                                  "--node-id", spot.node_id, "--metadata-url", "{metadata.url}", "--interval", "0.2",
                                  "--lock", "{{}}/spot.lock".format(sys.argv[1])],
                                 capture_output=True, text=True, timeout=60)
        result.update(watcher_exit=watcher.returncode, watcher_log=watcher.stderr[-2000:],
                      draining=ray._private.state.state.get_draining_nodes())
        deadline = result["draining"].get(spot.node_id, 0) / 1000
        time.sleep(max(0.0, deadline - time.time()) + 0.5)
        cluster.remove_node(spot)  # EC2 takes the instance away (its shutdown stops Ray first)
        try:
            ray.get(worker.node.remote(), timeout=60)
        except ray.exceptions.RayActorError as err:
            result["preempted"] = err.preempted
        print(json.dumps(result))
        ray.shutdown()
        cluster.shutdown()
    """)
    try:
        with tempfile.TemporaryDirectory() as lock_dir:
            out = subprocess.run([sys.executable, "-c", script, lock_dir], capture_output=True, text=True,
                                 timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        metadata.close()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["on_spot_node"] and result["watcher_exit"] == 0, result
    assert len(metadata.polls) == 3  # two quiet polls, then the notice, then the watcher stopped
    assert "drained as preempted" in result["watcher_log"]
    assert list(result["draining"]) == [result["spot"]]
    # the drain's deadline: the announced time (whole seconds, UTC) less the 10 s margin
    assert -1.5 < result["draining"][result["spot"]] / 1000 - (metadata.announced - 10) <= 0.01
    assert result["preempted"] is True, result


def test_the_spot_watcher_exits_quietly_off_ec2_and_a_second_one_at_once(tmp_path, capsys):
    import socket

    from filelock import FileLock

    from pipelines import spot_notice

    with socket.socket() as s:  # a port nothing listens on: no metadata service
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(spot_notice.NotOnEC2):
        spot_notice.watch("127.0.0.1:1", metadata_url=nowhere, interval_s=0.01)
    assert spot_notice.main(["--address", "127.0.0.1:1", "--metadata-url", nowhere, "--interval", "0.01",
                             "--lock", str(tmp_path / "lock")]) == 0
    with FileLock(str(tmp_path / "held")):
        assert spot_notice.main(["--address", "127.0.0.1:1", "--metadata-url", nowhere,
                                 "--lock", str(tmp_path / "held")]) == 0
    # A drain that can pass (a GCS restarting) is tried again, with the deadline set anew; a refusal is final
    import time

    calls = []

    def drain(gcs, node, deadline, message):
        calls.append(deadline)
        if len(calls) < 3:
            raise ConnectionError("GCS restarting")

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(spot_notice, "drain_as_preempted", drain)
    try:
        when = time.time() + 30
        node, deadline = spot_notice._drain_until("gcs:6379", "ab" * 28, when, margin_s=29.5)
        assert node == "ab" * 28 and len(calls) == 3 and calls[2] > calls[0] and deadline == calls[2]
        monkeypatch.setattr(spot_notice, "drain_as_preempted",
                            lambda *args: (_ for _ in ()).throw(spot_notice.CannotDrain("refused")))
        started = time.monotonic()
        with pytest.raises(spot_notice.CannotDrain):
            spot_notice._drain_until("gcs:6379", "ab" * 28, time.time() + 30, margin_s=10)
        assert time.monotonic() - started < 1  # not retried for 30 s
    finally:
        monkeypatch.undo()
    metadata = FakeInstanceMetadata(quiet_polls=1)
    try:  # no notice yet: None; then the announced time
        assert spot_notice.interruption_time(metadata.url) is None
        assert abs(spot_notice.interruption_time(metadata.url) - metadata.announced) < 1.0
    finally:
        metadata.close()
