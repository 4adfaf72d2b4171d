"""Data converted once per stage and input size, shared with every worker through Ray's object store.

Without it every model run's worker loads the data set itself (scikit-learn's digits, the Fashion-MNIST IDX
files, CIFAR-10), converts every image to its input size through PIL and imports what that needs: seconds
per run before the first step, repeated for every model and every search trial. A stage instead starts one
:class:`SplitsCache` actor; the first worker that asks for ``(data settings, spec)`` has the actor load and
convert the splits and ``ray.put`` them, every later worker (on any node) just reads them back.

In-memory data sets only: image folders are decoded lazily per item and are not shared; neither is data
whose converted size exceeds :data:`MAX_SHARED_BYTES` (it would crowd the object store). When the cache is
not there (a run resumed by a later driver) or declines, the worker loads the data itself as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Iterator

import ray

from .config import DataConfig
from .data import ConvertedSplit, convert_splits, converted_bytes, load_splits
from .preprocess import PreprocessSpec
from .runtime import on_this_node

__all__ = ["SplitsCache", "shared_splits", "prepare", "fetch_converted", "converted_for_sharing",
           "MAX_SHARED_BYTES"]

logger = logging.getLogger(__name__)

#: Converted splits larger than this are not put in the object store (workers convert their own).
MAX_SHARED_BYTES = 2 * 1024**3


@ray.remote(num_cpus=0, max_concurrency=64)
class SplitsCache:
    """Converts a data set's splits once per spec and keeps them in the object store for the stage.

    One conversion at a time, in a thread of its own: the sizes :func:`prepare` queued, in the runs' order, but
    the sizes workers asked for first, in the order they asked (a request waited behind every size queued
    before it: a first run held its CPUs or GPUs idle until all of a search's sizes were converted). Requests
    wait in the actor's other threads; an answer already converted comes at once. A conversion that failed is
    not tried again for the stage: every worker that asks hears of it at once and converts its own (as when no
    cache is there)."""

    def __init__(self) -> None:
        from .console import configure_console

        configure_console()  # its INFO lines (data not shared, and why) reach the driver's console
        self._done: dict[str, list] = {}
        self._failed: dict[str, str] = {}  # key -> what went wrong (raised afresh for each request)
        self._waiting: list[str] = []  # keys in the order they are converted
        self._requested = 0  # how many keys at the head of _waiting a worker asked for
        self._arguments: dict[str, tuple[str, str]] = {}
        self._converting: str | None = None
        self._order: list[str] = []  # keys in the order their conversions ended
        self._changed = threading.Condition()
        threading.Thread(target=self._convert_in_order, name="cnnzoo-convert", daemon=True).start()

    def _enqueue(self, data_json: str, spec_json: str, *, requested: bool) -> str:
        key = data_json + spec_json
        with self._changed:
            if key in self._done or key in self._failed or key == self._converting:
                return key
            self._arguments[key] = (data_json, spec_json)
            if key in self._waiting:
                if not requested or self._waiting.index(key) < self._requested:
                    return key  # queued already, or asked for already
                self._waiting.remove(key)
            if requested:  # after the sizes asked for before, ahead of those only queued
                self._waiting.insert(self._requested, key)
                self._requested += 1
            else:
                self._waiting.append(key)
            self._changed.notify_all()
        return key

    def prepare(self, data_json: str, spec_jsons: list[str]) -> None:
        """Queue these specs' conversions, in this order, behind those queued before (no answer: nothing waits
        for it). One call for all: a threaded actor runs separate calls in any order."""
        for spec_json in spec_jsons:
            self._enqueue(data_json, spec_json, requested=False)

    def converted(self, data_json: str, spec_json: str) -> list:
        """``[ObjectRef]`` of ``{split: (images, labels)}`` numpy arrays, or ``[]`` when not shared (the
        reference travels inside a list so that fetching this answer does not fetch the data too); a
        RuntimeError saying why when the conversion failed."""
        key = self._enqueue(data_json, spec_json, requested=True)
        with self._changed:
            self._changed.wait_for(lambda: key in self._done or key in self._failed)
            if key in self._failed:
                raise RuntimeError(self._failed[key])  # a new one each time: a shared one grew its traceback
            return self._done[key]

    def _convert_in_order(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._waiting))
                key = self._converting = self._waiting.pop(0)
                self._requested = max(0, self._requested - 1)
                data_json, spec_json = self._arguments.pop(key)
            entry, failure = None, "the conversion did not end"
            try:
                entry = self._convert(data_json, spec_json)
            except BaseException as err:  # noqa: BLE001 - told to every worker that asks: each converts its own
                failure = f"{type(err).__name__}: {err}"  # (kept going: a dead thread would leave requests waiting)
            finally:
                with self._changed:
                    if entry is not None:
                        self._done[key] = entry
                    else:
                        self._failed[key] = failure
                    self._converting = None
                    self._order.append(key)
                    self._changed.notify_all()

    @staticmethod
    def _convert(data_json: str, spec_json: str) -> list:
        # (its own frame: the converted arrays are freed once in the object store, not kept until the next size)
        arrays = converted_for_sharing(DataConfig.model_validate_json(data_json),
                                       PreprocessSpec.from_dict(json.loads(spec_json)))
        return [ray.put(arrays)] if arrays is not None else []


def converted_for_sharing(data: DataConfig, spec: PreprocessSpec) -> dict | None:
    """``{split: (images, labels)}`` numpy arrays of ``data`` at ``spec``, or None when they are not shared: image
    folders (decoded per item), and data whose converted size exceeds :data:`MAX_SHARED_BYTES`, worked out
    before converting anything (converted first, it cost the whole conversion, then every worker's own)."""
    if data.dataset == "imagefolder":  # not even worth scanning here
        return None
    splits = load_splits(data)
    size = converted_bytes(sum(len(s) for s in (splits.train, splits.val, splits.test)), spec)
    if size > MAX_SHARED_BYTES:
        logger.info("not sharing %s at %d px through the object store (%.1f GB); workers convert their own",
                    data.dataset, spec.image_size, size / 1024**3)
        return None
    converted = convert_splits(splits, spec)
    if converted is None:
        return None
    return {name: (split.images.numpy(), split.labels.numpy()) for name, split in converted.items()}


@contextlib.contextmanager
def shared_splits() -> Iterator[str]:
    """Start a stage's :class:`SplitsCache`; yields its actor name (for ``ModelRun.shared_data``)."""
    name = f"cnnzoo-splits-{uuid.uuid4().hex[:12]}"
    cache = SplitsCache.options(name=name, scheduling_strategy=on_this_node()).remote()
    try:
        yield name
    finally:
        ray.kill(cache)


def prepare(name: str, data: DataConfig, specs) -> None:
    """Have the stage's cache convert these specs now, while the runs' processes are still starting."""
    cache = ray.get_actor(name)
    # In the runs' order, each size once: the actor converts one at a time, and the first runs start first (a
    # worker's request, when it comes, goes before the sizes not started yet).
    cache.prepare.remote(data.model_dump_json(), list(dict.fromkeys(json.dumps(spec.to_dict()) for spec in specs)))


def fetch_converted(name: str | None, data: DataConfig, spec: PreprocessSpec) -> dict[str, ConvertedSplit] | None:
    """The converted splits from the stage's cache, or None (no cache, or the cache does not share them)."""
    import torch

    if not name:
        return None
    try:
        cache = ray.get_actor(name)
        refs = ray.get(cache.converted.remote(data.model_dump_json(), json.dumps(spec.to_dict())))
        if not refs:
            return None
        arrays = ray.get(refs[0])
    except (ValueError, ray.exceptions.RayError) as err:  # gone with its stage, or failed: convert here
        cause = getattr(err, "cause", None) or err  # a task's error wraps the cache's own
        reason = (str(cause).strip().splitlines() or [""])[0]
        logger.warning("shared data unavailable (%s%s); loading it in this worker", type(cause).__name__,
                       f": {reason}" if reason else "")
        return None
    # Copies: arrays read from the object store are read-only, and the training loop may augment in place.
    return {split: ConvertedSplit(torch.from_numpy(images.copy()), torch.from_numpy(labels.copy()))
            for split, (images, labels) in arrays.items()}
