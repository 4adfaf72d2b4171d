"""A serving replica's model loads, through the deployment's own methods without Serve: a load that outlasts its
request is not started again beside itself."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from types import SimpleNamespace

import pytest
import torch

import cnnmodels
from pipelines.checkpoints import ModelCheckpoint, save_checkpoint
from pipelines.model_store import ModelStore
from pipelines.preprocess import PreprocessSpec


@pytest.fixture
def replica_with_a_gated_load(make_config, tmp_path):
    """A replica serving one checkpoint file, whose loads (real ones) wait for ``gate`` and are counted."""
    from pipelines.serve import Classifier

    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.25,), class_names=("a", "b", "c"))
    model = cnnmodels.create_model("lenet5", num_classes=3, in_chans=1)
    save_checkpoint(ModelCheckpoint("lenet5", {}, spec, model.state_dict()), tmp_path / "lenet5.pt")
    cfg = make_config(f"serve.checkpoints={{good: {tmp_path / 'lenet5.pt'}}}", "serve.trace_models=false",
                      "serve.request_timeout_s=2")
    replica = object.__new__(Classifier.func_or_class)  # the deployment's own methods, without Serve
    replica.cfg, replica.store, replica.device, replica.loads = cfg, ModelStore(cfg), torch.device("cpu"), {}
    replica.load_expiries = {}
    replica.by_alias = {m.alias: m for m in replica.store.discover()[0]}
    calls, gate, failures = [], threading.Event(), []
    load = replica.store.load

    def gated_load(served, **options):
        calls.append(served.alias)
        gate.wait(60)
        if failures:
            raise failures.pop()
        return load(served, **options)

    replica.store.load = gated_load
    return replica, calls, gate, failures


def test_a_load_outlasting_its_request_is_taken_over_by_the_next_request(replica_with_a_gated_load):
    """A request's deadline passes while its model loads: the next request waits for that load rather than
    starting a second one (the thread cannot be cancelled; Serve's multiplexer keeps only finished loads)."""
    replica, calls, gate, _ = replica_with_a_gated_load

    async def two_requests():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(replica._load_once("good"), 0.3)
        second = asyncio.ensure_future(replica._load_once("good"))
        await asyncio.sleep(0.3)
        assert calls == ["good"] and not second.done()
        gate.set()
        return await second

    loaded = asyncio.run(two_requests())
    assert calls == ["good"] and loaded.alias == "good" and loaded.spec.num_classes == 3
    assert replica.loads == {}  # handed over: the multiplexer's cache holds it from here


def test_a_load_that_finished_after_its_request_gave_up_is_handed_to_the_next_one(replica_with_a_gated_load):
    replica, calls, gate, _ = replica_with_a_gated_load

    async def abandoned_then_asked_again():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(replica._load_once("good"), 0.3)
        gate.set()
        while not replica.loads["good"].done():
            await asyncio.sleep(0.05)
        return await replica._load_once("good")

    loaded = asyncio.run(abandoned_then_asked_again())
    assert calls == ["good"] and loaded.alias == "good"
    again = asyncio.run(replica._load_once("good"))  # once handed over, a later call (after eviction) loads anew
    assert calls == ["good", "good"] and again is not loaded


def test_an_abandoned_load_is_not_held_for_good_nor_its_failure_handed_on(replica_with_a_gated_load):
    """Nobody asks again: the model loaded for a request that gave up is let go after one request deadline (it
    is not counted in the multiplexer's max_models_per_replica). A load that failed with no request waiting is
    forgotten at once: the next request tries afresh instead of getting that stale error."""
    replica, calls, gate, failures = replica_with_a_gated_load

    async def abandon(failure=None):
        if failure is not None:
            failures.append(failure)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(replica._load_once("good"), 0.2)
        gate.set()
        load = replica.loads["good"]
        while not load.done():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0)  # its done-callbacks
        held = "good" in replica.loads
        await asyncio.sleep(2.5)  # past serve.request_timeout_s
        gate.clear()
        return held, "good" in replica.loads

    assert asyncio.run(abandon()) == (True, False)
    assert asyncio.run(abandon(MemoryError("out of memory"))) == (False, False)
    gate.set()
    assert asyncio.run(replica._load_once("good")).alias == "good" and calls == ["good"] * 3


def test_a_model_a_request_took_is_not_kept_alive_by_its_load(replica_with_a_gated_load):
    """Once a request has taken its load (and the multiplexer evicted the model), nothing of the replica's holds
    the model: the load's expiry timer used to, for a request deadline, one more copy at every reload."""
    replica, calls, gate, _ = replica_with_a_gated_load
    gate.set()

    async def load_then_evict():
        loaded = await replica._load_once("good")
        model = weakref.ref(loaded.model)
        del loaded  # what the multiplexer's eviction leaves
        # The loop's wake-up of this task holds the load's result until the next step, and the executor's thread
        # its finished work item until it takes the next one: neither is the replica's, so both are waited out.
        for _ in range(100):
            await asyncio.sleep(0.01)
            gc.collect()
            if model() is None:
                break
        return model() is None, dict(replica.loads), dict(replica.load_expiries)

    # Checked while the loop runs: closing it drops its timers, and with them what they hold.
    assert asyncio.run(load_then_evict()) == (True, {}, {})
    assert calls == ["good"]

    async def taken_before_its_callback_ran():
        # A request that awaited the finished load at once (no suspension) forgot it before _after_load ran.
        load = asyncio.get_running_loop().create_future()
        load.set_result(object())
        replica._after_load("good", load)
        return dict(replica.load_expiries)

    assert asyncio.run(taken_before_its_callback_ran()) == {}


def test_a_checkpoint_whose_input_no_request_could_fit_is_refused(make_config, tmp_path):
    """A model whose own input is over serve.max_resized_pixels is refused at verification (every request for it
    would be refused, after each load had probed it at that size), not served as ok."""
    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.25,), class_names=("a", "b", "c"))
    model = cnnmodels.create_model("lenet5", num_classes=3, in_chans=1)
    save_checkpoint(ModelCheckpoint("lenet5", {}, spec, model.state_dict()), tmp_path / "lenet5.pt")
    # (The models the config trains must fit the budget when it loads; a checkpoint file is checked here.)
    cfg = make_config(f"serve.checkpoints={{big: {tmp_path / 'lenet5.pt'}}}", "serve.max_resized_pixels=1000",
                      "train.models=[resnet18]", "search.phis=[]")
    store = ModelStore(cfg)
    models, _ = store.discover()
    store.verify(models)
    assert models[0].status == "error" and "32x32 pixels, above serve.max_resized_pixels (1,000)" in models[0].error
    cfg.serve.max_resized_pixels = 1024  # exactly its input: servable
    store.verify(models)
    assert models[0].status == "ok"


def _post(body: bytes, content_type: str = "image/png"):
    """A real Starlette request carrying ``body``, as the replica's route receives it."""
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers, "query_string": b""},
                   receive)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


# A valid PNG header of 65535 x 1 pixels (no pixel data needed: the budget refuses it from the header).
_STRIP_PNG = (b"\x89PNG\r\n\x1a\n"
              + _png_chunk(b"IHDR", (65535).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x08\x00\x00\x00\x00")
              + _png_chunk(b"IDAT", b""))


@pytest.mark.parametrize("body, status, reason", [(b"", 400, "empty body"),
                                                  (b"not an image at all", 400, "not a readable image"),
                                                  (b"%!PS-Adobe-3.0 EPSF-3.0\n", 415, "EPS images are not accepted"),
                                                  # an iPhone's photo: was a 400 "not a readable image"
                                                  (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", 415,
                                                   "HEIF images are not accepted"),
                                                  (_STRIP_PNG, 400, "aspect ratio above the limit")])
def test_an_upload_refused_from_its_header_loads_no_model(replica_with_a_gated_load, body, status, reason):
    """Bad input changes nothing: an empty body, bytes that are no image, a refused format or an image over the
    budget is refused before the model is loaded (a load would evict another model from the replica's cache)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.http_api import RequestError
    from pipelines.preprocess import DecodeBudget

    replica, calls, gate, _ = replica_with_a_gated_load
    gate.set()
    replica.get_model, replica.champion = replica._load_once, "good"
    replica.models, replica.registry_champion = list(replica.by_alias.values()), None
    replica.max_bytes, replica.budget = 1 << 20, DecodeBudget()
    replica.decoder = replica.header_checks = ThreadPoolExecutor(max_workers=1)
    with pytest.raises(RequestError) as refused:
        asyncio.run(replica._answer(_post(body), replica.by_alias["good"], None))
    replica.decoder.shutdown()
    assert refused.value.status == status and reason in refused.value.message and calls == []


def _truncated_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40).save(buffer, "PNG")
    return buffer.getvalue()[:-200]


@pytest.mark.parametrize("body, top_k, budget, status, reason", [
    ("square", 4, {}, 422, "top_k must be at most 3 for good"),
    ("truncated", None, {}, 400, "truncated or corrupt"),
    ("square", None, {"max_resized_pixels": 1000}, 400, "resizes to 1,024 pixels for a 32-pixel model"),
])
def test_a_request_its_verified_model_cannot_answer_loads_no_model(replica_with_a_gated_load, body, top_k, budget,
                                                                    status, reason):
    """Bad input changes nothing, past the header too: with the model's preprocessing known from its verification,
    a top_k above its classes, truncated pixels or an image over the resize budget is refused before the model is
    loaded (the load ran first, and evicted another model from the replica's cache)."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from pipelines.http_api import RequestError
    from pipelines.preprocess import DecodeBudget

    replica, calls, gate, _ = replica_with_a_gated_load
    gate.set()
    replica.store.verify(list(replica.by_alias.values()))
    assert calls == ["good"] and replica.by_alias["good"].status == "ok"
    calls.clear()
    replica.get_model = replica._load_once
    replica.max_bytes, replica.budget = 1 << 20, DecodeBudget(**budget)
    replica.decoder = replica.header_checks = ThreadPoolExecutor(max_workers=1)
    square = io.BytesIO()
    Image.new("L", (32, 32)).save(square, "PNG")
    data = square.getvalue() if body == "square" else _truncated_png()
    with pytest.raises(RequestError) as refused:
        asyncio.run(replica._answer(_post(data), replica.by_alias["good"], top_k))
    replica.decoder.shutdown()
    assert refused.value.status == status and reason in refused.value.message and calls == []


def test_a_checkpoint_file_verified_only_at_request_time_reports_what_it_says(replica_with_a_gated_load):
    """A checkpoint file whose verification at start failed for a passing reason (an NFS mount's EIO) was loaded
    fine by a later request, but never got its architecture, input size and parameters: /models showed none."""
    import errno

    replica, calls, gate, failures = replica_with_a_gated_load
    gate.set()
    served = replica.by_alias["good"]
    failures.append(OSError(errno.EIO, "Input/output error"))
    replica.store.verify([served])
    assert served.status == "unchecked" and served.arch == "" and served.input_size is None
    replica.get_model, replica.models, replica.registry_champion = replica._load_once, [served], None
    asyncio.run(replica._loaded(served))
    assert served.status == "ok" and served.arch == "lenet5" and served.input_size == 32
    assert served.params_count == sum(p.numel() for p in cnnmodels.create_model("lenet5", num_classes=3,
                                                                                in_chans=1).parameters())
    assert replica.champion == "good"


def test_a_load_failing_for_a_passing_reason_logs_no_tracking_password(replica_with_a_gated_load, caplog):
    """MLflow's client names the full URL of a request that failed, credentials included: a replica logged it as
    it came (no console redaction in a replica), and Ray streams replica logs to the driver's console."""
    import logging

    from mlflow.exceptions import MlflowException

    from pipelines.serve import RequestError

    replica, calls, gate, failures = replica_with_a_gated_load
    gate.set()
    served = replica.by_alias["good"]
    replica.get_model, replica.models, replica.registry_champion = replica._load_once, [served], None
    failures.append(MlflowException("API request to http://alice:s3cret@mlflow:5000/api/2.0/mlflow/model-versions"
                                    "/get failed with exception ConnectionError"))
    with caplog.at_level(logging.WARNING, logger="pipelines"), pytest.raises(RequestError) as refused:
        asyncio.run(replica._loaded(served))
    assert refused.value.status == 503 and "could not be loaded now" in caplog.text
    assert "s3cret" not in caplog.text and "alice:***@mlflow:5000" in caplog.text


def test_an_upload_s_header_is_parsed_beside_the_event_loop(replica_with_a_gated_load, monkeypatch):
    """Pillow parses headers in Python: one it takes long over (whatever the structure bounds let through) stalled
    every request of the replica, its deadlines and health checks, when it was parsed on the event loop."""
    import io
    import time
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from pipelines.preprocess import DecodeBudget

    replica, _, gate, _ = replica_with_a_gated_load
    gate.set()
    replica.store.verify(list(replica.by_alias.values()))
    replica.get_model = replica._load_once
    replica.max_bytes, replica.budget = 1 << 20, DecodeBudget()
    replica.decoder, replica.header_checks = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)
    replica.batcher = SimpleNamespace(submit=lambda item: asyncio.sleep(0, result=torch.ones(3) / 3))  # one row
    real_check, checking = type(replica)._answer.__globals__["check_upload"], []

    def slow_check(*args):  # a header Pillow takes 0.6 s over
        checking.append(time.perf_counter())
        time.sleep(0.6)
        checking.append(time.perf_counter())
        return real_check(*args)

    # Where the deployment's methods look it up: Serve's ingress copies the class, with its own globals.
    monkeypatch.setitem(type(replica)._answer.__globals__, "check_upload", slow_check)
    square = io.BytesIO()
    Image.new("L", (32, 32)).save(square, "PNG")

    async def request_beside_a_ticker():
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.05)

        ticking = asyncio.ensure_future(ticker())
        answer = await replica._answer(_post(square.getvalue()), replica.by_alias["good"], None)
        ticking.cancel()
        return answer, ticks

    answer, ticks = asyncio.run(request_beside_a_ticker())
    assert answer["model"] == "good" and len(answer["predictions"]) == 3
    during = [t for t in ticks if checking[0] < t < checking[1]]
    assert len(during) >= 6, f"the event loop stalled: {len(during)} ticks of 50 ms during a 0.6 s header parse"


class _FixedBatchFlatten(torch.nn.Module):
    """Flattens with the batch size read as a Python int: a trace keeps the tracing batch's size as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(int(x.shape[0]), -1))


def test_a_trace_that_fails_on_another_batch_size_is_not_served_and_does_not_fail_the_model():
    """The trace is checked on a batch of 3 after tracing on 2: one that fails there is set aside for the eager
    model (the check's own failure used to escape, and the model was marked failed for good)."""
    from pipelines.model_store import trace_for_serving

    spec = PreprocessSpec(image_size=8, channels=1, mean=(0.5,), std=(0.25,), class_names=("a", "b", "c"))
    model = _FixedBatchFlatten().eval()
    served, traced = trace_for_serving(model, spec)
    assert served is model and not traced
    assert served(torch.zeros(5, 1, 8, 8)).shape == (5, 3)


def test_downloaded_checkpoints_of_versions_not_served_are_deleted_once_old(make_config):
    """Every training left its old versions' checkpoints in every serving node's download cache, for good."""
    import os
    import time

    from pipelines.model_store import CACHE_KEEP_S, ServedModel

    cfg = make_config()
    store = ModelStore(cfg)
    folder = store.cache_dir / cfg.registered_model_name
    week_old = time.time() - CACHE_KEEP_S - 60
    for name, age in (("v1-a", week_old), ("v2-b", week_old), ("v12-c", week_old), ("v3-d", time.time())):
        (folder / name).mkdir(parents=True)
        (folder / name / "model.pt").write_bytes(b"x")
        os.utime(folder / name, (age, age))
    served = [ServedModel(alias="lenet5", source=f"models:/{cfg.registered_model_name}/2", version="2"),
              ServedModel(alias="file", source="/elsewhere/model.pt")]
    assert store.prune_cache(served) == ["v1-a", "v12-c"]  # not served, old; v2 is served, v3 recent
    assert sorted(p.name for p in folder.iterdir()) == ["v2-b", "v3-d"]
    assert store.prune_cache(served) == []
    # Age counts from the last use: a version taken from the cache (by a replica of the app being replaced, say)
    # is not deleted by the next app's replicas, though it was downloaded long ago.
    os.utime(folder / "v2-b", (week_old, week_old))
    in_use = ServedModel(alias="lenet5", source=f"models:/{cfg.registered_model_name}/2", version="2", cache_key="b")
    assert store.checkpoint_file(in_use) == folder / "v2-b" / "model.pt"  # from the cache, no registry asked
    assert store.prune_cache([]) == []
    assert (folder / "v2-b").is_dir()


def test_a_checkpoint_file_s_infinite_val_acc_is_not_reported(make_config, tmp_path):
    """A hand-made checkpoint file whose metrics say val_acc inf made /models answer 500 (JSON has no inf), as
    NaN tags of registry versions did before they were left out."""
    import json

    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.25,), class_names=("a", "b"))
    weights = cnnmodels.create_model("lenet5", num_classes=2, in_chans=1).state_dict()
    for name, val_acc in (("odd", float("inf")), ("fine", 0.75)):
        save_checkpoint(ModelCheckpoint("lenet5", {}, spec, weights, metrics={"val_acc": val_acc}),
                        tmp_path / f"{name}.pt")
    cfg = make_config(f"serve.checkpoints={{odd: {tmp_path / 'odd.pt'}, fine: {tmp_path / 'fine.pt'}}}",
                      "serve.trace_models=false")
    store = ModelStore(cfg)
    models = store.discover()[0]
    store.verify(models)
    by_alias = {m.alias: m for m in models}
    assert by_alias["odd"].status == "ok" and by_alias["odd"].val_acc is None
    assert by_alias["fine"].val_acc == 0.75
    json.dumps([m.val_acc for m in models], allow_nan=False)  # what /models answers with


@pytest.fixture
def replica_with_serves_multiplexer(make_config, tmp_path, serve_replica_context):
    """A replica serving three checkpoint files through Serve's own multiplexer (``serve.multiplexed``, which
    needs a replica's context and metrics: given here, as a deployment has them); loads of ``slow`` wait for
    ``gate``; every load is counted."""
    from pipelines.serve import Classifier

    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.25,), class_names=("a", "b", "c"))
    model = cnnmodels.create_model("lenet5", num_classes=3, in_chans=1)
    save_checkpoint(ModelCheckpoint("lenet5", {}, spec, model.state_dict()), tmp_path / "lenet5.pt")
    files = {alias: str(tmp_path / "lenet5.pt") for alias in ("quick", "other", "slow")}
    cfg = make_config(f"serve.checkpoints={files}", "serve.trace_models=false", "serve.request_timeout_s=5",
                      "serve.max_models_per_replica=1")
    replica = object.__new__(Classifier.func_or_class)
    replica.cfg, replica.store, replica.device, replica.loads = cfg, ModelStore(cfg), torch.device("cpu"), {}
    replica.load_expiries, replica.registry_champion = {}, None
    replica.models = replica.store.discover()[0]
    replica.by_alias = {m.alias: m for m in replica.models}
    replica._make_multiplexed_loader()
    calls, gate, gated = [], threading.Event(), {"slow"}
    load = replica.store.load

    def counted_load(served, **options):
        calls.append(served.alias)
        if served.alias in gated:
            gate.wait(60)
        return load(served, **options)

    replica.store.load = counted_load
    yield replica, calls, gate, gated
    gate.set()


def test_a_slow_load_holds_up_no_other_model_and_evicts_none_for_nothing(replica_with_serves_multiplexer):
    """Serve's multiplexer holds one lock over every load and evicts its least recently used model before it
    loads: a load that outlasted its request's deadline (a large download, a B7's trace) held every other model's
    first request until then (503) and evicted a model for a load that never arrived. Loads now finish before
    the multiplexer sees them."""
    replica, calls, gate, _ = replica_with_serves_multiplexer

    async def requests():
        await replica._loaded(replica.by_alias["quick"])
        with pytest.raises(asyncio.TimeoutError):  # its deadline passes; the load goes on
            await asyncio.wait_for(replica._loaded(replica.by_alias["slow"]), 0.5)
        # The model in the LRU stays: no load has arrived to take its place.
        assert (await replica._loaded(replica.by_alias["quick"])).alias == "quick" and calls == ["quick", "slow"]
        # Another model's first request while the slow load still runs (and another still waits for it).
        waiting = asyncio.ensure_future(replica._loaded(replica.by_alias["slow"]))
        other = await asyncio.wait_for(replica._loaded(replica.by_alias["other"]), 3)
        assert other.alias == "other" and not waiting.done()
        gate.set()
        return await asyncio.wait_for(waiting, 10)

    assert asyncio.run(requests()).alias == "slow"
    assert calls == ["quick", "slow", "other"]  # the slow model loaded once, for both of its requests


def test_a_champion_verified_late_is_loaded_before_requests_go_to_it(replica_with_serves_multiplexer):
    """The registry's champion unchecked at start (MLflow down): requests without a model went to the best
    loaded one; once the champion's check passed they went to it straight away, each waiting for its first load
    (503 past the deadline for a large one) while the model it replaced was loaded and answering."""
    replica, calls, _, _ = replica_with_serves_multiplexer
    for served in replica.models:
        served.status = "unchecked" if served.alias == "other" else "ok"
    replica.registry_champion = "other"

    def verify(models):  # MLflow back: the check passes
        for served in models:
            served.status = "ok"

    replica.store.verify = verify

    async def outage_over():
        replica.champion = replica.store.servable_champion(replica.models, replica.registry_champion)
        assert replica.champion != "other"
        await replica._loaded(replica.by_alias[replica.champion])  # the fallback answering
        await replica._verify_until_checked(interval_s=0)
        return replica.champion, replica._holds("other")

    assert asyncio.run(outage_over()) == ("other", True)
    assert calls[-1] == "other"


def test_a_request_unanswered_within_the_deadline_is_503_and_the_next_one_is_answered(replica_with_a_gated_load):
    """The replica's own deadline (serve.request_timeout_s, 2 s here): a request whose model is still loading when it
    passes gets a 503 saying so, the load goes on, and the next request is answered with it."""
    import io
    import json
    import time
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from pipelines.batching import Batcher
    from pipelines.http_api import RequestError
    from pipelines.preprocess import DecodeBudget

    replica, calls, gate, _ = replica_with_a_gated_load
    replica.get_model, replica.champion, replica.auth_token = replica._load_once, "good", None
    replica.models, replica.registry_champion = list(replica.by_alias.values()), None
    replica.max_bytes, replica.budget = 1 << 20, DecodeBudget()
    replica.decoder = replica.header_checks = ThreadPoolExecutor(max_workers=1)
    replica.forwards = ThreadPoolExecutor(max_workers=1)
    square = io.BytesIO()
    Image.new("L", (32, 32), 128).save(square, "PNG")

    async def two_requests():
        replica.batcher = Batcher(replica._forward, 8, 0.005)
        started = time.monotonic()
        with pytest.raises(RequestError) as late:
            await replica.predict(_post(square.getvalue()), model="good", top_k=None)
        waited = time.monotonic() - started
        gate.set()
        answered = await replica.predict(_post(square.getvalue()), model="good", top_k=None)
        return late.value, waited, json.loads(answered.body)

    try:
        late, waited, answer = asyncio.run(two_requests())
    finally:
        replica.decoder.shutdown()
        replica.forwards.shutdown()
    assert late.status == 503 and "no answer within serve.request_timeout_s (2 s)" in late.message
    assert 1.9 < waited < 10
    assert answer["model"] == "good" and len(answer["predictions"]) == 3 and calls == ["good"]  # loaded once


def test_a_replica_decodes_at_most_max_concurrent_decodes_images_at_once(replica_with_a_gated_load, monkeypatch):
    """Twenty requests at once: their decodes (each up to serve.max_image_pixels, hundreds of MB for the largest)
    run serve.max_concurrent_decodes (2) at a time, the rest wait in the pool's queue, not in memory."""
    import io
    import threading
    import time

    from PIL import Image

    from pipelines.batching import Batcher
    from pipelines.preprocess import DecodeBudget

    replica, calls, gate, _ = replica_with_a_gated_load
    gate.set()
    replica.store.verify(list(replica.by_alias.values()))
    replica.get_model, replica.max_bytes, replica.budget = replica._load_once, 1 << 20, DecodeBudget()
    replica._start_executors()
    running, most, lock = [0], [0], threading.Lock()
    decode = type(replica)._answer.__globals__["decode_upload"]

    def counted_decode(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return decode(*args)
        finally:
            with lock:
                running[0] -= 1

    # (Serve's ingress rebuilt the class: its methods read a copy of the module's globals)
    monkeypatch.setitem(type(replica)._answer.__globals__, "decode_upload", counted_decode)
    square = io.BytesIO()
    Image.new("L", (32, 32), 128).save(square, "PNG")

    async def twenty_requests():
        replica.batcher = Batcher(replica._forward, 8, 0.005)
        return await asyncio.gather(*(replica._answer(_post(square.getvalue()), replica.by_alias["good"], None)
                                      for _ in range(20)))

    try:
        answers = asyncio.run(twenty_requests())
    finally:
        for pool in (replica.decoder, replica.header_checks, replica.forwards):
            pool.shutdown()
    assert len(answers) == 20 and all(a["model"] == "good" for a in answers)
    assert most[0] == replica.cfg.serve.max_concurrent_decodes == 2


def test_a_replica_loads_at_most_two_models_at_once_and_tells_serve_which(replica_with_serves_multiplexer):
    """Loads run beside the multiplexer's LRU, not under its lock: a burst of first requests for every model
    loaded them all at once (each load holds a checkpoint, a model and its trace). Two at a time; and Serve's
    router hears which models a replica is loading, as from the multiplexer's own loads (without it, requests
    routed by model went to other replicas, which loaded the model too)."""
    replica, calls, gate, gated = replica_with_serves_multiplexer
    gate.set()

    async def burst():
        await replica._loaded(replica.by_alias["quick"])  # (Serve's multiplexer is made at its first call)
        gate.clear()
        gated.update({"other", "slow"})
        replica.by_alias["third"] = replica.by_alias["other"].__class__(**{**vars(replica.by_alias["other"]),
                                                                           "alias": "third"})
        gated.add("third")
        loads = [asyncio.ensure_future(replica._loaded(replica.by_alias[a])) for a in ("other", "slow", "third")]
        await asyncio.sleep(1.0)
        loading = set(replica.get_model.__wrapped__.__serve_multiplex_wrapper._model_load_tasks) \
            if hasattr(replica.get_model, "__wrapped__") else None
        started = list(calls)
        gate.set()
        done = await asyncio.wait_for(asyncio.gather(*loads), 20)
        return started, loading, [d.alias for d in done]

    started, loading, done = asyncio.run(burst())
    assert started == ["quick", "other", "slow"]  # the third waited for a slot
    assert done == ["other", "slow", "third"] and calls == ["quick", "other", "slow", "third"]
    assert loading == {"other", "slow"}


def test_a_finished_load_no_request_has_taken_stays_announced_to_serve_until_taken_or_let_go(
        replica_with_serves_multiplexer):
    """A load that outlasted its request's deadline finished with the model held for the next request, but the
    replica stopped telling Serve's router it had it: a retry routed by model went to a replica with fewer models,
    which loaded it again (and likely timed out again)."""
    replica, calls, gate, gated = replica_with_serves_multiplexer
    gated.add("other")

    async def scenario():
        await replica._loaded(replica.by_alias["quick"])  # (Serve's multiplexer is made at its first call)
        wrapper = replica._multiplexed_load.__dict__["__serve_multiplex_wrapper"]
        announced = []
        for alias in ("slow", "other"):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(replica._loaded(replica.by_alias[alias]), 0.3)
        gate.set()
        await asyncio.wait_for(asyncio.gather(replica.loads["slow"], replica.loads["other"]), 20)
        announced.append(set(wrapper._model_load_tasks))  # both finished, neither taken
        replica._forget_load("other", replica.loads["other"])  # as its expiry does
        announced.append(set(wrapper._model_load_tasks))
        taken = await replica._loaded(replica.by_alias["slow"])
        announced.append(set(wrapper._model_load_tasks))
        return announced, taken.alias, set(wrapper.models)

    announced, taken, loaded = asyncio.run(scenario())
    assert announced == [{"slow", "other"}, {"slow"}, set()]
    assert taken == "slow" and loaded == {"slow"} and calls == ["quick", "slow", "other"]


def test_a_load_every_request_gave_up_on_while_it_waited_for_a_slot_is_not_run(replica_with_serves_multiplexer):
    """A burst of first requests whose deadlines passed while their loads waited for a slot: those loads ran
    anyway, one after another, and a later request for any other model waited behind loads nobody wanted."""
    replica, calls, gate, gated = replica_with_serves_multiplexer
    gated.update({"quick", "other"})
    replica.by_alias["third"] = replica.by_alias["other"].__class__(**{**vars(replica.by_alias["other"]),
                                                                       "alias": "third"})

    async def gave_up_waiting():
        first = [asyncio.ensure_future(replica._loaded(replica.by_alias[a])) for a in ("quick", "other")]
        await asyncio.sleep(0.5)  # both slots taken
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(replica._loaded(replica.by_alias["third"]), 0.3)
        gate.set()
        await asyncio.wait_for(asyncio.gather(*first), 20)
        for _ in range(50):  # the third's load takes a slot, finds no request, and ends
            await asyncio.sleep(0.05)
            if "third" not in replica.loads:
                break
        return "third" in replica.loads

    assert asyncio.run(gave_up_waiting()) is False
    assert calls == ["quick", "other"]  # the third model was never loaded


def test_models_folded_in_threads_at_once_all_fold():
    """A replica loads two models at once, in threads: torch.fx's symbolic tracing (the batch-norm folding) patches
    torch's module calls process-wide while it runs, and folds that overlapped failed with "module is not installed
    as a submodule" (two of twelve here, before the folding was serialised)."""
    import threading

    from pipelines.model_store import prepare_for_serving

    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.25,), class_names=tuple("0123456789"))
    errors, folded = [], []

    def fold(arch: str) -> None:
        for _ in range(3):
            model = cnnmodels.create_model(arch, num_classes=10, in_chans=1, small_input=True)
            try:
                folded.append(prepare_for_serving(model, spec).folded)
            except Exception as err:  # noqa: BLE001 - counted
                errors.append(repr(err))

    threads = [threading.Thread(target=fold, args=(arch,)) for arch in ("resnet18", "densenet121", "googlenet",
                                                                         "vgg11_bn")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(folded) == 12 and all(folded)


def test_a_large_models_checking_forwards_hold_up_no_other_models_preparation():
    """Folding and tracing were serialised as a whole, the forwards that check each step included (about a
    dozen: seconds for a B7 at 600 px on a CPU): a small model's load waited for all of them. Here the large
    model's real forwards wait for a gate, and the small model is folded and traced meanwhile."""
    from pipelines.model_store import prepare_for_serving

    gate = threading.Event()

    class Large(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head = torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Linear(3, 3)

        def forward(self, x):
            if isinstance(x, torch.Tensor) and not torch.jit.is_tracing():  # not fx's symbolic trace, nor jit's
                gate.wait(30)
            return self.head(self.bn(self.conv(x)).mean((2, 3)))

    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.25,), class_names=("a", "b", "c"))
    large = threading.Thread(target=prepare_for_serving, args=(Large(), spec), kwargs={"trace": True})
    large.start()
    try:
        time.sleep(0.5)  # the large model is in its first checking forward
        done = []
        small = threading.Thread(target=lambda: done.append(prepare_for_serving(
            cnnmodels.create_model("lenet5", num_classes=3, in_chans=1), spec, trace=True)))
        small.start()
        small.join(20)
        assert done and done[0].folded and done[0].traced and large.is_alive()
    finally:
        gate.set()
        large.join(30)


def test_folding_a_model_leaves_the_forwards_of_other_threads_alone():
    """torch.fx's tracer patches nn.Module's calls process-wide while it traces: a replica folding a model it had
    just loaded failed every forward its other threads ran meanwhile (requests for its other models), with
    "module is not installed as a submodule"."""
    import threading

    import torch

    import cnnmodels
    from pipelines.model_store import fold_batchnorm
    from pipelines.preprocess import PreprocessSpec

    spec = PreprocessSpec(image_size=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                          class_names=tuple(str(i) for i in range(10)))
    served = cnnmodels.create_model("lenet5", num_classes=10).eval()
    loading = cnnmodels.create_model("resnet50", num_classes=10).eval()
    done, errors, forwards = threading.Event(), [], []

    def answer_requests():
        x = torch.randn(1, 3, 32, 32)
        while not done.is_set():
            try:
                with torch.inference_mode():
                    served(x)
                forwards.append(1)
            except Exception as err:  # noqa: BLE001 - counted
                errors.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=answer_requests)
    thread.start()
    try:
        folds = [fold_batchnorm(loading, spec)[1] for _ in range(3)]
    finally:
        done.set()
        thread.join()
    assert folds == [True] * 3
    assert forwards and not errors, errors[:3]
    # and the tracer's patches are gone afterwards: a plain call works, the model handed in is unchanged
    assert served(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in loading.modules())


def test_a_checkpoint_files_version_is_the_epoch_it_holds_when_loaded(make_config, tmp_path):
    """/models gave a checkpoint file's version as "" while /predict answered "epoch3"; once /models had it, a
    file replaced while served was answered with the old file's epoch."""
    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.25,), class_names=("a", "b", "c"))
    model = cnnmodels.create_model("lenet5", num_classes=3, in_chans=1)
    path = tmp_path / "lenet5.pt"
    save_checkpoint(ModelCheckpoint("lenet5", {}, spec, model.state_dict(), epoch=3), path)
    store = ModelStore(make_config(f"serve.checkpoints={{good: {path}}}", "serve.trace_models=false"))
    [served], _ = store.discover()
    store.verify([served])
    assert served.status == "ok" and served.version == "epoch3"  # what /models lists
    save_checkpoint(ModelCheckpoint("lenet5", {}, spec, model.state_dict(), epoch=7), path)  # trained on
    assert store.load(served, fold=False).version == "epoch7"
