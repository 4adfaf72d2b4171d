"""Start the next model while the current one trains: a gate that admits runs to the CPUs one at a time.

On a machine where one model's workers take every core, runs used to go strictly one after another, and
each paid its whole start-up (a Tune trial, a Ray Train controller and worker processes importing PyTorch,
the data, the model) with the cores idle. With the gate, one more run than fits is admitted by Ray (its
workers reserve a smaller share of CPU), starts up while the current run trains, and then waits at the gate
until that run's training is done; only ``capacity`` runs train at once, each with the threads of a full
share. The planner decides when this pays (:func:`pipelines.planning.with_overlapped_startup`); a stage starts the
gate (:func:`compute_gate`), workers pass it (:func:`wait_for_compute`, :func:`release_compute`), and the
driver releases a run whose trial ended in any way (:class:`ReleaseOnTrialEnd`), so a failed run cannot
hold it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator

import ray
from ray.tune import Callback

from .runtime import on_this_node

__all__ = ["ComputeGate", "compute_gate", "wait_for_compute", "release_compute", "ReleaseOnTrialEnd",
           "gate_is_gone", "worker_threads"]

logger = logging.getLogger(__name__)

#: How often a waiting worker asks the gate again.
POLL_S = 0.25


@ray.remote(num_cpus=0)
class ComputeGate:
    """First come, first served: at most ``capacity`` runs (by run name) hold the compute at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.holders: set[str] = set()
        self.queue: list[str] = []
        self.ended: set[str] = set()  #: runs whose trials ended for good in this stage

    def acquire(self, run: str) -> bool:
        """Queue ``run`` (once) and say whether it holds the compute now. Every rank of a run may ask. A run
        whose trial has ended is let through without a slot: a worker of it still asking (being torn down, ASHA
        stopped it) queued it again, and it then held a slot for good."""
        if run in self.ended:
            return True
        if run not in self.holders and run not in self.queue:
            self.queue.append(run)
        while self.queue and len(self.holders) < self.capacity:
            self.holders.add(self.queue.pop(0))
        return run in self.holders

    def release(self, run: str) -> None:
        self.holders.discard(run)
        if run in self.queue:
            self.queue.remove(run)

    def end(self, run: str) -> None:
        """``run``'s trial ended for good (done, stopped, failed): released, and never queued again."""
        self.release(run)
        self.ended.add(run)


@contextlib.contextmanager
def compute_gate(capacity: int | None) -> Iterator[str | None]:
    """A stage's gate for ``capacity`` concurrent trainings (None: no gate); yields its actor name."""
    if capacity is None:
        yield None
        return
    name = f"cnnzoo-gate-{uuid.uuid4().hex[:12]}"
    gate = ComputeGate.options(name=name, scheduling_strategy=on_this_node()).remote(capacity)
    try:
        yield name
    finally:
        ray.kill(gate)


def _gate(name: str | None):
    if not name:
        return None
    try:
        return ray.get_actor(name)
    except ValueError:  # the stage that made it is gone (a resumed run): no gate to wait for
        return None


def gate_is_gone(gate_name: str | None) -> bool:
    """Whether a run was planned with a gate that no longer exists: a trial whose saved config names the gate
    of a stage that was interrupted, not given the resuming command's placement (:func:`pipelines.trials.trial_run`)."""
    return bool(gate_name) and _gate(gate_name) is None


def wait_for_compute(gate_name: str | None, run: str) -> None:
    """Block until ``run`` may train (at once when there is no gate)."""
    gate = _gate(gate_name)
    if gate is None:
        return
    while not ray.get(gate.acquire.remote(run)):
        time.sleep(POLL_S)


def release_compute(gate_name: str | None, run: str) -> None:
    """Hand the compute on to the next waiting run."""
    gate = _gate(gate_name)
    if gate is not None:
        gate.release.remote(run)


class ReleaseOnTrialEnd(Callback):
    """Tune callback on the driver: however a trial ends (done, stopped by ASHA, failed, retried), its run
    leaves the gate. ``run_name_of(config)`` names a trial's run; both must be picklable."""

    def __init__(self, gate_name: str | None, run_name_of) -> None:
        self.gate_name = gate_name
        self.run_name_of = run_name_of

    def _release(self, trial, *, ended: bool = True) -> None:
        gate = _gate(self.gate_name)
        if gate is not None:
            run = self.run_name_of(trial.config)
            (gate.end if ended else gate.release).remote(run)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):  # after its last retry
        self._release(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Tune retries the trial (its driver was lost): only this hook is called, and a slot kept by the lost
        # attempt would hold the gate for good if the retry cannot be placed (its node gone, not replaced). The
        # retry queues again.
        self._release(trial, ended=False)


def worker_threads(run) -> int:
    """The torch threads of one of ``run``'s workers: a full share's when a gate admits it to the cores (an
    overlapped start-up reserves less CPU than it computes with), the reserved CPUs' when its gate is gone:
    without one, every admitted run trains at once, and full shares each would oversubscribe the cores."""
    if run.threads and gate_is_gone(run.compute_gate):
        return max(1, int(round(float(run.workers.cpus_per_worker))))
    return run.threads_per_worker
