"""The overlapped start-up (``train.overlap_startup``, opt-in since it measured no faster on 2 cores: see
docs/benchmarks.md), end to end on a local Ray of its own (2 CPUs): the next model's Ray processes start while
one model trains, and the compute gate lets one train at a time. A system check, not a CI test, for its time
(about 40 s); run it after changing pipelines/compute_gate.py or how a run starts up (pipelines/worker.py)."""

from __future__ import annotations

import time

import pytest

from pipelines.config import load_config
from pipelines.console import configure_console
from pipelines.runtime import ray_session
from pipelines.train import train_stage

pytestmark = pytest.mark.slow


def test_the_next_model_starts_up_while_one_trains_and_waits_for_the_cores(tmp_path, capfd):
    """Two runs are admitted on a 2-CPU Ray, but only one trains at a time; both are trained, tested and
    registered as usual, with progress on the console."""
    cfg = load_config(None, [
        f"workdir={tmp_path}", "name=overlap", "ray.address=local", "ray.num_cpus=2", "ray.num_gpus=0",
        "ray.include_dashboard=true",  # Ray Train's placement-group cleanup queries the state API
        "train.models=[lenet5, vgg11]", "train.overlap_startup=true", "train.epochs=2", "data.train_subset=200",
        "data.image_size=16", "train.progress_interval_s=0.01", "train.optimizer=adamw", "train.lr=0.003",
        "train.weight_decay=0.0001", "train.batch_size=64"])
    configure_console()
    out = ""
    with ray_session(cfg):
        stage = train_stage(cfg)
        deadline = time.monotonic() + 30
        while "[vgg11] epoch 1/2: batch " not in out and time.monotonic() < deadline:
            out += capfd.readouterr().out  # worker lines reach the driver's console through Ray's log monitor
            time.sleep(0.2)
    out += capfd.readouterr().out
    assert stage.ok and sorted(stage.trained) == ["lenet5", "vgg11"]

    def at(result, milestone: str) -> float:  # wall-clock time of a run's milestone
        return result.timeline["started_at"] + result.timeline[milestone]

    first, second = sorted(stage.results.values(), key=lambda r: at(r, "compute_granted"))
    assert at(second, "worker_start") < at(first, "test_start"), "the second run did not start up meanwhile"
    # (milestones are kept to the millisecond: 2 ms for the rounding of both)
    assert at(second, "compute_granted") >= at(first, "compute_released") - 0.002, "both trained at the same time"
    assert all(r.version for r in stage.results.values()), "both registered"
    assert "[vgg11] epoch 1/2: batch " in out and " img/s, epoch ETA " in out  # within an epoch
    assert "[train] 1/2 models done in " in out and "[train] 2/2 models done" in out
