"""``run``: every stage end to end, idempotent re-runs, the report, and a simulated two-node cluster."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from cnnmodels.scaling import constraint_value
from pipelines.tracking import Tracker

pytestmark = pytest.mark.slow

#: This checkout: the simulated cluster's worker setup hook imports `pipelines` before Ray puts the driver's
#: directory on the workers' path, so without it on PYTHONPATH they would import an installed copy instead.
ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_runs_and_the_champion_answers_over_http(pipeline_run):
    cfg, result = pipeline_run
    assert result.ok and result.stages == {"search": "ran", "train": "ran", "report": "ran", "serve": "ran"}
    assert set(result.train.results) == {"lenet5", "resnet18"}
    assert result.train.champion in result.train.results
    image = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(image, format="PNG")
    response = requests.post(f"{result.serve.url}/predict", data=image.getvalue(),
                             headers={"Content-Type": "image/png"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == result.train.champion and body["requested"] == "champion"
    assert len(body["predictions"]) == 5
    assert result.seconds_to_serving is not None
    # The example printed for the user: a real test image of the data set, named after its class.
    sample = result.serve.sample_image
    assert sample is not None and sample.is_file()
    response = requests.post(f"{result.serve.url}/predict", data=sample.read_bytes(),
                             headers={"Content-Type": "image/png"}, timeout=60)
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] in cfg_class_names(cfg)


def cfg_class_names(cfg) -> tuple[str, ...]:
    from pipelines.data import describe_dataset

    return describe_dataset(cfg.data).class_names


def test_search_trials_respect_the_constraint_and_include_the_paper(pipeline_run):
    cfg, result = pipeline_run
    search = result.search
    assert len(search.trials) == 2
    for trial in search.trials:
        assert abs(constraint_value(trial["alpha"], trial["beta"], trial["gamma"]) - 2.0) <= 0.1 + 1e-9
    assert any(t["paper"] and (t["alpha"], t["beta"], t["gamma"]) == (1.2, 1.1, 1.15) for t in search.trials)
    best = json.loads(cfg.paths.search_result.read_text())
    assert best["best"]["val_acc"] == max(t["val_acc"] for t in best["trials"])
    assert {"alpha", "beta", "gamma", "val_acc", "score", "params_count", "macs"} <= set(best["best"])


def test_search_is_tracked_as_a_parent_with_a_child_per_trial(pipeline_run):
    cfg, result = pipeline_run
    tracker = Tracker.for_config(cfg)
    parent = tracker.find_run("tags.stage = 'search' and tags.`cnnzoo.stage_parent` = 'true'")
    assert parent.info.status == "FINISHED"
    assert float(parent.data.params["best_alpha"]) == result.search.best["alpha"]
    children = tracker.client.search_runs([tracker.experiment_id],
                                          f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    for child in children:
        assert child.data.tags["stage"] == "search"
        for key in ("alpha", "beta", "gamma", "phi", "compound_product", "params_count", "macs"):
            assert key in child.data.params
        steps = tracker.client.get_metric_history(child.info.run_id, "val_acc")
        assert [m.step for m in steps] == [0]


def test_report_has_the_table_and_plots(pipeline_run):
    cfg, result = pipeline_run
    directory = cfg.paths.report_dir
    for name in ("models.csv", "models.md", "accuracy_vs_macs.png", "accuracy_vs_params.png", "val_curves.png",
                 "search.png"):
        assert (directory / name).is_file(), name
    import pandas as pd

    table = pd.read_csv(directory / "models.csv")
    assert len(table) == 2
    for column in ("arch", "params", "MMACs", "best val_acc", "test_acc", "train img/s", "train s", "serve ms"):
        assert column in table.columns
    assert (table["serve ms"] > 0).all()
    tracker = Tracker.for_config(cfg)
    parent = tracker.find_run("tags.stage = 'train' and tags.`cnnzoo.stage_parent` = 'true'")
    logged = {a.path for a in tracker.client.list_artifacts(parent.info.run_id, "report")}
    assert "report/accuracy_vs_macs.png" in logged and "report/models.csv" in logged


def test_a_second_run_skips_finished_stages(pipeline_run, capsys):
    from pipelines.pipeline import run_pipeline

    cfg, first = pipeline_run
    again = run_pipeline(cfg, ["search", "train", "report"])
    assert again.stages["search"] == "skipped" and again.stages["train"] == "skipped"
    assert sorted(again.train.skipped) == sorted(first.train.results)
    assert again.train.trained == []
    assert again.search.best == first.search.best


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
            cfg = load_config(None, ["workdir={tmp_path}", "name=twonode", "train.models=[lenet5]",
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
                cfg = load_config(None, ["workdir={tmp_path}", "name=nodeloss", "train.models=[lenet5]",
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
