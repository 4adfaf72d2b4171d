"""Ray Train: DDP on CPU, MLflow tracking and registry, fault tolerance, resume, every architecture."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import ONE_PER_BLOCK_TYPE, write_split_folder

import cnnmodels
from pipelines.checkpoints import load_checkpoint
from pipelines.data import DEBIAN_FASHION_MNIST
from pipelines.tracking import Tracker
from pipelines.train import stage_eta, train_stage

FAST = ["data.image_size=32", "train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.0001",
        "train.batch_size=64"]


@pytest.fixture(scope="module")
def ddp_run(ray_cluster, tmp_path_factory):
    """lenet5 trained with 2 DDP workers (gloo, CPU) for 6 epochs; shared by the tests below."""
    from pipelines.config import load_config

    workdir = tmp_path_factory.mktemp("ddp")
    cfg = load_config(None, [f"workdir={workdir}", "name=ddp", "train.models=[lenet5]", "train.epochs=6",
                             "train.num_workers=2", *FAST])
    return cfg, train_stage(cfg)


@pytest.mark.slow
def test_two_worker_ddp_learns_digits(ddp_run):
    cfg, stage = ddp_run
    assert stage.ok and stage.trained == ["lenet5"]
    result = stage.results["lenet5"]
    assert result.best_val_acc >= 0.9, result.history
    assert result.test_acc >= 0.85
    assert [h["epoch"] for h in result.history] == list(range(6))
    assert result.params_count == 61_706 and result.input_size == 32
    assert all(h["train_images_per_sec"] > 0 for h in result.history)
    # Each DDP rank saved its own generator states into every (merged) checkpoint directory. (Every one the run
    # kept, not the recorded best's: the tests after this one train the run on, and Ray prunes that one then.)
    from pathlib import Path

    checkpoints = [c for c in (Path(cfg.paths.storage) / result.run_name).glob("checkpoint_*") if c.is_dir()]
    assert checkpoints and all(sorted(p.name for p in c.glob("rng_state_rank*.pt")) == [
        "rng_state_rank0.pt", "rng_state_rank1.pt"] for c in checkpoints), checkpoints


@pytest.mark.slow
def test_both_ddp_ranks_end_an_epoch_with_the_same_weights(ray_cluster, make_config, tmp_path):
    """Nothing checked that the ranks train one model: with DDP's wrapping switched off each rank trained its
    own LeNet-5, and every DDP test still passed (the accuracy is rank 0's). An epoch of the worker's own loop
    on two ranks, then every parameter gathered from both."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models

    cfg = make_config("train.models=[lenet5]", "train.num_workers=2", "train.cpus_per_worker=0.5",
                      "data.image_size=16", "data.train_subset=64", "train.batch_size=16", "train.optimizer=adamw",
                      "train.lr=0.003")
    [run] = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)

    def loop(config):
        import torch.distributed as dist

        from pipelines.planning import ModelRun
        from pipelines.worker import _unwrap, restore, setup, train_epoch

        ctx = setup(ModelRun.from_dict(config["run"]))
        restore(ctx)
        before = torch.cat([p.detach().flatten().clone() for p in _unwrap(ctx.model).parameters()])
        train_epoch(ctx, 0)
        after = torch.cat([p.detach().flatten() for p in _unwrap(ctx.model).parameters()])
        gathered = [torch.empty_like(after) for _ in range(ctx.world)]
        dist.all_gather(gathered, after)
        if ctx.rank == 0:
            Path(config["out"]).write_text(json.dumps({
                "ranks": len(gathered), "moved": float((after - before).abs().max()),
                "difference": float((gathered[0] - gathered[1]).abs().max())}))

    TorchTrainer(loop, train_loop_config={"run": run.to_dict(), "out": str(tmp_path / "weights.json")},
                 scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={
                     "CPU": run.workers.cpus_per_worker}),
                 run_config=ray.train.RunConfig(name="ddp-sync", storage_path=str(tmp_path / "ray"))).fit()
    weights = json.loads((tmp_path / "weights.json").read_text())
    assert weights["ranks"] == 2 and weights["moved"] > 0  # trained, on two ranks ...
    assert weights["difference"] == 0.0  # ... to the same weights


@pytest.mark.slow
def test_mlflow_child_run_has_the_comparable_params_and_metrics(ddp_run):
    cfg, stage = ddp_run
    tracker = Tracker.for_config(cfg)
    run = tracker.client.get_run(stage.results["lenet5"].mlflow_run_id)
    assert run.data.tags["stage"] == "train" and run.info.status == "FINISHED"
    parent = tracker.client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["stage"] == "train"
    params = run.data.params
    for key, value in {"arch": "lenet5", "params_count": "61706", "input_size": "32", "epochs": "6",
                       "batch_size": "64", "lr": "0.003", "num_workers": "2", "dataset": "digits"}.items():
        assert params[key] == value
    # every training setting is a param, so runs that differ in any of them can be told apart in the UI
    for key in ("weight_decay", "schedule", "warmup_epochs", "label_smoothing", "cpu_bf16", "seed", "augment",
                "amp", "channels_last"):
        assert key in params, key
    assert params["weight_decay"] == str(cfg.train.weight_decay)
    assert int(params["macs"]) == cnnmodels.profile(cnnmodels.create_model("lenet5", num_classes=10, in_chans=1),
                                                    (1, 32, 32)).macs
    for metric in ("train_loss", "val_loss", "val_acc"):
        history = tracker.client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in history) == list(range(6)), metric
    for metric in ("test_acc", "best_val_acc", "train_images_per_sec", "train_seconds"):
        assert metric in run.data.metrics
    # The run's throughput is the report's (the median over epochs), not the last epoch's: MLflow shows a metric
    # at its highest step, so the per-epoch series has a name of its own.
    assert run.data.metrics["train_images_per_sec"] == pytest.approx(stage.results["lenet5"].train_images_per_sec)
    epoch_rates = tracker.client.get_metric_history(run.info.run_id, "epoch_images_per_sec")
    assert sorted(m.step for m in epoch_rates) == list(range(6))
    assert run.data.metrics["test_acc"] == pytest.approx(stage.results["lenet5"].test_acc)


@pytest.mark.slow
def test_registered_version_loads_back_and_predicts_like_the_checkpoint(ddp_run):
    from pipelines.results import load_results

    cfg, _ = ddp_run
    # The current record, not the fixture's first one: a test that re-registers the run may have run first.
    result = load_results(cfg.paths.train_dir)["lenet5"]
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    client = Tracker.for_config(cfg).client
    version = client.get_model_version_by_alias(cfg.registered_model_name, "lenet5")
    assert str(version.version) == result.version
    assert str(client.get_model_version_by_alias(cfg.registered_model_name, "champion").version) == result.version
    registered = mlflow.pyfunc.load_model(f"models:/{cfg.registered_model_name}@lenet5")  # no pickle: from code
    from_checkpoint = load_checkpoint(result.checkpoint_path).build_model()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(registered.predict(x.numpy())), from_checkpoint(x))
    assert float(version.tags["test_acc"]) == pytest.approx(result.test_acc)
    assert version.tags["dataset"] == "digits" and version.tags["fingerprint"] == result.fingerprint


@pytest.mark.slow
def test_second_invocation_skips_and_more_epochs_resume(ddp_run, caplog):
    cfg, first = ddp_run
    # (A plain re-run skips it: test_pipeline.py's second run, and below after its re-registration.)
    # Fewer epochs: the run would resume past its end and record the 6-epoch model as a 3-epoch one.
    shorter = train_stage(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3})}))
    assert shorter.skipped == ["lenet5"] and shorter.results["lenet5"].epochs == 6
    assert "train.epochs=3 asks for fewer" in caplog.text
    # Its version deleted in MLflow's UI: the next run registers it again, from its last checkpoint, training
    # no epoch (it used to be skipped for good while `serve` said "train first").
    tracker = Tracker.for_config(cfg)
    tracker.client.delete_model_version(cfg.registered_model_name, first.results["lenet5"].version)
    refinished = train_stage(cfg)
    assert refinished.skipped == [] and refinished.trained == ["lenet5"]
    assert refinished.results["lenet5"].history == first.results["lenet5"].history
    versions, _ = tracker.registered_versions(cfg.registered_model_name)
    assert [(v.alias, v.version) for v in versions] == [("lenet5", refinished.results["lenet5"].version)]
    assert train_stage(cfg).skipped == ["lenet5"]
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 7})})
    extended = train_stage(longer)
    history = extended.results["lenet5"].history
    assert [h["epoch"] for h in history] == list(range(7))
    # Only the new epoch was trained: the attempt that ran it started from the epoch-5 checkpoint.
    assert history[6]["start_epoch"] == 6 and history[0]["start_epoch"] == 0


@pytest.mark.slow
def test_a_run_whose_checkpoints_were_deleted_or_damaged_starts_afresh(ddp_run, tmp_path, caplog):
    """Ray Train refuses to start a run whose record names a checkpoint that is gone ("a corrupted run
    directory"), at every attempt and every re-run: such a model could never be trained again. Its record is
    set aside (on a copy of the DDP run's directory, written by Ray itself) and the run starts afresh."""
    import json
    import shutil
    from pathlib import Path
    from types import SimpleNamespace

    from pipelines.trials import RUN_SNAPSHOT, set_aside_a_record_of_lost_checkpoints

    cfg, stage = ddp_run
    result = stage.results["lenet5"]
    run_dir = tmp_path / "storage" / result.run_name
    shutil.copytree(Path(cfg.paths.storage) / result.run_name, run_dir)
    run = SimpleNamespace(model_name="lenet5", arch="lenet5", run_name=result.run_name,
                          storage_path=str(tmp_path / "storage"))
    snapshot = json.loads((run_dir / RUN_SNAPSHOT).read_text())
    recorded = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    # Ray's record, as this code reads it (the run's other tests may have trained it on since the fixture).
    assert recorded and all((run_dir / name / "model.pt").is_file() for name in recorded)
    assert set_aside_a_record_of_lost_checkpoints(run) is None and (run_dir / RUN_SNAPSHOT).is_file()

    # A damaged checkpoint (an upload cut short) failed every attempt and every re-run the same way.
    snapshot_text = (run_dir / RUN_SNAPSHOT).read_text()
    weights = run_dir / recorded[-1] / "model.pt"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 5])
    assert set_aside_a_record_of_lost_checkpoints(run) == f"{run_dir}/{recorded[-1]}"
    assert not (run_dir / RUN_SNAPSHOT).exists() and "is damaged (checkpoint" in caplog.text
    for aside in run_dir.glob(f"{RUN_SNAPSHOT}.gone-*"):
        aside.unlink()
    (run_dir / RUN_SNAPSHOT).write_text(snapshot_text)
    weights.write_bytes(intact)

    shutil.rmtree(run_dir / recorded[0])
    assert set_aside_a_record_of_lost_checkpoints(run) == f"{run_dir}/{recorded[0]}"
    assert not (run_dir / RUN_SNAPSHOT).exists() and len(list(run_dir.glob(f"{RUN_SNAPSHOT}.gone-*"))) == 1
    assert all((run_dir / name).is_dir() for name in recorded[1:])  # what is left stays
    assert "is gone from the storage, so the run cannot resume: starting it afresh" in caplog.text


def test_a_run_directory_reused_for_another_model_starts_afresh(tmp_path, caplog):
    """Ray hands a run every checkpoint its record names: in a run directory reused by hand, the other model's
    checkpoint held the record's best place, was tested and registered as this model's (or failed to load after
    training), and pushed this model's own best checkpoints out. Such a record is set aside: the run starts
    afresh."""
    import json
    from types import SimpleNamespace

    from pipelines.trials import RUN_SNAPSHOT, latest_reported_metrics, set_aside_a_record_of_lost_checkpoints

    run_dir = tmp_path / "storage" / "run"
    owners = {"checkpoint_000000": "lenet5", "checkpoint_000001": "alexnet"}
    for name, owner in owners.items():
        (run_dir / name).mkdir(parents=True)
        torch.save({}, run_dir / name / "model.pt")
        (run_dir / name / "meta.json").write_text(json.dumps({"model_name": owner, "arch": owner}))
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": name} for name in owners],
                "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000000"}}
    (run_dir / RUN_SNAPSHOT).write_text(json.dumps(snapshot))
    run = SimpleNamespace(model_name="lenet5", arch="lenet5", run_name="run", storage_path=str(tmp_path / "storage"))
    # Nor are its metrics an interrupted run of this model's (the driver's check of train.epochs against them).
    snapshot["latest_checkpoint_result"]["metrics"] = {"epoch": 7, "epochs": 20}
    (run_dir / RUN_SNAPSHOT).write_text(json.dumps(snapshot))
    assert latest_reported_metrics(run) is None
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert set_aside_a_record_of_lost_checkpoints(run) == f"{run_dir}/checkpoint_000001"
    assert not (run_dir / RUN_SNAPSHOT).exists() and "is alexnet's (a run directory reused" in caplog.text
    (run_dir / RUN_SNAPSHOT).write_text(json.dumps(snapshot))  # every checkpoint its own: nothing to do
    (run_dir / "checkpoint_000001" / "meta.json").write_text(json.dumps({"model_name": "lenet5", "arch": "lenet5"}))
    assert latest_reported_metrics(run) == {"epoch": 7, "epochs": 20}
    assert set_aside_a_record_of_lost_checkpoints(run) is None and (run_dir / RUN_SNAPSHOT).exists()


def test_a_longer_run_warns_of_a_warm_restart_only_where_a_checkpoint_is_there_to_resume(make_config, caplog):
    """A run trained to 1 epoch and extended to 3 said its schedule restarts warm from its checkpoint even with its
    checkpoints deleted (the storage's run folder gone): it trained from scratch, as the warning told the user to
    arrange by hand."""
    import json

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.train import _warn_of_a_warm_restart
    from pipelines.trials import RUN_SNAPSHOT, resume_point

    cfg = make_config("train.models=[lenet5]", "train.epochs=3")
    [run] = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    Path(run.storage_path).mkdir(parents=True, exist_ok=True)
    assert resume_point(run) == ("afresh", None)
    with caplog.at_level(logging.INFO, logger="pipelines"):
        _warn_of_a_warm_restart(run, 1)
    assert "warm restart" not in caplog.text and "cannot be resumed" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    run_dir = Path(run.storage_path) / run.run_name  # its 1-epoch checkpoint there: a warm restart
    (run_dir / "checkpoint_000000").mkdir(parents=True)
    torch.save({}, run_dir / "checkpoint_000000" / "model.pt")
    (run_dir / "checkpoint_000000" / "meta.json").write_text(json.dumps({"model_name": "lenet5", "arch": "lenet5"}))
    metrics = {"epoch": 0, "epochs": 1}
    (run_dir / RUN_SNAPSHOT).write_text(json.dumps({
        "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_000000"}],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000000", "metrics": metrics}}))
    assert resume_point(run) == ("resumes", metrics)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines"):
        _warn_of_a_warm_restart(run, 1)
    assert "warm restart" in caplog.text and "cannot be resumed" not in caplog.text
    # an older checkpoint in its record gone (a lifecycle rule takes the oldest first), or its latest damaged:
    # the record is set aside and the run starts afresh
    snapshot = json.loads((run_dir / RUN_SNAPSHOT).read_text())
    snapshot["checkpoint_results"].insert(0, {"checkpoint_dir_name": "checkpoint_older"})
    (run_dir / RUN_SNAPSHOT).write_text(json.dumps(snapshot))
    assert resume_point(run) == ("afresh", None)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines"):
        _warn_of_a_warm_restart(run, 1)
    assert "warm restart" not in caplog.text and "cannot be resumed" in caplog.text
    snapshot["checkpoint_results"].pop(0)
    (run_dir / RUN_SNAPSHOT).write_text(json.dumps(snapshot))
    (run_dir / "checkpoint_000000" / "model.pt").write_bytes(b"PK\x03\x04 cut short")
    assert resume_point(run) == ("resumes", metrics)  # (not read unless asked: a download from remote storage)
    assert resume_point(run, read_checkpoints=True) == ("afresh", None)
    # a storage that does not answer (a volume not mounted): not said to train afresh
    unmounted = run.model_copy(update={"storage_path": str(Path(run.storage_path) / "not-mounted")})
    assert resume_point(unmounted) == ("unknown", None)


@pytest.mark.slow
def test_a_diverged_model_stops_at_once_and_fails_the_stage(ray_cluster, make_config):
    """lenet5 at lr 1e8 trains to NaN weights in its first epoch. It went on for every epoch left (hours on a
    long schedule), scored each with class 0's share as val_acc (argmax of NaN logits: a number that could pass
    for the best epoch's) and failed only at its registration. Now the epoch reports val_acc NaN, the run stops
    there, and the model fails naming the divergence; a re-run trains nothing from its NaN weights."""
    # No Tune retries: each would start a trial actor (about 5 s) only to stop at once (the next test's subject).
    cfg = make_config("train.models=[lenet5]", "train.epochs=3", "train.optimizer=sgd", "train.lr=1e8",
                      "train.max_failures=0", "train.trial_retries=0", "data.train_subset=200",
                      "data.image_size=32", "train.batch_size=64")
    stage = train_stage(cfg)
    assert stage.failed == ["lenet5"] and stage.trained == [] and not stage.ok
    tracked = Tracker.for_config(cfg).find_run("tags.stage = 'train' and tags.`cnnzoo.model` = 'lenet5'")
    assert tracked.info.status == "FAILED" and "training diverged" in tracked.data.tags["error"], tracked.data.tags
    client = Tracker.for_config(cfg).client
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "epoch_seconds")] == [0]  # 1 epoch of 3
    assert client.get_metric_history(tracked.info.run_id, "val_acc") == []  # NaN, not class 0's share (not logged)
    again = train_stage(cfg)  # resumed from its diverged checkpoint: not trained further, failed again
    assert again.failed == ["lenet5"] and not again.ok
    tracker = Tracker.for_config(cfg)
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      "tags.stage = 'train' and tags.`cnnzoo.model` = 'lenet5'")
    assert runs and all([m.step for m in tracker.client.get_metric_history(r.info.run_id, "epoch_seconds")]
                        in ([0], []) for r in runs)


@pytest.mark.slow
def test_a_train_run_that_spent_its_failures_is_not_retried_by_tune(ray_cluster, make_config, monkeypatch):
    """Tune's trial retries are for a lost driver: a Train run that gave up after train.max_failures (here 0)
    is not run again by the retry, which would otherwise resume it and hide the failure."""
    cfg = make_config("train.models=[lenet5]", "train.epochs=2", "train.max_failures=0", "train.trial_retries=1",
                      "train.simulate_failure_at_epoch=1", "data.train_subset=200", *FAST)
    stage = train_stage(cfg)
    # A retry that resumed would have passed epoch 1 (the rehearsal kills only a fresh attempt) and succeeded.
    assert stage.failed == ["lenet5"]
    errors = [path.read_text() for path in Path(cfg.paths.storage).glob("*-train-*/lenet5_*/error.txt")]
    assert len(errors) == 1 and "not retried" in errors[0], errors  # Tune did retry; the retry stopped at once
    # Its MLflow run says so too: the tracking callback read the error through Tune's real trial object.
    tracked = Tracker.for_config(cfg).find_run("tags.stage = 'train' and tags.`cnnzoo.model` = 'lenet5'")
    assert tracked.info.status == "FAILED" and "not retried" in tracked.data.tags["error"], tracked.data.tags

    # The run stopped after epoch 1 of its 2-epoch schedule. Re-run with train.epochs=1, it trained nothing more
    # and was registered as a 1-epoch model, its learning rate still at half of train.lr: refused at once.
    from pipelines.config import ConfigError

    client = Tracker.for_config(cfg).client
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    shorter = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    with pytest.raises(ConfigError, match="was training to 2 epochs .*epoch 1, its learning rate at 50%") as refused:
        train_stage(shorter)
    assert refused.value.key == "train.epochs" and "delete the interrupted run's folder" in str(refused.value)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before
    # `run` refuses it before its search (minutes to hours on a CPU), not once the search is done.
    import pipelines.search
    from pipelines.pipeline import run_pipeline

    monkeypatch.setattr(pipelines.search, "search_stage", lambda *args, **kwargs: pytest.fail("searched first"))
    with pytest.raises(ConfigError, match="was training to 2 epochs") as refused:
        run_pipeline(shorter, ["search", "train"])
    assert refused.value.key == "train.epochs"
    # Its checkpoint gone (deleted by hand, a bucket's lifecycle rule): the run starts afresh, nothing to cut.
    import shutil

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.train import check_interrupted_schedules

    [run] = plan_model_runs(shorter, describe_dataset(shorter.data), resolve_models(shorter), cluster_cpus=2)
    with pytest.raises(ConfigError):
        check_interrupted_schedules([run])
    # Its checkpoints damaged (an upload cut short): set aside at its start, the run trains afresh: nothing to cut
    run_dir = Path(cfg.paths.storage) / run.run_name
    weights = {path: path.read_bytes() for path in run_dir.glob("checkpoint_*/model.pt")}
    assert weights
    for path, data in weights.items():
        path.write_bytes(data[: len(data) // 2])
    assert check_interrupted_schedules([run]) == {}  # not resumed at epoch 2: the estimate counts both epochs
    for path, data in weights.items():
        path.write_bytes(data)
    with pytest.raises(ConfigError):
        check_interrupted_schedules([run])
    for checkpoint in (Path(cfg.paths.storage) / run.run_name).glob("checkpoint_*"):
        if checkpoint.is_dir():  # (not Ray's record of them, checkpoint_manager_snapshot.json)
            shutil.rmtree(checkpoint)
    check_interrupted_schedules([run])


def test_a_schedule_resumed_with_other_epochs_is_cut_short_only_past_its_warm_up(make_config):
    """An interrupted run re-run with fewer epochs is refused for the learning rate it would skip; one stopped in
    its warm-up (the same for any length) or on a constant schedule skips nothing."""
    from pipelines.train import schedule_change

    cosine = make_config("train.schedule=cosine", "train.warmup_epochs=3", "train.epochs=5", "search.epochs=3").train
    assert schedule_change(cosine, planned=10, reached=1)[0] == "same"  # within the warm-up: nothing differs yet
    verdict, was, now = schedule_change(cosine, planned=10, reached=4)
    assert verdict == "shorter" and now < was  # the rate would drop at once
    assert schedule_change(cosine, planned=10, reached=6)[0] == "shorter"  # past the new end
    assert schedule_change(cosine.model_copy(update={"epochs": 12}), planned=10, reached=4)[0] == "longer"
    assert schedule_change(cosine, planned=5, reached=4)[0] == "same"
    constant = cosine.model_copy(update={"schedule": "constant"})
    assert schedule_change(constant, planned=10, reached=4)[0] == "same"
    assert schedule_change(constant, planned=10, reached=6)[0] == "shorter"  # a checkpoint past the new end


def test_a_worker_no_node_can_hold_is_refused_before_the_stage_starts(ray_cluster, make_config):
    """Ray Train compares a worker group with the cluster's totals only, then retries placing it without end
    (train.max_failures does not count that): a worker of 3 CPUs on 2-CPU nodes left the stage waiting for good.
    Refused before anything is written (the local-Ray config check cannot see a cluster joined by address)."""
    from types import SimpleNamespace

    from pipelines.config import ConfigError
    from pipelines.runtime import check_workers_fit

    address = ray_cluster.get_runtime_context().gcs_address
    cfg = make_config(f"ray.address={address}", "train.models=[lenet5]", "train.cpus_per_worker=3",
                      "train.epochs=1", *FAST)
    with pytest.raises(ConfigError, match="one worker needs 3 CPU on one node") as refused:
        train_stage(cfg)
    assert refused.value.key == "train.cpus_per_worker"
    assert not Tracker.for_config(cfg).client.search_runs(
        [e.experiment_id for e in Tracker.for_config(cfg).client.search_experiments()])

    def workers(cpus, gpus=0.0, strategy="PACK", count=2):
        return SimpleNamespace(cpus_per_worker=cpus, gpus_per_worker=gpus, use_gpu=gpus > 0,
                               num_workers=count, placement_strategy=strategy)

    check_workers_fit(workers(0.9), "fits")  # two workers of 0.9 CPUs
    with pytest.raises(ConfigError, match="all its workers together"):
        check_workers_fit(workers(1.5, strategy="STRICT_PACK"), "packed")
    # Each worker fits the node, but not both at once: Ray Train retried for good (here the 2-CPU local Ray).
    with pytest.raises(ConfigError, match="2 workers, but this cluster can hold at most 1 of them") as too_many:
        check_workers_fit(workers(1.5), "two of 1.5 CPUs")
    assert too_many.value.key == "train.num_workers"
    with pytest.raises(ConfigError) as no_gpu:
        check_workers_fit(workers(1, gpus=0.5), "gpu", gpu_key="search.gpus_per_trial")
    assert no_gpu.value.key == "search.gpus_per_trial"


def test_the_give_up_note_holds_only_for_the_same_trial_of_the_same_tune_run(make_config):
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.trials import earlier_give_up, record_gave_up

    cfg = make_config("train.models=[lenet5]")
    run = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)[0]
    assert earlier_give_up(run, "tune-run-1", "t0") is None
    record_gave_up(run, "tune-run-1", "t0", RuntimeError("WorkerGroupError: bad file x.png"))
    assert "bad file x.png" in earlier_give_up(run, "tune-run-1", "t0")
    assert earlier_give_up(run, "tune-run-2", "t0") is None  # a re-run of the pipeline resumes as usual
    assert earlier_give_up(run, "tune-run-1", "t1") is None


def test_a_failed_trial_is_recorded_as_failed_in_mlflow(make_config):
    """The failure path of the tracking callback on its own: the run's parameters, parent and status. A stand-in
    for the trial carries Tune 2.60's interface (``get_error()``); the test above fails a real trial."""
    from types import SimpleNamespace

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.tracking_queue import TrackingQueue, TrialTracking
    from pipelines.train import describe_run

    cfg = make_config("train.models=[lenet5]")
    run = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)[0]
    tracker = Tracker.for_config(cfg)
    parent = tracker.start_run("train-test", {"stage": "train"})
    queue = TrackingQueue(tracker)
    callback = TrialTracking(queue, "train", parent, describe=describe_run)
    trial = SimpleNamespace(trial_id="t0", config={"run": run.to_dict()}, get_error=lambda: "WorkerGroupError: boom",
                            last_result={})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_error(0, [], trial)
    assert queue.flush(timeout_s=60) == []
    failed = tracker.find_run("tags.`ray.trial_id` = 't0'")
    assert failed.info.status == "FAILED" and "boom" in failed.data.tags["error"]
    assert failed.data.params["arch"] == "lenet5" and failed.data.tags["mlflow.parentRunId"] == parent



def test_a_search_trial_run_gets_the_median_throughput_of_its_epochs(make_config):
    """A search trial ends on an epoch report (no test split): its run's train_images_per_sec was that last
    epoch's, where the training stage's runs have the median over their epochs (the report's figure)."""
    from types import SimpleNamespace

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.tracking_queue import TrackingQueue, TrialTracking
    from pipelines.train import describe_run

    cfg = make_config("train.models=[lenet5]")
    run = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)[0]
    tracker = Tracker.for_config(cfg)
    queue = TrackingQueue(tracker)
    callback = TrialTracking(queue, "search", tracker.start_run("search-test", {"stage": "search"}),
                             describe=describe_run)
    # (Tune's own maximum of val_acc: NaN once a diverged epoch's NaN came last)
    trial = SimpleNamespace(trial_id="s0", config={"run": run.to_dict()}, last_result={},
                            metric_analysis={"val_acc": {"max": float("nan")}})
    callback.on_trial_start(0, [], trial)
    accs = [0.5, 0.7, 0.6, float("nan")]
    for epoch, rate in enumerate([40.0, 100.0, 90.0, 10.0]):
        trial.last_result = {"epoch": epoch, "val_acc": accs[epoch], "score": accs[epoch] * 0.9, "val_loss": 1.0,
                             "train_images_per_sec": rate}
        callback.on_trial_result(0, [], trial, trial.last_result)
    callback.on_trial_complete(0, [], trial)
    assert queue.flush(timeout_s=60) == []
    finished = tracker.find_run("tags.`ray.trial_id` = 's0'")
    assert finished.data.metrics["train_images_per_sec"] == 65.0  # not the last epoch's 10
    # What the search ranks it by, at its best finite epoch (a diverged last epoch left them out)
    assert finished.data.metrics["best_val_acc"] == 0.7
    assert finished.data.metrics["best_score"] == pytest.approx(0.63)
    epochs = tracker.client.get_metric_history(finished.info.run_id, "epoch_images_per_sec")
    assert sorted((m.step, m.value) for m in epochs) == [(0, 40.0), (1, 100.0), (2, 90.0), (3, 10.0)]


def test_a_resumed_models_run_gets_the_epochs_an_earlier_command_trained(make_config):
    """Each command's stage opens runs of its own: a model interrupted at epoch 3 of 4 and finished by the next
    command had a run holding only epoch 4's metrics (a run resumed only to be registered, none): its curves in
    MLflow started where the resume did. The finished run's history fills in the epochs this stage did not see."""
    import json
    from types import SimpleNamespace

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.tracking_queue import TrackingQueue, TrialTracking
    from pipelines.train import describe_run

    cfg = make_config("train.models=[lenet5]", "train.epochs=4")
    run = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)[0]
    tracker = Tracker.for_config(cfg)
    queue = TrackingQueue(tracker)
    callback = TrialTracking(queue, "train", tracker.start_run("train-test", {"stage": "train"}), describe=describe_run)
    rows = [{"epoch": e, "train_loss": 2.0 - e / 4, "val_loss": 1.0, "val_acc": 0.5 + e / 10, "lr": 0.1,
             "train_images_per_sec": 100.0 + e, "epoch_seconds": 3.0, "start_epoch": 0 if e < 3 else 3}
            for e in range(4)]
    trial = SimpleNamespace(trial_id="r0", config={"run": run.to_dict()}, last_result={})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, rows[3])  # the only epoch this command trained
    trial.last_result = {"test_acc": 0.8, "best_val_acc": 0.8, "best_epoch": 3, "history": json.dumps(rows)}
    callback.on_trial_complete(0, [], trial)
    assert queue.flush(timeout_s=60) == []
    finished = tracker.find_run("tags.`ray.trial_id` = 'r0'")
    history = tracker.client.get_metric_history(finished.info.run_id, "val_acc")
    assert sorted((m.step, m.value) for m in history) == [(e, pytest.approx(0.5 + e / 10)) for e in range(4)]
    rates = tracker.client.get_metric_history(finished.info.run_id, "epoch_images_per_sec")
    assert sorted(m.step for m in rates) == [0, 1, 2, 3]  # each once: epoch 3 was not logged a second time


def test_the_tracking_callback_leaves_its_secrets_out_of_the_experiment_tune_saves(make_config, tmp_path):
    """Tune writes its callbacks into the experiment's tuner.pkl, in the storage (a bucket on a cluster): the
    tracking callback's queue held the tracking URI with its password, its hooks the config with the Serve
    token. It is saved as Tune's no-op callback (a restored experiment gets the resuming command's)."""
    from ray import tune

    from pipelines.tracking_queue import TrackingQueue, TrialTracking
    from pipelines.train import ModelFinisher, describe_run

    cfg = make_config("tracking.uri=http://alice:S3cretPW@127.0.0.1:9", "serve.auth_token=T0kenValue")
    queue = TrackingQueue(Tracker.for_config(cfg))
    finisher = ModelFinisher(cfg, queue, [])
    callback = TrialTracking(queue, "train", "parent-id", describe=describe_run, on_complete=finisher,
                             on_error=finisher.trial_failed, on_epoch=finisher.epoch_done)
    tune.Tuner(lambda config: None, run_config=tune.RunConfig(name="secrets", storage_path=str(tmp_path),
                                                              callbacks=[callback]))
    saved = (tmp_path / "secrets" / "tuner.pkl").read_bytes()
    assert saved and b"S3cretPW" not in saved and b"T0kenValue" not in saved
    import pickle

    assert type(pickle.loads(pickle.dumps(callback))) is tune.Callback


@pytest.mark.parametrize(("abort", "status"), [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")])
def test_an_aborted_stage_ends_its_run_and_the_unfinished_model_runs_and_sends_what_finished(make_config, abort,
                                                                                             status):
    """What an interrupted (Ctrl-C) or failed stage leaves in MLflow: its own run and the runs of models still
    training KILLED (FAILED), a model that had finished untouched and its writes sent. After an error they used
    to die with the process (a daemon writer thread): a finished model's registration was lost. The subprocess
    test in test_config.py sends a real Ctrl-C."""
    from types import SimpleNamespace

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.tracking_queue import TrackingQueue, TrialTracking, flushed_on_abort
    from pipelines.train import describe_run

    cfg = make_config("train.models=[lenet5,alexnet]")
    runs = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    tracker = Tracker.for_config(cfg)
    parent = tracker.start_run("train-test", {"stage": "train"})
    queue = TrackingQueue(tracker)
    callback = TrialTracking(queue, "train", parent, describe=describe_run)
    done, training = (SimpleNamespace(trial_id=f"t{i}", config={"run": run.to_dict()}, last_result={})
                      for i, run in enumerate(runs))
    with pytest.raises(abort), flushed_on_abort(queue, parent, callback):
        callback.on_trial_start(0, [], done)
        callback.on_trial_start(0, [], training)
        callback.on_trial_complete(0, [], done)
        queue.put("set_tags", parent, tags={"queued": "before the abort"})
        raise abort
    assert len(queue) == 0
    assert tracker.client.get_run(parent).info.status == status
    assert tracker.client.get_run(parent).data.tags["queued"] == "before the abort"
    assert tracker.find_run("tags.`ray.trial_id` = 't0'").info.status == "FINISHED"
    assert tracker.find_run("tags.`ray.trial_id` = 't1'").info.status == status
    assert callback.end_open_runs() == []  # nothing is ended twice

@pytest.mark.slow
def test_every_block_type_trains_one_short_epoch_through_the_worker_loop(ray_cluster, make_config, tmp_path):
    """One architecture per family and block type through train_loop_per_worker, each in a Ray Train run of its
    own in Ray Train's local mode (``num_workers=0``): the function runs in this process with Ray Train's context,
    reports and checkpoint API as a worker has them, without a controller and worker processes (about 15 s of
    start-up on 2 cores; the worker loop in real worker processes is every other Ray test's)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.data import describe_dataset, make_spec
    from pipelines.planning import ModelChoice, plan_model_runs
    from pipelines.worker import train_loop_per_worker

    # bfloat16 autocast (train.cpu_bf16): every block type must train under it as well as in fp32 (the rest of
    # the suite), e.g. DenseNet's concatenations and the SE gates mixing bf16 and fp32 tensors.
    cfg = make_config("data.image_size=16", "data.train_subset=10", "data.val_fraction=0.01",
                      "train.batch_size=8", "train.models=[lenet5]", "train.cpu_bf16=true")
    info = describe_dataset(cfg.data)
    template = plan_model_runs(cfg, info, [ModelChoice("lenet5", "lenet5")], epochs=1, cluster_cpus=2)[0]
    threads = torch.get_num_threads()  # (a worker sets its own: this process's is put back below)
    reported = {}
    try:
        for name in ONE_PER_BLOCK_TYPE:
            kwargs = {} if name == "lenet5" else {"small_input": True}
            with torch.device("meta"):  # only its input-size attributes are needed here
                model = cnnmodels.create_model(name, num_classes=10, in_chans=1, **kwargs)
            size = model.input_size_for(cfg.data.image_size)
            # stage "search": a trial without the final test evaluation
            run = template.model_copy(update={"model": ModelChoice(name, name, kwargs), "stage": "search",
                                              "spec": make_spec(info, size)})
            result = TorchTrainer(
                train_loop_per_worker, train_loop_config={"run": run.to_dict()},
                scaling_config=ray.train.ScalingConfig(num_workers=0),
                run_config=ray.train.RunConfig(name=f"every-arch-{name}", storage_path=str(tmp_path / "ray"))).fit()
            reported[name] = result.metrics if result.checkpoint is not None else None
    finally:
        torch.set_num_threads(threads)
    # Each one's epoch was reported with its checkpoint, and trained to finite losses (a NaN in bf16 would not
    # raise on its own).
    assert [name for name, metrics in reported.items() if metrics and metrics["epoch"] == 0] == ONE_PER_BLOCK_TYPE
    losses = {name: (metrics["train_loss"], metrics["val_loss"]) for name, metrics in reported.items()}
    assert np.isfinite(list(losses.values())).all(), losses


@pytest.mark.slow
def test_free_resources_counts_cpus_a_finished_actor_is_still_handing_back(ray_cluster):
    """Right after an actor dies Ray briefly under-reports free CPUs; the next stage must not size its
    workers (and concurrency) on that reading, or it crowds every model onto a sliver of CPU."""
    import ray

    from pipelines.runtime import free_resources

    before = free_resources()

    @ray.remote(num_cpus=1)
    class Holder:
        def ping(self) -> int:
            return 1

    import threading

    holder = Holder.remote()
    ray.get(holder.ping.remote())
    # Killed while free_resources already reads: its first reading has the CPU held, so only waiting for the
    # release (not the first reading) gives the full count back.
    threading.Timer(0.5, ray.kill, args=(holder,)).start()
    assert free_resources()["CPU"] >= before["CPU"] - 1e-6


def test_autocast_follows_amp_on_gpus_and_cpu_bf16_on_cpus(make_config):
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.worker import autocast_dtype, cpu_has_native_bf16

    def run(*overrides):
        cfg = make_config("train.models=[lenet5]", *overrides)
        return plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)[0]

    cpu = torch.device("cpu")
    assert autocast_dtype(run(), cpu) is None  # train.amp (on by default) is for GPUs
    assert autocast_dtype(run("train.cpu_bf16=true"), cpu) == torch.bfloat16
    assert autocast_dtype(run("train.model_overrides={lenet5: {cpu_bf16: true}}"), cpu) == torch.bfloat16
    assert autocast_dtype(run("train.amp=false", "train.cpu_bf16=true"), cpu) == torch.bfloat16
    auto = autocast_dtype(run("train.cpu_bf16=auto"), cpu)
    assert auto == (torch.bfloat16 if cpu_has_native_bf16() else None)


def test_a_gpu_that_only_emulates_bf16_trains_in_float16(make_config, monkeypatch):
    """torch counts emulated bf16 as supported (a T4 or V100 says yes): those GPUs trained in bf16 without tensor
    cores, never taking the float16-with-a-scaler path meant for them."""
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.worker import autocast_dtype

    cfg = make_config("train.models=[lenet5]")
    [run] = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    gpu = torch.device("cuda")  # a device name: nothing runs on it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype(run, gpu) == torch.float16  # compute capability 7: emulated only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype(run, gpu) == torch.bfloat16  # an A10G, an H100: native


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_auto_bf16_detects_amx_and_avx512_bf16_cpus():
    # The flags as the kernel reports them, independent of torch's own detection.
    from pipelines.worker import cpu_has_native_bf16

    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    assert cpu_has_native_bf16() == bool(flags & {"amx_tile", "avx512_bf16"})


def test_the_worker_says_which_precision_and_layout_it_chose(monkeypatch):
    from types import SimpleNamespace

    from pipelines.worker import describe_compute

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # (set_num_threads would outlive the test)
    cpu_bf16 = SimpleNamespace(world=1, device=torch.device("cpu"), amp_dtype=torch.bfloat16, channels_last=True)
    assert describe_compute(cpu_bf16) == "1 cpu worker(s) x 2 threads, bfloat16 autocast, channels-last"
    gpu_fp32 = SimpleNamespace(world=4, device=torch.device("cuda"), amp_dtype=None, channels_last=False)
    assert describe_compute(gpu_fp32) == "4 cuda worker(s), float32, contiguous"


def _worker_context(make_config, model: str, *overrides: str, **kwargs):
    """A worker's StepContext for ``model`` on a few digits, built as in Ray Train but without it (rank 0 of 1)."""
    from pipelines.data import describe_dataset
    from pipelines.planning import ModelChoice, plan_model_runs
    from pipelines.worker import build_context

    cfg = make_config("data.image_size=16", "data.train_subset=32", "train.batch_size=8", *overrides)
    [run] = plan_model_runs(cfg, describe_dataset(cfg.data), [ModelChoice(model, model, kwargs)], cluster_cpus=2)
    return build_context(run, rank=0, world=1, device=torch.device("cpu"))


def test_no_training_batch_holds_a_single_image(make_config):
    """A small set's last batch was kept whatever its size: one image left over made batch norm fail ("Expected
    more than 1 value per channel") in a model whose last maps are 1x1, at the end of every epoch."""
    remainders = set()
    for subset in (10, 17, 18):  # 17 of batch 16: one left over
        ctx = _worker_context(make_config, "lenet5", f"data.train_subset={subset}", "train.batch_size=16")
        remainders.add(len(ctx.train_sampler) % ctx.train_loader.batch_size)
        ctx.train_sampler.start_epoch(0, 1)
        assert min(len(labels) for _, labels in ctx.train_loader) > 1, subset
    assert 1 in remainders  # the case itself came up


def test_train_loss_is_the_plain_cross_entropy_whatever_the_label_smoothing(make_config):
    """train_loss was the smoothed loss trained on: with label smoothing 0.1 (every preset) it sat about 0.5 above
    val_loss's plain cross-entropy late in training, which read as underfitting."""
    from pipelines.worker import train_epoch

    losses = []
    for smoothing in (0.0, 0.3):
        ctx = _worker_context(make_config, "lenet5", f"train.label_smoothing={smoothing}", "train.lr=1e-12",
                              "train.warmup_epochs=0")
        last = [m for m in ctx.model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(30)  # confident outputs, where smoothing changes the loss (not at uniform ones)
        losses.append(train_epoch(ctx, 0)["train_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)  # same weights, same batches: the same loss


def test_a_worker_refuses_data_that_differ_from_what_the_driver_planned_with(make_config, tmp_path):
    """Each worker reads data.root on its own node: a copy missing a class folder shifted every later class's
    labels silently, and another number of images gives the DDP ranks different step counts (a hang)."""
    import shutil

    import numpy as np
    from PIL import Image

    from pipelines.data import DataError, _load_splits_cached, describe_dataset
    from pipelines.planning import ModelChoice, ModelRun, plan_model_runs
    from pipelines.worker import build_context

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in ("ant", "bee", "cat"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    cfg = make_config("data.dataset=imagefolder", f"data.root={root}", "data.image_size=16", "train.batch_size=8")
    [run] = plan_model_runs(cfg, describe_dataset(cfg.data), [ModelChoice("lenet5", "lenet5")], cluster_cpus=2)
    assert build_context(run, rank=0, world=1, device=torch.device("cpu")).run is run  # the same copy: fine
    assert run.split_membership and ModelRun.from_dict(run.to_dict()) == run
    for change in ("a renamed file", "an image moved between classes", "a stale copy (one more image)",
                   "a partial copy (no ant)"):
        if "renamed" in change:  # the same classes and split sizes: another file in some split
            (root / "bee" / "3.png").rename(root / "bee" / "3b.png")
        elif "moved" in change:
            (root / "bee" / "3b.png").rename(root / "bee" / "3.png")
            (root / "cat" / "4.png").rename(root / "bee" / "4c.png")
            (root / "bee" / "5.png").rename(root / "cat" / "5b.png")
        elif "more" in change:
            shutil.copy(root / "bee" / "0.png", root / "bee" / "10.png")
        else:
            shutil.rmtree(root / "ant")
        _load_splits_cached.cache_clear()  # this process stands for another node's worker
        with pytest.raises(DataError, match="every node needs the same copy") as refused:
            build_context(run, rank=0, world=1, device=torch.device("cpu"))
        same_counts = "renamed" in change or "moved" in change
        assert ("differ from the driver's" if same_counts else "is not what the run was planned with") \
            in str(refused.value), change


def test_a_workers_loaders_leave_the_global_random_stream_alone(make_config):
    """A loader drew its worker processes' seed from the global torch RNG when its iterator started, once per
    attempt for a persistent loader: a resumed run drew at another point than an uninterrupted one, and every
    later epoch's augmentation differed (data.loader_workers > 0, as in both GPU presets)."""
    ctx = _worker_context(make_config, "lenet5", "data.loader_workers=1")
    assert ctx.train_loader.num_workers == 1 and ctx.train_loader.persistent_workers
    ctx.train_sampler.start_epoch(0, 7)
    before = torch.get_rng_state()
    next(iter(ctx.train_loader))
    next(iter(ctx.val_loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_googlenets_train_loss_is_its_main_heads_as_val_loss_is(make_config):
    """train_loss included the auxiliary heads' losses (main + 0.3 x (aux1 + aux2)): about 1.6 times the
    validation loss for an untrained model, and not comparable with any other model's."""
    from pipelines.worker import train_epoch

    ctx = _worker_context(make_config, "googlenet", "train.lr=1e-5", small_input=True)  # barely moves
    # Each head of the untrained model is near chance (ln 10 = 2.30); the three together gave about 3.7.
    assert train_epoch(ctx, 0)["train_loss"] == pytest.approx(math.log(10), abs=0.3)


#: Two DDP ranks (gloo, one process each) on which the tests below check what the ranks must agree on: the
#: autocast dtype for each case of PRECISION_CASES (rank 0's and rank 1's own choice), and precise BN's
#: statistics. One pair of processes for all of them: each process costs seconds of imports on 2 cores.
TWO_RANKS = """
import copy, json, sys
from types import SimpleNamespace
import torch
import torch.distributed as dist
from pipelines.worker import common_autocast_dtype, recalibrate_batchnorm

def rank_main(rank, store, out, cases):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    agreed = [str(common_autocast_dtype(getattr(torch, case[rank], None), torch.device("cpu"))) for case in cases]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    model = torch.nn.parallel.DistributedDataParallel(net)
    # Each rank sees other images: rank 1's are shifted by 4 and twice as spread.
    batches = [(torch.randn(8, 1, 4, 4) * (1 + rank) + 4 * rank, torch.zeros(8)) for _ in range(3)]
    ctx = SimpleNamespace(model=model, train_loader=batches, forward=model, world=2, rank=rank, last_line_at=0.0,
                          run=SimpleNamespace(model_name="net", workers=SimpleNamespace(progress_interval_s=30.0)))
    # This rank's own statistics: the same recalibration without the other rank.
    alone = SimpleNamespace(model=copy.deepcopy(net), train_loader=batches, world=1, rank=1)
    alone.forward = alone.model
    recalibrate_batchnorm(alone, batches=3)
    recalibrate_batchnorm(ctx, batches=3)
    bn, own = model.module[1], alone.model[1]
    torch.save({"mean": bn.running_mean, "var": bn.running_var, "own_mean": own.running_mean,
                "own_var": own.running_var, "agreed": agreed}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()

if __name__ == "__main__":
    out = sys.argv[1]
    torch.multiprocessing.spawn(rank_main, args=(f"{out}/store", out, json.loads(sys.argv[2])), nprocs=2)
"""

PRECISION_CASES = [
    ("bfloat16", "float16", "torch.float16"),  # an A10G beside a T4: float16 with a scaler on both
    ("bfloat16", "fp32", "None"),  # cpu_bf16 auto on CPUs with and without native bf16: float32 on both
    ("bfloat16", "bfloat16", "torch.bfloat16"),
]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """What each of TWO_RANKS' ranks saved."""
    import json

    directory = tmp_path_factory.mktemp("two-ranks")
    script = directory / "two_ranks.py"
    script.write_text(TWO_RANKS)
    cases = json.dumps([[rank0, rank1] for rank0, rank1, _ in PRECISION_CASES])
    out = subprocess.run([sys.executable, str(script), str(directory), cases], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("case", range(len(PRECISION_CASES)), ids=["-".join(c) for c in PRECISION_CASES])
def test_the_ranks_of_a_run_train_at_one_precision(two_ranks, case):
    """Each rank chose its autocast dtype by its own hardware: mixed nodes trained one DDP model at two precisions
    (bf16 without a scaler beside float16 with one: one rank stepped 32768 times too far, the replicas drifted)."""
    agreed = PRECISION_CASES[case][2]
    assert [rank["agreed"][case] for rank in two_ranks] == [agreed, agreed]


def test_precise_bn_leaves_every_ddp_rank_with_the_same_statistics(two_ranks):
    """DDP broadcasts buffers only in forwards that need gradients: after precise BN each rank kept the
    statistics of its own images, evaluated its validation shard with them, and rank 0's went into the
    checkpoint. The ranks' statistics are averaged now."""
    for key in ("mean", "var"):
        assert not torch.allclose(two_ranks[0][f"own_{key}"], two_ranks[1][f"own_{key}"])  # they saw other images
        average = (two_ranks[0][f"own_{key}"] + two_ranks[1][f"own_{key}"]) / 2
        for rank in two_ranks:
            torch.testing.assert_close(rank[key], average)


#: Three DDP ranks (gloo) train a model on digits for three epochs, and again resumed after the first epoch from
#: what its checkpoint holds (weights, optimizer, generator states), each epoch through the worker's run_epoch.
THREE_RANKS = """
import copy, sys
import torch
import torch.distributed as dist
from pipelines.checkpoints import capture_rng_state, restore_rng_state
from pipelines.config import load_config
from pipelines.data import describe_dataset
from pipelines.planning import plan_model_runs, resolve_models
from pipelines.worker import build_context, run_epoch

def rank_main(rank, out, model):
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=3)
    torch.set_num_threads(1)
    cfg = load_config(None, [f"workdir={out}/w", f"train.models=[{model}]", "train.epochs=3", "train.num_workers=3",
                             "train.batch_size=48", "data.image_size=16", "train.precise_bn_batches=0"])
    run = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=3)[0]
    device = torch.device("cpu")
    ctx = build_context(run, rank, 3, device)
    ctx.model = torch.nn.parallel.DistributedDataParallel(ctx.model)
    for epoch in range(3):
        run_epoch(ctx, epoch)
        if epoch == 0:  # what its checkpoint holds (rank 0's weights, this rank's generators)
            rng, optimizer = capture_rng_state(device), copy.deepcopy(ctx.optimizer.state_dict())
            weights = copy.deepcopy(ctx.model.module.state_dict())
    went_on = ctx.model.module.state_dict()
    resumed = build_context(run, rank, 3, device)
    resumed.model.load_state_dict(weights)
    resumed.optimizer.load_state_dict(optimizer)
    resumed.model = torch.nn.parallel.DistributedDataParallel(resumed.model)
    resumed.start_epoch = 1
    restore_rng_state(rng, device)
    for epoch in (1, 2):
        run_epoch(resumed, epoch)
    difference = max((went_on[k].double() - v.double()).abs().max().item()
                     for k, v in resumed.model.module.state_dict().items() if v.is_floating_point())
    torch.save({"difference": difference}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()

if __name__ == "__main__":
    torch.multiprocessing.spawn(rank_main, args=(sys.argv[1], sys.argv[2]), nprocs=3)
"""


@pytest.mark.slow
def test_a_run_of_three_ddp_ranks_resumed_ends_with_the_weights_of_one_that_went_on(tmp_path):
    """DDP regroups its gradient buckets after its first step, which changes the order three or more ranks'
    gradients are summed in: a run resumed at an epoch (a new DDP wrapper) drifted from one that went on (resnet18
    0.15 apart one epoch later, lenet5 3e-8), where the docs promise the same weights. Each epoch gets a new wrapper
    now."""
    script = tmp_path / "three_ranks.py"
    script.write_text(THREE_RANKS)
    out = subprocess.run([sys.executable, str(script), str(tmp_path), "lenet5"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["difference"] for r in range(3)] == [0.0] * 3


def test_the_learning_rate_warms_up_linearly_then_follows_the_schedule():
    from pipelines.optim import lr_at

    steps = 10  # per epoch; 3 epochs, 1 of warm-up
    cosine = [lr_at(0.1, "cosine", 1.0, 3, step, steps) for step in range(30)]
    assert cosine[0] == pytest.approx(0.01) and cosine[9] == pytest.approx(0.1)  # linear warm-up to the peak
    assert cosine[10] == pytest.approx(0.1) and cosine[-1] < 0.002  # then cosine decay towards zero
    assert all(a >= b for a, b in zip(cosine[9:], cosine[10:], strict=False))
    assert cosine[20] == pytest.approx(0.05, abs=0.003)  # half-way through the decay
    constant = [lr_at(0.1, "constant", 0.0, 3, step, steps) for step in range(30)]
    assert constant == [0.1] * 30
    # A fractional warm-up is rounded to whole steps, not truncated (0.29 of 100 steps was 28 steps)
    assert lr_at(0.1, "constant", 0.29, 1, 27, 100) == pytest.approx(0.1 * 28 / 29)


@pytest.fixture
def worker_lines(monkeypatch):
    """The worker module on a clock of its own (``clock[0]``, seconds) and the lines it logs, as (time, message)."""
    from types import SimpleNamespace

    import pipelines.worker as worker

    clock, lines = [0.0], []
    # The worker module's clock only (patching time.perf_counter itself stopped it for every thread in the process)
    monkeypatch.setattr(worker, "time", SimpleNamespace(perf_counter=lambda: clock[0], time=worker.time.time,
                                                        monotonic=worker.time.monotonic, sleep=worker.time.sleep))
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append((clock[0], record.getMessage()))
    worker.logger.addHandler(handler)
    old_level = worker.logger.level
    worker.logger.setLevel(logging.INFO)
    try:
        yield clock, lines
    finally:
        worker.logger.removeHandler(handler)
        worker.logger.setLevel(old_level)


def test_progress_lines_come_before_the_interval_passes_and_long_evaluations_print_them_too(worker_lines):
    """A line was printed only once 30 s had passed, after the step that crossed it: with 7 s steps (DenseNet on 2
    cores) the gaps were 35 s. Validation, the test evaluation and precise BN printed nothing, however long."""
    from types import SimpleNamespace

    import pipelines.worker as worker

    clock, lines = worker_lines
    ctx = SimpleNamespace(rank=0, world=2, last_line_at=0.0, run=SimpleNamespace(
        model_name="densenet121", workers=SimpleNamespace(progress_interval_s=30.0)))
    progress = worker.LoopProgress(ctx, "epoch 1/3", 100)
    for done in range(1, 101):
        clock[0] += 7.0
        progress.step(done, done * 64)
    assert lines, "no progress line"
    times = [0.0] + [at for at, _ in lines]
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) <= 30.0
    assert "[densenet121] epoch 1/3: batch 4/100, 18 img/s, epoch ETA " in lines[0][1]

    lines.clear()
    model = torch.nn.Linear(4, 3)

    def slow_forward(images):
        clock[0] += 12.0
        return model(images)

    ctx.model, ctx.forward, ctx.device = model, slow_forward, torch.device("cpu")
    batches = [(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)) for _ in range(6)]
    ctx.last_line_at = clock[0]  # (as an epoch's report leaves it)
    worker.evaluate(ctx, batches, "test")
    found = [re.search(r"\[densenet121\] (\w+): batch (\d+)/6, .* (\w+) ETA", message) for _, message in lines]
    assert [(m.group(1), int(m.group(2)), m.group(3)) for m in found] == [("test", 2, "test"), ("test", 4, "test")]


def test_divergence_is_judged_on_the_weights_not_on_an_epochs_loss():
    """With float16 autocast one overflowing batch makes the epoch's loss infinite while the gradient scaler skips
    its step and the weights stay sound: the run must go on. NaN weights or batch-norm statistics stop it, and so
    does a loss scale the scaler halved below 1 (every step skipped: the weights finite, nothing trained)."""
    from types import SimpleNamespace

    from pipelines.worker import diverged

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ctx = SimpleNamespace(model=model, device=torch.device("cpu"), scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert not diverged(ctx)
    with torch.no_grad():
        model[1].running_var[0] = float("nan")
    assert diverged(ctx)
    with torch.no_grad():
        model[1].running_var.fill_(1.0)
        model[0].weight[0, 0] = float("inf")
    assert diverged(ctx)
    # float16 autocast, activations overflowing: the scaler skips every step (halving its scale each time), the
    # weights stay finite and nothing trains. One overflowing batch (the scale halved once) is no divergence.
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** -20)
    assert diverged(ctx)
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 15)
    assert not diverged(ctx)


def test_a_run_that_diverged_is_not_resumed_for_more_epochs_and_stays_in_the_results(make_config, caplog):
    """A run that diverged at epoch 3 of 10 and stopped keeps its record (its best epoch before). Re-run with 20
    epochs it resumed from its NaN weights, trained nothing and was registered again as a 20-epoch model."""
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.results import ModelResult
    from pipelines.train import _split_finished, current_results

    cfg = make_config("train.models=[lenet5, alexnet]", "train.epochs=20")
    runs = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    for run in runs:
        history = [{"epoch": 0, "val_acc": 0.7}, {"epoch": 1, "val_acc": 0.8}]
        if run.model_name == "lenet5":
            history.append({"epoch": 2, "val_acc": float("nan"), "diverged": True})
        ModelResult(run.model_name, run.arch, {}, run.run_name, run.fingerprint, 32, 1, 1, 10, 0.8, 1, 0.79, 1.0,
                    1.0, "/nowhere", history=history).save(cfg.paths.train_dir)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        todo, skipped = _split_finished(cfg, runs)
    assert [r.model_name for r in todo] == ["alexnet"] and skipped == ["lenet5"]  # alexnet: 10 of 20, resumed
    assert "lenet5 diverged at epoch 3 of its training and stopped; its record (epoch 2) stays" in caplog.text
    assert "lenet5 was trained to 10 epochs" not in caplog.text  # no warm-restart warning for it
    # ... and it is this stage's result (its table, the report), not dropped as a shorter training's record.
    assert set(current_results(cfg, runs)) == {"lenet5"}


def test_the_loops_of_one_epoch_share_the_progress_interval(worker_lines):
    """Each loop (training, batch-norm statistics, validation) started its own 30 s clock and never printed its
    last batch: their quiet tails added up to 69 s without a line in one epoch. The interval now runs from the
    last line any of them printed."""
    from types import SimpleNamespace

    import pipelines.worker as worker

    clock, lines = worker_lines
    ctx = SimpleNamespace(rank=0, world=1, last_line_at=0.0, run=SimpleNamespace(
        model_name="densenet121", workers=SimpleNamespace(progress_interval_s=30.0)))
    for what, batches, seconds in (("epoch 1/3", 100, 1.0), ("batch-norm statistics", 20, 1.4),
                                   ("validation", 40, 0.7)):
        progress = worker.LoopProgress(ctx, what, batches)
        for done in range(1, batches + 1):
            clock[0] += seconds
            progress.step(done, done * 64)
    times = [0.0, *(at for at, _ in lines), clock[0]]
    # The last loop's last batch ends the epoch (156 s), which the epoch's own line reports.
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) <= 31.0, times


def test_the_stage_eta_weighs_models_by_their_work_and_waits_for_a_twentieth_of_it():
    # The fashion-mnist preset's first two models: LeNet-5 (0.4 MMACs) then AlexNet (156 MMACs), 15 epochs
    # each, with the rest (vgg11_bn, googlenet, resnet18, densenet121, se_resnet18) still to train.
    lenet, alexnet, rest = 0.4e6 * 15, 155.6e6 * 15, (134.3 + 375.7 + 121.8 + 672.3 + 121.9) * 1e6 * 15
    assert stage_eta(60.0, lenet, alexnet + rest) is None  # 0.02% of the work: its pace says nothing yet
    eta = stage_eta(4400.0, lenet + alexnet, rest)  # 72 min in, AlexNet done: 9.9% of the work
    assert eta == pytest.approx(4400.0 * rest / (lenet + alexnet))
    assert 10 * 3600 < eta < 12 * 3600  # hours for the big models, not "5 models x 36 min"
    assert stage_eta(100.0, 1.0, 0.0) is None  # nothing left
    assert stage_eta(100.0, 1.0, 1.0) == pytest.approx(100.0)


@pytest.mark.slow
def test_the_compute_gate_admits_runs_first_come_first_served(ray_cluster):
    import ray

    from pipelines.compute_gate import ComputeGate

    gate = ComputeGate.remote(1)
    assert ray.get(gate.acquire.remote("a")) and ray.get(gate.acquire.remote("a"))  # every rank of "a" passes
    assert not ray.get(gate.acquire.remote("b")) and not ray.get(gate.acquire.remote("c"))
    ray.get(gate.release.remote("a"))
    assert not ray.get(gate.acquire.remote("c")) and ray.get(gate.acquire.remote("b"))  # b asked first
    ray.get(gate.release.remote("c"))  # a run that ends while still waiting leaves the queue
    ray.get(gate.release.remote("b"))
    assert ray.get(gate.acquire.remote("d"))
    ray.kill(gate)


def test_a_trial_tune_retries_leaves_the_gate(ray_cluster):
    """Tune calls only on_trial_recover when it retries a trial (its driver lost): the lost attempt kept its slot,
    and the gate stayed shut for good when the retry could not be placed."""
    import time
    from types import SimpleNamespace

    import ray

    from pipelines.compute_gate import ReleaseOnTrialEnd, compute_gate

    with compute_gate(1) as name:
        gate = ray.get_actor(name)
        assert ray.get(gate.acquire.remote("run-a")) and not ray.get(gate.acquire.remote("run-b"))
        callback = ReleaseOnTrialEnd(name, lambda config: config["run_name"])
        callback.on_trial_recover(0, [], SimpleNamespace(config={"run_name": "run-a"}))
        deadline = time.monotonic() + 10
        while not ray.get(gate.acquire.remote("run-b")) and time.monotonic() < deadline:
            time.sleep(0.1)  # release_compute does not wait for the gate
        assert ray.get(gate.acquire.remote("run-b"))


def test_a_worker_asking_after_its_trial_ended_takes_no_slot(ray_cluster):
    """A worker of a trial that ended (ASHA stopped it, it failed for good) still asking while it is torn down
    queued its run again, which then held a slot for good: the gate let no other run through."""
    import time
    from types import SimpleNamespace

    import ray

    from pipelines.compute_gate import ReleaseOnTrialEnd, compute_gate

    with compute_gate(1) as name:
        gate = ray.get_actor(name)
        callback = ReleaseOnTrialEnd(name, lambda config: config["run_name"])
        for end in (callback.on_trial_complete, callback.on_trial_error):
            assert ray.get(gate.acquire.remote("stopped"))
            end(0, [], SimpleNamespace(config={"run_name": "stopped"}))
            deadline = time.monotonic() + 10
            while "stopped" not in ray.get(gate.__ray_call__.remote(lambda self: getattr(self, "ended", ()))) \
                    and time.monotonic() < deadline:
                time.sleep(0.1)  # the callback does not wait for the gate
            assert ray.get(gate.acquire.remote("stopped"))  # the straggler passes, holding nothing...
            assert ray.get(gate.acquire.remote("next"))  # ... and the next run gets the slot
            ray.get(gate.release.remote("next"))


@pytest.mark.slow
def test_workers_read_the_stages_shared_conversion(ray_cluster, make_config):
    from pipelines.data import convert_splits, describe_dataset, load_splits, make_spec
    from pipelines.shared_data import fetch_converted, shared_splits

    cfg = make_config("data.image_size=16")
    spec = make_spec(describe_dataset(cfg.data), 16)
    local = convert_splits(load_splits(cfg.data), spec)
    with shared_splits() as name:
        shared = fetch_converted(name, cfg.data, spec)
    for split in ("train", "val", "test"):
        assert torch.equal(shared[split].images, local[split].images)
        assert torch.equal(shared[split].labels, local[split].labels)
    assert fetch_converted(name, cfg.data, spec) is None  # the stage's cache is gone: workers convert their own


def test_a_version_of_another_model_with_the_same_fingerprint_does_not_count_as_registered(make_config, tmp_path):
    """efficientnet_phi0 and an efficientnet at phi 0 named in train.models build the same B0 (their fingerprints
    are equal): a version of one counted as the other's registration, which was then never registered."""
    from pipelines.data import describe_dataset
    from pipelines.planning import ModelChoice, plan_model_runs
    from pipelines.train import _unregistered

    cfg = make_config("train.epochs=1")
    runs = plan_model_runs(cfg, describe_dataset(cfg.data), [
        ModelChoice("efficientnet_phi0", "efficientnet", {"phi": 0.0, "alpha": 1.3, "beta": 1.05, "gamma": 1.2}),
        ModelChoice("b0_by_hand", "efficientnet", {"phi": 0.0})], cluster_cpus=2)
    assert runs[0].fingerprint == runs[1].fingerprint
    client = Tracker.for_config(cfg).client  # (its registry is this store's, whatever mlflow's globals say)
    client.create_registered_model(cfg.registered_model_name)
    (tmp_path / "model").mkdir()
    client.create_model_version(cfg.registered_model_name, str(tmp_path / "model"), tags={
        "model_name": "efficientnet_phi0", "fingerprint": runs[0].fingerprint, "epochs": "1"})
    assert _unregistered(cfg, runs) == {"b0_by_hand"}


def test_a_version_tested_on_other_test_images_does_not_count_as_registered(make_config, tmp_path):
    """A model retested on a changed test split (its record now names the new one) whose new version was lost in a
    crash had only its version of the old test images, which counted as its registration: it was never
    registered again, and the champion, chosen among versions of the current test images, passed it over."""
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.train import _unregistered

    cfg = make_config("train.models=[lenet5]", "train.epochs=1")
    [run] = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    assert run.test_split
    client = Tracker.for_config(cfg).client
    client.create_registered_model(cfg.registered_model_name)
    (tmp_path / "model").mkdir()
    tags = {"model_name": "lenet5", "fingerprint": run.fingerprint, "epochs": "1"}
    client.create_model_version(cfg.registered_model_name, str(tmp_path / "model"),
                                tags={**tags, "test_split": "another-test-split"})
    assert _unregistered(cfg, [run]) == {"lenet5"}
    # a version of these test images holds it, and so does one from before the tag (any test images)
    for version_tags in ({**tags, "test_split": run.test_split}, tags):
        version = client.create_model_version(cfg.registered_model_name, str(tmp_path / "model"), tags=version_tags)
        assert _unregistered(cfg, [run]) == set()
        client.delete_model_version(cfg.registered_model_name, version.version)


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_a_workers_request_goes_before_the_sizes_queued_and_a_failed_conversion_is_not_repeated(ray_cluster, caplog):
    """The stage's cache converted one size at a time in the order asked: a worker's request waited behind every
    size queued before it (the first run held its CPUs or GPUs idle until all of a search's sizes were done).
    A conversion that failed was tried again by every worker's request."""
    import ray

    from pipelines.config import DataConfig
    from pipelines.data import describe_dataset, make_spec
    from pipelines.shared_data import fetch_converted, prepare, shared_splits

    data = DataConfig(dataset="fashion-mnist", train_subset=2000)  # 18,000 images a size: about a second each
    specs = [make_spec(describe_dataset(data), size) for size in (32, 40, 48, 56)]
    with shared_splits() as name:
        prepare(name, data, specs)
        last = fetch_converted(name, data, specs[-1])  # queued last, asked for first
        assert last["test"].images.shape[-1] == 56
        cache = ray.get_actor(name)
        order = ray.get(cache.__ray_call__.remote(lambda self: [json.loads(k[len(data.model_dump_json()):])
                                                                ["image_size"] for k in self._order]))
        # first, or right after the one converting when it was asked (a threaded actor runs calls in any order)
        assert 56 in order[:2], order
        missing = DataConfig(dataset="fashion-mnist", root="/nonexistent/fashion", download=False)
        with caplog.at_level(logging.WARNING, logger="pipelines"):
            assert fetch_converted(name, missing, specs[0]) is None  # failed: the worker converts its own
        # Why, not only "RayTaskError": the cache's own error, first line
        assert "shared data unavailable (RuntimeError: " in caplog.text and "/nonexistent/fashion" in caplog.text
        assert fetch_converted(name, missing, specs[0]) is None
        converted = ray.get(cache.__ray_call__.remote(lambda self: self._order))
        assert sum("/nonexistent/fashion" in key for key in converted) == 1  # tried once


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_resumes_to_the_same_weights(ray_cluster, make_config, tmp_path):
    """The worker of a training-stage run is killed (a real process exit) after epoch 0's checkpoint: Ray
    Train replaces it, the run continues from that checkpoint in the same Tune trial and MLflow run, and its
    final weights equal those of a run that never stopped, bit for bit. Augmentation is on, so this also
    needs the restored generator states, not only the (seed, epoch) order."""
    from pipelines.checkpoints import CHECKPOINT_FILE, rng_state_file
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.trials import build_trainer

    # One CPU per worker in both runs: the same thread count, so the same floating-point reductions.
    settings = ["train.models=[lenet5]", "train.epochs=2", "data.train_subset=64", "data.augment=true",
                "train.batch_size=16", "train.precise_bn_batches=2", "train.max_failures=1",
                "train.cpus_per_worker=1", "train.checkpoints_to_keep=2", *FAST[1:4]]

    # The reference: the same run, uninterrupted (its Train run alone, no Tune trial or MLflow).
    cfg = make_config(*settings, workdir=tmp_path / "uninterrupted")
    run = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)[0]
    reference = build_trainer(run).fit()
    assert reference.metrics["epoch"] == 1 and reference.metrics["start_epoch"] == 0
    with reference.checkpoint.as_directory() as directory:
        assert (Path(directory) / rng_state_file(0)).is_file()
        uninterrupted = load_checkpoint(Path(directory) / CHECKPOINT_FILE).state_dict

    cfg = make_config(*settings, "train.simulate_failure_at_epoch=1", workdir=tmp_path / "killed")
    stage = train_stage(cfg)
    assert stage.ok, stage.failed
    result = stage.results["lenet5"]
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert [h["start_epoch"] for h in result.history] == [0, 1]  # restarted at epoch 1, not from epoch 0
    steps = [m.step for m in Tracker.for_config(cfg).client.get_metric_history(result.mlflow_run_id, "val_acc")]
    assert sorted(steps) == [0, 1]  # one MLflow run, each epoch logged once
    last = [c for c in (load_checkpoint(p) for p in Path(cfg.paths.storage).glob(f"**/{CHECKPOINT_FILE}"))
            if c.epoch == 1]
    assert len(last) == 1
    resumed = last[0].state_dict
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_which_finished_models_are_registered_again(make_config, monkeypatch):
    """A finished model is run again (resuming at its end, to register) only when no version of its training is
    in the registry and no pending write brings one: not when its alias was moved by a pipeline on other data,
    nor for a version registered before the fingerprint tag existed, nor during an outage."""
    import json as json_module
    from dataclasses import replace

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.results import ModelResult
    from pipelines.tracking_queue import PENDING_FILE
    from pipelines.train import _split_finished

    cfg = make_config("train.models=[lenet5, alexnet, vgg11, googlenet]")
    runs = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    for run in runs:
        ModelResult(model_name=run.model_name, arch=run.arch, model_kwargs={}, run_name=run.run_name,
                    fingerprint=run.fingerprint, input_size=32, params_count=1, macs=1, epochs=run.hyper.epochs,
                    best_val_acc=0.5, best_epoch=0, test_acc=0.5, train_images_per_sec=1.0, train_seconds=1.0,
                    checkpoint_path="", history=[],  # googlenet diverged: its registration was dropped for good
                    registration_error="weights hold NaN" if run.model_name == "googlenet" else "",
                    ).save(cfg.paths.train_dir)
    client, name = Tracker.for_config(cfg).client, cfg.registered_model_name
    client.create_registered_model(name)
    fingerprints = {run.model_name: run.fingerprint for run in runs}

    def register(alias, dataset="digits", **tags):
        version = client.create_model_version(name, "/nowhere", tags={"dataset": dataset, **tags}).version
        client.set_registered_model_alias(name, alias, version)
        return version

    register("lenet5", fingerprint=fingerprints["lenet5"])
    register("lenet5", dataset="fashion-mnist", fingerprint="other")  # the alias moved by another data set
    register("alexnet")  # registered before the fingerprint tag existed
    lost = register("vgg11", fingerprint=fingerprints["vgg11"], epochs=str(cfg.train.epochs))
    assert _split_finished(cfg, runs) == ([], ["lenet5", "alexnet", "vgg11", "googlenet"])
    # A version of the same training to fewer epochs does not hold the longer one (its registration lost).
    longer = make_config("train.models=[lenet5, alexnet, vgg11, googlenet]", f"train.epochs={cfg.train.epochs + 2}")
    longer_runs = plan_model_runs(longer, describe_dataset(longer.data), resolve_models(longer), cluster_cpus=2)
    for run in longer_runs:
        replace(ModelResult.load(cfg.paths.train_dir / f"{run.model_name}.json"),
                epochs=run.hyper.epochs).save(cfg.paths.train_dir)
    assert [r.model_name for r in _split_finished(longer, longer_runs)[0]] == ["vgg11"]
    for run in runs:
        replace(ModelResult.load(cfg.paths.train_dir / f"{run.model_name}.json"),
                epochs=run.hyper.epochs).save(cfg.paths.train_dir)

    client.delete_model_version(name, lost)  # deleted in the MLflow UI
    todo, skipped = _split_finished(cfg, runs)
    assert [r.model_name for r in todo] == ["vgg11"] and skipped == ["lenet5", "alexnet", "googlenet"]
    pending = cfg.paths.run_dir / PENDING_FILE
    pending.write_text(json_module.dumps({"tracking_uri": cfg.tracking_uri, "run_ids": {}, "ops": [
        {"seq": 1, "kind": "register", "ref": "r", "args": {"alias": "vgg11"}}]}))
    assert _split_finished(cfg, runs)[0] == []  # the pending write will register it
    pending.unlink()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": "http://127.0.0.1:9"})})
    assert _split_finished(down, runs)[0] == []  # the registry cannot be asked: nothing is retrained for it


def test_an_image_folders_changed_files_retrain_or_retest_its_models(make_config, tmp_path, caplog):
    """The fingerprint held only the settings, the class names and a sample's mean and std: images relabelled
    (moved to another class folder) or added to training left the models skipped as trained, and the finished
    search reused. Images added to test/ left every model skipped with its test accuracy on the old test images,
    and the champion, chosen among versions tested on the new ones, was none: the alias deleted."""
    import numpy as np
    from PIL import Image

    from pipelines.data import describe_dataset, forget_loaded_splits
    from pipelines.planning import data_content, plan_model_runs, resolve_models
    from pipelines.results import ModelResult
    from pipelines.train import _split_finished

    root, rng = tmp_path / "images", np.random.default_rng(0)
    write_split_folder(root, rng)
    cfg = make_config("data.dataset=imagefolder", f"data.root={root}", "data.image_size=16", "train.batch_size=8",
                      "train.models=[lenet5]")

    def plan():
        forget_loaded_splits()  # (the files changed)
        info = describe_dataset(cfg.data)
        [run] = plan_model_runs(cfg, info, resolve_models(cfg), cluster_cpus=2)
        return run, data_content(info)

    run, content = plan()
    ModelResult(model_name="lenet5", arch="lenet5", model_kwargs={}, run_name=run.run_name,
                fingerprint=run.fingerprint, input_size=16, params_count=1, macs=1, epochs=run.hyper.epochs,
                best_val_acc=0.5, best_epoch=0, test_acc=0.5, train_images_per_sec=1.0, train_seconds=1.0,
                checkpoint_path="", test_split=run.test_split).save(cfg.paths.train_dir)
    client, name = Tracker.for_config(cfg).client, cfg.registered_model_name
    client.create_registered_model(name)
    version = client.create_model_version(name, "/nowhere", tags={
        "dataset": "imagefolder", "data_root": str(root), "model_name": "lenet5", "fingerprint": run.fingerprint,
        "epochs": str(run.hyper.epochs), "test_split": run.test_split}).version
    client.set_registered_model_alias(name, "lenet5", version)
    assert _split_finished(cfg, [run]) == ([], ["lenet5"])

    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / "test" / "bee" / "9.png")
    tested_anew, _ = plan()
    assert tested_anew.fingerprint == run.fingerprint and tested_anew.test_split != run.test_split
    with caplog.at_level(logging.INFO, logger="pipelines"):
        todo, skipped = _split_finished(cfg, [tested_anew])  # trained, so resumed to test and register it again
    assert [r.model_name for r in todo] == ["lenet5"] and skipped == []
    # said as what it is (its version is of the old test images), not as a registration lost
    assert "lenet5 is trained but was tested on other test images" in caplog.text
    assert "not in the registry" not in caplog.text

    (root / "test" / "bee" / "9.png").unlink()
    assert plan() == (run, content)
    (root / "val" / "ant" / "0.png").rename(root / "val" / "bee" / "0a.png")  # relabelled: the same split sizes
    relabelled, relabelled_content = plan()
    assert relabelled.fingerprint != run.fingerprint and relabelled_content != content
    (root / "val" / "bee" / "0a.png").rename(root / "val" / "ant" / "0.png")
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / "train" / "ant" / "99.png")
    assert plan()[0].fingerprint not in (run.fingerprint, relabelled.fingerprint)  # more to learn from


def test_a_run_whose_gate_is_gone_computes_with_the_cpus_it_reserved(ray_cluster, make_config):
    """A search resumed by Tune's restore keeps its trials' saved settings, naming the interrupted stage's gate:
    nothing held its runs back any more, and each trained with a full share's threads on a smaller reservation
    (two trials x 2 threads on 2 cores)."""
    from pipelines.compute_gate import compute_gate, worker_threads
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models

    cfg = make_config("train.models=[lenet5]")
    [planned] = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    overlapped = planned.model_copy(update={"threads": 2, "workers": planned.workers.model_copy(
        update={"cpus_per_worker": 0.67})})
    with compute_gate(1) as gate:
        assert worker_threads(overlapped.model_copy(update={"compute_gate": gate})) == 2  # admitted by its gate
    assert worker_threads(overlapped.model_copy(update={"compute_gate": "cnnzoo-gate-gone"})) == 1
    assert worker_threads(planned) == planned.threads_per_worker  # no overlap: as planned


def test_a_failed_model_leaves_the_stages_estimate(make_config):
    """A model whose trial failed stayed in the work still to go: the last model done said "about 40 min to go"
    as the stage ended."""
    from types import SimpleNamespace

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.train import ModelFinisher

    cfg = make_config("train.models=[lenet5, resnet18]")
    runs = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    finisher = ModelFinisher(cfg, queue=None, runs=runs)
    work = {run.model_name: max(run.macs, 1) * run.hyper.epochs for run in runs}
    assert finisher.work_to_go() == sum(work.values())
    finisher.trial_failed(SimpleNamespace(config={"run": runs[1].to_dict()}))  # as Tune hands it over
    assert finisher.work_to_go() == work["lenet5"]


def test_the_stage_estimate_counts_only_the_epochs_an_interrupted_run_has_left(make_config):
    """A run trained to its end and re-opened only to be registered (or resumed at epoch 14 of 15) was counted
    with all its epochs to go: "about 1 min 52 s to go" for a registration of about 12 s."""
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.train import ModelFinisher

    cfg = make_config("train.models=[lenet5, resnet18]", "train.epochs=15")
    runs = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    macs = {run.model_name: max(run.macs, 1) for run in runs}
    finisher = ModelFinisher(cfg, queue=None, runs=runs, resumes_at={"lenet5": 15, "resnet18": 14})
    assert finisher.work_to_go() == macs["resnet18"] * 1
    assert ModelFinisher(cfg, queue=None, runs=runs).work_to_go() == sum(m * 15 for m in macs.values())


def test_a_stage_tune_returned_from_without_finishing_its_models_is_an_interruption(ray_cluster, make_config,
                                                                                   monkeypatch):
    """Where Tune handles a Ctrl-C itself (a notebook's interrupt, TUNE_DISABLE_SIGINT_HANDLER=0) it leaves its
    loop and returns normally, the models unfinished and without errors: the stage listed them as trained, said
    it succeeded and ended its MLflow run FINISHED. (run_model_trials stands in for Tune's early return here: an
    empty result grid, no trial run.)"""
    import pipelines.train as train
    from pipelines.results import load_results

    cfg = make_config("train.models=[lenet5]", "data.train_subset=100", "data.image_size=16")
    monkeypatch.setattr(train, "run_model_trials", lambda *args, **kwargs: [])
    with pytest.raises(KeyboardInterrupt, match="the training of lenet5 was interrupted"):
        train.train_stage(cfg, show_table=False)
    parent = Tracker.for_config(cfg).find_run("tags.stage = 'train' and tags.`cnnzoo.stage_parent` = 'true'")
    assert parent.info.status == "KILLED"
    assert "lenet5" not in load_results(cfg.paths.train_dir)


def test_the_stage_eta_counts_the_epochs_of_models_training_side_by_side(make_config):
    """Ten models on one GPU (H200, the fashion-mnist preset): after LeNet-5 and AlexNet finished at 4 min 05 s,
    the stage said "about 42 min 58 s to go" while the others were a third to three quarters through and
    DenseNet-121, the last, needed about 9 more minutes: only finished models counted as work done."""
    from types import SimpleNamespace

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.train import ModelFinisher

    names = ["lenet5", "alexnet", "vgg11_bn", "googlenet", "resnet18", "densenet121", "se_resnet18"]
    cfg = make_config("train.models=[" + ",".join(names) + "]", "train.epochs=15")
    runs = {r.model_name: r for r in plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg),
                                                      cluster_cpus=2)}
    finisher = ModelFinisher(cfg, queue=None, runs=list(runs.values()))
    t0 = finisher.started
    # (epochs reached at 245 s, seconds per epoch) as measured; every model's first epoch came after 50 s.
    measured = {"lenet5": (15, 11), "alexnet": (15, 12), "vgg11_bn": (12, 13), "googlenet": (5, 30),
                "resnet18": (10, 16), "densenet121": (4, 48), "se_resnet18": (8, 20)}
    for name, (reached, seconds) in measured.items():
        trial = SimpleNamespace(config={"run": runs[name].to_dict()})
        for epoch in range(reached):
            ended = t0 + 245 - (reached - 1 - epoch) * seconds
            finisher.epoch_done(trial, {"epoch": epoch, "start_epoch": 0}, now=ended)
    assert finisher.running["densenet121"]["epoch_seconds"] == pytest.approx(48)
    finisher.model_finished("lenet5", 15, now=t0 + 220)
    line = finisher.model_finished("alexnet", 15, now=t0 + 245)
    eta = finisher.eta(now=t0 + 245)
    assert eta == pytest.approx(11 * 48)  # DenseNet-121's 11 epochs left at its pace: the stage's tail
    assert "2/7 models done in 4 min 05 s, about 8 min 48 s to go" in line
    # Work done counts the epochs of models still training; what is left, only the epochs they have not reached.
    assert finisher.work_to_go() == sum(runs[n].macs * (15 - r) for n, (r, _) in measured.items() if r < 15)
    assert finisher.work_done() == sum(runs[n].macs * r for n, (r, _) in measured.items())
    # A model resumed by this stage at epoch 10 counts only the epochs trained here as done.
    resumed = SimpleNamespace(config={"run": runs["resnet18"].to_dict()})
    finisher.epoch_done(resumed, {"epoch": 10, "start_epoch": 10}, now=t0 + 260)
    assert finisher.running["resnet18"] == {"start": 10, "reached": 11, "at": t0 + 260, "epoch_seconds": 16}

    # Early on (under a twentieth of the work done) the tail of the models training is no estimate while
    # others wait in the queue: on 2 cores, two at a time, AlexNet's 1.5 h left are not the stage's 13 h.
    early = ModelFinisher(cfg, queue=None, runs=list(runs.values()))
    alexnet = SimpleNamespace(config={"run": runs["alexnet"].to_dict()})
    for epoch in range(2):
        early.epoch_done(alexnet, {"epoch": epoch, "start_epoch": 0}, now=early.started + 400 * (epoch + 1))
    assert early.model_finished("lenet5", 15, now=early.started + 800) == "[train] 1/7 models done in 13 min 20 s"


def test_the_stage_hears_of_every_epoch_and_a_failing_estimate_never_ends_it(make_config, caplog):
    """TrialTracking hands each epoch's result to the stage's estimate; Tune does not guard its callbacks, so an
    error there would end every model's training."""
    from types import SimpleNamespace

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.tracking_queue import TrackingQueue, TrialTracking
    from pipelines.train import ModelFinisher, describe_run

    cfg = make_config("train.models=[lenet5]")
    runs = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    tracker = Tracker.for_config(cfg)
    queue = TrackingQueue(tracker)
    finisher = ModelFinisher(cfg, queue, runs)
    callback = TrialTracking(queue, "train", tracker.start_run("train-test", {"stage": "train"}),
                             describe=describe_run, on_complete=finisher, on_epoch=finisher.epoch_done)
    trial = SimpleNamespace(trial_id="t0", config={"run": runs[0].to_dict()}, last_result={})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, {"epoch": 0, "val_acc": 0.5, "val_loss": 1.0, "start_epoch": 0})
    assert finisher.running["lenet5"]["reached"] == 1
    callback.on_trial_result(0, [], trial, {"val_acc": 0.6, "val_loss": 0.9, "test_acc": 0.6})  # the test report
    assert finisher.running["lenet5"]["reached"] == 1

    def broken(trial, result):
        raise KeyError("epoch")

    callback.on_epoch = broken
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        callback.on_trial_result(0, [], trial, {"epoch": 1, "val_acc": 0.7, "val_loss": 0.8})
    assert "lenet5: progress not counted" in caplog.text
    assert queue.flush(timeout_s=60) == []


def test_a_resumed_model_counts_only_the_epochs_this_stage_trained():
    """A run resumed at epoch 14 of 15 was credited with all 15 epochs' work: after a Ctrl-C during densenet121,
    the stage promised its remaining models in minutes when they took hours."""
    from pipelines.train import epochs_of_the_last_attempt

    def history(start_epoch: int) -> list[dict]:
        return [{"epoch": e, "start_epoch": 0 if e < start_epoch else start_epoch} for e in range(15)]

    assert epochs_of_the_last_attempt(history(14)) == 1  # resumed at epoch 14 by this stage
    assert epochs_of_the_last_attempt(history(0)) == 15  # trained here from the start
    assert epochs_of_the_last_attempt([]) == 0
    # Re-run only to be registered (resumed past its last epoch): the history is an earlier attempt's, but this
    # attempt trained nothing; it was credited with all 15 epochs and the stage promised seconds for hours.
    assert epochs_of_the_last_attempt(history(0), start_epoch=15) == 0
    assert epochs_of_the_last_attempt(history(14), start_epoch=14) == 1


def _replay_stage(finisher, runs: dict, order: list[str], slots: int, epoch_seconds, before: float, after: float,
                  *, with_start: bool = True) -> list[tuple[float, str, str]]:
    """Replay a train stage into ``finisher``: ``order`` in Tune's order, ``slots`` models at a time, each paying
    ``before`` seconds to start, its epochs of ``epoch_seconds(name)``, and ``after`` seconds to be tested and
    recorded. Returns (when, model, progress line) of each finish; the stage ends at the last."""
    from types import SimpleNamespace

    t0 = finisher.started + 5  # the stage's own set-up before the first trial
    free_at = [t0] * slots
    events = []  # (time, kind, name, payload)
    for name in order:
        slot = min(range(slots), key=free_at.__getitem__)
        start = free_at[slot]
        epochs = runs[name].hyper.epochs
        for epoch in range(epochs):
            events.append((start + before + (epoch + 1) * epoch_seconds(name), "epoch", name, (epoch, start)))
        end = start + before + epochs * epoch_seconds(name) + after
        events.append((end, "done", name, (epochs, start)))
        free_at[slot] = end
    lines = []
    for when, kind, name, (value, start) in sorted(events, key=lambda e: (e[0], e[1] == "done")):
        trial = SimpleNamespace(config={"run": runs[name].to_dict()})
        if kind == "epoch":
            finisher.epoch_done(trial, {"epoch": value, "start_epoch": 0}, now=when)
        else:
            started = {"started_at": start} if with_start else {}
            lines.append((when, name, finisher.model_finished(name, value, now=when, **started)))
    return lines


def test_the_stage_eta_counts_each_models_fixed_cost_in_seconds_not_multiply_adds(make_config):
    """A new user's quick start on 2 cores said "about 17 min to go" at 2 of 9 models with 4.8 min left: the
    first models (LeNet-5, AlexNet: few multiply-adds) spent most of their time in the ~12 s every model pays
    to start and to be tested, which MACs x epochs read as a slow pace over the large models."""
    import re

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.train import ModelFinisher

    order = ["lenet5", "alexnet", "vgg11_bn", "googlenet", "resnet18", "densenet121", "se_resnet18"]
    cfg = make_config("train.models=[" + ",".join(order) + "]", "train.epochs=2")
    runs = {r.model_name: r for r in plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg),
                                                      cluster_cpus=2)}
    per_mmac = {name: 2.0 * 1e-6 * runs[name].macs for name in order}

    def epoch_seconds(name: str) -> float:  # validation and checkpoint, then the training loop by size
        return 1.0 + 20 * per_mmac[name] / max(per_mmac.values())

    def seconds(text: str) -> float:  # "about 1 min 33 s to go" -> 93
        to_go = re.search(r"about (?:(\d+) min )?(\d+) s to go", text)
        return int(to_go.group(1) or 0) * 60 + int(to_go.group(2))

    for slots in (1, 2):
        finisher = ModelFinisher(cfg, queue=None, runs=list(runs.values()))
        lines = _replay_stage(finisher, runs, order, slots, epoch_seconds, before=10.0, after=2.0)
        end = lines[-1][0]
        when, _, line = lines[1]  # the second model done
        assert "2/7 models done" in line and "to go" in line, line
        left = end - when
        assert 0.6 * left <= seconds(line) <= 1.5 * left, (slots, line, left)
        # and every later estimate within the same bounds (the last model's line has nothing to go)
        for when, _, line in lines[2:-1]:
            assert "to go" in line and 0.5 * (end - when) <= seconds(line) <= 1.6 * (end - when), (slots, line,
                                                                                                 end - when)
    # Without a trial's start time (an older Tune callback), the estimate is the one by multiply-adds, as before.
    fallback = ModelFinisher(cfg, queue=None, runs=list(runs.values()))
    _replay_stage(fallback, runs, order, 2, epoch_seconds, before=10.0, after=2.0, with_start=False)
    assert not fallback.fixed


def _finisher_of_three(make_config, epochs: int):
    """A stage's ModelFinisher for lenet5, alexnet and resnet18 of ``epochs`` each, its start time, and a Tune
    trial stand-in per model (what ``epoch_done`` reads)."""
    from types import SimpleNamespace

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.train import ModelFinisher

    cfg = make_config("train.models=[lenet5, alexnet, resnet18]", f"train.epochs={epochs}")
    runs = {r.model_name: r for r in plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg),
                                                      cluster_cpus=2)}
    finisher = ModelFinisher(cfg, queue=None, runs=list(runs.values()))
    trial = {name: SimpleNamespace(config={"run": runs[name].to_dict()}) for name in runs}
    return finisher, finisher.started, trial

def test_a_running_model_past_its_usual_epoch_still_leaves_time_to_go_and_a_failing_estimate_is_no_error(
        make_config, caplog, monkeypatch):
    """A model whose epoch ran over its measured length had "0 s" left (the line lost its time to go while the
    stage had minutes to run); and an error in the estimate, called from Tune's callback unguarded, would
    have ended the stage."""
    finisher, t0, trial = _finisher_of_three(make_config, epochs=4)
    for epoch in range(4):  # lenet5: 10 s to start, 4 epochs of 2 s, 2 s to finish
        finisher.epoch_done(trial["lenet5"], {"epoch": epoch, "start_epoch": 0}, now=t0 + 10 + 2 * (epoch + 1))
    finisher.model_finished("lenet5", 4, now=t0 + 20, started_at=t0)
    for epoch in range(2):  # alexnet, beside it: epochs of 5 s
        finisher.epoch_done(trial["alexnet"], {"epoch": epoch, "start_epoch": 0}, now=t0 + 10 + 5 * (epoch + 1))
    for epoch in range(4):
        finisher.epoch_done(trial["resnet18"], {"epoch": epoch, "start_epoch": 0}, now=t0 + 30 + 3 * (epoch + 1))
    finisher.model_finished("resnet18", 4, now=t0 + 44, started_at=t0 + 20)
    # alexnet's third epoch running over its 5 s adds about that epoch, not every epoch left at twice its pace
    assert finisher.eta(now=t0 + 25.1) - finisher.eta(now=t0 + 24.9) < 5.5
    # ... and 60 s late, it is still training, with two epochs to go
    late = finisher.eta(now=t0 + 20 + 60)
    assert late is not None and late > 0
    monkeypatch.setattr(finisher, "eta", lambda now=None: 1 / 0)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        line = finisher.model_finished("alexnet", 4, now=t0 + 100, started_at=t0)
    assert line.startswith("[train] 3/3 models done") and "to go" not in line
    assert "no estimate of the time to go (ZeroDivisionError" in caplog.text


def test_the_last_running_model_without_a_pace_of_its_own_still_leaves_time_to_go(make_config):
    """Every model left training, the slowest having reported only its first epoch of this attempt (no pace of
    its own yet): the stage said "about 0 s to go" with its epochs left to train."""
    finisher, t0, trial = _finisher_of_three(make_config, epochs=10)
    for epoch in range(10):  # lenet5 and alexnet side by side: 10 s to start, epochs of 2 s and 5 s
        finisher.epoch_done(trial["lenet5"], {"epoch": epoch, "start_epoch": 0}, now=t0 + 10 + 2 * (epoch + 1))
        finisher.epoch_done(trial["alexnet"], {"epoch": epoch, "start_epoch": 0}, now=t0 + 10 + 5 * (epoch + 1))
    finisher.model_finished("lenet5", 10, now=t0 + 32, started_at=t0)
    finisher.epoch_done(trial["resnet18"], {"epoch": 0, "start_epoch": 0}, now=t0 + 55)  # started at 32
    line = finisher.model_finished("alexnet", 10, now=t0 + 62, started_at=t0)
    assert line.startswith("[train] 2/3 models done") and "to go" in line, line
    assert finisher.eta(now=t0 + 62) > 9 * 5  # nine epochs left, each at least alexnet's 5 s by the MACs fit


def test_a_stage_aborted_after_a_model_registered_moves_the_champion_to_it(ray_cluster, make_config, monkeypatch,
                                                                          tmp_path):
    """A Ctrl-C after some models had finished sent their registrations but never the champion alias, and
    `register` then found nothing pending: `serve` and the report went on with an older champion, or none."""
    import pipelines.train as train
    from pipelines.checkpoints import ModelCheckpoint, save_checkpoint
    from pipelines.data import describe_dataset
    from pipelines.preprocess import PreprocessSpec
    from pipelines.tracking import CHAMPION

    cfg = make_config("train.models=[lenet5]")
    test_split = describe_dataset(cfg.data).test_split

    def finished_one_then_interrupted(cfg, queue, parent, *args):
        spec = PreprocessSpec(image_size=32, channels=1, mean=(0.3,), std=(0.4,),
                              class_names=tuple(str(i) for i in range(10)), dataset="digits")
        model = cnnmodels.create_model("lenet5", num_classes=10, in_chans=1)
        save_checkpoint(ModelCheckpoint(arch="lenet5", model_kwargs={}, spec=spec, state_dict=model.state_dict(),
                                        model_name="lenet5"), tmp_path / "best" / "model.pt")
        tracker = Tracker.for_config(cfg)
        run_id = tracker.start_run("lenet5", {"stage": "train"})
        tracker.log_and_register(run_id, tmp_path / "best", cfg.registered_model_name, "lenet5",
                                 tags={"test_acc": 0.5, "dataset": "digits", "test_split": test_split})
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_train_models", finished_one_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg)
    registered = Tracker.for_config(cfg).client.get_registered_model(cfg.registered_model_name)
    assert registered.aliases.get(CHAMPION) == registered.aliases["lenet5"]


def test_an_interrupted_extension_resumes_without_a_second_warm_restart_warning(make_config, caplog):
    """A model trained to 5 epochs, extended to 10 and interrupted at epoch 8: re-run with 10, it resumes at
    epoch 9 on its 10-epoch schedule, but the warning said it "continues to 10 from its checkpoint" with the
    learning rate going back up to that of epoch 5."""
    import json

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.results import ModelResult
    from pipelines.train import _split_finished
    from pipelines.trials import RUN_SNAPSHOT

    cfg = make_config("train.models=[lenet5]", "train.epochs=10")
    [run] = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    ModelResult(model_name="lenet5", arch="lenet5", model_kwargs={}, run_name=run.run_name,
                fingerprint=run.fingerprint, input_size=32, params_count=1, macs=1, epochs=5, best_val_acc=0.9,
                best_epoch=4, test_acc=0.9, train_images_per_sec=1.0, train_seconds=1.0,
                checkpoint_path="").save(cfg.paths.train_dir)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert _split_finished(cfg, [run]) == ([run], [])
    assert "was trained to 5 epochs with these settings; it continues to 10" in caplog.text  # a first extension
    caplog.clear()
    run_dir = Path(run.storage_path) / run.run_name
    (run_dir / "checkpoint_000007").mkdir(parents=True)
    (run_dir / "checkpoint_000007" / "model.pt").write_bytes(b"weights")
    (run_dir / RUN_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {
        "metrics": {"epoch": 7, "epochs": 10}, "checkpoint_dir_name": "checkpoint_000007"}}))
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert _split_finished(cfg, [run]) == ([run], [])
    assert "continues to 10" not in caplog.text



@pytest.mark.parametrize("lost_first", [True, False], ids=["lost-first", "lost-second"])
@pytest.mark.parametrize("with_start", [True, False], ids=["by-seconds", "by-work"])
def test_a_model_lost_after_some_epochs_counts_its_time_as_done(make_config, with_start, lost_first):
    """A trial that failed for good left the stage's work but not its time: the stage said "about 3 min 28 s to
    go" with about 25 s left (the pace was the whole stage's time over the other models' work alone)."""
    finisher, t0, trial = _finisher_of_three(make_config, epochs=4)

    def lenet5(start: float) -> float:  # 10 s to start, 4 epochs of 2 s, 2 s to finish
        for epoch in range(4):
            finisher.epoch_done(trial["lenet5"], {"epoch": epoch, "start_epoch": 0}, now=start + 10 + 2 * (epoch + 1))
        finisher.model_finished("lenet5", 4, now=start + 20, started_at=start if with_start else None)
        return start + 20

    def resnet18(start: float) -> float:  # 10 s to start, 3 epochs of 20 s, then it fails for good
        for epoch in range(3):
            finisher.epoch_done(trial["resnet18"], {"epoch": epoch, "start_epoch": 0},
                                now=start + 10 + 20 * (epoch + 1))
        finisher.trial_failed(trial["resnet18"], now=start + 71)
        return start + 71

    # one model at a time; alexnet, last, is still queued: 10 s to start, 4 epochs of about 10 s (the line
    # through the other two by multiply-adds), 2 s to finish
    now = lenet5(resnet18(t0)) if lost_first else resnet18(lenet5(t0))
    assert now == t0 + 91
    eta = finisher.eta(now=now)
    assert eta is not None and 0.6 * 52 <= eta <= 1.5 * 52, eta
