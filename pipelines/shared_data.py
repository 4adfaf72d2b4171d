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

    One conversion at a time, in a thread of its own: the sizes :func:`prepare` queued in the runs' order, but a
    worker's request first (it waited behind every size queued before it: a first run held its CPUs or GPUs
    idle until all of a search's sizes were converted). Requests wait in the actor's other threads; an answer
    already converted comes at once. A conversion that failed is not tried again for the stage: every worker
    that asks hears of it at once and converts its own (as when no cache is there)."""

    def __init__(self) -> None:
        self._done: dict[str, list] = {}
        self._failed: dict[str, BaseException] = {}
        self._waiting: list[str] = []  # keys in the order they are converted
        self._arguments: dict[str, tuple[str, str]] = {}
        self._converting: str | None = None
        self._order: list[str] = []  # keys in the order their conversions ended
        self._changed = threading.Condition()
        threading.Thread(target=self._convert_in_order, name="cnnzoo-convert", daemon=True).start()

    def _enqueue(self, data_json: str, spec_json: str, *, first: bool) -> str:
        key = data_json + spec_json
        with self._changed:
            if key in self._done or key in self._failed or key == self._converting:
                return key
            self._arguments[key] = (data_json, spec_json)
            if key in self._waiting:
                if not first:
                    return key
                self._waiting.remove(key)
            if first:
                self._waiting.insert(0, key)
            else:
                self._waiting.append(key)
            self._changed.notify_all()
        return key

    def prepare(self, data_json: str, spec_json: str) -> None:
        """Queue this spec's conversion behind those queued before (no answer: nothing waits for it)."""
        self._enqueue(data_json, spec_json, first=False)

    def converted(self, data_json: str, spec_json: str) -> list:
        """``[ObjectRef]`` of ``{split: (images, labels)}`` numpy arrays, or ``[]`` when not shared (the
        reference travels inside a list so that fetching this answer does not fetch the data too); the
        conversion's error when it failed."""
        key = self._enqueue(data_json, spec_json, first=True)
        with self._changed:
            self._changed.wait_for(lambda: key in self._done or key in self._failed)
            if key in self._failed:
                raise self._failed[key]
            return self._done[key]

    def _convert_in_order(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._waiting))
                key = self._converting = self._waiting.pop(0)
                data_json, spec_json = self._arguments.pop(key)
            entry, error = None, None
            try:
                arrays = converted_for_sharing(DataConfig.model_validate_json(data_json),
                                               PreprocessSpec.from_dict(json.loads(spec_json)))
                entry = [ray.put(arrays)] if arrays is not None else []
            except Exception as err:  # noqa: BLE001 - told to every worker that asks: each converts its own
                error = err
            with self._changed:
                if error is None:
                    self._done[key] = entry
                else:
                    self._failed[key] = error
                self._converting = None
                self._order.append(key)
                self._changed.notify_all()


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
    for spec_json in dict.fromkeys(json.dumps(spec.to_dict()) for spec in specs):
        cache.prepare.remote(data.model_dump_json(), spec_json)


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
        logger.info("shared data unavailable (%s); loading it in this worker", type(err).__name__)
        return None
    # Copies: arrays read from the object store are read-only, and the training loop may augment in place.
    return {split: ConvertedSplit(torch.from_numpy(images.copy()), torch.from_numpy(labels.copy()))
            for split, (images, labels) in arrays.items()}
