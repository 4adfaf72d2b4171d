"""The server's batcher: a batch is what arrived while the previous one ran, up to the size limit."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pipelines.batching import Batcher


class SlowModel:
    """Doubles its inputs, taking ``seconds`` per batch (or, with ``gate``, until the gate opens); records the
    batches it saw."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.gate: asyncio.Event | None = None
        self.batches: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(self.seconds)
        if -1 in items:
            raise ValueError("bad item")
        return [2 * i for i in items]


async def submit_later(batcher: Batcher, item: int, delay: float):
    await asyncio.sleep(delay)
    return await batcher.submit(item)


def test_requests_arriving_during_a_batch_form_the_next_one():
    model = SlowModel()

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit(0))
        later = [submit_later(batcher, i, 0.01) for i in range(1, 21)]  # while batch [0] runs
        return await asyncio.gather(first, *later)

    results = asyncio.run(scenario())
    assert results == [2 * i for i in range(21)]
    assert [len(b) for b in model.batches] == [1, 8, 8, 4]
    assert [i for b in model.batches for i in b] == list(range(21))


def test_an_idle_model_waits_for_a_batch_to_gather():
    model = SlowModel(seconds=0.0)

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, wait_s=0.05)
        return await asyncio.gather(*(submit_later(batcher, i, 0.005 * i) for i in range(4)))

    assert asyncio.run(scenario()) == [0, 2, 4, 6]
    assert model.batches == [[0, 1, 2, 3]]


def test_abandoned_requests_are_left_out_and_errors_reach_only_their_batch():
    model = SlowModel()

    async def scenario():
        # Batch [1] runs until the gate opens: what queues behind it does not race a timer on a busy machine.
        model.gate = asyncio.Event()
        batcher = Batcher(model, max_batch_size=4)
        running = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(2), 0.01)  # gives up while batch [1] runs
        failing = asyncio.gather(batcher.submit(-1), batcher.submit(3), return_exceptions=True)
        await asyncio.sleep(0.01)  # both queued behind batch [1]
        assert model.batches == [[1]]
        model.gate.set()
        assert await running == 2
        bad, also_bad = await failing
        assert isinstance(bad, ValueError) and isinstance(also_bad, ValueError)
        return await batcher.submit(5)

    assert asyncio.run(scenario()) == 10
    assert model.batches == [[1], [-1, 3], [5]]


def test_an_idle_model_waits_no_longer_than_its_batch_takes_to_fill():
    """``wait_s`` is the most an idle model waits: a full batch waited all of it anyway."""
    model = SlowModel(seconds=0.0)

    async def scenario():
        batcher = Batcher(model, max_batch_size=4, wait_s=30.0)
        return await asyncio.wait_for(asyncio.gather(*(submit_later(batcher, i, 0.005 * i) for i in range(4))), 5)

    assert asyncio.run(scenario()) == [0, 2, 4, 6]
    assert model.batches == [[0, 1, 2, 3]]


def test_items_of_another_key_in_a_batch_are_answered_when_their_own_run_is_done():
    """A multiplexed replica's batch holds several models' requests: the small model's requests waited for the
    large model's forward (run after it, or before) to be answered."""

    async def scenario():
        gate = asyncio.Event()  # (made on the loop that runs the scenario)
        seen = []

        async def run(items):
            seen.append(list(items))
            if items[0].startswith("large"):
                await gate.wait()
            return [item.upper() for item in items]

        batcher = Batcher(run, max_batch_size=8, wait_s=0.05, key=lambda item: item.split("-")[0])
        large = [asyncio.ensure_future(batcher.submit(f"large-{i}")) for i in range(2)]
        small = [asyncio.ensure_future(batcher.submit(f"small-{i}")) for i in range(2)]
        await asyncio.sleep(0.2)
        assert seen == [["large-0", "large-1"]]  # one batch's turn, the large model's group first ...
        gate.set()
        assert await asyncio.gather(*large) == ["LARGE-0", "LARGE-1"]
        assert await asyncio.gather(*small) == ["SMALL-0", "SMALL-1"]
        gate.clear()
        small = [asyncio.ensure_future(batcher.submit(f"small-{i}")) for i in range(2, 4)]
        large = [asyncio.ensure_future(batcher.submit(f"large-{i}")) for i in range(2, 4)]
        # ... and the small model's answered while the large one's forward still runs
        assert await asyncio.wait_for(asyncio.gather(*small), 2) == ["SMALL-2", "SMALL-3"]
        assert not any(f.done() for f in large)
        gate.set()
        assert await asyncio.gather(*large) == ["LARGE-2", "LARGE-3"]
        return seen

    assert asyncio.run(scenario())[1:] == [["small-0", "small-1"], ["small-2", "small-3"], ["large-2", "large-3"]]


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(SlowModel(), max_batch_size=0)


class AllocatesTooMuch(torch.nn.Module):
    """A model whose forward asks the CPU allocator for a petabyte: torch raises its real RuntimeError."""

    def forward(self, x):
        return torch.empty(2**50, dtype=torch.uint8)


def test_a_forward_that_fails_fails_only_its_own_models_requests_and_out_of_memory_is_a_memory_error():
    """Requests for two models in one batch: the one whose forward runs out of memory gets a MemoryError (the
    endpoint's 503), the other its probabilities (they shared the batch, not the failure)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.model_store import LoadedModel
    from pipelines.preprocess import PreprocessSpec
    from pipelines.serve import Classifier

    spec = PreprocessSpec(image_size=4, channels=1, mean=(0.0,), std=(1.0,), class_names=("a", "b"))
    working = LoadedModel("small", "1", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval(), spec,
                          folded=False)
    failing = LoadedModel("huge", "1", AllocatesTooMuch(), spec, folded=False)
    replica = object.__new__(Classifier.func_or_class)  # the deployment's own methods, without Serve
    replica.forwards = ThreadPoolExecutor(1)
    images = [torch.rand(1, 1, 4, 4) for _ in range(3)]
    outputs = asyncio.run(replica._forward([(working, images[0]), (failing, images[1]), (working, images[2])]))
    assert isinstance(outputs[1], MemoryError) and "can't allocate memory" in str(outputs[1])
    for output, image in ((outputs[0], images[0]), (outputs[2], images[2])):
        with torch.inference_mode():
            expected = torch.softmax(working.model(image), dim=1)[0]
        torch.testing.assert_close(output, expected)
