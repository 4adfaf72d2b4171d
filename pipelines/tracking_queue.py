"""Tracking writes off the training's critical path: a queue that survives a tracking outage.

The Tune callbacks and the stages hand every MLflow write (runs, params, metrics, tags, artifacts, model
registrations, the champion alias) to a :class:`TrackingQueue` and return at once; one background thread
of the driver sends them in order through :class:`~pipelines.tracking.Tracker`. While the tracking
server or the artifact store is unreachable the thread retries the oldest write with a capped back-off
(every ``RETRY_CAP_S`` at most), so training goes on and the backlog goes out within seconds of the
server's return. A run created during an outage has no MLflow id yet; callers hold a *reference* for it
(``local:...``) that the queue resolves once the run exists.

At the end of a stage :meth:`TrackingQueue.flush` waits up to ``tracking.pending_timeout_s`` for the
backlog. What is still unwritten then is saved to ``<workdir>/<name>/tracking-pending.json`` and listed in
one message with the command that finishes it (``python -m pipelines register``); the next stage or that
command picks the file up and sends it. A write no retry can send (MLflow refuses it for good, or the
checkpoint it would register is unusable) is logged and dropped, not retried: it must not hold up the writes
behind it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import re
import socket
import statistics
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from .config import redact_text, redact_uri
from .console import duration, timestamped
from .tracking import (
    EPOCH_METRIC_NAMES,
    EPOCH_METRICS,
    FINAL_METRICS,
    PERMANENT_ERRORS,
    TAG_MODEL,
    TAG_STAGE,
    TAG_TRIAL,
    TRAINING_TAGS,
    first_line,
    http_status,
    is_auth_refusal,
    is_unreachable,
)
from .trials import SCORE

__all__ = ["TrackingQueue", "TrialTracking", "TrackingOp", "PENDING_FILE", "EXIT_PENDING", "load_pending",
           "send_pending", "SentPending", "pending_summary"]

logger = logging.getLogger(__name__)

#: Written next to the run's other outputs when a stage ends with tracking writes unsent.
PENDING_FILE = "tracking-pending.json"
#: The CLI's exit code when training finished but some tracking writes are still pending.
EXIT_PENDING = 3
#: Longest wait between two attempts while the tracking store is unreachable.
RETRY_CAP_S = 10.0
#: How long flush waits, beyond the client's request timeout, for a write in flight when it gives up.
IN_FLIGHT_SLACK_S = 5.0
#: How long a pending write taken over by a command on another host (or in a container since restarted) stays
#: that command's; one on this host is its command's for as long as that process runs.
CLAIM_TTL_S = 3600.0
#: MLflow errors that no retry can fix: the write is dropped with an error message.
#: What each kind of write is, for the pending summary.
DESCRIPTIONS = {"start_run": "run created", "start_trial_run": "run created", "log_params": "params",
                "log_metrics": "metrics", "set_tags": "tags", "end_run": "run ended", "reopen": "run reopened",
                "log_artifact": "artifact", "log_text": "artifact", "register": "model registration",
                "update_champion": "champion alias"}


@dataclass
class TrackingOp:
    """One queued MLflow write: ``kind`` names a ``_do_<kind>`` method, ``ref`` the run it writes to."""

    seq: int
    kind: str
    ref: str | None
    args: dict[str, Any] = field(default_factory=dict)
    #: Tells the write apart in the pending file, which several commands of one config may share.
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)


class UnsendableWrite(LookupError):
    """A write whose run was never created (its creation was dropped) or was deleted, or a registration whose
    checkpoint is gone: no retry can send it."""


#: Writes that create a run (sent twice: two runs).
CREATING_KINDS = ("start_run", "start_trial_run")
#: Writes whose second sending repeats the first (metrics carry the time they were queued at).
RESENDABLE_KINDS = frozenset({"log_metrics", "log_params", "set_tags", "end_run"})
#: How often the pending file follows a backlog drained after an outage, for resendable writes (seconds).
DRAIN_SAVE_INTERVAL_S = 2.0


class RunStillBeingCreated(RuntimeError):
    """A write whose run another command is creating: that command's flush gave up while the creation was on its
    way (a slow server) and it still sends it, while this command took over the writes behind it. Retried until
    the run exists; dropped as never created, that run's metrics, end and registration were lost."""


def _is_permanent(err: BaseException) -> bool:
    """Whether no retry can send the write: MLflow refused it, its run does not exist, or the checkpoint it
    registers is unusable (a diverged run's NaN weights, say) or gone from a storage that answers. Anything
    else counts as an outage and is retried, a checkpoint whose storage does not answer included. Refused
    credentials (:func:`~pipelines.tracking.is_auth_refusal`) are retried too: dropped, an expired token
    discarded every write queued behind it."""
    from .checkpoints import CheckpointError, MissingCheckpointError

    if is_unreachable(err):  # before the error code: MLflow reports a lost database connection as BAD_REQUEST
        return False
    if is_auth_refusal(err):  # every write behind it meets the same: kept (on disk) until the credentials work
        return False
    unusable = isinstance(err, CheckpointError) and not isinstance(err, MissingCheckpointError)
    if unusable or isinstance(err, UnsendableWrite) or getattr(err, "error_code", None) in PERMANENT_ERRORS:
        return True
    # A 4xx from the HTTP artifact store or a proxy in front of MLflow (413: a checkpoint over nginx's 1 MB body
    # limit) is refused the same way every time: retried, it held up every write behind it, in every later
    # command too. (S3's 4xx come as botocore errors, some of them passing, as RequestTimeout's 400: retried.)
    status = http_status(err, http_only=True)
    return status is not None and 400 <= status < 500 and not is_unreachable(err)


class TrackingQueue:
    """MLflow writes in order on one background thread, retried while the tracking store is unreachable.

    Picklable (Tune saves its callbacks, which hold the queue): the thread and lock are recreated on use,
    the backlog and the resolved run ids travel with it.
    """

    def __init__(self, tracker, pending_file: str | os.PathLike | None = None) -> None:
        self.tracker = tracker
        self.pending_file = Path(pending_file) if pending_file else None
        self.run_ids: dict[str, str] = {}  #: reference -> MLflow run id, once the run exists
        #: the trial references whose run this queue created or reopened (the others in run_ids came from the
        #: pending file: an earlier command's, ended when it stopped)
        self._started_trials: set[str] = set()
        self.outcomes: dict[int, Any] = {}  #: seq -> what the write returned (e.g. a registered version)
        self.dropped: list[str] = []  #: writes MLflow refused for good, as messages
        #: (alias, fingerprint) of the registrations among them
        self.dropped_registrations: list[tuple[str, str]] = []
        self._ops: deque[TrackingOp] = deque()
        self._seq = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._down_since: float | None = None
        self._writing = False  #: the writer thread is in its loop (see _drain)
        #: Whether the pending file holds writes this queue took over: it is then kept in step as they go out,
        #: so a process killed before :meth:`flush` does not leave them to be sent twice (two model versions).
        self._tracks_file = False
        #: Names this queue's claim on the pending file's writes it took over, and which writes there are its own.
        self.token = uuid.uuid4().hex
        self._own_uids: set[str] = set()
        #: The uid of the write still being sent when the queue ended (flush): the only one it still holds.
        self._in_flight: str | None = None
        #: The (first, last) sequence numbers of the backlog last put on disk during an outage, and when (time.time).
        self._backlog_on_disk: tuple[int, int] | None = None
        self._saved_at = 0.0
        self._retry_now = False  # flush() asks the writer for one retry at once, out of its back-off
        if self.pending_file is not None:
            _wait_for_the_write_in_flight(self.pending_file)
        if self.pending_file is not None and self.pending_file.exists():
            self._tracks_file = self._load_pending() > 0

    def __getstate__(self) -> dict:
        with self._lock:
            state = dict(self.__dict__)
            state["_ops"] = list(self._ops)
            # Copies: the writer thread changes them (an outage's retries, a run created elsewhere) while Tune
            # pickles its callbacks.
            for name in ("run_ids", "outcomes", "_own_uids", "dropped", "dropped_registrations", "_started_trials"):
                state[name] = type(state[name])(state[name])
        return {**state, "_lock": None, "_thread": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_started_trials", set())  # (a queue pickled before it was kept)
        self._ops = deque(state["_ops"])
        self._lock = threading.Condition()

    def __len__(self) -> int:
        return len(self._ops)

    @classmethod
    def for_config(cls, cfg, tracker=None) -> TrackingQueue:
        """The queue of a pipeline config's tracker (``tracker``: that one, already made); picks up writes an
        earlier stage left pending."""
        from .tracking import Tracker

        return cls(tracker or Tracker.for_config(cfg), cfg.paths.run_dir / PENDING_FILE)

    # -- producers: never block on MLflow --------------------------------------------------------------
    def put(self, kind: str, ref: str | None = None, **args: Any) -> int:
        """Queue one write; returns its sequence number (see :attr:`outcomes`). Metrics and a run's end are
        stamped now, when they happen: sent after an outage they keep their times (a run's duration without
        the outage), and a metric sent twice (a retry after a lost reply) is the same point, not a second one."""
        now_ms = int(time.time() * 1000)
        if kind == "log_metrics":
            args.setdefault("timestamp_ms", now_ms)
        elif kind == "end_run":
            args.setdefault("end_time_ms", now_ms)
        elif kind in CREATING_KINDS:
            args.setdefault("start_time_ms", now_ms)
        with self._lock:
            self._seq += 1
            self._ops.append(TrackingOp(self._seq, kind, ref, args))
            self._ensure_thread()
            self._lock.notify_all()
            return self._seq

    def new_run(self, run_name: str, tags: dict[str, str], parent: str | None = None) -> str:
        """Queue a new run; returns the reference that later writes to it use."""
        ref = f"local:{uuid.uuid4().hex}"
        self.put("start_run", ref, run_name=run_name, tags=tags, parent=parent)
        return ref

    def trial_run(self, ref: str, find: str, run_name: str, tags: dict[str, str], parent: str) -> str:
        """Queue the run of a Tune trial under ``ref``: the run ``find`` matches is reopened (a restored
        trial), otherwise a new one is created."""
        self.put("start_trial_run", ref, find=find, run_name=run_name, tags=tags, parent=parent)
        return ref

    def run_id(self, ref: str) -> str | None:
        """The MLflow run id behind a reference, or None while its run is not created yet."""
        return ref if not ref.startswith("local:") else self.run_ids.get(ref)

    # -- the writer thread ---------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if not self._writer_alive():
            self._stop, self._in_flight, self._writing = False, None, True
            self._thread = threading.Thread(target=self._drain, name="cnnzoo-tracking", daemon=True)
            self._thread.start()

    def _writer_alive(self) -> bool:
        # Not the thread's is_alive(): a join interrupted by Ctrl-C marks it ended while it still sends.
        return self._thread is not None and self._writing

    def _drain(self) -> None:
        try:
            self._send_in_order()
        finally:
            # Said under the lock, for flush(): a join interrupted by Ctrl-C marks the thread ended while it is
            # still sending (CPython bpo-45274), so flush waits on this instead of joining.
            with self._lock:
                self._writing = False
                self._lock.notify_all()

    def _send_in_order(self) -> None:
        delay = 1.0
        while True:
            with self._lock:
                while not self._ops and not self._stop:
                    self._lock.wait()
                if self._stop:
                    if self._in_flight is not None and self._ops and self._ops[0].uid == self._in_flight:
                        # The write it was still sending when the queue ended did not go out: anyone's now.
                        self._release_claim(self._ops[0])
                    return
                op = self._ops[0]
            try:
                outcome = self._execute(op)
                if outcome is not None:  # Tune pickles the queue with its callbacks: keep only what matters
                    self.outcomes[op.seq] = outcome
                if op.kind == "register":  # registered now: an earlier registration of it dropped is no failure
                    # (an earlier command's, left pending, whose checkpoint was gone: the model trained again)
                    alias = str(op.args.get("alias"))
                    self.dropped_registrations[:] = [d for d in self.dropped_registrations if d[0] != alias]
            except Exception as err:  # noqa: BLE001 - sorted into retry and drop below
                if _is_permanent(err):
                    message = redact_text(f"{DESCRIPTIONS.get(op.kind, op.kind)} for run {op.ref}: {err}")
                    logger.error("[tracking] a write no retry can send, dropped: %s", message[:500])
                    self.dropped.append(message)
                    if op.kind == "register":
                        self.dropped_registrations.append(
                            (str(op.args.get("alias")), str((op.args.get("tags") or {}).get("fingerprint", ""))))
                    try:
                        _note_unregistrable(op, err)
                    except Exception as note_err:  # noqa: BLE001 - the writer must outlive its bookkeeping
                        logger.warning("[tracking] could not note it in the model's record: %s", note_err)
                else:
                    self._note_outage(err)
                    with self._lock:
                        self._keep_backlog_on_disk()
                        # The whole back-off, cut short only by flush() (ending the queue, or asking for a retry
                        # while a stage's end waits; none for a write that failed after flush gave up: its end is
                        # due now). Woken by every put (each epoch's metrics), it retried at each one, against a
                        # recovering server, and rewrote the file.
                        retry_at = time.monotonic() + delay
                        while not (self._stop or self._retry_now) and (left := retry_at - time.monotonic()) > 0:
                            self._lock.wait(timeout=left)
                        self._retry_now = False
                    delay = min(delay * 2, RETRY_CAP_S)
                    continue
            with self._lock:  # the file is written under the lock: flush() writes it too
                self._ops.popleft()
                # A write sent twice (this process killed before the file said it went out) that is not a mere
                # repeat (a second run, a second upload) is taken out of the file at once; the others every few
                # seconds, since rewriting a backlog of thousands after each write is quadratic.
                due = (op.kind not in RESENDABLE_KINDS or not self._ops or self._in_flight is not None
                       or time.time() - self._saved_at >= DRAIN_SAVE_INTERVAL_S)
                if self._tracks_file and due:
                    # After the queue's end only the write that was in flight is this queue's to take out.
                    try:
                        self._save_pending([] if self._in_flight is not None else list(self._ops))
                        self._saved_at = time.time()
                        self._tracks_file = bool(self._ops) and self._in_flight is None
                    except OSError as err:  # (a full disk: the writer goes on sending, the file is tried again)
                        logger.warning("[tracking] could not take the writes sent out of %s: %s", self.pending_file,
                                       err)
                # Up again, said before flush() wakes: seen still down, a flush with no time left gave up.
                was_down, self._down_since = self._down_since, None
                self._lock.notify_all()
            delay = 1.0
            if was_down is not None:
                logger.info("[tracking] writes go out again after %s; sending %d queued write(s)",
                            duration(time.time() - was_down), len(self._ops))

    def _keep_backlog_on_disk(self) -> None:
        """During an outage (under the lock, at every retry): the backlog goes to the pending file, claimed by
        this queue, and is kept in step from then on. A command killed before its flush (`ray job stop` kills
        3 s after its SIGTERM, the OOM killer, a lost head) lost every write it had queued since MLflow went
        down; now the next command of the config takes them over once this process is gone."""
        if self.pending_file is None or self._stop or self._in_flight is not None or not self._ops:
            return
        backlog = (self._ops[0].seq, self._ops[-1].seq)
        # Saved again, unchanged, well within CLAIM_TTL_S: a command on another node reads the claim's age.
        if backlog == self._backlog_on_disk and time.time() - self._saved_at < CLAIM_TTL_S / 4:
            return
        self._save_backlog()

    def _save_backlog(self) -> None:
        """(Under the lock.) The backlog to the pending file, claimed by this queue, kept in step from then on."""
        try:
            self._save_pending(list(self._ops))
        except OSError as err:  # the disk is the fallback here: training goes on regardless
            logger.warning("[tracking] could not keep the queued writes in %s: %s", self.pending_file, err)
            return
        self._backlog_on_disk = (self._ops[0].seq, self._ops[-1].seq)
        self._tracks_file, self._saved_at = True, time.time()

    def keep_on_disk(self) -> None:
        """Before a wait this process may not outlive (an abort: `ray job stop` kills 3 s after its SIGTERM, which
        Ray's driver raises as SystemExit): the backlog goes to the pending file now, claimed by this queue, so
        that what it has not sent when it is killed is the next command's to send, not lost with it."""
        with self._lock:
            if self.pending_file is not None and not self._stop and self._in_flight is None and self._ops:
                self._save_backlog()

    def _note_outage(self, err: BaseException) -> None:
        """The head write did not go out and will be retried: MLflow is unreachable, or the write waits for a run
        another command is creating. Either way the time counts against ``tracking.pending_timeout_s``."""
        if self._down_since is None:
            self._down_since = time.time()
            if isinstance(err, RunStillBeingCreated):
                logger.info("[tracking] %s", err)
            elif is_auth_refusal(err):
                logger.warning("[tracking] MLflow at %s refuses this machine's credentials (%s); training goes on, "
                               "writes are kept and retried (mend the credentials; what is left unsent is sent by "
                               "`python -m pipelines register` with the same config)",
                               redact_uri(self.tracker.tracking_uri), first_line(err))
            else:
                logger.warning("[tracking] MLflow at %s is unreachable (%s); training goes on, writes are queued "
                               "and retried", redact_uri(self.tracker.tracking_uri), first_line(err))

    def _resolve(self, ref: str | None) -> str:
        if ref is None:
            raise UnsendableWrite("this write needs a run")
        run_id = self.run_id(ref) or self._run_created_elsewhere(ref)
        if run_id is None:
            raise UnsendableWrite(f"run {ref} was never created")
        return run_id

    def _run_created_elsewhere(self, ref: str) -> str | None:
        """The run id of ``ref`` from the pending file, where the command that created the run put it; raises
        :class:`RunStillBeingCreated` while a running command still holds the write that creates it."""
        if self.pending_file is None or not ref.startswith("local:") or not self.pending_file.exists():
            return None
        with _pending_file_lock(self.pending_file):
            body = _read_pending_file(self.pending_file)
        if run_id := body.get("run_ids", {}).get(ref):
            self.run_ids[ref] = run_id
            return run_id
        claims = body.get("claims", {})
        for op in body.get("ops", []):
            if op.get("ref") != ref or op.get("kind") not in CREATING_KINDS:
                continue
            claim = claims.get(op.get("uid"))
            if _held_elsewhere(claim, own_token=self.token):
                raise RunStillBeingCreated(f"run {ref} is still being created by another command (pid "
                                           f"{claim.get('pid')} on {claim.get('host')}): waiting for it")
            self._take_over_creation(op)
            raise RunStillBeingCreated(f"run {ref}: the command creating it is gone; this one creates it")
        return None

    def _take_over_creation(self, op: dict) -> None:
        """Claim the write creating a run that a command gone (killed, crashed) left in the pending file, and put
        it at the head of this queue: it goes out before the write that needs the run. Not once the queue has
        ended (flush handed its writes over): the next command takes it over."""
        if self._stop or self._in_flight is not None:
            return
        with _pending_file_lock(self.pending_file):
            body = _read_pending_file(self.pending_file)
            claims = body.setdefault("claims", {})
            still_there = any(other.get("uid") == op["uid"] for other in body.get("ops", []))
            if not still_there or _held_elsewhere(claims.get(op["uid"]), own_token=self.token):
                return  # sent or taken over meanwhile: looked up again at the next attempt
            claims[op["uid"]] = self._claim()
            self._write_pending_file(body)
        with self._lock:
            self._seq += 1
            self._ops.appendleft(TrackingOp(self._seq, op["kind"], op["ref"], op["args"], op["uid"]))
            self._own_uids.add(op["uid"])
            self._tracks_file = True  # taken out of the file once it went out

    def _execute(self, op: TrackingOp) -> Any:
        write = getattr(self, f"_do_{op.kind}", None)
        try:
            bound = inspect.signature(write).bind(op.ref, **op.args) if write is not None else None
        except TypeError as err:
            bound, reason = None, str(err)
        else:
            reason = "unknown kind of write"
        if bound is None:  # from a pending file of another version of this code: no retry can send it
            raise UnsendableWrite(f"this version cannot send it ({reason})")
        return write(*bound.args, **bound.kwargs)

    # -- the writes (run on the writer thread, or by ``pipelines register``) --------------------------
    def _do_start_run(self, ref: str, run_name: str, tags: dict, parent: str | None,
                      start_time_ms: int | None = None) -> str:
        if ref not in self.run_ids:  # a retry after the create went through but its reply was lost
            self.run_ids[ref] = self.tracker.start_run(run_name, tags, self._resolve(parent) if parent else None,
                                                       start_time_ms)
        return self.run_ids[ref]

    def _do_start_trial_run(self, ref: str, find: str, run_name: str, tags: dict, parent: str,
                            start_time_ms: int | None = None) -> str:
        if ref in self.run_ids and ref not in self._started_trials:
            # A restored trial whose run an earlier command created and ended (KILLED) as it stopped, its id read
            # from the pending file that command left: reopened, as one found in MLflow is (it stayed KILLED
            # while it trained again)
            self.tracker.reopen(self.run_ids[ref])
        elif ref not in self.run_ids:
            parent_id = self._resolve(parent)
            existing = self.tracker.find_run(f"{find} and tags.`mlflow.parentRunId` = '{parent_id}'")
            if existing is not None:
                self.tracker.reopen(existing.info.run_id)
                self.run_ids[ref] = existing.info.run_id
            else:
                self.run_ids[ref] = self.tracker.start_run(run_name, tags, parent_id, start_time_ms)
        self._started_trials.add(ref)
        return self.run_ids[ref]

    def _do_log_params(self, ref: str, params: dict) -> None:
        self.tracker.log_params(self._resolve(ref), params)

    def _do_log_metrics(self, ref: str, metrics: dict, step: int = 0, timestamp_ms: int | None = None) -> None:
        self.tracker.log_metrics(self._resolve(ref), metrics, step=step, timestamp_ms=timestamp_ms)

    def _do_set_tags(self, ref: str, tags: dict) -> None:
        self.tracker.set_tags(self._resolve(ref), tags)

    def _do_end_run(self, ref: str, status: str, end_time_ms: int | None = None) -> None:
        self.tracker.end_run(self._resolve(ref), status, end_time_ms)
        # A trial started again after this is reopened: its run ended, also when this queue sent the start and end
        # an earlier command left pending (the run stayed FAILED, its traceback shown, while it trained again).
        self._started_trials.discard(ref)

    def _do_reopen(self, ref: str) -> None:
        self.tracker.reopen(self._resolve(ref))

    def _do_log_artifact(self, ref: str, path: str, artifact_path: str | None = None) -> None:
        if not Path(path).exists():  # deleted since (or `register` run elsewhere): no retry brings it back
            raise UnsendableWrite(f"the file {path} to log is gone")
        self.tracker.log_artifact(self._resolve(ref), path, artifact_path)

    def _do_log_text(self, ref: str, text: str, artifact_file: str) -> None:
        # The text itself is queued (and kept pending), not its file's path: the file may change or go before the
        # write is sent (`search --force` deletes the finished search's result, then writes the new one).
        self.tracker.client.log_text(self._resolve(ref), text, artifact_file)

    def _do_register(self, ref: str, checkpoint_path: str, storage_path: str, registered_model: str, alias: str,
                     tags: dict, result_file: str | None = None) -> str:
        from .checkpoints import MissingCheckpointError
        from .trials import checkpoint_gone, reported_checkpoint_dir

        run_id = self._resolve(ref)
        # MLflow refuses to start a deleted run with INTERNAL_ERROR, its code for an unreachable server too:
        # retried as an outage, this write held up every write behind it, in this stage and every later one.
        if self.tracker.client.get_run(run_id).info.lifecycle_stage == "deleted":
            raise UnsendableWrite(f"run {run_id} of {alias} was deleted in MLflow, so its model is not registered "
                                  "(train it again to register it)")
        # A retry whose version went through (its alias or reply did not): that version, before the checkpoint is
        # read, since it may be gone by now (retention): dropped as gone, the model kept a version but no alias.
        version = self.tracker.alias_registered_version(registered_model, run_id, alias, tags)
        try:
            if version is None:
                with reported_checkpoint_dir(checkpoint_path, storage_path) as directory:
                    version = self.tracker.log_and_register(run_id, directory, registered_model, alias, tags)
        except (MissingCheckpointError, FileNotFoundError) as err:
            # Missing while its storage answers: no retry brings it back, and retrying would hold up every
            # write behind this one, in this stage and in every later one. Not registered, the next train
            # stage finds the model missing from the registry and trains it again.
            if checkpoint_gone(checkpoint_path, storage_path):
                raise UnsendableWrite(f"the checkpoint of {alias} ({checkpoint_path}) is gone from {storage_path}, "
                                      "so its model is not registered (the next `python -m pipelines train` "
                                      "trains it again)") from err
            raise
        try:
            record = _record_of_this_training(result_file, tags)
            if record is not None:
                # The result record was written when training ended; it learns its version now.
                record.version = version
                record.mlflow_run_id = run_id
                if "started_at" in record.timeline:
                    record.timeline["registered"] = round(time.time() - record.timeline["started_at"], 3)
                record.save(Path(result_file).parent)
        except Exception as err:  # noqa: BLE001 - the registration went through: what fails now is local
            # (a record damaged or unwritable): retried as an outage, it said "MLflow is unreachable" every 10 s
            # and held up every write behind it, for good, as every retry met the same file.
            logger.error("[tracking] %s: registered %s v%s, but its result record %s could not be updated (%s: "
                         "%s); the version is in MLflow", alias, registered_model, version, result_file,
                         type(err).__name__, err)
        logger.info("[tracking] %s: registered %s v%s as @%s", alias, registered_model, version, alias)
        return version

    def _do_update_champion(self, ref: None, registered_model: str,
                            test_split: str | None = None) -> tuple[str, str] | None:
        return self.tracker.update_champion(registered_model, test_split=test_split)

    # -- the end of a stage ---------------------------------------------------------------------------
    def flush(self, timeout_s: float) -> list[TrackingOp]:
        """Wait for the backlog while MLflow answers, and up to ``timeout_s`` while it is unreachable; returns
        what is still unsent (and saves it to the pending file, or removes that file when nothing is left)."""
        deadline = time.monotonic() + timeout_s
        announced = False
        try:
            with self._lock:
                left = len(self._ops)
                try:
                    while self._ops:
                        if len(self._ops) < left or self._down_since is None:
                            # Draining, or slow but answering: only time with MLflow unreachable counts (so a
                            # timeout of 0 still sends everything MLflow takes).
                            left, deadline = len(self._ops), time.monotonic() + timeout_s
                        elif time.monotonic() >= deadline:
                            break
                        if self._down_since is not None and not announced:
                            logger.warning("[tracking] waiting up to %s for MLflow to take %d queued write(s) "
                                           "(tracking.pending_timeout_s)", duration(timeout_s), len(self._ops))
                            announced = True
                        self._ensure_thread()
                        # A retry each second while the stage's end waits for the backlog, not at the end of the
                        # writer's back-off (up to RETRY_CAP_S after MLflow is back)
                        self._retry_now = True
                        self._lock.notify_all()
                        # The writer wakes this after each write; while MLflow is down, at the deadline.
                        self._lock.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic()))
                                        if self._down_since is not None else 1.0)
                finally:
                    self._stop = True
                    self._lock.notify_all()
            # An attempt in flight ends within the client's request timeout; it may still succeed.
            request_timeout_s = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"))
            writer_deadline = time.monotonic() + request_timeout_s + IN_FLIGHT_SLACK_S
            with self._lock:
                while self._writer_alive() and time.monotonic() < writer_deadline:
                    self._lock.wait(timeout=min(1.0, max(0.0, writer_deadline - time.monotonic())))
        finally:
            # Also after a Ctrl-C while it waits (a second one during an abort's flush): what is unsent is kept
            # pending, not lost with the process.
            with self._lock:
                pending = self._hand_over()
        return pending

    def _hand_over(self) -> list[TrackingOp]:
        """The queue's end (under its lock): the unsent writes go to the pending file for the next command. One
        still in flight (a slow upload after an outage) stays this queue's until it ends: should it succeed, the
        writer takes it out of the file, or the next `register` would send it again (a second version, the alias
        moved); the others are no longer this queue's to write."""
        pending = list(self._ops)
        writing = bool(pending) and self._writer_alive()
        self._in_flight = pending[0].uid if writing else None
        self._save_pending(pending, claimed={self._in_flight} if writing else set())
        if writing:
            self._tracks_file, self._own_uids = True, {self._in_flight}
            if self.pending_file is not None:
                _WRITES_IN_FLIGHT[self.pending_file.resolve()] = self._thread
        return pending

    def _save_pending(self, pending: list[TrackingOp], claimed: set[str] | None = None) -> None:
        """Put this queue's unsent writes ``pending`` in the pending file beside those of other commands of the
        config (a `register` run by hand, a search beside a train stage): each command writes only its own, under
        the file's lock, so none overwrites or deletes another's. ``claimed``: the uids of those it goes on
        sending (default: all), which no other command takes; the rest are left to the next command."""
        if self.pending_file is None or (not pending and not self.pending_file.exists()):
            return
        with _pending_file_lock(self.pending_file):
            body = _read_pending_file(self.pending_file)
            foreign = [op for op in body.get("ops", []) if op.get("uid") not in self._own_uids]
            self._own_uids.update(op.uid for op in pending)
            if not foreign and not pending:
                self.pending_file.unlink(missing_ok=True)
                return
            foreign_uids = {op.get("uid") for op in foreign}
            claims = {uid: claim for uid, claim in body.get("claims", {}).items() if uid in foreign_uids}
            claims.update({op.uid: self._claim() for op in pending if claimed is None or op.uid in claimed})
            # Masked: the file is plain text in the workdir, and a rotated password is still the same store.
            self._write_pending_file({"tracking_uri": redact_uri(self.tracker.tracking_uri),
                                      "run_ids": {**body.get("run_ids", {}), **self.run_ids},
                                      "ops": foreign + [asdict(op) for op in pending], "claims": claims})

    def _release_claim(self, op: TrackingOp) -> None:
        """Leave ``op``, the write in flight when the queue ended, to the next command, where it stands in the
        pending file: ahead of the writes queued after it (re-saved as this queue's own, it went behind them, and a
        registration then came after the champion's move and its run's end)."""
        if self.pending_file is None:
            return
        with _pending_file_lock(self.pending_file):
            body = _read_pending_file(self.pending_file)
            ops = body.get("ops", [])
            if not any(entry.get("uid") == op.uid for entry in ops):
                ops.insert(0, asdict(op))  # the file was removed or replaced meanwhile: it was the head write
            body["claims"] = {uid: claim for uid, claim in body.get("claims", {}).items() if uid != op.uid}
            body.update(tracking_uri=redact_uri(self.tracker.tracking_uri), ops=ops,
                        run_ids={**body.get("run_ids", {}), **self.run_ids})
            self._write_pending_file(body)
        self._own_uids.discard(op.uid)

    def _write_pending_file(self, body: dict) -> None:
        self.pending_file.parent.mkdir(parents=True, exist_ok=True)
        # A scratch file of this writer's own: two commands on one workdir (a `register` beside a stage waiting out
        # an outage) shared one, and one could move the other's half-written file into place.
        scratch = self.pending_file.with_name(f"{self.pending_file.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with scratch.open("w") as out:
                out.write(json.dumps(body, indent=1))
                out.flush()
                os.fsync(out.fileno())  # a crash must not leave an empty file in its place
            scratch.replace(self.pending_file)
        finally:
            scratch.unlink(missing_ok=True)

    def _claim(self) -> dict[str, Any]:
        return {"token": self.token, "pid": os.getpid(), "host": socket.gethostname(), "at": time.time(),
                **_this_process()}

    def _load_pending(self) -> int:
        """Take over the writes an earlier command left pending, those no running command has taken over
        (two commands of a config loaded the same writes and sent each twice: two model versions); returns
        how many."""
        taken, others = 0, Counter()
        with _pending_file_lock(self.pending_file):
            body = _pending_body(self.pending_file, self.tracker.tracking_uri)
            claims = body.setdefault("claims", {})
            self.run_ids.update(body.get("run_ids", {}))
            for op in body.get("ops", []):
                op.setdefault("uid", uuid.uuid4().hex)  # written before writes had one
                claim = claims.get(op["uid"])
                if _held_elsewhere(claim, own_token=self.token):
                    others[f"pid {claim.get('pid')} on {claim.get('host')}"] += 1
                    continue
                self._seq += 1
                self._ops.append(TrackingOp(self._seq, op["kind"], op["ref"], op["args"], op["uid"]))
                self._own_uids.add(op["uid"])
                claims[op["uid"]] = self._claim()
                taken += 1
            if taken:
                self._write_pending_file(body)
        if taken:
            logger.info("[tracking] %d write(s) left pending by an earlier stage are queued again (%s)", taken,
                        self.pending_file)
        for holder, count in others.items():
            logger.info("[tracking] %d pending write(s) in %s are being sent by another command (%s): left to it",
                        count, self.pending_file, holder)
        return taken


def _held_elsewhere(claim: dict | None, *, own_token: str | None = None, own_pid: int | None = None) -> bool:
    """Whether a pending write's ``claim`` is held by a command still running, other than the queue ``own_token``
    or the process ``own_pid``."""
    if not claim or claim.get("token") == own_token:
        return False
    namespace = _this_process().get("pidns")
    if claim.get("host") != socket.gethostname() or (claim.get("pidns") and namespace
                                                     and claim["pidns"] != namespace):
        # Its process cannot be looked up from here (another node, this container before a restart under another
        # name, or a container beside this one under the same host name, whose pids are its own): its claim holds
        # for CLAIM_TTL_S after the command last wrote the file.
        return time.time() - float(claim.get("at", 0)) < CLAIM_TTL_S
    try:
        if int(claim["pid"]) == own_pid:
            return False
        os.kill(int(claim["pid"]), 0)
    except ProcessLookupError:
        return False  # it ended (killed, crashed) before it sent the write: the write is anyone's
    except PermissionError:
        pass  # alive, another user's
    except (KeyError, TypeError, ValueError):
        return True
    # A live process of that id may be another one: a container restarted after its command was killed runs the
    # next one as the same pid (1, say), a rebooted host reuses ids. Taken for the holder, its writes were
    # nobody's for good (`register` exited 3 every time).
    recorded, now = claim.get("process"), _process_identity(int(claim["pid"]))
    return not (recorded and now and recorded != now)


#: This process's entries in its claims (see :func:`_this_process`), by pid: a forked child is another process.
_THIS_PROCESS: dict[int, dict[str, str]] = {}


def _this_process() -> dict[str, str]:
    """``process`` (:func:`_process_identity`) and ``pidns`` (its pid namespace: containers sharing a host name
    number their processes apart) of this process, where Linux's /proc has them; read once, not per claim (a
    backlog of thousands is claimed at every save)."""
    pid = os.getpid()
    if pid not in _THIS_PROCESS:
        entries = {}
        if (identity := _process_identity(pid)) is not None:
            entries["process"] = identity
        try:
            entries["pidns"] = os.readlink("/proc/self/ns/pid")
        except OSError:
            pass
        _THIS_PROCESS[pid] = entries
    return _THIS_PROCESS[pid]


def _process_identity(pid: int) -> str | None:
    """Which process ``pid`` is, across pid reuse: the boot's id and the process's start time (Linux's /proc);
    None where they cannot be read (another OS: the pid alone then)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        started = stat[stat.rindex(")") + 2:].split()[19]  # field 22, counted after the command name
    except (OSError, ValueError, IndexError):
        return None
    return f"{boot}:{started}"


@contextlib.contextmanager
def _pending_file_lock(pending_file: Path) -> Iterator[None]:
    """Hold the pending file's lock for one read-modify-write (milliseconds); on a filesystem without locks, or
    when the lock is not had within a minute, go on without it, saying so."""
    from filelock import FileLock, Timeout

    pending_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(pending_file) + ".lock", timeout=60)
    try:
        lock.acquire()
        locked = True
    except (Timeout, OSError, NotImplementedError) as err:
        logger.warning("[tracking] %s cannot be locked (%s); another command may change it at the same time",
                       pending_file, err)
        locked = False
    try:
        yield
    finally:
        if locked:
            lock.release()


def _store_address(uri: str) -> str:
    """``uri`` without its user name and password (``scheme://user:pw@host/...``: ``scheme://host/...``)."""
    return re.sub(r"^([A-Za-z][\w+.-]*://)[^/@]*@", r"\1", uri, count=1)


def _pending_body(pending_file: Path, tracking_uri: str) -> dict:
    """The pending file's contents; ``ConfigError`` (exit 2) when it holds writes for another tracking store."""
    from .config import absolute_sqlite_uri

    body = _read_pending_file(pending_file)
    # As the config resolves it: a file written for sqlite:///runs/mlflow.db (relative, before such URIs were
    # made absolute) is for this store when the command runs where it did then.
    written_for = redact_uri(absolute_sqlite_uri(body.get("tracking_uri", tracking_uri)))
    # The store, whoever logs in to it: credentials moved out of the URI (into MLFLOW_TRACKING_USERNAME and
    # _PASSWORD, PGPASSWORD) or another user name leave it the same store.
    if _store_address(written_for) != _store_address(redact_uri(tracking_uri)):
        # Its run ids live in that store: sent here they were refused and dropped, and this queue's own end would
        # then have overwritten or deleted the file.
        from .config import ConfigError

        raise ConfigError("tracking.uri", f"{pending_file} holds {len(body.get('ops', []))} write(s) for another "
                                          f"tracking store ({written_for}): send them with "
                                          "`python -m pipelines register` and that tracking.uri, or delete the "
                                          "file to drop them")
    return body


def check_pending_writes(cfg) -> None:
    """Before Ray starts: ``ConfigError`` when the workdir's pending writes are for another tracking store (the
    stage would otherwise find out after starting Ray and planning its models)."""
    pending_file = cfg.paths.run_dir / PENDING_FILE
    if pending_file.is_file():
        _pending_body(pending_file, cfg.tracking_uri)


#: Writer threads of this process still sending a write after their queue's flush gave up, by pending file:
#: the file is theirs until that write ends (they take it out on success). A later stage of the same `run`
#: that loaded the file meanwhile sent the write a second time (a second model version, the alias moved),
#: and the old writer then overwrote the file under it.
_WRITES_IN_FLIGHT: dict[Path, threading.Thread] = {}


def _wait_for_the_write_in_flight(pending_file: Path, report_every_s: float = 30.0) -> None:
    """Before a queue reads ``pending_file``: wait for a writer of this process still sending one of its writes.
    It stops after that write (its queue was flushed), however many requests and retries the write takes (a
    registration uploads, registers and moves an alias): reading the file before then sends the write twice."""
    writer = _WRITES_IN_FLIGHT.pop(pending_file.resolve(), None)
    waited = 0.0
    while writer is not None and writer.is_alive():
        if waited:
            logger.info("[tracking] still waiting (%s) for a write on its way to MLflow before reading %s",
                        duration(waited), pending_file)
        else:
            logger.info("[tracking] waiting for a write still on its way to MLflow before reading %s", pending_file)
        writer.join(timeout=report_every_s)
        waited += report_every_s


def _note_unregistrable(op: TrackingOp, err: BaseException) -> None:
    """A registration dropped because its checkpoint is unusable is noted in the model's result record: the
    next train stage would otherwise run the model again to register it, and fail the same way, every time."""
    from .checkpoints import CheckpointError, UnreadableCheckpointError

    result_file = op.args.get("result_file") if op.kind == "register" else None
    record = _record_of_this_training(result_file, op.args.get("tags") or {})
    # An unreadable file (its permissions) says nothing against the model: the next train stage registers it
    # again from its checkpoint, once it can be read.
    if not isinstance(err, CheckpointError) or isinstance(err, UnreadableCheckpointError) or record is None:
        return
    record.registration_error = first_line(err)
    record.save(Path(result_file).parent)


def _record_of_this_training(result_file: str | None, tags: dict):
    """The model's result record, when it is still of the training a registration was queued for (its
    fingerprint and epochs): a registration left pending by an earlier command, sent after the model was trained
    again with other settings, must not put its version (or its failure) into the new training's record."""
    from .results import ModelResult

    if not result_file or not Path(result_file).exists():
        return None
    record = ModelResult.load(result_file)
    for key in TRAINING_TAGS:
        value = getattr(record, key)
        if key in tags and str(tags[key]) != str(value):
            logger.info("[tracking] %s: the registration of an earlier training (%s %s) leaves the record of the "
                        "current one (%s) as it is", record.model_name, key, tags[key], value)
            return None
    return record


def _trial_error(trial) -> str:
    """The end of a failed trial's error trace, for the run's tags.

    Tune appends each failure to the trial's error file in the driver's staging directory (``error_file``)
    before it calls back, and copies that file to storage only later: the stored copy (``get_error()``) can
    still hold just an earlier failure (the one a retry was started for), so the local file comes first."""
    text = None
    local = getattr(trial, "error_file", None)
    if local:
        try:
            text = Path(local).read_text(errors="replace")
        except OSError:
            text = None
    if not text and hasattr(trial, "get_error"):
        try:
            text = trial.get_error()
        except Exception:  # noqa: BLE001 - the storage may be gone with its node
            text = None
    text = text or getattr(trial, "error_msg", None)  # older Tune trials carried it
    return redact_text(str(text or "trial failed").strip())[-4000:]  # a tag: shown to whoever reads the run


class TrialTracking(Callback):
    """A Ray Tune callback that mirrors every trial into an MLflow child run, live, from the driver.

    Every write goes through a :class:`~pipelines.tracking_queue.TrackingQueue`, so a slow or unreachable
    tracking server never holds up Tune's loop. ``describe(config)`` returns ``(run_name, model_name,
    params)`` for a trial; ``on_complete(trial, run_ref, started_at)`` (optional) runs when a trial
    finishes, e.g. to register its model (``run_ref``: the queue's reference for the trial's run,
    ``started_at``: the wall-clock time the trial started, for its timeline), and then ends the MLflow run
    itself; without it the run ends when the trial does. ``on_error(trial)`` (optional) hears of a trial that
    failed for good (not one Tune starts again); ``on_epoch(trial, result)`` (optional) hears of each epoch
    reported. All must be picklable (module-level functions, ``functools.partial`` of them or bound methods
    of picklable objects): Tune saves its callbacks with the experiment. A restored search gets
    this process's callback instead (:func:`~pipelines.trials.restore_tuner`), whose parent is the same run
    found again by its experiment tag; child runs are found again by trial id.
    """

    def __init__(
        self,
        queue,
        stage: str,
        parent_run_id: str,
        describe: Callable[[dict], tuple[str, str, dict[str, Any]]],
        on_complete: Callable[[Any, str, float], None] | None = None,
        on_error: Callable[[Any], None] | None = None,
        on_epoch: Callable[[Any, dict], None] | None = None,
    ) -> None:
        self.queue = queue
        self.stage = stage
        self.parent_run_id = parent_run_id
        self.describe = describe
        self.on_complete = on_complete
        self.on_error = on_error
        self.on_epoch = on_epoch
        self.run_refs: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.started_at: dict[str, float] = {}
        self.ended: set[str] = set()  # trial ids whose runs have their end queued (or are ended by on_complete)
        self.epoch_rates: dict[str, dict[int, float]] = {}  # trial id -> epoch -> training images/s
        self.best_seen: dict[str, dict[str, float]] = {}  # trial id -> the highest finite val_acc and score
        self.logged_epochs: dict[str, set[int]] = {}  # trial id -> the epochs whose metrics it logged

    def __reduce__(self):
        # Tune writes its callbacks into the experiment's tuner.pkl, in the storage (a bucket on a cluster): this
        # one's queue and hooks hold the tracking URI's password and the config's Serve token. It is saved as
        # Tune's no-op callback; a restored experiment gets the resuming process's callbacks (restore_tuner).
        return (Callback, ())

    def progress(self, message: str) -> None:
        logger.info(timestamped(message))

    def _run_ref(self, trial) -> str:
        if trial.trial_id in self.run_refs:
            return self.run_refs[trial.trial_id]
        run_name, model_name, params = self.describe(trial.config)
        ref = self.queue.trial_run(
            f"local:trial:{self.parent_run_id}:{self.stage}:{trial.trial_id}",
            find=f"tags.`{TAG_TRIAL}` = '{trial.trial_id}' and tags.`{TAG_STAGE}` = '{self.stage}'",
            run_name=run_name, tags={TAG_STAGE: self.stage, TAG_TRIAL: trial.trial_id, TAG_MODEL: model_name},
            parent=self.parent_run_id)
        self.queue.put("log_params", ref, params=params)
        self.run_refs[trial.trial_id] = ref
        self.names[trial.trial_id] = model_name
        return ref

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started_at[trial.trial_id] = time.time()
        self.ended.discard(trial.trial_id)  # a trial restarted after an error runs (and ends) again
        self._run_ref(trial)
        self.progress(f"[{self.stage}] {self.names[trial.trial_id]}: started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        ref = self._run_ref(trial)
        if "val_acc" in result and "test_acc" not in result:  # an epoch, not the final test report
            epoch = int(result.get("epoch", result.get("training_iteration", 1) - 1))
            metrics = {EPOCH_METRIC_NAMES.get(k, k): result[k] for k in EPOCH_METRICS if k in result}
            if self.stage == "search" and SCORE in result:  # what the search ranks by (the objective's)
                metrics[SCORE] = result[SCORE]
            best = self.best_seen.setdefault(trial.trial_id, {})
            for name in ("val_acc", SCORE):
                value = result.get(name)
                if isinstance(value, (int, float)) and math.isfinite(value) and value > best.get(name, -math.inf):
                    best[name] = float(value)
            self.queue.put("log_metrics", ref, step=epoch, metrics=metrics)
            self.logged_epochs.setdefault(trial.trial_id, set()).add(epoch)
            if "train_images_per_sec" in result:
                self.epoch_rates.setdefault(trial.trial_id, {})[epoch] = float(result["train_images_per_sec"])
            total = trial.config.get("run", {}).get("hyper", {}).get("epochs", "?")
            self.progress(
                f"[{self.stage}] {self.names[trial.trial_id]}: epoch {epoch + 1}/{total}  "
                f"train_loss {result.get('train_loss', float('nan')):.4f}  val_loss {result['val_loss']:.4f}  "
                f"val_acc {result['val_acc']:.4f}  {result.get('train_images_per_sec', 0):.0f} img/s")
            if self.on_epoch is not None:
                try:  # Tune does not guard its callbacks: a progress estimate must never end the stage
                    self.on_epoch(trial, result)
                except Exception as err:  # noqa: BLE001
                    logger.warning("[%s] %s: progress not counted (%s)", self.stage, self.names[trial.trial_id], err)

    def end_open_runs(self, status: str = "KILLED") -> list[str]:
        """Queue the end of every child run whose trial started but neither finished nor failed (the stage
        was interrupted: without this they would stay RUNNING in MLflow for good); returns their refs."""
        open_refs = [ref for trial_id, ref in self.run_refs.items() if trial_id not in self.ended]
        self.ended.update(self.run_refs)
        for ref in open_refs:
            self.queue.put("end_run", ref, status=status)
        return open_refs

    def on_trial_complete(self, iteration, trials, trial, **info):
        ref = self._run_ref(trial)
        self.ended.add(trial.trial_id)
        result = trial.last_result or {}
        self._log_epochs_of_earlier_commands(trial, ref, result)
        metrics = {k: result[k] for k in FINAL_METRICS if k in result}
        rates = self.epoch_rates.get(trial.trial_id)
        if "test_acc" not in result and rates:
            # Ended on an epoch report (a search trial): the run's figure is the median over its epochs, as a
            # trained model's (its final report carries none; the stage logs the median).
            metrics["train_images_per_sec"] = statistics.median(rates.values())
        if "test_acc" not in result:
            # A search trial is ranked by its best epoch, not its last, which is all MLflow's runs table and charts
            # showed of it (Tune keeps each metric's maximum over the trial, across a resumed search too).
            # (Tune's maximum is NaN once a NaN came last, a diverged epoch's: the finite ones seen here count too)
            seen = self.best_seen.get(trial.trial_id, {})
            for name, best in (("val_acc", "best_val_acc"), (SCORE, "best_score")):
                tops = [(getattr(trial, "metric_analysis", None) or {}).get(name, {}).get("max"), seen.get(name)]
                finite = [float(t) for t in tops if isinstance(t, (int, float)) and math.isfinite(t)]
                if finite:
                    metrics[best] = max(finite)
        self.queue.put("log_metrics", ref, metrics=metrics, step=0)
        if self.on_complete is not None:
            self.on_complete(trial, ref, self.started_at.get(trial.trial_id, time.time()))
        else:
            self.queue.put("end_run", ref, status="FINISHED")

    def _log_epochs_of_earlier_commands(self, trial, ref: str, result: dict) -> None:
        """Log the epochs of the finished run's history that this callback did not see: those an earlier command
        trained before it was interrupted, or all of them for a run resumed only to be tested and registered. Each
        command's stage has a run of its own, so this run's curves would otherwise start where the resume did."""
        try:
            history = json.loads(result.get("history") or "[]")
        except (TypeError, ValueError):
            return
        seen = self.logged_epochs.get(trial.trial_id, set())
        for row in history if isinstance(history, list) else []:
            epoch = row.get("epoch") if isinstance(row, dict) else None
            if isinstance(epoch, int) and epoch not in seen:
                metrics = {EPOCH_METRIC_NAMES.get(k, k): row[k] for k in EPOCH_METRICS if k in row}
                self.queue.put("log_metrics", ref, step=epoch, metrics=metrics)

    def on_trial_error(self, iteration, trials, trial, **info):
        ref = self._run_ref(trial)
        self.ended.add(trial.trial_id)
        self.queue.put("set_tags", ref, tags={"error": _trial_error(trial)})
        self.queue.put("end_run", ref, status="FAILED")
        self.progress(f"[{self.stage}] {self.names[trial.trial_id]}: FAILED (see the Ray logs and its MLflow run)")
        if self.on_error is not None:
            self.on_error(trial)


def _read_pending_file(path: Path) -> dict:
    """The pending file's contents; a damaged one (cut short by a crash, edited by hand) is moved aside with an
    error naming it, since every command would otherwise stop at it."""
    try:
        body = json.loads(path.read_text())
        ops = body.get("ops", []) if isinstance(body, dict) else None
        if not isinstance(ops, list) or not all(
                isinstance(op, dict) and isinstance(op.get("kind"), str) and isinstance(op.get("args"), dict)
                and "ref" in op and isinstance(op["ref"], str | None) and isinstance(op.get("uid", ""), str)
                and isinstance(op.get("seq", 0), int) for op in ops):
            raise ValueError("not a list of pending writes")
        claims, run_ids = body.get("claims", {}), body.get("run_ids", {})
        if not isinstance(claims, dict) or not all(isinstance(claim, dict) for claim in claims.values()):
            raise ValueError("its claims are not a mapping of writes to the commands sending them")
        if not isinstance(run_ids, dict) or not all(isinstance(run_id, str) for run_id in run_ids.values()):
            raise ValueError("its run ids are not a mapping of runs to MLflow run ids")
        return body
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as err:
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
        try:
            path.replace(aside)
        except FileNotFoundError:  # another command moved it aside first
            return {}
        logger.error("[tracking] %s is damaged (%s): its writes cannot be sent; moved to %s", path, err, aside)
        return {}


def load_pending(run_dir: str | os.PathLike, *, this_process: bool = False) -> list[TrackingOp]:
    """The writes left pending in ``run_dir`` (none when the file is absent); ``this_process``: without those
    another running command has taken over (it sends them, or says so when it ends)."""
    path = Path(run_dir) / PENDING_FILE
    if not path.exists():
        return []
    body = _read_pending_file(path)
    claims = body.get("claims", {})
    # The fields this version knows (a file of another version may have more, or lack seq and uid).
    return [TrackingOp(op.get("seq", 0), op["kind"], op["ref"], op["args"], op.get("uid") or uuid.uuid4().hex)
            for op in body.get("ops", [])
            if not (this_process and _held_elsewhere(claims.get(op.get("uid")), own_pid=os.getpid()))]


@dataclass
class SentPending:
    """What :func:`send_pending` did: the writes still unsent, and the models whose registration MLflow refused
    for good (their reasons are logged as they are dropped)."""

    pending: list[TrackingOp]
    unregistered: list[str]


def send_pending(cfg) -> SentPending:
    """Send what earlier stages left pending, then move the champion alias."""
    queue = TrackingQueue.for_config(cfg)
    if not len(queue):
        logger.info("[tracking] nothing pending in %s", cfg.paths.run_dir)
        return SentPending([], [])
    if not any(op.kind == "update_champion" for op in queue._ops):
        queue.put("update_champion", registered_model=cfg.registered_model_name)
    total = len(queue)
    pending = queue.flush(cfg.tracking.pending_timeout_s)
    # Dropped writes are not sent: counted as sent, a registration refused for good read as success.
    dropped = len(queue.dropped)
    logger.info("[tracking] sent %d of %d pending write(s) to %s%s", total - len(pending) - dropped, total,
                redact_uri(queue.tracker.tracking_uri), f"; {dropped} refused for good (above)" if dropped else "")
    unregistered = sorted({alias for alias, _ in queue.dropped_registrations})
    if unregistered:
        logger.error("[tracking] not registered (MLflow refused it for good, the reason is above): %s",
                     ", ".join(unregistered))
    return SentPending(pending, unregistered)


@contextlib.contextmanager
def flushed_on_abort(queue: TrackingQueue, parent: str | None, trials: TrialTracking | None = None,
                     timeout_s: float = 10.0, closing: Sequence[tuple[str, dict]] = ()) -> Iterator[None]:
    """Ctrl-C or an error inside: the stage's MLflow run ``parent`` and the child runs of ``trials`` still running
    end as KILLED (FAILED after an error), the stage's ``closing`` writes (``(kind, kwargs)``: the champion alias,
    which the finished models' registrations may move) are queued after what finished, and the queued writes go
    out (or are kept pending when MLflow does not take them within ``timeout_s``) before the exception goes on.
    Without this, an error lost the registrations of models that had finished: the writer is a daemon thread, and
    their result records then said trained."""
    try:
        yield
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"
        if trials is not None:
            trials.end_open_runs(status)
        for kind, kwargs in closing:
            queue.put(kind, **kwargs)
        if parent is not None:
            queue.put("end_run", parent, status=status)
        queue.keep_on_disk()
        queue.flush(timeout_s)
        raise


def send_pending_before_reading(cfg) -> None:
    """For the stages that read the registry (report, serve): send what earlier stages left pending first, so
    they see those registrations and the champion alias. Touches nothing when nothing is pending."""
    if (Path(cfg.paths.run_dir) / PENDING_FILE).exists():
        send_pending(cfg)


def pending_summary(pending: list[TrackingOp], run_dir: Path, command: str) -> str:
    """One message: what is unsent, where it is kept and the command that sends it."""
    pending_file = Path(run_dir) / PENDING_FILE
    counts = Counter(DESCRIPTIONS.get(op.kind, op.kind) for op in pending)
    what = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
    models = sorted({str(op.args["alias"]) for op in pending if op.kind == "register" and op.args.get("alias")})
    unregistered = f"; not registered yet: {', '.join(models)}" if models else ""
    return (f"[tracking] MLflow did not take {len(pending)} write(s) in time ({what}){unregistered}. They are kept "
            f"in {pending_file}; once MLflow is reachable, send them with:\n  {command}")
