"""The MLflow side without Ray: champion choice and the registry on a real sqlite store."""

from __future__ import annotations

import json
import socket
import time

import pytest

from pipelines.tracking import CHAMPION, Tracker, choose_champion, ui_hint


def queue_with_a_slow_write(tracker, pending_file):
    """A TrackingQueue with one extra kind of write, ``slow_tags``: fails once as if MLflow were down, then takes
    ``seconds`` and sets the tags."""
    import time

    from pipelines.tracking_queue import TrackingQueue

    class QueueWithASlowWrite(TrackingQueue):
        attempts = 0

        def _do_slow_tags(self, ref, tags, seconds):
            self.attempts += 1
            if self.attempts == 1:
                raise ConnectionError("MLflow is down")
            time.sleep(seconds)
            for key, value in tags.items():
                self.tracker.client.set_tag(ref, key, value)

    return QueueWithASlowWrite(tracker, pending_file)


def flush_interrupted(queue, after_s: float, timeout_s: float) -> None:
    """``queue.flush(timeout_s)`` with a Ctrl-C (SIGINT) ``after_s`` into it."""
    import signal
    import threading

    # Python's own Ctrl-C handler, as a command has it (a Ray driver in the same test session installs another).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(after_s, signal.raise_signal, args=(signal.SIGINT,))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            queue.flush(timeout_s=timeout_s)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)


def test_the_champion_is_the_best_score_and_the_first_among_equals():
    assert choose_champion({"lenet5": 0.91, "resnet18": 0.97, "vgg11_bn": 0.95}) == "resnet18"
    assert choose_champion({"a": 0.9, "b": 0.9}) == "a"
    assert choose_champion({"a": None, "b": 0.5}) == "b"  # unscored aliases rank last
    assert choose_champion({"a": float("nan"), "b": 0.5}) == "b"  # a NaN score is no score (it used to win)
    assert choose_champion({"a": None, "b": None}) is None
    assert choose_champion({"a": None, "b": None}, allow_unscored=True) == "a"  # checkpoint files, no metrics
    assert choose_champion({}) is None
    # Equal test accuracies: the better validation accuracy, then the first (the report's table sorts the same way).
    assert choose_champion({"a": 0.9, "b": 0.9, "c": 0.8}, tiebreak={"a": 0.8, "b": 0.85, "c": 0.99}) == "b"
    assert choose_champion({"a": 0.9, "b": 0.9}, tiebreak={"a": None, "b": 0.1}) == "b"


@pytest.fixture
def tracker(make_config, tmp_path):
    cfg = make_config()
    source = tmp_path / "artifacts"
    source.mkdir()
    tracker = Tracker.for_config(cfg)
    client = tracker.client
    client.create_registered_model(cfg.registered_model_name)
    for alias, test_acc in (("lenet5", "0.91"), ("resnet18", "0.97"), ("alexnet", "0.62")):
        version = client.create_model_version(cfg.registered_model_name, source.as_uri(), tags={"test_acc": test_acc,
                                                                                                "arch": alias})
        client.set_registered_model_alias(cfg.registered_model_name, alias, version.version)
    return cfg, tracker


def test_update_champion_points_the_alias_at_the_best_test_accuracy(tracker):
    cfg, tracker = tracker
    assert tracker.champion_alias(cfg.registered_model_name) is None
    assert tracker.update_champion(cfg.registered_model_name) == ("resnet18", "2")
    versions, champion = tracker.registered_versions(cfg.registered_model_name)
    assert champion == "resnet18" == tracker.champion_alias(cfg.registered_model_name)
    assert [v.alias for v in versions] == ["alexnet", "lenet5", "resnet18"]  # champion itself is not listed
    assert {v.alias: v.uri for v in versions}["lenet5"] == f"models:/{cfg.registered_model_name}/1"
    assert CHAMPION in tracker.client.get_registered_model(cfg.registered_model_name).aliases


def test_a_version_registered_while_the_champion_moves_is_taken_into_account(tracker, tmp_path):
    """Two commands sharing a registered model: the other registered a better resnet18 (moving its alias) after
    this one read the aliases and before it set the champion, which was then left on version 2, an alias no
    model names any more: `serve` found no champion."""
    cfg, tracker = tracker
    name, client = cfg.registered_model_name, tracker.client
    other = Tracker.for_config(cfg).client  # the other command's own client
    set_alias = client.set_registered_model_alias

    def the_other_command_registers_first(model, alias, version):
        if alias == CHAMPION and not other.search_model_versions(f"name='{name}' and tag.arch='resnet18-v2'"):
            newer = other.create_model_version(name, (tmp_path / "artifacts").as_uri(),
                                               tags={"test_acc": "0.99", "arch": "resnet18-v2"})
            other.set_registered_model_alias(name, "resnet18", newer.version)
        set_alias(model, alias, version)

    client.set_registered_model_alias = the_other_command_registers_first
    assert tracker.update_champion(name) == ("resnet18", "4")
    assert tracker.champion(name) == ("resnet18", "4")


def test_database_stores_keep_their_artifacts_in_the_workdir(make_config):
    """A PostgreSQL tracking.uri put artifacts in ./mlruns of the command's directory (under `ray job submit`, a
    temporary copy of the job's working directory); sqlite's went next to the database."""
    for uri in ("postgresql://mlflow:pw@db/mlflow", "postgresql+psycopg2://db/mlflow", "mysql://db/mlflow"):
        cfg = make_config(f"tracking.uri={uri}")
        assert Tracker.for_config(cfg).artifact_root == cfg.paths.mlflow_artifacts.as_uri()
    cfg = make_config()
    assert Tracker.for_config(cfg).artifact_root == cfg.paths.mlflow_artifacts.as_uri()  # sqlite, as before
    assert Tracker.for_config(make_config("tracking.uri=http://head:5000")).artifact_root is None  # the server's


def test_a_deleted_experiment_is_named_with_how_to_restore_it_and_the_command_given_works(make_config):
    """An experiment deleted in MLflow's UI kept its name taken: every stage then failed with MLflow's "must be in
    the 'active' state" (and the report found "no train stage run"), with no way out named."""
    import os
    import re
    import subprocess
    import sys

    from pipelines.tracking import TrackingUnavailable

    cfg = make_config()
    tracker = Tracker.for_config(cfg)
    tracker.client.delete_experiment(tracker.experiment_id)
    fresh = Tracker.for_config(cfg)
    with pytest.raises(TrackingUnavailable, match=r"'test' \(id \d+\) is deleted") as refused:
        fresh.open_stage_run("train", {"stage": "train"}, {}, "{}")
    restore = re.search(r"MLFLOW_TRACKING_URI=(sqlite:///\S+), restore it \(`mlflow (experiments restore "
                        r"--experiment-id \d+)`\)", str(refused.value))
    assert restore and "--backend-store-uri $MLFLOW_TRACKING_URI`" in str(refused.value), refused.value
    assert len(str(refused.value)) - len(restore.group(1)) < 350  # whole on the CLI's one line (400 characters)
    # The command it names brings the experiment back, and the stage opens its run in it.
    subprocess.run([sys.executable, "-m", "mlflow", *restore.group(2).split()], check=True, capture_output=True,
                   env={**os.environ, "MLFLOW_TRACKING_URI": restore.group(1)})
    again = Tracker.for_config(cfg)
    run_id = again.open_stage_run("train", {"stage": "train"}, {}, "{}")
    assert again.client.get_run(run_id).info.experiment_id == tracker.experiment_id


def test_writes_queued_in_an_outage_wait_out_the_retry_back_off(make_config, tmp_path, monkeypatch):
    """Every write queued during an outage (a metric per epoch, from Tune's callbacks) woke the writer from its
    back-off: the oldest write was retried at each one, against a server that was recovering, and the pending
    file rewritten each time (put() waiting for it)."""
    import requests

    from pipelines.tracking_queue import TrackingQueue

    queue = TrackingQueue(Tracker.for_config(make_config()), tmp_path / "pending.json")
    attempts = []

    def unreachable(op):
        attempts.append(time.monotonic())
        raise requests.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(queue, "_execute", unreachable)
    started = time.monotonic()
    for step in range(25):  # 2.5 s of writes, one every 0.1 s
        queue.put("log_metrics", "0123abcd", metrics={"val_acc": 0.5}, step=step)
        time.sleep(0.1)
    left = queue.flush(0.0)
    assert len(left) == 25
    # Retries after 1 s, then 2 s more: three attempts in 2.5 s (there were 25, one per write)
    assert 2 <= len(attempts) <= 4, [round(t - started, 2) for t in attempts]


def test_a_pending_file_that_cannot_be_rewritten_does_not_stop_the_writer(make_config, tmp_path, monkeypatch):
    """Taking a sent write out of the pending file on a full disk raised OSError in the writer thread: it ended,
    and the writes behind it were not sent until the next put or flush."""
    import requests

    from pipelines.tracking_queue import TrackingQueue

    queue = TrackingQueue(Tracker.for_config(make_config()), tmp_path / "pending.json")
    sent, saves = [], []
    real_save = queue._save_pending

    def once_down(op):
        if not sent and not saves:
            raise requests.exceptions.ConnectionError("Connection refused")  # an outage: the backlog goes to disk
        sent.append(op.args["step"])

    def full_disk_once(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the first save after the outage: the sent write taken out of the file
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(queue, "_execute", once_down)
    monkeypatch.setattr(queue, "_save_pending", full_disk_once)
    monkeypatch.setattr("pipelines.tracking_queue.DRAIN_SAVE_INTERVAL_S", 0.0)  # the file follows every write
    for step in range(3):
        queue.put("log_metrics", "0123abcd", metrics={"val_acc": 0.5}, step=step)
    deadline = time.monotonic() + 10
    while len(sent) < 3 and time.monotonic() < deadline:  # by the writer alone: no flush to restart it
        time.sleep(0.1)
    assert sent == [0, 1, 2]
    assert queue.flush(1.0) == [] and not (tmp_path / "pending.json").exists()


def test_a_restored_trial_reopens_the_run_an_earlier_command_left_in_the_pending_file(make_config, tmp_path,
                                                                                         monkeypatch):
    """A resumed search's trial whose run id came from the pending file an interrupted command left (with a
    write MLflow had not taken) was neither found nor reopened: its run stayed KILLED while it trained again."""
    import requests

    from pipelines.tracking_queue import TrackingQueue

    tracker = Tracker.for_config(make_config())
    parent = tracker.start_run("search", {"stage": "search"})
    pending = tmp_path / "pending.json"
    ref, find = "local:trial:p:search:t1", "tags.`cnnzoo.trial` = 't1'"
    first = TrackingQueue(tracker, pending)
    first.trial_run(ref, find, "trial-t1", {"cnnzoo.trial": "t1"}, parent)
    assert first.flush(5.0) == []
    run_id = first.run_ids[ref]

    def unreachable(op):
        raise requests.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(first, "_execute", unreachable)  # the interruption: its run's end left unsent
    first.put("end_run", ref, status="KILLED")
    assert len(first.flush(0.0)) == 1 and pending.exists()

    second = TrackingQueue(tracker, pending)  # the re-run: the end is sent, then the restored trial starts
    second.trial_run(ref, find, "trial-t1", {"cnnzoo.trial": "t1"}, parent)
    second.put("log_metrics", ref, metrics={"val_acc": 0.5}, step=1)
    assert second.flush(5.0) == []
    assert second.run_ids[ref] == run_id and tracker.client.get_run(run_id).info.status == "RUNNING"

    # A trial that failed (its error tagged) and is restored: running again, the old error kept aside, not shown
    # as the error of a run that then finishes
    tracker.client.set_tag(run_id, "error", "RuntimeError: out of memory")
    tracker.end_run(run_id, "FAILED")
    tracker.reopen(run_id)
    tags = tracker.client.get_run(run_id).data.tags
    assert "error" not in tags and tags["previous_error"] == "RuntimeError: out of memory"


def test_a_restored_trial_reopens_its_run_when_its_whole_first_attempt_was_left_pending(make_config, tmp_path,
                                                                                          monkeypatch):
    """MLflow down from before a trial started until the command stopped: the re-run's queue sent the pending
    start, error and end (FAILED), then the restored trial's own start found the run as its own and neither
    reopened nor found it: FAILED with the traceback while it trained again, FINISHED with it after."""
    import requests

    from pipelines.tracking_queue import TrackingQueue

    tracker = Tracker.for_config(make_config())
    parent = tracker.start_run("search", {"stage": "search"})
    pending = tmp_path / "pending.json"
    ref, find = "local:trial:p:search:t1", "tags.`cnnzoo.trial` = 't1'"
    first = TrackingQueue(tracker, pending)

    def unreachable(op):
        raise requests.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(first, "_execute", unreachable)
    first.trial_run(ref, find, "trial-t1", {"cnnzoo.trial": "t1"}, parent)
    first.put("log_metrics", ref, metrics={"val_acc": 0.3}, step=0)
    first.put("set_tags", ref, tags={"error": "RuntimeError: out of memory"})
    first.put("end_run", ref, status="FAILED")
    assert len(first.flush(0.0)) == 4 and pending.exists()

    second = TrackingQueue(tracker, pending)  # MLflow back: the first attempt goes out, then the restored trial
    second.trial_run(ref, find, "trial-t1", {"cnnzoo.trial": "t1"}, parent)
    second.put("log_metrics", ref, metrics={"val_acc": 0.5}, step=1)
    assert second.flush(5.0) == []
    run = tracker.client.get_run(second.run_ids[ref])
    assert run.info.status == "RUNNING"
    assert "error" not in run.data.tags and run.data.tags["previous_error"] == "RuntimeError: out of memory"
    assert len(tracker.client.search_runs([run.info.experiment_id], "tags.`cnnzoo.trial` = 't1'")) == 1
    second.put("end_run", ref, status="FINISHED")
    assert second.flush(5.0) == [] and tracker.client.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_missing_registered_model_is_a_lookup_error(make_config):
    tracker = Tracker.for_config(make_config())
    with pytest.raises(LookupError, match="train first"):
        tracker.registered_versions("nothing-here")
    assert tracker.champion_alias("nothing-here") is None
    assert tracker.update_champion("nothing-here") is None


def test_the_ui_hint_opens_the_model_training_view():
    hint = ui_hint("sqlite:////tmp/mlflow.db", "7")
    assert "mlflow ui --backend-store-uri 'sqlite:////tmp/mlflow.db'" in hint  # quoted: a URI may hold & or ?
    assert "#/experiments/7/runs?workflowType=machine_learning" in hint
    assert ui_hint("http://head:5000", "3") == "open http://head:5000/#/experiments/3/runs?workflowType=machine_learning"
    # a cluster head's private address (what cluster.yaml exports): the laptop's way in is the SSH tunnel
    on_cluster = ui_hint("http://172.31.5.9:5000", "3")
    assert on_cluster.startswith("open http://172.31.5.9:5000/#/experiments/3/")
    assert "ssh -L 5001:172.31.5.9:5000" in on_cluster  # 5001 on the laptop, as the README's tunnel: AirPlay
    assert "http://127.0.0.1:5001/#/experiments/3/runs?workflowType=machine_learning" in on_cluster
    assert "tunnel" not in ui_hint("http://127.0.0.1:5000", "3") + ui_hint("http://34.210.1.5:5000", "3")
    assert "ssh -L 5001:[fd00::7]:443 " in ui_hint("https://[fd00::7]", "3")  # brackets; no root port locally
    assert "ssh -L 8080:10.0.0.1:8080 " in ui_hint("http://10.0.0.1:8080", "3")  # another port: the same locally
    assert "http://127.0.0.1:5001/mlflow/#/experiments/3/" in ui_hint("http://10.0.0.5:5000/mlflow/", "3")  # prefix


def test_a_write_no_retry_can_send_is_dropped_and_the_writes_behind_it_go_out(make_config, tmp_path):
    """A diverged model's checkpoint (NaN weights) cannot be registered, ever: retrying it as if MLflow were down
    would hold up every write behind it until the stage gave up (exit 3), and every later `register` too."""
    import torch

    import cnnmodels
    from pipelines.checkpoints import ModelCheckpoint, save_checkpoint
    from pipelines.preprocess import PreprocessSpec
    from pipelines.tracking_queue import TrackingQueue

    cfg = make_config()
    tracker = Tracker.for_config(cfg)
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    model = cnnmodels.create_model("lenet5", num_classes=10, in_chans=1)
    weights = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in model.state_dict().items()}
    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.5,), class_names=tuple("0123456789"))
    save_checkpoint(ModelCheckpoint(arch="lenet5", model_kwargs={}, spec=spec, state_dict=weights),
                    tmp_path / "diverged" / "model.pt")
    queue = TrackingQueue(tracker, tmp_path / "pending.json")
    from pipelines.results import ModelResult

    record = ModelResult(model_name="lenet5", arch="lenet5", model_kwargs={}, run_name="r", fingerprint="f",
                         input_size=32, params_count=1, macs=1, epochs=1, best_val_acc=0.1, best_epoch=0,
                         test_acc=float("nan"), train_images_per_sec=1.0, train_seconds=1.0,
                         checkpoint_path="").save(tmp_path / "train")
    queue.put("register", run_id, checkpoint_path=str(tmp_path / "diverged"), storage_path=str(tmp_path),
              registered_model=cfg.registered_model_name, alias="lenet5", tags={}, result_file=str(record))
    queue.put("log_metrics", run_id, metrics={"test_acc": 0.1})
    queue.put("set_tags", "local:never-created", tags={"a": "b"})  # its run's creation was dropped
    assert queue.flush(timeout_s=20) == []
    assert len(queue.dropped) == 2 and "NaN" in queue.dropped[0] and "never created" in queue.dropped[1]
    assert queue.dropped_registrations == [("lenet5", "")]  # the train stage fails for it (by alias and fingerprint)
    # A file to log that is gone (deleted since it was queued): dropped, not retried as an outage (it held up
    # every write behind it, and the stage waited out tracking.pending_timeout_s to exit 3).
    queue.put("log_artifact", run_id, path=str(tmp_path / "deleted-since.json"))
    queue.put("log_metrics", run_id, metrics={"after_the_artifact": 1.0})
    assert queue.flush(timeout_s=20) == [] and "deleted-since.json to log is gone" in queue.dropped[2]
    # The search's result goes as its text, queued with it: the file may be gone or rewritten before the write
    # goes out (`search --force` deletes it first), which dropped it, or logged the next search's result.
    queue.put("log_text", run_id, text='{"best": 1}', artifact_file="best.json")
    assert queue.flush(timeout_s=20) == [] and len(queue.dropped) == 3
    assert open(tracker.client.download_artifacts(run_id, "best.json", str(tmp_path))).read() == '{"best": 1}'
    assert tracker.client.get_run(run_id).data.metrics["after_the_artifact"] == 1.0
    del queue.dropped[2]
    # Noted in the model's record: the next train stage does not run it again to register it (and fail again).
    assert "NaN" in ModelResult.load(record).registration_error
    assert tracker.client.get_run(run_id).data.metrics["test_acc"] == 0.1
    assert not (tmp_path / "pending.json").exists()
    # A registration for a run deleted in MLflow's UI (MLflow: INTERNAL_ERROR, as for an unreachable server).
    deleted = tracker.start_run("vgg11", {"stage": "train"})
    save_checkpoint(ModelCheckpoint(arch="lenet5", model_kwargs={}, spec=spec, state_dict=model.state_dict()),
                    tmp_path / "fine" / "model.pt")
    tracker.client.delete_run(deleted)
    queue.put("register", deleted, checkpoint_path=str(tmp_path / "fine"), storage_path=str(tmp_path),
              registered_model=cfg.registered_model_name, alias="vgg11", tags={})
    queue.put("set_tags", run_id, tags={"behind": "the deleted run's write"})
    assert queue.flush(timeout_s=20) == []
    assert len(queue.dropped) == 3 and "was deleted in MLflow" in queue.dropped[2]
    assert tracker.client.get_run(run_id).data.tags["behind"] == "the deleted run's write"
    # A checkpoint gone from a storage that answers (deleted by hand): retried, it held up every write behind
    # it, in this stage and every later one. Dropped, and not noted as unregistrable: the next train stage
    # finds the model missing from the registry and trains it again.
    trained = ModelResult.load(record)
    trained.model_name, trained.registration_error = "resnet18", ""
    trained = trained.save(tmp_path / "train")
    queue.put("register", run_id, checkpoint_path=str(tmp_path / "storage" / "checkpoint_000002"),
              storage_path=str(tmp_path), registered_model=cfg.registered_model_name, alias="resnet18", tags={},
              result_file=str(trained))
    queue.put("set_tags", run_id, tags={"behind": "the gone checkpoint's write"})
    assert queue.flush(timeout_s=20) == []
    assert len(queue.dropped) == 4 and "checkpoint_000002) is gone from" in queue.dropped[3]
    assert tracker.client.get_run(run_id).data.tags["behind"] == "the gone checkpoint's write"
    assert ModelResult.load(trained).registration_error == ""
    # A checkpoint whose storage itself is not there (a volume not mounted) may come back: retried, then pending.
    unmounted = tmp_path / "unmounted"
    missing = queue.put("register", run_id, checkpoint_path=str(unmounted / "checkpoint_000002"),
                        storage_path=str(unmounted), registered_model=cfg.registered_model_name, alias="lenet5",
                        tags={})
    assert [op.seq for op in queue.flush(timeout_s=2)] == [missing] and len(queue.dropped) == 4
    assert (tmp_path / "pending.json").exists()


def trained_lenet5(cfg, tmp_path, fingerprint: str = "f", epochs: int = 1):
    """A tracked lenet5 training to register: (tracker, its run id, its good checkpoint's directory, its result
    record's path)."""
    import cnnmodels
    from pipelines.checkpoints import ModelCheckpoint, save_checkpoint
    from pipelines.preprocess import PreprocessSpec
    from pipelines.results import ModelResult

    tracker = Tracker.for_config(cfg)
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    model = cnnmodels.create_model("lenet5", num_classes=10, in_chans=1)
    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.5,), class_names=tuple("0123456789"))
    save_checkpoint(ModelCheckpoint(arch="lenet5", model_kwargs={}, spec=spec, state_dict=model.state_dict()),
                    tmp_path / "good" / "model.pt")
    record = ModelResult(model_name="lenet5", arch="lenet5", model_kwargs={}, run_name="r", fingerprint=fingerprint,
                         input_size=32, params_count=1, macs=1, epochs=epochs, best_val_acc=0.1, best_epoch=0,
                         test_acc=0.5, train_images_per_sec=1.0, train_seconds=1.0,
                         checkpoint_path="").save(tmp_path / "train")
    return tracker, run_id, tmp_path / "good", record


def test_a_registration_whose_storage_fails_to_read_is_retried_not_dropped(make_config, tmp_path, monkeypatch):
    """An EIO from the (NFS) storage while the registration reads a good checkpoint: retried as an outage, then
    registered once the storage answers. It was read as a corrupt checkpoint: dropped for good, and the model's
    record marked unregistrable, so no later train stage registered it."""
    import errno

    import torch

    from pipelines.results import ModelResult
    from pipelines.tracking_queue import TrackingQueue

    cfg = make_config()
    tracker, run_id, _, record = trained_lenet5(cfg, tmp_path)
    real_load = torch.load

    def storage_fails(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "load", storage_fails)
    queue = TrackingQueue(tracker, tmp_path / "pending.json")
    register = queue.put("register", run_id, checkpoint_path=str(tmp_path / "good"), storage_path=str(tmp_path),
                         registered_model=cfg.registered_model_name, alias="lenet5", tags={},
                         result_file=str(record))
    assert [op.seq for op in queue.flush(timeout_s=2)] == [register]
    assert queue.dropped == [] and ModelResult.load(record).registration_error == ""
    monkeypatch.setattr(torch, "load", real_load)  # the storage answers again
    assert queue.flush(timeout_s=30) == [] and queue.dropped == []
    assert tracker.client.get_model_version_by_alias(cfg.registered_model_name, "lenet5").run_id == run_id


def test_a_registration_retried_after_its_version_went_through_needs_no_checkpoint(make_config, tmp_path):
    """A registration whose version was created but whose alias was not set (MLflow down in between) was retried by
    reading the checkpoint first: gone meanwhile (retention), the retry was dropped, and the model kept a version
    without an alias, never served and never trained again."""
    import shutil

    from pipelines.tracking_queue import TrackingQueue

    cfg = make_config()
    tracker, run_id, checkpoint, record = trained_lenet5(cfg, tmp_path)
    tags = {"fingerprint": "f", "epochs": "1"}
    version = tracker.log_and_register(run_id, checkpoint, cfg.registered_model_name, "lenet5", tags)
    tracker.client.delete_registered_model_alias(cfg.registered_model_name, "lenet5")  # the alias never set
    shutil.rmtree(checkpoint)
    queue = TrackingQueue(tracker, tmp_path / "pending.json")
    queue.put("register", run_id, checkpoint_path=str(checkpoint), storage_path=str(tmp_path),
              registered_model=cfg.registered_model_name, alias="lenet5", tags=tags, result_file=str(record))
    assert queue.flush(timeout_s=10) == [] and queue.dropped == []
    assert str(tracker.client.get_model_version_by_alias(cfg.registered_model_name, "lenet5").version) == version
    assert len(tracker.client.search_model_versions(f"name = '{cfg.registered_model_name}'")) == 1


def test_a_write_whose_run_another_command_is_still_creating_waits_for_it(make_config, tmp_path):
    """A stage's flush gave up while its write creating a run was on its way (a slow server): it still sends that
    one, and the next command takes the writes behind it. Those were dropped as "never created" (the run's
    metrics, end and registration lost). They wait for the run, whose id the first command writes down; and
    if that command is gone before its write went out, the run is created in its place."""
    import subprocess
    import sys

    from pipelines.tracking_queue import TrackingQueue

    cfg = make_config()
    tracker = Tracker.for_config(cfg)
    pending_file = tmp_path / "pending.json"

    def held_creation(ref: str, holder: subprocess.Popen) -> None:
        creating = {"seq": 1, "kind": "start_run", "ref": ref, "uid": f"creating-{ref}",
                    "args": {"run_name": ref.removeprefix("local:"), "tags": {}, "parent": None}}
        pending_file.write_text(json.dumps({
            "tracking_uri": cfg.tracking_uri, "run_ids": {}, "ops": [creating],
            "claims": {creating["uid"]: {"token": "first", "pid": holder.pid, "host": socket.gethostname(),
                                         "at": time.time()}}}))

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the first command
    try:
        held_creation("local:slow", holder)
        queue = TrackingQueue(tracker, pending_file)
        assert len(queue) == 0  # the creation is the first command's
        queue.put("set_tags", "local:slow", tags={"note": "behind the creation"})
        # Retried meanwhile, not dropped; and the stage's end waits for it no longer than for MLflow itself.
        started = time.monotonic()
        assert [op.kind for op in queue.flush(timeout_s=2)] == ["set_tags"] and queue.dropped == []
        assert time.monotonic() - started < 20
        # The first command's write goes through: it takes the write out and notes the run's id.
        run_id = tracker.start_run("slow", {})
        body = json.loads(pending_file.read_text())
        body["ops"] = [op for op in body["ops"] if op["kind"] != "start_run"]
        body["run_ids"]["local:slow"] = run_id
        scratch = tmp_path / "pending.json.tmp"  # replaced whole, as the queue writes it: it is reading it now
        scratch.write_text(json.dumps(body))
        scratch.replace(pending_file)
        assert queue.flush(timeout_s=30) == [] and queue.dropped == []
        assert tracker.client.get_run(run_id).data.tags["note"] == "behind the creation"

        held_creation("local:orphaned", holder)
        queue = TrackingQueue(tracker, pending_file)
        queue.put("set_tags", "local:orphaned", tags={"note": "its creator died"})
        holder.kill()  # the first command dies with its write to create the run still in the file
        holder.wait()
        assert queue.flush(timeout_s=30) == [] and queue.dropped == []
        [orphan] = tracker.client.search_runs([tracker.experiment_id], "attributes.run_name = 'orphaned'")
        assert orphan.data.tags["note"] == "its creator died"
        assert not pending_file.exists()  # the creation was taken out with the rest
    finally:
        holder.kill()
        holder.wait()


def test_metrics_and_run_ends_keep_the_time_they_were_queued_at(make_config, tmp_path, monkeypatch):
    """Sent after an outage, a metric kept its step but took the time it was sent at, and a run ended then: its
    duration in the UI included the outage. And a metric resent after a lost reply was a second point."""
    import time

    from pipelines.tracking_queue import TrackingQueue

    cfg = make_config()
    tracker = Tracker.for_config(cfg)
    real_start_run, real_log_metrics, real_end_run = tracker.start_run, tracker.log_metrics, tracker.end_run
    state = {"down": True, "replies_lost": 0}

    def start_run(*args, **kwargs):
        if state["down"]:
            raise ConnectionError("MLflow is down")
        return real_start_run(*args, **kwargs)

    def log_metrics(*args, **kwargs):
        if state["down"]:
            raise ConnectionError("MLflow is down")
        real_log_metrics(*args, **kwargs)
        if state["replies_lost"] == 0:  # it went through, but its reply is lost: sent again
            state["replies_lost"] += 1
            raise ConnectionError("connection reset before the reply")

    def end_run(*args, **kwargs):
        if state["down"]:
            raise ConnectionError("MLflow is down")
        real_end_run(*args, **kwargs)

    monkeypatch.setattr(tracker, "start_run", start_run)
    monkeypatch.setattr(tracker, "log_metrics", log_metrics)
    monkeypatch.setattr(tracker, "end_run", end_run)
    queue = TrackingQueue(tracker, tmp_path / "pending.json")
    before = int(time.time() * 1000)
    ref = queue.new_run("lenet5", {"stage": "train"})
    queue.put("log_metrics", ref, metrics={"val_acc": 0.5}, step=0)
    queue.put("end_run", ref, status="FINISHED")
    queued = int(time.time() * 1000)
    time.sleep(0.5)  # sent at least this much later: time enough to tell the two apart
    state["down"] = False
    assert queue.flush(timeout_s=30) == [] and queue.dropped == [] and state["replies_lost"] == 1
    run_id = queue.run_id(ref)
    [point] = tracker.client.get_metric_history(run_id, "val_acc")
    assert before <= point.timestamp <= queued
    run = tracker.client.get_run(run_id)  # started and ended when it did, not when MLflow was back
    assert run.info.status == "FINISHED" and before <= run.info.start_time <= run.info.end_time <= queued


def test_a_trial_starting_in_an_outage_gets_its_run_under_its_parent_once_mlflow_is_back(make_config, tmp_path,
                                                                                          monkeypatch):
    """A Tune trial that starts while MLflow is down (a stage's next model, a search trial): its find-or-create
    run is queued like any write, and created under the stage's run with what was logged to it once MLflow is
    back (not reopened from another trial's, not lost)."""
    from pipelines.tracking_queue import TrackingQueue

    tracker = Tracker.for_config(make_config())
    parent = tracker.start_run("train", {"stage": "train"})
    tracker.start_run("lenet5", {"stage": "train", "ray.trial_id": "t0"}, parent)  # an earlier trial's
    state = {"down": True, "tries": 0}
    real_find_run, real_start_run = tracker.find_run, tracker.start_run

    def find_run(*args, **kwargs):
        state["tries"] += 1
        if state["down"]:
            raise ConnectionError("MLflow is down")
        return real_find_run(*args, **kwargs)

    def start_run(*args, **kwargs):
        if state["down"]:
            raise ConnectionError("MLflow is down")
        return real_start_run(*args, **kwargs)

    monkeypatch.setattr(tracker, "find_run", find_run)
    monkeypatch.setattr(tracker, "start_run", start_run)
    queue = TrackingQueue(tracker, tmp_path / "pending.json")
    ref = queue.trial_run("local:trial:t1", find="tags.`ray.trial_id` = 't1' and tags.stage = 'train'",
                          run_name="alexnet", tags={"stage": "train", "ray.trial_id": "t1"}, parent=parent)
    queue.put("log_metrics", ref, metrics={"val_acc": 0.5}, step=0)
    deadline = time.monotonic() + 10
    while state["tries"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state["tries"] >= 1 and queue.run_id(ref) is None  # tried, and not created while MLflow is down
    state["down"] = False
    assert queue.flush(timeout_s=30) == [] and queue.dropped == []
    run = tracker.client.get_run(queue.run_id(ref))
    assert run.info.run_name == "alexnet" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["ray.trial_id"] == "t1"
    assert [m.value for m in tracker.client.get_metric_history(run.info.run_id, "val_acc")] == [0.5]


def test_a_checkpoint_this_process_may_not_read_is_not_marked_unregistrable(make_config, tmp_path, monkeypatch):
    """A checkpoint whose permissions keep this process out (NFS root-squash, another uid): no retry changes that,
    so the registration is dropped, but the model is not marked unregistrable for good: the next train stage
    registers it from its checkpoint once the permissions are mended."""
    import errno

    import torch

    from pipelines.results import ModelResult
    from pipelines.tracking_queue import TrackingQueue

    cfg = make_config()
    tracker, run_id, _, record = trained_lenet5(cfg, tmp_path)

    def no_permission(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "load", no_permission)
    queue = TrackingQueue(tracker, tmp_path / "pending.json")
    queue.put("register", run_id, checkpoint_path=str(tmp_path / "good"), storage_path=str(tmp_path),
              registered_model=cfg.registered_model_name, alias="lenet5", tags={}, result_file=str(record))
    assert queue.flush(timeout_s=30) == [] and "Permission denied" in queue.dropped[0]
    assert ModelResult.load(record).registration_error == ""


def test_a_stale_registration_leaves_the_record_of_a_newer_training_alone(make_config, tmp_path):
    """A registration left pending by an earlier command (fingerprint f-old), sent after the model was trained
    again with other settings: it wrote its version into the new training's record, which then claimed to be
    registered (and served as that version) with the new training's accuracy."""
    from pipelines.results import ModelResult
    from pipelines.tracking_queue import TrackingQueue

    cfg = make_config()
    tracker, run_id, _, record = trained_lenet5(cfg, tmp_path, fingerprint="f-new", epochs=5)
    queue = TrackingQueue(tracker, tmp_path / "pending.json")
    for fingerprint, epochs in (("f-old", 5), ("f-new", 3), ("f-new", 5)):
        queue.put("register", run_id, checkpoint_path=str(tmp_path / "good"), storage_path=str(tmp_path),
                  registered_model=cfg.registered_model_name, alias="lenet5", result_file=str(record),
                  tags={"fingerprint": fingerprint, "epochs": epochs})
        assert queue.flush(timeout_s=30) == [] and queue.dropped == []
        expected = "3" if fingerprint == "f-new" and epochs == 5 else ""
        assert ModelResult.load(record).version == expected, (fingerprint, epochs)


def test_report_and_serve_send_what_an_earlier_stage_left_pending_first(make_config):
    """README: any later stage of the same config sends the pending writes first (here the stages then stop
    for want of trained models, after sending)."""
    import json

    from pipelines.report import report_stage
    from pipelines.serve import serve_stage
    from pipelines.tracking_queue import PENDING_FILE

    cfg = make_config()
    tracker = Tracker.for_config(cfg)
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    pending = cfg.paths.run_dir / PENDING_FILE
    for stage in (report_stage, serve_stage):
        pending.parent.mkdir(parents=True, exist_ok=True)
        pending.write_text(json.dumps({"tracking_uri": tracker.tracking_uri, "run_ids": {}, "ops": [
            {"seq": 1, "kind": "set_tags", "ref": run_id, "args": {"tags": {"sent_by": stage.__name__}}}]}))
        with pytest.raises(LookupError):
            stage(cfg)
        assert tracker.client.get_run(run_id).data.tags["sent_by"] == stage.__name__
        assert not pending.exists()


def test_writes_taken_over_from_the_pending_file_leave_it_as_they_go_out(make_config, tmp_path):
    """A stage that picked up an earlier stage's pending writes and is killed before its end (before flush)
    must not leave them in the file: the next command would send them again (a second model version)."""
    import json
    import time

    from pipelines.tracking_queue import TrackingQueue

    cfg = make_config()
    tracker = Tracker.for_config(cfg)
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    pending = tmp_path / "pending.json"
    pending.write_text(json.dumps({"tracking_uri": tracker.tracking_uri, "run_ids": {}, "ops": [
        {"seq": i, "kind": "log_metrics", "ref": run_id, "args": {"metrics": {"m": float(i)}, "step": i}}
        for i in range(1, 4)]}))
    queue = TrackingQueue(tracker, pending)
    queue.put("set_tags", run_id, tags={"stage_went_on": "yes"})  # the stage's own writes start the sending
    deadline = time.monotonic() + 60
    while len(queue) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(queue) == 0
    assert not pending.exists()  # without any flush: the process could die here
    history = tracker.client.get_metric_history(run_id, "m")
    assert sorted(m.value for m in history) == [1.0, 2.0, 3.0]


def test_an_unreachable_registry_is_not_read_as_nothing_registered(tmp_path, caplog, monkeypatch):
    """During an outage a queued champion update used to count as sent (the registry's failure read as "not
    found", so update_champion returned None) and left the pending file: the alias was never set."""
    from pipelines.tracking_queue import TrackingQueue

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not after retries
    down = Tracker("http://127.0.0.1:9", "x")  # nothing listens on port 9
    with pytest.raises(Exception) as info:
        down.update_champion("m")
    assert not isinstance(info.value, LookupError)
    queue = TrackingQueue(down, tmp_path / "pending.json")
    queue.put("update_champion", registered_model="m")
    assert [op.kind for op in queue.flush(timeout_s=3)] == ["update_champion"]
    assert (tmp_path / "pending.json").exists() and not queue.dropped
    # An error without a message (TimeoutError()) killed the writer thread while it logged the outage.
    queue._down_since = None
    queue._note_outage(TimeoutError())
    assert "unreachable (TimeoutError)" in caplog.text


def test_a_tracking_password_stays_out_of_logs_errors_and_served_model_errors(tmp_path, caplog, capsys,
                                                                               monkeypatch):
    """MLflow's client quotes the full URL of a request that failed, credentials included: the outage warning,
    the stage's TrackingUnavailable and a served model's load error (sent to HTTP clients) printed the password
    beside the masked URI."""
    import logging

    from pipelines.config import redact_text
    from pipelines.console import configure_console
    from pipelines.model_store import ServedModel
    from pipelines.tracking import TrackingUnavailable
    from pipelines.tracking_queue import TrackingQueue

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = Tracker("http://alice:s3cret@127.0.0.1:9", "x")  # nothing listens on port 9
    queue = TrackingQueue(down, tmp_path / "pending.json")
    queue.put("update_champion", registered_model="m")
    assert queue.flush(timeout_s=3) and "unreachable" in caplog.text
    with pytest.raises(TrackingUnavailable) as unavailable:
        down.open_stage_run("stage", {}, {}, "a: 1\n")
    with pytest.raises(Exception) as raw:
        down.update_champion("m")
    assert "s3cret" in str(raw.value)  # what MLflow says, unmasked: the case the masking is for
    for text, masked in (("http://u:p@ss@h/x", "http://u:***@h/x"),  # an unencoded @ in the password
                         ("http://host:5000/path?email=a@b.com ok", None),  # an @ in the query is no password
                         ("_http://alice:s3cret@h/x", "_http://alice:***@h/x"),
                         ("GET http://h/api?password=hunter2 failed: 401\nmore", "GET http://h/api?password=*** "
                                                                                   "failed: 401\nmore"),
                         ("postgresql://u:pa/ss@db/mlflow down", "postgresql://u:***@db/mlflow down")):
        assert redact_text(text) == (masked or text), text
    served = ServedModel(alias="m", source="registry")
    served.mark_failed(raw.value)
    configure_console()
    logging.getLogger("pipelines.test").error("error: %s", raw.value)
    try:  # --debug logs the traceback, whose chained errors quote the URL too
        raise RuntimeError("stage failed") from raw.value
    except RuntimeError:
        logging.getLogger("pipelines.test").exception("error")
    printed = capsys.readouterr().err
    assert "Traceback" in printed
    for text in (caplog.text, str(unavailable.value), served.error, printed):
        assert "s3cret" not in text and "alice:***@127.0.0.1:9" in text, text


@pytest.mark.slow
def test_a_write_still_in_flight_when_flush_gives_up_leaves_the_pending_file_once_it_succeeds(make_config, tmp_path,
                                                                                              monkeypatch):
    """After an outage, a slow retry (a model upload) can outlast flush(): it was saved as pending and, when it
    then succeeded, stayed in the file, so the next `register` sent it again (a second model version); a later
    stage in the same process read the file while the write was still in flight and sent it again too."""
    import threading

    from pipelines.tracking_queue import TrackingQueue

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "0")
    monkeypatch.setattr("pipelines.tracking_queue.IN_FLIGHT_SLACK_S", 1.0)  # flush waits 1 s for it in flight
    tracker = Tracker.for_config(make_config())
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    queue = queue_with_a_slow_write(tracker, tmp_path / "pending.json")
    queue.put("slow_tags", run_id, tags={"sent": "late"}, seconds=5)
    assert [op.kind for op in queue.flush(timeout_s=2)] == ["slow_tags"]  # the retry starts after 1 s
    assert (tmp_path / "pending.json").exists()
    writer: threading.Thread = queue._thread
    assert writer.is_alive()
    # The next stage of the same `run` opens the file meanwhile: it loaded the write and sent it a second time.
    # It waits for the write in flight instead, and finds it sent.
    later = TrackingQueue(tracker, tmp_path / "pending.json")
    assert len(later) == 0 and queue.attempts == 2
    assert not writer.is_alive() and tracker.client.get_run(run_id).data.tags["sent"] == "late"
    assert not (tmp_path / "pending.json").exists()  # sent: not left for `register` to send twice


def test_writes_pending_for_another_tracking_store_are_neither_sent_here_nor_lost(make_config, capsys, monkeypatch):
    """After tracking.uri changed, the pending writes (run ids of the old store) were sent to the new one, refused
    and dropped, and the stage's end overwrote or deleted the file: refused instead, exit 2, the file untouched."""
    import json

    from pipelines.__main__ import main
    from pipelines.config import ConfigError
    from pipelines.tracking_queue import PENDING_FILE, TrackingQueue

    cfg = make_config()
    pending = cfg.paths.run_dir / PENDING_FILE
    pending.parent.mkdir(parents=True, exist_ok=True)
    body = {"tracking_uri": "postgresql://mlflow:s3cret@db:5432/mlflow", "run_ids": {},
            "ops": [{"seq": 1, "kind": "set_tags", "ref": "0123abcd", "args": {"tags": {"a": "b"}}}]}
    pending.write_text(json.dumps(body))
    with pytest.raises(ConfigError) as info:
        TrackingQueue.for_config(cfg)
    assert info.value.key == "tracking.uri" and "(postgresql://mlflow:***@db:5432/mlflow)" in str(info.value)
    assert "s3cret" not in str(info.value)
    assert main(["register", "--set", f"workdir={cfg.workdir}", "--set", f"name={cfg.name}"]) == 2
    assert "config error: tracking.uri" in capsys.readouterr().err
    assert json.loads(pending.read_text()) == body
    # The stages say so before Ray starts (they found out after starting it and planning every model).
    import pipelines.runtime

    def no_ray(cfg):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(pipelines.runtime, "ray_session", no_ray)
    assert main(["train", "--set", f"workdir={cfg.workdir}", "--set", f"name={cfg.name}"]) == 2
    assert "config error: tracking.uri" in capsys.readouterr().err
    # A file written for this store under its relative name (before relative sqlite URIs were made absolute) is
    # this store's: it loads, where the command runs as it did then.
    monkeypatch.chdir(cfg.paths.mlflow_db.parent)
    pending.write_text(json.dumps({**body, "tracking_uri": f"sqlite:///{cfg.paths.mlflow_db.name}"}))
    assert len(TrackingQueue.for_config(cfg)) == 1


def test_a_second_command_of_the_same_config_does_not_run_a_stage_beside_the_first(make_config):
    """Two commands of one config (a job submitted twice) shared the Train run directories: each resumed from
    the other's checkpoints while pruning deleted the other's, and every model was registered twice."""
    import subprocess
    import sys

    from pipelines.runtime import StageBusyError
    from pipelines.search import search_stage
    from pipelines.train import train_stage

    cfg = make_config()
    cfg.paths.run_dir.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(  # another command, in its own process, in the middle of both stages
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; "
         f"locks = [FileLock({str(cfg.paths.run_dir)!r} + f'/.{{s}}.lock') for s in ('train', 'search')]; "
         "[lock.acquire() for lock in locks]; print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for stage in (train_stage, search_stage):
            with pytest.raises(StageBusyError, match="another command is running the"):
                stage(cfg)
    finally:
        holder.kill()
        holder.wait()


def test_a_second_command_is_refused_before_its_ray_starts(tmp_path, pipelines_cli):
    """The lock was found held only once the stage began, after Ray had started (about 24 s): the command says
    so at once, before Ray (the address names a port nothing listens on: a command that tried Ray would hang)."""
    import subprocess
    import sys

    run_dir = tmp_path / "test"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from filelock import FileLock; "
         f"lock = FileLock({str(run_dir / '.search.lock')!r}); lock.acquire(); print('held', flush=True); "
         "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in (["search"], ["run", "--stages", "search,train"]):
            out = pipelines_cli(*command, "--set", f"workdir={tmp_path}", "--set", "name=test",
                                "--set", "ray.address=127.0.0.1:1")
            assert out.returncode == 1 and not out.started_ray, out.stderr
            assert "another command is running the search stage of this config" in out.stderr
        # A command that runs no stage held by the other is not refused (the report: it needs no Ray either)
        out = pipelines_cli("run", "--stages", "report", "--set", f"workdir={tmp_path}", "--set", "name=test")
        assert "another command is running" not in out.stderr and "no trained models under" in out.stderr
        assert not out.started_ray
    finally:
        holder.kill()
        holder.wait()


def test_a_workdir_that_cannot_be_locked_runs_its_stage_unguarded(tmp_path, monkeypatch, caplog):
    """A filesystem without locks (NFSv3 without its lock daemon: ENOLCK) failed every stage once they locked."""
    import errno
    import logging

    import filelock

    from pipelines.runtime import exclusive_stage

    def no_locks(self, *args, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(filelock.FileLock, "acquire", no_locks)
    ran = []
    with caplog.at_level(logging.WARNING, logger="pipelines"), exclusive_stage(tmp_path / "run", "train"):
        ran.append(True)
    assert ran and "cannot be locked (" in caplog.text and "No locks available" in caplog.text


def test_another_users_lock_file_is_refused_while_held_and_locked_otherwise(tmp_path, monkeypatch):
    """In a workdir shared by several users, a lock file of another user (0644 under umask 022, or any in a
    sticky directory) cannot be opened for writing: read as a filesystem without locks, the stage ran unguarded
    beside that user's command. (As root, which opens any file, the operating system's refusal is stood in for;
    the other user's command is a real process holding the lock.)"""
    import errno
    import subprocess
    import sys

    import filelock

    from pipelines.runtime import StageBusyError, check_stages_free, exclusive_stage

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from filelock import FileLock; "
         f"lock = FileLock({str(run_dir / '.train.lock')!r}); lock.acquire(); print('held', flush=True); "
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"

        def not_ours(self, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(run_dir / ".train.lock"))

        monkeypatch.setattr(filelock.FileLock, "acquire", not_ours)
        with pytest.raises(StageBusyError, match="another command is running the train stage"):
            check_stages_free(run_dir, ["train"])
        ran = []
        with pytest.raises(StageBusyError, match="another command"), exclusive_stage(run_dir, "train"):
            ran.append(True)
        assert not ran
    finally:
        holder.kill()
        holder.wait()
    check_stages_free(run_dir, ["train"])  # their command ended: free
    with exclusive_stage(run_dir, "train"):  # run, holding their file locked read-only
        # A second command of this user (a job submitted twice) is kept out, as is their next command
        with pytest.raises(StageBusyError, match="another command is running the train stage"):
            check_stages_free(run_dir, ["train"])
        with pytest.raises(StageBusyError, match="another command"), exclusive_stage(run_dir, "train"):
            pass
        monkeypatch.undo()
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(str(run_dir / ".train.lock")).acquire(timeout=0)
    filelock.FileLock(str(run_dir / ".train.lock")).acquire(timeout=0)  # and let in once the stage ends


def test_errors_are_sorted_into_outages_and_refusals():
    """A sqlite file locked by another writer or a database server that is down raises the driver's
    OperationalError unwrapped: it read as a refusal (the report stopped, replicas marked the model failed for
    good). An S3 5xx (botocore) carries its status in a dict. A 413 from a proxy (a checkpoint over nginx's body
    limit) was retried for ever, holding up every write behind it, in every later command."""
    import sqlite3

    import requests
    import sqlalchemy.exc

    from pipelines.tracking import http_status, is_unreachable
    from pipelines.tracking_queue import _is_permanent

    locked = sqlalchemy.exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked"))
    assert is_unreachable(locked) and is_unreachable(sqlite3.OperationalError("unable to open database file"))
    assert not _is_permanent(locked)

    class ClientError(Exception):  # botocore's shape: the status inside a dict
        def __init__(self, status):
            super().__init__(f"S3 said {status}")
            self.response = {"Error": {"Code": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}

    assert http_status(ClientError(503)) == 503 and is_unreachable(ClientError(503))
    assert not is_unreachable(ClientError(403))

    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(f"{status}", response=response)

    too_large = http_error(413)
    assert _is_permanent(too_large) and not is_unreachable(too_large)
    for transient in (http_error(503), http_error(429), http_error(408)):
        assert not _is_permanent(transient) and is_unreachable(transient)
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = too_large
    assert http_status(wrapped) == 413 and _is_permanent(wrapped)
    assert not _is_permanent(ClientError(400))  # S3's RequestTimeout is a 400 that passes: botocore retries it
    assert not _is_permanent(ConnectionError("refused"))
    # MLflow's database sessions turn every SQLAlchemy error but OperationalError into BAD_REQUEST: a pool's
    # timeout or a connection lost in a failover was dropped as a refusal. What the server does not have (an
    # endpoint of another MLflow version) was retried for ever.
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    for lost in (sqlalchemy.exc.TimeoutError("QueuePool limit reached"),
                 sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("connection already closed"))):
        try:
            raise MlflowException(message=str(lost), error_code=codes.BAD_REQUEST) from lost
        except MlflowException as err:
            assert err.error_code == "BAD_REQUEST" and not _is_permanent(err) and is_unreachable(err), type(lost)
    # Through a tracking server the cause is gone: only the message the server sent names it (str() of the error).
    for lost in (sqlalchemy.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out, "
                                             "timeout 30.00", code="3o7r"),
                 sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("connection already closed"))):
        relayed = MlflowException(str(lost), error_code=codes.BAD_REQUEST)
        assert not _is_permanent(relayed) and is_unreachable(relayed), str(lost)
    assert _is_permanent(MlflowException("invalid metric", error_code=codes.BAD_REQUEST))
    assert _is_permanent(MlflowException("no such logged model", error_code=codes.NOT_FOUND))
    assert not _is_permanent(MlflowException("a concurrent update", error_code=codes.RESOURCE_CONFLICT))
    # MLflow's client names any 404 without a JSON body ENDPOINT_NOT_FOUND: a proxy's while MLflow restarts too.
    assert not _is_permanent(MlflowException("404 page not found", error_code=codes.ENDPOINT_NOT_FOUND))


def test_statuses_mlflow_names_only_in_its_message_are_sorted_and_refused_credentials_keep_writes(
        tmp_path, caplog, monkeypatch, refusing_credentials):
    """MLflow's client keeps a reply's status only in its message where it has no error code for it (405, 413,
    414, 422 and 502 all become INTERNAL_ERROR): a proxy's 413 was retried as an outage, stalling every later
    command. Refused credentials (401/403: an expired token) dropped every queued write for good, the pending
    file deleted: they are kept, to be sent once the credentials work; only MLflow's auth app refusing one
    resource refuses one write."""

    import requests
    from mlflow.utils.rest_utils import verify_rest_response

    from pipelines.tracking import http_status, is_auth_refusal, is_unreachable
    from pipelines.tracking_queue import TrackingQueue, _is_permanent

    def refusal(status: int, body: str = "denied"):
        response = requests.Response()
        response.status_code, response._content = status, body.encode()
        try:
            verify_rest_response(response, "/api/2.0/mlflow/runs/log-batch")
        except Exception as err:  # noqa: BLE001 - what MLflow raises is the point
            return err
        raise AssertionError("accepted")

    for status in (405, 413, 414, 422):
        err = refusal(status)
        assert err.error_code == "INTERNAL_ERROR" and http_status(err) == status
        assert _is_permanent(err) and not is_unreachable(err), status
    assert not _is_permanent(refusal(502)) and is_unreachable(refusal(502))
    for err in (refusal(401), refusal(401, '{"error_code": "UNAUTHENTICATED", "message": "no"}'),
                refusal(403, "Invalid Host header - possible DNS rebinding attack detected"),  # MLflow 3.5+
                refusal(403, '{"error_code": "PERMISSION_DENIED", "message": "Invalid access token"}')):
        assert is_auth_refusal(err) and not _is_permanent(err), err
    # MLflow's auth app refuses one resource to a user it knows (a model they may read but not write) with a
    # plain "Permission denied": that write alone is refused; held, it blocked every write behind it for good.
    forbidden = refusal(403, "Permission denied")
    assert not is_auth_refusal(forbidden) and _is_permanent(forbidden)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    queue = TrackingQueue(Tracker(refusing_credentials, "x"), tmp_path / "pending.json")
    queue.put("update_champion", registered_model="m")
    queue.put("set_tags", "0123abcd", tags={"a": "b"})
    assert [op.kind for op in queue.flush(timeout_s=2)] == ["update_champion", "set_tags"]
    assert not queue.dropped and (tmp_path / "pending.json").exists()
    assert "refuses this machine's credentials" in caplog.text


def test_a_pending_write_this_version_cannot_send_is_dropped(make_config, tmp_path):
    """A pending file of another version of this code (a kind of write or an argument this one lacks) held up
    every write behind it, retried for ever, in every later command."""
    from pipelines.tracking_queue import TrackingQueue

    tracker = Tracker.for_config(make_config())
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    queue = TrackingQueue(tracker, tmp_path / "pending.json")
    queue.put("register_v9", run_id, alias="lenet5")
    queue.put("set_tags", run_id, tags={"a": "b"}, retries=3)
    queue.put("set_tags", run_id, tags={"behind": "them"})
    assert queue.flush(timeout_s=20) == []
    assert len(queue.dropped) == 2 and all("this version cannot send it" in d for d in queue.dropped)
    assert "retries" in queue.dropped[1]
    assert tracker.client.get_run(run_id).data.tags["behind"] == "them"


def test_a_damaged_pending_file_is_moved_aside_not_in_every_commands_way(make_config, tmp_path, caplog):
    """An empty or cut pending file (a crash while it was written) stopped every later command with a
    JSONDecodeError that named no file."""
    import logging

    from pipelines.tracking_queue import PENDING_FILE, TrackingQueue, load_pending

    tracker = Tracker.for_config(make_config())
    pending = tmp_path / PENDING_FILE
    with caplog.at_level(logging.ERROR, logger="pipelines"):
        pending.write_text('{"tracking_uri": "sqlite:///x", "ops": [{"seq"')
        assert load_pending(tmp_path) == [] and not pending.exists()
        pending.write_text("")
        queue = TrackingQueue(tracker, pending)
    assert len(queue) == 0 and not pending.exists()
    aside = sorted(tmp_path.glob(f"{PENDING_FILE}.damaged-*"))
    assert len(aside) == 2 and f"{PENDING_FILE} is damaged" in caplog.text
    assert all(path.name in caplog.text for path in aside)
    queue.put("set_tags", tracker.start_run("r", {"stage": "train"}), tags={"a": "b"})
    assert queue.flush(timeout_s=20) == []


def test_every_reader_of_the_pending_file_takes_what_the_queue_takes(make_config, tmp_path, caplog):
    """Two readers disagreed on a valid file: a write of another version of this code (without a seq, or with a
    field this one lacks) crashed the train stage's check of unregistered models with a TypeError, while a
    file with malformed claims crashed the queue that the check let through."""
    import json

    from pipelines.tracking_queue import PENDING_FILE, TrackingQueue, load_pending, pending_summary

    tracker = Tracker.for_config(make_config())
    pending = tmp_path / PENDING_FILE
    foreign = [{"kind": "set_tags", "ref": None, "args": {"tags": {}}},  # no seq, no uid
               {"seq": 4, "kind": "register", "ref": "r1", "args": {"alias": "lenet5"}, "uid": "u1", "attempts": 3},
               {"seq": 5, "kind": "register", "ref": "r2", "args": {}, "uid": "u2"}]  # (no alias: named by none)
    pending.write_text(json.dumps({"tracking_uri": tracker.tracking_uri, "ops": foreign}))
    loaded = load_pending(tmp_path)
    assert [(op.kind, op.ref) for op in loaded] == [("set_tags", None), ("register", "r1"), ("register", "r2")]
    assert "not registered yet: lenet5. They" in pending_summary(loaded, tmp_path, "register")
    for claims in ([], {"u1": ["pid", 1]}):
        pending.write_text(json.dumps({"tracking_uri": tracker.tracking_uri, "ops": foreign, "claims": claims}))
        assert load_pending(tmp_path) == [] and not pending.exists()
        assert len(TrackingQueue(tracker, pending)) == 0
    assert "damaged (its claims are not a mapping" in caplog.text


def test_ctrl_c_while_flush_waits_keeps_the_unsent_writes_pending(make_config, tmp_path):
    """A Ctrl-C during the end-of-stage wait for MLflow (or a second one during an abort's) lost every queued
    write with the process: registrations, metrics, the stage run's end."""

    from pipelines.tracking_queue import TrackingQueue, load_pending

    class QueueWithAnOutage(TrackingQueue):
        def _do_down(self, ref):
            raise ConnectionError("MLflow is down")

    tracker = Tracker.for_config(make_config())
    queue = QueueWithAnOutage(tracker, tmp_path / "tracking-pending.json")
    queue.put("down", None)
    queue.put("set_tags", "local:run", tags={"queued": "behind"})
    flush_interrupted(queue, after_s=2.0, timeout_s=60)
    assert [op.kind for op in load_pending(tmp_path)] == ["down", "set_tags"]


def test_two_commands_of_one_config_share_the_pending_file_without_sending_twice_or_losing_writes(make_config,
                                                                                                  tmp_path):
    """Two commands on one workdir (a `register` by hand beside a stage, a search beside a train stage) both
    loaded the pending writes and sent each twice (two model versions), and one's end overwrote or deleted the
    writes the other had left pending meanwhile."""
    import subprocess
    import sys

    from pipelines.tracking_queue import TrackingQueue, load_pending

    sent = []

    class QueueWithAnOutage(TrackingQueue):
        mlflow_down = True

        def _do_down(self, ref, note):
            if QueueWithAnOutage.mlflow_down:
                raise ConnectionError("MLflow is down")
            sent.append(note)

    tracker = Tracker.for_config(make_config())
    pending = tmp_path / "tracking-pending.json"
    earlier = QueueWithAnOutage(tracker, pending)
    earlier.put("down", None, note="left by an earlier stage")
    assert len(earlier.flush(timeout_s=1)) == 1 and pending.exists()

    first = QueueWithAnOutage(tracker, pending)  # takes the earlier write over
    second = QueueWithAnOutage(tracker, pending)  # meanwhile: the write is the first's to send
    assert [op.args["note"] for op in first._ops] == ["left by an earlier stage"] and len(second) == 0
    second.put("down", None, note="the second's own")
    assert len(second.flush(timeout_s=1)) == 1
    notes = [op.args["note"] for op in load_pending(tmp_path)]
    assert notes == ["left by an earlier stage", "the second's own"]  # the first's claim kept, the second's added
    QueueWithAnOutage.mlflow_down = False
    assert first.flush(timeout_s=20) == [] and sent == ["left by an earlier stage"]
    assert [op.args["note"] for op in load_pending(tmp_path)] == ["the second's own"]  # not deleted by the first

    # A write taken over by another command is left to it while that command runs, and is anyone's again once it
    # died without sending it.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        body = json.loads(pending.read_text())
        body["claims"] = {body["ops"][0]["uid"]: {"token": "other", "pid": other.pid, "host": socket.gethostname()}}
        pending.write_text(json.dumps(body))
        assert len(QueueWithAnOutage(tracker, pending)) == 0
        # A command's closing summary ("MLflow did not take N writes", exit 3) is about its own writes only.
        assert len(load_pending(tmp_path)) == 1 and load_pending(tmp_path, this_process=True) == []
        # The claim of a killed command whose pid a live process has now (a container restarted runs its next
        # command as the same pid): the process it names is gone, so its writes are anyone's.
        from pipelines.tracking_queue import _process_identity

        assert _process_identity(other.pid) is not None  # (Linux)
        claim = {"token": "killed", "pid": other.pid, "host": socket.gethostname(), "process": "another-boot:1"}
        body["claims"] = {body["ops"][0]["uid"]: claim}
        pending.write_text(json.dumps(body))
        assert len(load_pending(tmp_path, this_process=True)) == 1
        body["claims"] = {body["ops"][0]["uid"]: {**claim, "process": _process_identity(other.pid)}}  # itself
        pending.write_text(json.dumps(body))
        assert load_pending(tmp_path, this_process=True) == []
        # A container beside this one under the same host name numbers its processes apart: its claim's pid says
        # nothing here (here it names a process of this container), so the claim holds for its time to live.
        beside = {**claim, "process": _process_identity(other.pid), "pidns": "pid:[1]", "at": time.time()}
        body["claims"] = {body["ops"][0]["uid"]: beside}
        pending.write_text(json.dumps(body))
        assert load_pending(tmp_path, this_process=True) == []
        body["claims"] = {body["ops"][0]["uid"]: {**beside, "pid": 999_999_999}}  # no such pid here either
        pending.write_text(json.dumps(body))
        assert load_pending(tmp_path, this_process=True) == []
        body["claims"] = {body["ops"][0]["uid"]: {**beside, "at": time.time() - 7200}}  # not renewed: stale
        pending.write_text(json.dumps(body))
        assert len(load_pending(tmp_path, this_process=True)) == 1
        body["claims"] = {body["ops"][0]["uid"]: {**claim, "process": "another-boot:1"}}
        pending.write_text(json.dumps(body))
    finally:
        other.kill()
        other.wait()
    taker = QueueWithAnOutage(tracker, pending)
    assert [op.args["note"] for op in taker._ops] == ["the second's own"]
    claims = json.loads(pending.read_text())["claims"].values()  # the taker's: which process, in which namespace
    assert claims and all(c["token"] == taker.token and {"process", "pidns"} <= set(c) for c in claims)


@pytest.mark.slow
def test_a_ctrl_c_while_flush_waits_for_the_write_in_flight_keeps_it_pending_for_this_command(make_config, tmp_path,
                                                                                               monkeypatch):
    """The second Ctrl-C of an abort most likely comes while flush waits for the write in flight (up to 35 s):
    every unsent write was lost then. The write in flight stays this command's (another would send it twice) and
    leaves the file once it goes out."""

    from pipelines.tracking_queue import load_pending

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "0")  # flush waits 5 s for an attempt in flight
    tracker = Tracker.for_config(make_config())
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    queue = queue_with_a_slow_write(tracker, tmp_path / "tracking-pending.json")
    queue.put("slow_tags", run_id, tags={"sent": "once"}, seconds=4.5)  # in flight from 1 s to 5.5 s
    queue.put("set_tags", run_id, tags={"queued": "behind"})
    flush_interrupted(queue, after_s=3.0, timeout_s=2)  # the wait for MLflow ends at 2 s: in the writer's
    body = json.loads((tmp_path / "tracking-pending.json").read_text())
    slow, behind = body["ops"]
    assert [slow["kind"], behind["kind"]] == ["slow_tags", "set_tags"]
    assert body["claims"][slow["uid"]]["token"] == queue.token and behind["uid"] not in body["claims"]
    queue._thread.join(timeout=30)
    assert tracker.client.get_run(run_id).data.tags["sent"] == "once"
    assert [op.kind for op in load_pending(tmp_path)] == ["set_tags"]  # the sent one out, the other left


@pytest.mark.slow
def test_a_write_in_flight_that_fails_after_flush_gave_up_keeps_its_place_in_the_pending_file(make_config, tmp_path,
                                                                                              monkeypatch):
    """The write still being sent when flush gave up (a slow upload after an outage), failing then, was saved again
    behind the writes queued after it: a registration went behind the champion's move and its run's end."""
    from pipelines.tracking_queue import TrackingQueue, load_pending

    class QueueWithAFailingSlowWrite(TrackingQueue):
        attempts = 0

        failed_at = None

        def _do_slow_upload(self, ref, seconds):
            self.attempts += 1
            if self.attempts == 2:  # the retry: slow, then the connection resets
                time.sleep(seconds)
                self.failed_at = time.monotonic()
            raise ConnectionError("MLflow is down")

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "0")
    monkeypatch.setattr("pipelines.tracking_queue.IN_FLIGHT_SLACK_S", 1.0)  # flush waits 1 s for it in flight
    tracker = Tracker.for_config(make_config())
    queue = QueueWithAFailingSlowWrite(tracker, tmp_path / "tracking-pending.json")
    queue.put("slow_upload", "local:run", seconds=5)
    queue.put("update_champion", registered_model="m")
    queue.put("end_run", "local:run", status="FINISHED")
    left = queue.flush(timeout_s=2)  # the retry starts after 1 s and outlasts flush (2 s, then 1 s for it)
    assert [op.kind for op in left] == ["slow_upload", "update_champion", "end_run"]
    assert queue.attempts == 2 and queue._thread.is_alive()  # in flight when flush gave up
    queue._thread.join(timeout=30)
    assert queue.attempts == 2 and not queue._thread.is_alive()
    # Its writer ended then, not after one more back-off (2 s here, up to 10 s: a stage's end held up that long).
    assert time.monotonic() - queue.failed_at < 1.0
    assert [op.kind for op in load_pending(tmp_path)] == ["slow_upload", "update_champion", "end_run"]
    # ... and it is no longer held: the next command takes all three, in that order.
    assert [op.kind for op in load_pending(tmp_path, this_process=True)] == ["slow_upload", "update_champion",
                                                                             "end_run"]


def test_a_pending_timeout_of_0_still_sends_what_mlflow_takes(make_config, tmp_path):
    """`tracking.pending_timeout_s: 0` (give up at once on an unreachable MLflow) gave up on a healthy one too:
    flush never waited, and every stage ended with its writes pending (exit 3)."""
    from pipelines.tracking_queue import TrackingQueue

    tracker = Tracker.for_config(make_config())
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    queue = TrackingQueue(tracker, tmp_path / "tracking-pending.json")
    for step in range(10):
        queue.put("log_metrics", run_id, metrics={"loss": 1.0 / (step + 1)}, step=step)
    assert queue.flush(timeout_s=0) == []
    assert len(tracker.client.get_metric_history(run_id, "loss")) == 10
    assert not (tmp_path / "tracking-pending.json").exists()


def test_an_abort_puts_the_queued_writes_on_disk_before_it_waits_for_mlflow(make_config, tmp_path):
    """`ray job stop` sends SIGTERM (Ray's driver raises SystemExit) and kills 3 s later: the abort's flush waited
    first and wrote the pending file only at its end, so the registrations and the runs' ends queued behind a slow
    write were lost with the process, the runs left RUNNING for good."""
    from pipelines.tracking_queue import TrackingQueue, flushed_on_abort, load_pending

    class QueueWithASlowWrite(TrackingQueue):
        on_disk_when_waiting: list = []

        def _do_slow_upload(self, ref, seconds):
            time.sleep(seconds)

        def flush(self, timeout_s):
            self.on_disk_when_waiting = [(op.kind, op.args.get("status")) for op in load_pending(tmp_path)]
            return super().flush(timeout_s)

    tracker = Tracker.for_config(make_config())
    run_id = tracker.start_run("train", {"stage": "train"})
    queue = QueueWithASlowWrite(tracker, tmp_path / "tracking-pending.json")
    queue.put("slow_upload", run_id, seconds=2)
    queue.put("set_tags", run_id, tags={"queued": "behind"})
    with pytest.raises(SystemExit), flushed_on_abort(queue, run_id):
        raise SystemExit(15)
    assert queue.on_disk_when_waiting == [("slow_upload", None), ("set_tags", None), ("end_run", "KILLED")]
    # MLflow took them in the end: nothing is left for the next command to send twice.
    assert tracker.client.get_run(run_id).info.status == "KILLED"
    assert tracker.client.get_run(run_id).data.tags["queued"] == "behind"
    assert not (tmp_path / "tracking-pending.json").exists()


def test_the_pending_file_keeps_no_tracking_password(make_config, tmp_path):
    """The pending file (plain text in the workdir, often on shared storage) held tracking.uri with its password,
    masked everywhere else; and with the password rotated its writes counted as another store's (exit 2)."""
    from types import SimpleNamespace

    from pipelines.config import ConfigError
    from pipelines.tracking_queue import TrackingQueue, _pending_body

    class QueueWithAnOutage(TrackingQueue):
        def _do_down(self, ref):
            raise ConnectionError("MLflow is down")

    tracker = SimpleNamespace(tracking_uri="postgresql://mlflow:s3cret@db:5432/mlflow")  # never reached
    queue = QueueWithAnOutage(tracker, tmp_path / "tracking-pending.json")
    queue.put("down", None)
    assert len(queue.flush(timeout_s=0.5)) == 1
    text = (tmp_path / "tracking-pending.json").read_text()
    assert "s3cret" not in text and "postgresql://mlflow:***@db:5432/mlflow" in text
    body = _pending_body(tmp_path / "tracking-pending.json", "postgresql://mlflow:rotated@db:5432/mlflow")
    assert [op["kind"] for op in body["ops"]] == ["down"]
    # The password moved out of the URI (PGPASSWORD): the same store, not "another store's writes" (exit 2).
    assert _pending_body(tmp_path / "tracking-pending.json", "postgresql://db:5432/mlflow")["ops"]
    with pytest.raises(ConfigError, match="another tracking store"):
        _pending_body(tmp_path / "tracking-pending.json", "postgresql://mlflow@db2:5432/mlflow")


def _save_a_lenet5_checkpoint(path) -> None:
    """A lenet5 checkpoint of random weights for 1-channel, 10-class digits at ``path``."""
    import cnnmodels
    from pipelines.checkpoints import ModelCheckpoint, save_checkpoint
    from pipelines.preprocess import PreprocessSpec

    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.5,), class_names=tuple("0123456789"))
    model = cnnmodels.create_model("lenet5", num_classes=10, in_chans=1)
    save_checkpoint(ModelCheckpoint(arch="lenet5", model_kwargs={}, spec=spec, state_dict=model.state_dict()), path)

def test_a_result_record_that_fails_after_the_registration_went_through_holds_up_nothing(make_config, tmp_path,
                                                                                        caplog):
    """The version registered, its result record damaged (cut short by a crash): the failure to read it was
    retried as an outage ("MLflow is unreachable" every 10 s), holding up every write behind it for good."""
    import logging

    from pipelines.tracking_queue import TrackingQueue

    cfg = make_config()
    tracker = Tracker.for_config(cfg)
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    _save_a_lenet5_checkpoint(tmp_path / "best" / "model.pt")
    record = tmp_path / "train" / "lenet5.json"
    record.parent.mkdir()
    record.write_text('{"model_name": "lenet5", "arch": "le')  # cut short
    queue = TrackingQueue(tracker, tmp_path / "pending.json")
    queue.put("register", run_id, checkpoint_path=str(tmp_path / "best"), storage_path=str(tmp_path),
              registered_model=cfg.registered_model_name, alias="lenet5", tags={"test_acc": 0.5},
              result_file=str(record))
    queue.put("set_tags", run_id, tags={"behind": "the registration"})
    with caplog.at_level(logging.ERROR, logger="pipelines"):
        assert queue.flush(timeout_s=3) == [] and queue.dropped == []
    assert tracker.client.get_run(run_id).data.tags["behind"] == "the registration"
    assert tracker.client.get_registered_model(cfg.registered_model_name).aliases["lenet5"] == 1
    assert "registered test v1, but its result record" in caplog.text and "could not be updated" in caplog.text


def test_a_registration_dropped_before_one_of_the_same_model_went_through_fails_nothing(make_config, tmp_path):
    """An earlier command's registration left pending, its checkpoint gone since (a lifecycle rule), and the model
    trained again from scratch: the old one dropped, the new one registered, and the stage still failed the model
    as "trained but not registered"."""
    from pipelines.tracking_queue import TrackingQueue

    cfg = make_config()
    tracker = Tracker.for_config(cfg)
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    _save_a_lenet5_checkpoint(tmp_path / "storage" / "fresh" / "model.pt")
    queue = TrackingQueue(tracker, tmp_path / "pending.json")
    for checkpoint, epochs in (("checkpoint_000009", 10), ("fresh", 20)):  # the first one is gone
        queue.put("register", run_id, checkpoint_path=str(tmp_path / "storage" / checkpoint),
                  storage_path=str(tmp_path / "storage"), registered_model=cfg.registered_model_name, alias="lenet5",
                  tags={"fingerprint": "f", "epochs": epochs})
    assert queue.flush(timeout_s=10) == [] and len(queue.dropped) == 1 and "is gone from" in queue.dropped[0]
    assert queue.dropped_registrations == []
    assert tracker.client.get_registered_model(cfg.registered_model_name).aliases["lenet5"] == 1


def test_a_resumed_runs_reopening_comes_after_the_end_its_interrupted_command_left_pending(make_config, tmp_path):
    """A search interrupted in an outage left "run ended (KILLED)" of its parent run pending; the resumed search
    reopened that run, then its queue sent the old end: the search read KILLED in MLflow while it ran."""
    from pipelines.tracking_queue import PENDING_FILE, TrackingQueue

    cfg = make_config()
    tracker = Tracker.for_config(cfg)
    parent = tracker.start_run("search-1", {"stage": "search"})
    pending = cfg.paths.run_dir / PENDING_FILE  # what the interrupted command left (it is gone: no claim)
    pending.parent.mkdir(parents=True, exist_ok=True)
    pending.write_text(json.dumps({"tracking_uri": cfg.tracking_uri, "run_ids": {}, "claims": {}, "ops": [
        {"seq": 1, "kind": "end_run", "ref": parent, "args": {"status": "KILLED"}, "uid": "u1"}]}))
    tracker.reopen(parent)  # the resumed search's open_stage_run
    resumed = TrackingQueue.for_config(cfg, tracker)
    assert len(resumed) == 1
    resumed.put("reopen", parent)  # as search_stage queues it
    assert resumed.flush(timeout_s=10) == []
    assert tracker.client.get_run(parent).info.status == "RUNNING"
