"""A simulated multi-node cluster (``ray.cluster_utils.Cluster``): DDP workers spread over nodes, fractional GPU
shares, and a trial that loses its node mid-run.

A system check, not part of the CI suite (about 3 minutes on 2 cores: it starts a Ray cluster of its own and
trains three times): ``python -m pytest bench/system`` (README, "Quick start"). Run it with no other Ray on the
machine: with another Ray instance alive, it ran 25-40% slower.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

#: This checkout: the simulated cluster's worker setup hook imports `pipelines` before Ray puts the driver's
#: directory on the workers' path, so without it on PYTHONPATH they would import an installed copy instead.
ROOT = Path(__file__).resolve().parents[2]


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
