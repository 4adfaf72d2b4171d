"""Dynamic batching that closes a batch when the model is free to run it.

A server replica submits one item per request (:meth:`Batcher.submit`) and awaits its result; a single worker
task runs the batches, one at a time. While a batch runs, the requests that arrive queue up, and the next batch
is everything queued when the model is free (up to ``max_batch_size``). When the model is idle, the first
request waits up to ``wait_s`` for others to join it (until the batch is full, if sooner).

Why not ``@serve.batch``: it closes a batch ``batch_wait_timeout_s`` after the batch's first request even when
the previous batch is still running, and the closed batch then waits for the model with the few requests it
got. With the forward off the event loop (a TorchScript trace runs without the GIL) that made batches of one
or two images; this batcher made batches of about 13 at concurrency 32 (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Batcher"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Runs ``run(items) -> results`` (same length, same order) on batches of submitted items.

    An item whose caller stopped waiting (its deadline passed) before its batch starts is left out. An
    exception raised by ``run`` is raised to every caller of that batch; later batches run as usual.

    ``key``: items of different keys (the models of a multiplexed replica) share a batch's turn but are run, and
    answered, one key at a time, in the order they arrived: a small model's requests are answered as soon as its
    own forward is done, not when a large model's in the same batch is.
    """

    def __init__(self, run: Callable[[list[Item]], Awaitable[list[Result]]], max_batch_size: int,
                 wait_s: float = 0.0, key: Callable[[Item], Hashable] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._key = key
        self._queue: deque[tuple[Item, asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` for the next batch that has room and return its result."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():  # created on the loop that serves the requests
            self._arrived, self._full = asyncio.Event(), asyncio.Event()
            self._worker = loop.create_task(self._work())
        future = loop.create_future()
        self._queue.append((item, future))
        self._arrived.set()
        if len(self._queue) >= self.max_batch_size:
            self._full.set()
        return await future

    def _take(self) -> list[tuple[Item, asyncio.Future]]:
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future = self._queue.popleft()
            if not future.done():  # done here means cancelled: nobody waits for it any more
                batch.append((item, future))
        return batch

    async def _work(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if not self._queue:
                continue
            if self.wait_s > 0 and len(self._queue) < self.max_batch_size:
                # The model is idle: give a batch a moment to gather, no longer than it takes to fill.
                self._full.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.wait_s)
            while batch := self._take():  # while a batch runs, the next one gathers in the queue
                for group in self._groups(batch):
                    await self._run_group(group)

    def _groups(self, batch: list[tuple[Item, asyncio.Future]]) -> list[list[tuple[Item, asyncio.Future]]]:
        if self._key is None:
            return [batch]
        groups: dict[Hashable, list[tuple[Item, asyncio.Future]]] = {}
        for entry in batch:
            groups.setdefault(self._key(entry[0]), []).append(entry)
        return list(groups.values())

    async def _run_group(self, group: list[tuple[Item, asyncio.Future]]) -> None:
        group = [(item, future) for item, future in group if not future.done()]  # (given up during another key's)
        if not group:
            return
        try:
            results = await self._run([item for item, _ in group])
        except Exception as err:  # noqa: BLE001 - the callers get it; the worker keeps going
            for _, future in group:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)
