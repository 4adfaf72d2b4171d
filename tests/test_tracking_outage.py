"""A tracking outage against a real ``mlflow server`` process: training goes on, writes are queued and sent
when the server is back, and what an outage outlasts is left pending for ``python -m pipelines register``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import free_port

from pipelines.results import load_results
from pipelines.tracking import CHAMPION, Tracker
from pipelines.tracking_queue import EXIT_PENDING, PENDING_FILE, TrackingQueue

REPO = Path(__file__).resolve().parents[1]


class MlflowServer:
    """``mlflow server`` on a local port, stopped and started again on the same store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its workers: one group to stop
            # Without the GenAI job runner: its half-dozen consumer processes triple the start-up on 2 cores.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.process is None:
            return
        # The server's workers are its children (its own process group): the port must be free before the next
        # start, and no other test's processes are touched.
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except ProcessLookupError:  # the group is gone already
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # a worker that outlived its parent
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _no_client_backoff(monkeypatch):
    """MLflow's client retries without sleeping between tries: with the pipeline's back-off (about 2.5 s per
    refused request) each write tried in an outage cost seconds of nothing; what the queue does is the same."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")


@pytest.fixture(scope="module")
def running_server(tmp_path_factory):
    # One store for the module (a cold start creates the database, the slow part); tests use their own
    # experiments and each leaves the server running.
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(running_server):
    if running_server.process is None or running_server.process.poll() is not None:
        running_server.start()
    yield running_server
    if running_server.process.poll() is not None:
        running_server.start()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_an_outage_queues_writes_and_register_sends_what_the_stage_left_pending(mlflow_server, tmp_path,
                                                                              pipelines_cli):
    from pipelines.config import load_config

    overrides = [f"workdir={tmp_path / 'work'}", "name=pending", f"tracking.uri={mlflow_server.uri}",
                 "tracking.pending_timeout_s=2"]
    cfg = load_config(None, overrides)
    queue = TrackingQueue.for_config(cfg)
    run = queue.new_run("lenet5", {"stage": "train"})
    assert queue.flush(timeout_s=60) == [] and queue.run_id(run)

    mlflow_server.stop()
    started = time.monotonic()
    late = queue.new_run("alexnet", {"stage": "train"}, parent=run)
    for step in range(3):
        queue.put("log_metrics", late, metrics={"val_acc": step / 10}, step=step)
    queue.put("set_tags", run, tags={"note": "written late"})
    assert time.monotonic() - started < 0.5, "queuing never waits for the server"
    pending = queue.flush(timeout_s=cfg.tracking.pending_timeout_s)
    assert [op.kind for op in pending] == ["start_run", "log_metrics", "log_metrics", "log_metrics", "set_tags"]
    saved = json.loads((cfg.paths.run_dir / PENDING_FILE).read_text())
    assert saved["run_ids"] == {run: queue.run_id(run)} and len(saved["ops"]) == 5

    arguments = ["register", *[a for o in overrides for a in ("--set", o)]]
    still_down = pipelines_cli(*arguments)  # (in this process; the one below is a real `python -m`)
    assert still_down.returncode == EXIT_PENDING, still_down.stderr
    # The five writes and the champion alias, with the command that sends them.
    assert "python -m pipelines register" in still_down.stderr and "6 write(s)" in still_down.stderr

    mlflow_server.start()
    sent = subprocess.run([sys.executable, "-m", "pipelines", *arguments], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert sent.returncode == 0, sent.stderr
    client = Tracker(mlflow_server.uri, "pending").client
    assert client.get_run(queue.run_id(run)).data.tags["note"] == "written late"
    [child] = client.search_runs([client.get_experiment_by_name("pending").experiment_id],
                                 "attributes.run_name = 'alexnet'")
    assert child.data.tags["mlflow.parentRunId"] == queue.run_id(run)
    assert [m.value for m in client.get_metric_history(child.info.run_id, "val_acc")] == [0.0, 0.1, 0.2]
    assert not (cfg.paths.run_dir / PENDING_FILE).exists()


@pytest.mark.slow
def test_register_fails_when_mlflow_refuses_a_pending_registration_for_good(mlflow_server, tmp_path, pipelines_cli):
    """A registration left pending by an outage whose run was then deleted in MLflow's UI is dropped: `register`
    counted it as sent ("sent 3 of 3") and exited 0, so a script saw success for a model not in the registry."""
    from pipelines.config import load_config

    overrides = [f"workdir={tmp_path / 'work'}", "name=refused", f"tracking.uri={mlflow_server.uri}",
                 "tracking.pending_timeout_s=2"]
    cfg = load_config(None, overrides)
    queue = TrackingQueue.for_config(cfg)
    run = queue.new_run("lenet5", {"stage": "train"})
    assert queue.flush(timeout_s=60) == []
    mlflow_server.stop()
    queue.put("register", run, checkpoint_path=str(tmp_path / "best"), storage_path=str(tmp_path),
              registered_model=cfg.registered_model_name, alias="lenet5", tags={"fingerprint": "abc"})
    queue.put("end_run", run, status="FINISHED")
    assert [op.kind for op in queue.flush(timeout_s=2)] == ["register", "end_run"]
    mlflow_server.start()
    Tracker(mlflow_server.uri, "refused").client.delete_run(queue.run_id(run))

    sent = pipelines_cli("register", *[a for o in overrides for a in ("--set", o)])
    assert sent.returncode == 1, sent.stderr
    assert "not registered (MLflow refused it for good" in sent.stderr and "lenet5" in sent.stderr
    # The champion alias went out; the registration and the run's end were refused (the run is deleted).
    assert "sent 1 of 3 pending write(s)" in sent.stdout and "2 refused for good (above)" in sent.stdout
    assert not (cfg.paths.run_dir / PENDING_FILE).exists()


@pytest.mark.slow
def test_writes_queued_in_an_outage_outlive_a_command_killed_before_its_flush(mlflow_server, tmp_path,
                                                                            pipelines_cli):
    """`ray job stop` (SIGKILL 3 s after its SIGTERM), the OOM killer, a lost head: a command killed while MLflow
    was down lost every write it had queued since, its runs left RUNNING without their metrics. The backlog is on
    disk from the first failed attempt, and the next command sends it."""
    from pipelines.config import load_config

    overrides = [f"workdir={tmp_path / 'work'}", "name=killed", f"tracking.uri={mlflow_server.uri}",
                 "tracking.pending_timeout_s=2"]
    cfg = load_config(None, overrides)
    pending_file = cfg.paths.run_dir / PENDING_FILE
    mlflow_server.stop()
    stage = ("import time\n"
             "from pipelines.config import load_config\n"
             "from pipelines.tracking_queue import TrackingQueue\n"
             f"queue = TrackingQueue.for_config(load_config(None, {overrides!r}))\n"
             "run = queue.new_run('lenet5', {'stage': 'train'})\n"
             "for step in range(3):\n"
             "    queue.put('log_metrics', run, metrics={'val_acc': step / 10}, step=step)\n"
             "time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", stage], cwd=REPO)
    try:
        _wait_for(lambda: pending_file.exists() and len(json.loads(pending_file.read_text())["ops"]) == 4, 120,
                  "the queued writes on disk")
        # Claimed while the command lives: another command of the config leaves them to it.
        assert len(TrackingQueue.for_config(cfg)) == 0
    finally:
        process.kill()
        process.wait()
    mlflow_server.start()
    sent = pipelines_cli("register", *[a for o in overrides for a in ("--set", o)])
    assert sent.returncode == 0, sent.stderr
    client = Tracker(mlflow_server.uri, "killed").client
    [run] = client.search_runs([client.get_experiment_by_name("killed").experiment_id],
                               "attributes.run_name = 'lenet5'")
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0.0, 0.1, 0.2]
    assert not pending_file.exists()


def test_a_wrong_artifact_store_fails_before_any_model_starts(make_config, tmp_path):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the artifact store should be")
    cfg = make_config("train.models=[lenet5]")
    tracker = Tracker(cfg.tracking_uri, "blocked", artifact_root=(blocked / "artifacts").as_uri())
    from pipelines.tracking import TrackingUnavailable

    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="cannot write artifacts to .*not-a-directory"):
        tracker.open_stage_run("train-x", {"stage": "train"}, {"dataset": "digits"}, cfg.to_yaml())
    assert time.monotonic() - started < 30
    assert tracker.find_run("tags.stage = 'train'").info.status == "FAILED"


def test_a_stage_that_cannot_open_its_mlflow_run_leaves_pending_writes_to_the_next_call(ray_cluster, make_config,
                                                                                        caplog):
    """MLflow down when a stage starts: the stage ends at once (TrackingUnavailable), and the writes an earlier
    command left pending stay free. Its queue had taken them over first and never ended, so they were this
    process's for as long as it lived: the next call in a notebook (or the tests' process) left them unsent."""
    from pipelines.tracking import TrackingUnavailable
    from pipelines.train import train_stage

    cfg = make_config("train.models=[lenet5]", "train.epochs=1", "tracking.uri=http://127.0.0.1:9",
                      "tracking.pending_timeout_s=2")
    pending_file = cfg.paths.run_dir / PENDING_FILE
    pending_file.parent.mkdir(parents=True, exist_ok=True)
    pending_file.write_text(json.dumps({"tracking_uri": cfg.tracking_uri, "run_ids": {}, "claims": {}, "ops": [
        {"seq": 1, "kind": "set_tags", "ref": "0123abcd", "args": {"tags": {"note": "left pending"}}, "uid": "u1"}]}))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipelines"), pytest.raises(TrackingUnavailable):
        train_stage(cfg)
    # Waited for the server, as for a restart, up to tracking.pending_timeout_s (at most STAGE_START_WAIT_S)
    assert 2 <= time.monotonic() - started < 30
    assert "does not answer" in caplog.text and "trying again for up to 2 s" in caplog.text
    assert len(TrackingQueue.for_config(cfg)) == 1


@pytest.mark.slow
def test_a_stage_starting_while_the_tracking_server_restarts_waits_for_it(mlflow_server, tmp_path):
    """A server restarting (seconds) as a stage opened its run failed the stage at once: in `run`, a search that
    failed so trained every model but the EfficientNet family. The stage's start waits for it now."""
    from pipelines.tracking import STAGE_START_WAIT_S

    tracker = Tracker(mlflow_server.uri, "restart")
    mlflow_server.stop()
    restart = threading.Thread(target=lambda: (time.sleep(1.0), mlflow_server.start()))
    restart.start()
    try:
        run_id = tracker.open_stage_run("train-restart", {"stage": "train"}, {"epochs": 1}, "a: 1\n",
                                        wait_s=STAGE_START_WAIT_S * 4)  # (a cold start on 2 cores: ~10-30 s)
    finally:
        restart.join()
    assert tracker.client.get_run(run_id).data.params == {"epochs": "1"}
    assert [r.info.run_id for r in tracker.client.search_runs([tracker.experiment_id])] == [run_id]  # one run


@pytest.mark.slow
def test_training_goes_on_through_a_tracking_outage(ray_cluster, mlflow_server, make_config):
    """The server stops while the model trains and comes back after it finished: training goes on, and at the end
    every epoch's metrics, its registration and the champion are in MLflow. (One model: a run created in an outage
    is the queue's to send, tested above for a stage's run and in test_tracking.py for a trial's.)"""
    from pipelines.train import train_stage

    cfg = make_config("train.models=[lenet5]", "train.epochs=2", f"tracking.uri={mlflow_server.uri}",
                      "data.image_size=16", "data.train_subset=400")
    tracker = Tracker.for_config(cfg)

    def first_model_started() -> bool:
        try:
            return bool(tracker.client.search_runs([tracker.experiment_id], "tags.`cnnzoo.model` = 'lenet5'"))
        except Exception:  # noqa: BLE001 - the experiment may not exist yet
            return False

    outage: dict = {}

    def interrupt_tracking() -> None:  # beside the stage, which runs in the main thread as Tune wants
        try:
            _wait_for(first_model_started, 300, "the first model's MLflow run")
            mlflow_server.stop()
            outage["stopped"], outage["stopped_ms"] = time.monotonic(), time.time() * 1000
            outage["lenet5_done_before"] = "lenet5" in load_results(cfg.paths.train_dir)
            # Training goes on without the server: the first model finishes and records its result.
            _wait_for(lambda: "lenet5" in load_results(cfg.paths.train_dir), 300, "lenet5 to finish")
            outage["lenet5_done"] = time.monotonic()
            mlflow_server.start()
            outage["back"] = time.monotonic()
        except Exception as err:  # noqa: BLE001 - reported by the assertions below
            outage["error"] = err

    monitor = threading.Thread(target=interrupt_tracking, daemon=True)
    monitor.start()
    result = train_stage(cfg, show_table=False)
    ended = time.monotonic()
    monitor.join(timeout=60)
    assert "error" not in outage, outage.get("error")
    assert outage["stopped"] < outage["lenet5_done"] < outage["back"] < ended
    assert not outage["lenet5_done_before"], "the server stopped before the first model finished"
    assert result.ok and result.pending == 0 and result.trained == ["lenet5"]
    assert ended - outage["back"] < 120, "the stage ends soon after the server's return"

    records = load_results(cfg.paths.train_dir)
    versions, champion = tracker.registered_versions(cfg.registered_model_name)
    assert {v.alias for v in versions} >= {"lenet5"} and champion is not None
    assert result.champion == "lenet5"
    assert records["lenet5"].version, "its record learns its registered version"
    history = tracker.client.get_metric_history(records["lenet5"].mlflow_run_id, "val_acc")
    assert sorted(m.step for m in history) == [0, 1], "every epoch's metrics reached MLflow"
    # An epoch reported while the server was down, sent once it was back.
    assert max(m.timestamp for m in history) > outage["stopped_ms"], history
    assert CHAMPION in tracker.client.get_registered_model(cfg.registered_model_name).aliases
    assert not (cfg.paths.run_dir / PENDING_FILE).exists()


def test_a_checkpoint_gone_from_the_artifact_store_is_a_lasting_failure_not_an_outage(mlflow_server, tmp_path):
    """Through the server's artifact proxy a missing file is an HTTP 404, which MLflow reports as INTERNAL_ERROR,
    its code for an unreachable server too: a replica kept such a model "not verified yet" for good, downloading
    it every 15 s. The store answering a listing of the version's artifacts tells the two apart."""
    import cnnmodels
    from pipelines.checkpoints import CheckpointError, ModelCheckpoint, save_checkpoint
    from pipelines.model_store import is_transient_load_error
    from pipelines.preprocess import PreprocessSpec

    tracker = Tracker(mlflow_server.uri, "gone")
    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.5,), class_names=tuple("0123456789"))
    weights = cnnmodels.create_model("lenet5", num_classes=10, in_chans=1).state_dict()
    save_checkpoint(ModelCheckpoint("lenet5", {}, spec, weights), tmp_path / "best" / "model.pt")
    version = tracker.log_and_register(tracker.start_run("lenet5", {"stage": "train"}), tmp_path / "best", "gone",
                                       "lenet5")
    for stored in (mlflow_server.root / "artifacts").rglob("model.pt"):
        stored.unlink()  # a bucket lifecycle rule, a cleanup by hand
    with pytest.raises(CheckpointError, match="holds no weights-only checkpoint") as gone:
        tracker.download_checkpoint("gone", version, tmp_path / "cache")
    assert not is_transient_load_error(gone.value)
