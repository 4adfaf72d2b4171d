"""The spot-interruption watcher (``pipelines.spot_notice``): a notice drains the node of a real small Ray cluster
of its own (run first in the session, ``conftest.py``), and off EC2 the watcher exits quietly.

The simulated multi-node cluster (DDP over two nodes, fractional GPU shares, a node lost mid-run) is a system
check in ``bench/system/test_simulated_cluster.py``, out of the CI suite for its 3 minutes (README, "Quick start").
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

#: This checkout, on the spot-drain cluster's PYTHONPATH: it runs the watcher as `python -m pipelines.spot_notice`.
ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.slow
@pytest.mark.own_ray
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
