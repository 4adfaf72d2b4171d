"""Ray Serve: the registered best models behind one HTTP endpoint (FastAPI ingress).

Routes (OpenAPI docs at ``/docs``):

* ``POST /predict``: the image as the raw body (``Content-Type: image/png``, ``image/jpeg``, ...) or as the
  multipart field ``file``. The model is chosen by ``?model=<alias>`` or the ``serve_multiplexed_model_id``
  header (also spelt ``serve-multiplexed-model-id``; Serve routes such requests to a replica that already holds
  the model), default ``champion``.
  ``top_k`` (default ``serve.default_top_k``, at most the model's class count). Returns ``{"model",
  "requested", "version", "predictions": [{"label", "index", "score"}], "latency_ms"}``.
* ``GET /models``: every servable alias with its architecture, version, data set, training fingerprint,
  ``test_acc``, ``val_acc``, ``params_count``, ``macs``, ``input_size``, load status, and which one is the champion.
* ``GET /healthz``: 200 while at least one model is servable, 503 otherwise.

:class:`Classifier` is the deployment, defined here once; :func:`build_app` configures it from
``serve.*`` with ``.options()``. Each replica keeps a bounded LRU of loaded models (Serve model
multiplexing), batches requests (:class:`~pipelines.batching.Batcher`: a batch is what arrived while the
previous one ran) and serves the model store's verified, batch-norm folded, traced models
(:mod:`pipelines.model_store`), their forward in a thread beside the event loop; the HTTP plumbing is
:mod:`pipelines.http_api`.
No request holds a replica for good: each has a deadline (``serve.request_timeout_s``, and
``serve.body_timeout_s`` for its body), and images are decoded within a budget checked from their header
(:class:`~pipelines.preprocess.DecodeBudget`), at most ``serve.max_concurrent_decodes`` at a time. Requests
waiting for a replica are at most ``serve.max_queued_requests`` per proxy (503 beyond). A body over
``serve.max_upload_mb`` is refused (413), but Serve's proxy has buffered it by then: a size limit on memory is a
reverse proxy's job (README).
"""

# No ``from __future__ import annotations`` here: Serve pickles the route handlers by value, and FastAPI must
# see real types (not strings to resolve against module globals) in their signatures.
import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse
from ray import serve

from .batching import Batcher
from .checkpoints import CHECKPOINT_FILE
from .config import (
    CHAMPION,
    ConfigError,
    PipelineConfig,
    ServeConfig,
    check_serve_settings,
    has_masked_password,
    outlives_the_command,
    redact_text,
    redact_uri,
)
from .http_api import (
    PREDICT_REQUEST_BODY,
    RequestError,
    api,
    authorize,
    check_upload,
    decode_upload,
    error_responses,
    read_image_bytes,
)
from .model_store import LoadedModel, ModelStore, ServedModel, is_transient_load_error, replica_threads
from .paths import write_text_atomically
from .preprocess import (
    DecodeBudget,
    PreprocessSpec,
    admit_budget_in_pillow,
    import_resizing,
    is_out_of_memory,
)

__all__ = ["Classifier", "build_app", "app_builder", "serve_stage", "write_serve_config", "ServeHandle",
           "is_transient_load_error"]

logger = logging.getLogger(__name__)

#: How often a replica verifies again the models it could not verify at start for a passing reason.
REVERIFY_INTERVAL_S = 15.0
#: Models a replica loads (or holds loaded for a request to take) at once, beside the
#: ``serve.max_models_per_replica`` it holds: one slow load (a large download, a B7's trace) holds up no other
#: model's, and a burst of requests for every model does not load them all at once (each load holds its
#: checkpoint, the model and its traced copy).
LOADS_AT_ONCE = 2


def classify(loaded: LoadedModel, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Class probabilities (on the CPU) for a batch of preprocessed images."""
    batch = torch.cat(tensors).to(loaded.device)
    with torch.inference_mode():
        return torch.softmax(loaded.model(batch).float(), dim=1).cpu()


async def require_token(request: Request) -> None:
    """401 unless the request carries this replica's token: a route dependency, so it comes before FastAPI judges
    the query (a bad top_k from a client without the token got 422, not the README's 401)."""
    authorize(request, serve.get_replica_context().servable_object.auth_token)


@serve.deployment(name="Classifier", health_check_period_s=10)
@serve.ingress(api)
class Classifier:
    """One replica: the config's models, verified at start, the champion preloaded.

    ``auth_token`` travels beside the config (whose dump masks it): :func:`build_app` reads it where the app
    is built, so replicas on other nodes need no copy of the environment variable. ``models`` (``ServedModel``
    fields) and ``registry_champion`` are what :func:`build_app` found to serve.
    """

    async def __init__(self, config: dict, auth_token: str | None, models: list[dict],
                       registry_champion: str | None) -> None:  # Serve awaits it
        self.cfg = PipelineConfig.model_validate(config)
        s = self.cfg.serve
        self.auth_token = auth_token
        torch.set_num_threads(replica_threads(s))
        import_resizing()  # here, not in the first request
        self.device = torch.device("cuda" if s.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.store = ModelStore(self.cfg)
        # What to serve was settled where the app was built (build_app): every replica serves the same versions,
        # and one started during an MLflow outage (a replacement, a scale-up) needs no registry to know them,
        # nor, for a checkpoint already in the node's download cache, to load it.
        self.models, self.registry_champion = [ServedModel(**m) for m in models], registry_champion
        self.by_alias = {m.alias: m for m in self.models}
        self.store.verify(self.models)
        self.store.prune_cache(self.models)
        self.champion = self.store.servable_champion(self.models, self.registry_champion)
        self.max_bytes = int(s.max_upload_mb * 1024 * 1024)
        self.budget = DecodeBudget.for_serving(s)
        admit_budget_in_pillow(self.budget)
        self._start_executors()
        self.batcher = Batcher(self._forward, s.max_batch_size, s.batch_wait_timeout_s,
                               key=lambda item: id(item[0]))  # one model at a time, each answered when done
        self.loads: dict[str, asyncio.Future] = {}  # alias -> its load, from start until a request takes it
        # alias -> when its finished, unclaimed load is let go; cancelled once it is (the timer holds the model)
        self.load_expiries: dict[str, asyncio.TimerHandle] = {}

        self._make_multiplexed_loader()
        if self.champion is not None:
            # Load (BN-fold, trace) the default model before the first request rather than during it.
            try:
                await self._loaded(self.by_alias[self.champion])
            except RequestError:
                logger.exception("could not preload the champion %s", self.champion)
        # Kept on the replica: the event loop holds only a weak reference to a task.
        self.reverifying = asyncio.get_running_loop().create_task(self._verify_until_checked())

    def _start_executors(self) -> None:
        """The replica's thread pools: decodes and header checks (``serve.max_concurrent_decodes`` at once each)
        and forwards (one batch at a time)."""
        s = self.cfg.serve
        # Decodes run here, never more than this many at once: the rest wait in the pool's queue, not in memory.
        self.decoder = ThreadPoolExecutor(max_workers=s.max_concurrent_decodes, thread_name_prefix="decode")
        self.header_checks = ThreadPoolExecutor(max_workers=s.max_concurrent_decodes, thread_name_prefix="header")
        # Traced forwards run here, one batch at a time, while the event loop goes on reading and decoding
        # requests; the next batch is what arrived meanwhile.
        self.forwards = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    def _make_multiplexed_loader(self) -> None:
        """``get_model``: Serve's multiplexer (an LRU of ``serve.max_models_per_replica`` loaded models) over
        :meth:`_load_once`. The LRU size is a config value, so the multiplexed loader is made here rather than as
        a decorated method (Serve detects loaders wired up at init)."""
        async def load(alias: str) -> LoadedModel:  # a function: Serve keeps its cache as an attribute on it
            return await self._load_once(alias)

        self._multiplexed_load, self._multiplexer_called = load, False
        self.get_model = serve.multiplexed(max_num_models_per_replica=self.cfg.serve.max_models_per_replica)(load)

    def _holds(self, alias: str) -> bool | None:
        """Whether Serve's multiplexer holds ``alias`` loaded; None where this Ray keeps its cache elsewhere."""
        load = getattr(self, "_multiplexed_load", None)
        if load is None:
            return None
        if not hasattr(load, "__serve_multiplex_wrapper"):  # made at its first call: nothing loaded before
            return False if not self._multiplexer_called else None
        models = getattr(load.__dict__["__serve_multiplex_wrapper"], "models", None)
        return alias in models if isinstance(models, dict) else None

    def _start_load(self, alias: str) -> asyncio.Future:
        """The load of ``alias`` in a thread: the one under way (or finished, not taken yet), else a new one."""
        load = self.loads.get(alias)
        if load is None:
            load = asyncio.ensure_future(self._load_in_a_slot(alias))
            load.add_done_callback(lambda done: self._after_load(alias, done))
            self.loads[alias] = load
        return load

    def _load_slots(self) -> tuple[asyncio.Semaphore, set[str], dict[str, int]]:
        """The :data:`LOADS_AT_ONCE` slots, the aliases holding one, and how many requests wait for each load."""
        if getattr(self, "_slots", None) is None:
            self._slots = (asyncio.Semaphore(LOADS_AT_ONCE), set(), {})
        return self._slots

    async def _load_in_a_slot(self, alias: str) -> LoadedModel:
        """Load ``alias`` in a thread once one of :data:`LOADS_AT_ONCE` slots is free, said to Serve as loading.
        The slot is held until the load is taken or let go (:meth:`_forget_load`): a finished load that waits for
        its next request holds its model too. A load whose every request gave up while it waited for a slot is
        not run: the requests behind it would wait for loads nobody wants."""
        slots, holders, waiting = self._load_slots()
        await slots.acquire()
        if not waiting.get(alias):
            # Gone before it ends: a request arriving now starts a load of its own rather than taking this one's
            # end for the model's failure.
            if self.loads.get(alias) is asyncio.current_task():
                del self.loads[alias]
            slots.release()
            raise RuntimeError(f"the load of {alias} was given up: no request waits for it")
        holders.add(alias)
        self._announce_loading(alias, True)
        try:
            s = self.cfg.serve
            return await asyncio.to_thread(self.store.load, self.by_alias[alias], fold=s.fold_batchnorm,
                                           trace=s.trace_models, device=self.device)
        except BaseException:
            self._announce_loading(alias, False)
            raise
        # A finished load stays announced until a request takes it (the multiplexer then lists the model as
        # loaded) or it is let go (:meth:`_forget_load`): a retry routed by model should come here, to the model
        # already loaded, not to a replica with fewer models, which would load it again.

    async def _wait_for_load(self, alias: str, load: asyncio.Future) -> LoadedModel:
        """``load``'s model, counted as a request waiting for it (see :meth:`_load_in_a_slot`); a request that
        gives up (its deadline) leaves the load running."""
        waiting = self._load_slots()[2]
        waiting[alias] = waiting.get(alias, 0) + 1
        try:
            return await asyncio.shield(load)
        finally:
            waiting[alias] -= 1
            if not waiting[alias]:
                del waiting[alias]

    def _announce_loading(self, alias: str, loading: bool) -> None:
        """Tell Serve's router that this replica is loading ``alias`` (or no longer is), as the multiplexer does
        for the loads it runs: requests routed by model then come here rather than to a replica with fewer
        models, which would load it too. (Nothing where this Ray keeps the multiplexer's state elsewhere.)"""
        wrapper = getattr(getattr(self, "_multiplexed_load", None), "__dict__", {}).get("__serve_multiplex_wrapper")
        loading_ids = getattr(wrapper, "_model_load_tasks", None)
        if isinstance(loading_ids, set):
            (loading_ids.add if loading else loading_ids.discard)(alias)
            if hasattr(wrapper, "_push_multiplexed_replica_info"):
                wrapper._push_multiplexed_replica_info = True

    async def _load_once(self, alias: str) -> LoadedModel:
        """Load ``alias`` in a thread (Serve's multiplexer caches the result). A request whose deadline passes
        during a load leaves the load running, and the next request for the model takes it over: cancelling the
        thread is impossible, and starting another beside it, as Serve's multiplexer would, doubles the memory
        and the wait of a model whose load outlasts ``serve.request_timeout_s``, at every request."""
        load = self._start_load(alias)
        try:
            return await self._wait_for_load(alias, load)
        finally:
            if load.done():  # handed to the multiplexer, or failed: the next request loads afresh
                self._forget_load(alias, load)

    def _after_load(self, alias: str, load: asyncio.Future) -> None:
        """A load that ends with no request waiting for it: a failure is forgotten at once (the next request
        tries afresh rather than getting a stale error), a model after one request deadline, so one nobody asks
        for again is not held beside the multiplexer's ``max_models_per_replica``."""
        if self.loads.get(alias) is not load:  # a request already took it (it awaited the finished load at once)
            return
        if load.cancelled() or load.exception() is not None:
            self._forget_load(alias, load)
        else:
            self.load_expiries[alias] = asyncio.get_running_loop().call_later(
                self.cfg.serve.request_timeout_s, self._forget_load, alias, load)

    def _forget_load(self, alias: str, load: asyncio.Future) -> None:
        """Let ``load`` go, its slot and its expiry timer with it: a timer left running would keep the loaded model
        in memory after the multiplexer evicted it, one more copy at each reload within a request deadline."""
        if self.loads.get(alias) is load:
            del self.loads[alias]
            if not self._holds(alias):  # (taken: the multiplexer lists it as loaded itself)
                self._announce_loading(alias, False)
            expiry = self.load_expiries.pop(alias, None)
            if expiry is not None:
                expiry.cancel()
            slots, holders, _ = self._load_slots()
            if alias in holders:
                holders.discard(alias)
                slots.release()

    async def _verify_until_checked(self, interval_s: float = REVERIFY_INTERVAL_S) -> None:
        """Verify again, every ``interval_s``, the models whose verification at start failed for a reason that
        can pass (the registry or its artifact store unreachable), until each is ok or failed for good: a
        replica started during an outage serves them once it is over, without a restart."""
        while any(m.status == "unchecked" for m in self.models):
            await asyncio.sleep(interval_s)
            # Those still unchecked after the wait: a request may have loaded one meanwhile (ok) or failed it for
            # good (a GPU error), which a verification listed before the wait undid (an unfoldable model back to
            # "ok", reloaded by every request; a served one back to "not verified yet").
            if pending := [m for m in self.models if m.status == "unchecked"]:
                # On copies, applied to those still unchecked once it is done: it takes seconds (a download),
                # and a request may load one (ok) or fail it for good meanwhile, which its result would undo.
                checked = [dataclasses.replace(m) for m in pending]
                # In one of the load slots (the models load one at a time in it): beside two requests' loads it
                # made a third model in memory, past the max_models_per_replica + 2 a replica is sized for
                slots, _, _ = self._load_slots()
                async with slots:
                    await asyncio.to_thread(self.store.verify, checked)
                for served, result in zip(pending, checked, strict=True):
                    if served.status == "unchecked":
                        for field in dataclasses.fields(result):
                            setattr(served, field.name, getattr(result, field.name))
            champion = self.store.servable_champion(self.models, self.registry_champion)
            if champion is not None and champion != self.champion:
                # Loaded (folded, traced) before requests go to it, as the champion is at start: switched to
                # straight after its check, every request without a model waited for its first load (503s past
                # serve.request_timeout_s for a large one) while the model it replaced was loaded and answering.
                try:
                    await self._loaded(self.by_alias[champion])
                except RequestError:  # (said by the load; one failed for good is no champion any more)
                    champion = self.store.servable_champion(self.models, self.registry_champion)
            self.champion = champion

    def _resolve(self, requested: str) -> ServedModel:
        alias = self.champion if requested == CHAMPION else requested
        served = self.by_alias.get(alias) if alias else None
        if served is None:
            known = ", ".join(sorted(self.by_alias)) or "none"
            if requested == CHAMPION:
                raise RequestError(503, "no servable champion model")
            raise RequestError(404, f"unknown model {requested!r}; known aliases: {CHAMPION}, {known}")
        if served.status == "error":
            raise RequestError(503, f"model {alias!r} failed to load: {served.error}")
        return served

    async def _loaded(self, served: ServedModel) -> LoadedModel:
        """The loaded model of ``served`` (from the LRU, or loaded now): 503 when that fails. A failure that can
        pass (memory, the registry unreachable) leaves it servable for the next request; any other marks it
        failed for this replica's life."""
        try:
            if self._holds(served.alias) is False:
                # Loaded before the multiplexer sees it, which then takes a finished load: it holds one lock over
                # every load and evicts its least recently used model before loading. A load that outlasted its
                # request's deadline (a large download, a B7's trace) held every other model's first request
                # (503) and evicted a model for a load that never arrived, at each request for it.
                await self._wait_for_load(served.alias, self._start_load(served.alias))
            self._multiplexer_called = True
            loaded = await self.get_model(served.alias)
        except Exception as err:  # noqa: BLE001 - the model may be unservable, the replica is not
            if is_transient_load_error(err):
                logger.warning("model %s could not be loaded now: %s: %s", served.alias, type(err).__name__,
                               redact_text(str(err)))  # (MLflow's errors name the URL, password included)
                raise RequestError(503, f"model {served.alias!r} could not be loaded now ({type(err).__name__}); "
                                        "retry later") from None
            served.mark_failed(err)
            self.champion = self.store.servable_champion(self.models, self.registry_champion)
            raise RequestError(503, f"model {served.alias!r} failed to load: {served.error}") from None
        if served.status == "unchecked":  # not verified at start (an outage): this load verified it
            served.status, served.error = "ok", None
            self.store.describe(served, loaded)
            self.champion = self.store.servable_champion(self.models, self.registry_champion)
        return loaded

    def _top_k(self, requested: int | None, spec: PreprocessSpec, alias: str) -> int:
        """``top_k``: an explicit one must fit the model's classes (422); the default is clamped to them."""
        classes = spec.num_classes
        if requested is None:
            return min(self.cfg.serve.default_top_k, classes)
        if requested > classes:
            raise RequestError(422, f"top_k must be at most {classes} for {alias}")
        return requested

    async def _forward(self, items: list[tuple[LoadedModel, torch.Tensor]]) -> list[torch.Tensor | Exception]:
        """One batch (:attr:`batcher`): one forward per loaded model in it. A forward that fails fails only its
        own model's requests (its exception is their result); running out of memory is a ``MemoryError``."""
        outputs: list[torch.Tensor | Exception | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (loaded, _) in enumerate(items):
            groups.setdefault(id(loaded), []).append(i)
        for indices in groups.values():
            loaded, tensors = items[indices[0]][0], [items[i][1] for i in indices]
            try:
                if loaded.traced:  # TorchScript holds no GIL while it computes: the loop keeps serving meanwhile
                    probabilities = await asyncio.get_running_loop().run_in_executor(self.forwards, classify, loaded,
                                                                                     tensors)
                else:  # an eager forward in a thread would queue for the GIL behind request handling at every layer
                    probabilities = classify(loaded, tensors)
            except Exception as err:  # noqa: BLE001 - handed to the requests of this model only
                failure = MemoryError(str(err)) if is_out_of_memory(err) else err
                for i in indices:
                    outputs[i] = failure
                continue
            for row, i in enumerate(indices):
                outputs[i] = probabilities[row]
        return outputs

    async def _answer(self, request: Request, served: ServedModel, top_k: int | None) -> dict[str, Any]:
        s = self.cfg.serve
        data = await read_image_bytes(request, self.max_bytes, s.body_timeout_s)
        loop = asyncio.get_running_loop()
        # A header parse, no pixels, in a pool of its own: in the decode pool it would queue behind other
        # requests' decodes, and on the loop a header the structure bounds let through (Pillow parses headers in
        # Python) would stall every request of the replica while it ran.
        await loop.run_in_executor(self.header_checks, check_upload, data, self.budget)
        # Bad input changes nothing: with the model's preprocessing known from its verification, a request it
        # cannot answer (top_k above its classes, an image over the resize budget, truncated pixels) is refused
        # before a load would evict another model from the replica's cache.
        spec = self.store.specs.get(served.alias)
        if spec is not None:
            answered_top_k = self._top_k(top_k, spec, served.alias)
            tensor = await loop.run_in_executor(self.decoder, decode_upload, data, spec, self.budget)
        loaded = await self._loaded(served)
        if spec != loaded.spec:  # not verified yet (an outage at start), or its checkpoint file replaced since
            answered_top_k = self._top_k(top_k, loaded.spec, served.alias)
            tensor = await loop.run_in_executor(self.decoder, decode_upload, data, loaded.spec, self.budget)
        probabilities = await self.batcher.submit((loaded, tensor))
        if isinstance(probabilities, Exception):
            raise probabilities
        scores, indices = probabilities.topk(answered_top_k)
        return {
            "model": served.alias,
            "version": loaded.version,
            "predictions": [{"label": loaded.spec.class_names[i], "index": int(i), "score": float(p)}
                            for p, i in zip(scores.tolist(), indices.tolist(), strict=True)],
        }

    @api.post("/predict", summary="Classify one image", openapi_extra=PREDICT_REQUEST_BODY,
              responses=error_responses(400, 401, 404, 408, 413, 415, 422, 503),
              dependencies=[Depends(require_token)])
    async def predict(
        self,
        request: Request,
        model: str | None = Query(None, description="alias (default: the champion)"),
        top_k: int | None = Query(None, ge=1,  # (at most the model's classes: _top_k's own 422)
                                  description="number of classes returned (default: serve.default_top_k, at most "
                                              "the model's classes)"),
    ) -> JSONResponse:
        started = time.perf_counter()
        # The id Serve routed by: its proxy reads the header in either spelling (serve_multiplexed_model_id, or
        # serve-multiplexed-model-id as proxies that drop underscores in header names forward it).
        requested = model or serve.get_multiplexed_model_id() or CHAMPION
        served = self._resolve(requested)
        timeout_s = self.cfg.serve.request_timeout_s
        try:
            # The replica's own deadline: the proxy's can be lifted by a client header (x-request-timeout-seconds).
            answer = await asyncio.wait_for(self._answer(request, served, top_k), timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(503, f"no answer within serve.request_timeout_s ({timeout_s:g} s)") from None
        answer["requested"] = requested
        answer["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return JSONResponse(answer)

    @api.get("/models", summary="Servable models and the champion", responses=error_responses(401),
             dependencies=[Depends(require_token)])
    async def list_models(self, request: Request) -> dict[str, Any]:
        return {"champion": self.champion, "registered_model": self.cfg.registered_model_name,
                "dataset": self.cfg.data.dataset,
                "models": [dict(asdict(m), champion=m.alias == self.champion) for m in self.models]}

    @api.get("/healthz", summary="Liveness: 200 while some model is servable")
    async def healthz(self, request: Request):
        ok = [m.alias for m in self.models if m.status == "ok"]
        failed = {m.alias: m.error for m in self.models if m.status == "error"}
        unchecked = {m.alias: m.error for m in self.models if m.status == "unchecked"}
        status = "ok" if ok and not failed and not unchecked else ("degraded" if ok else "unavailable")
        try:
            authorize(request, self.auth_token)
            body = {"status": status, "models": ok, "errors": failed, "not_verified_yet": unchecked}
        except RequestError:
            # Load balancers ask without a token: the status and counts only. The aliases and error texts (file
            # paths, the tracking server's address) are for callers /models would answer.
            body = {"status": status, "models": len(ok), "errors": len(failed), "not_verified_yet": len(unchecked)}
        return JSONResponse(body, status_code=200 if ok else 503)


def _portable_config(cfg: PipelineConfig) -> dict:
    """``cfg`` as JSON for replicas and config files: without the token, with the workdir made absolute (a
    replica's working directory is not the driver's)."""
    config = cfg.model_dump(mode="json", exclude={"serve": {"auth_token"}})
    config["workdir"] = str(cfg.paths.workdir)
    return config


def build_app(cfg: PipelineConfig, discovered: tuple[list[ServedModel], str | None] | None = None):
    """The Serve application for ``cfg``: replicas, autoscaling and resources from ``serve.*``; the bearer
    token (``serve.auth_token`` or the variable ``serve.auth_token_env`` names) and the models to serve with the
    registry's champion (``discovered``, default :meth:`ModelStore.discover` now) are settled here, once for
    every replica."""
    s = cfg.serve
    models, champion = discovered if discovered is not None else ModelStore(cfg).discover()
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
                               "max_ongoing_requests": s.max_ongoing_requests,
                               "max_queued_requests": s.max_queued_requests}
    if s.autoscaling:
        options["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                         "target_ongoing_requests": max(1, s.max_batch_size // 2)}
    else:
        options["num_replicas"] = s.num_replicas
    return Classifier.options(**options).bind(_portable_config(cfg), s.bearer_token(),
                                              [asdict(m) for m in models], champion)


def app_builder(args: dict):
    """Application builder for ``serve deploy``/``serve run`` configs: ``args: {config: {...}, require_token,
    served}`` (``served``: what the file was written for, see :func:`write_serve_config`; what is served is
    read again here).

    The token comes from ``serve.auth_token_env`` in the environment the application is built in; a config
    that had one (``require_token``) or binds a non-loopback host is refused without it.
    """
    cfg = PipelineConfig.model_validate(_with_tracking_password(args["config"]))
    # The checks `serve` makes, on a config edited since it was written (a serve.models typo deployed an app of no
    # models, every request refused, without a word).
    check_serve_settings(cfg)
    if args.get("require_token") and cfg.serve.bearer_token() is None:
        raise ConfigError("serve.auth_token_env", "this application requires a bearer token: export it in the "
                                                  "variable serve.auth_token_env names where it is deployed")
    return build_app(cfg, servable_models(cfg))


def _with_tracking_password(config: dict) -> dict:
    """A written app config whose tracking URI has its password masked (:func:`write_serve_config`), with the
    full URI from ``MLFLOW_TRACKING_URI`` where the app is built; ConfigError when that variable does not hold
    the same URI."""
    uri = (config.get("tracking") or {}).get("uri")
    if not uri or not has_masked_password(uri):
        return config
    full = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not full or redact_uri(full) != uri:
        raise ConfigError("tracking.uri", f"this application's tracking URI ({uri}) has a password, which its "
                                          "config file does not hold: export MLFLOW_TRACKING_URI with the full URI "
                                          "where it is deployed")
    return {**config, "tracking": {**config["tracking"], "uri": full}}


def _served_stamp(models: list[ServedModel], champion: str | None) -> dict:
    """Which model each alias stands for (its registry version, else its checkpoint file's path, size and
    modification time: a retrained checkpoint copied over the same path is another model) and the champion's
    alias."""
    def stamp(model: ServedModel) -> str:
        if model.version:
            return model.version
        try:
            path = Path(model.source)
            # (a directory holding model.pt, as load_checkpoint takes: the file copied over is model.pt)
            stat = (path / CHECKPOINT_FILE if path.is_dir() else path).stat()
        except OSError:  # (not here to look at: serving it checks it)
            return model.source
        return f"{model.source} ({stat.st_size} bytes, modified {stat.st_mtime_ns} ns)"

    return {"champion": champion, "models": {m.alias: stamp(m) for m in models}}


def write_serve_config(cfg: PipelineConfig,
                       served: tuple[list[ServedModel], str | None] | None = None) -> Path:
    """A Serve config file for ``serve deploy`` on a running cluster, next to the run's outputs.

    It never holds the token (only ``serve.auth_token_env``, the name of the variable holding it) nor the
    tracking URI's password (masked: the full URI is read from ``MLFLOW_TRACKING_URI`` where it is deployed),
    and is readable by its owner only. ``served``: the models and champion it is written for
    (:func:`servable_models`), named in its args: Serve rebuilds an app only when its import path, runtime env
    or args change, so the file written after a new registration was byte for byte the one before, and `serve
    deploy` of it kept the versions the app was first built with.
    """
    import yaml

    s = cfg.serve
    path = cfg.paths.serve_config
    path.parent.mkdir(parents=True, exist_ok=True)
    config = _portable_config(cfg)
    masked_uri = redact_uri(cfg.tracking_uri) != cfg.tracking_uri
    if masked_uri:
        config["tracking"]["uri"] = redact_uri(cfg.tracking_uri)
    document = {
        "proxy_location": "EveryNode",
        "http_options": {"host": s.host, "port": s.port, "request_timeout_s": proxy_timeout_s(s)},
        "applications": [{
            "name": cfg.name,
            "route_prefix": "/",
            "import_path": "pipelines.serve:app_builder",
            "args": {"config": config, "require_token": s.bearer_token() is not None,
                     **({"served": _served_stamp(*served)} if served is not None else {})},
        }],
    }
    header = f"# serve deploy {path}   (on a running Ray cluster)\n"
    if s.auth_token is not None:
        header += "# The token itself is not written here: set serve.auth_token_env and export it where it deploys.\n"
    if masked_uri:
        header += "# The tracking URI's password is not written here: export MLFLOW_TRACKING_URI (the full URI) " \
                  "where it deploys.\n"
    # Whole or not at all (a crash or a full disk left `serve deploy` a cut-off file), its owner's alone.
    write_text_atomically(path, header + yaml.safe_dump(document, sort_keys=False), mode=0o600)
    return path


def proxy_timeout_s(s: ServeConfig) -> float:
    """The Serve proxy's request timeout: a backstop a little after the replica's own deadline (which answers
    with a clearer message), and the deadline of a request still queued for a replica (which a client can lift
    with ``x-request-timeout-seconds``: ``serve.max_queued_requests`` bounds how many can wait)."""
    return s.request_timeout_s + 5.0


@dataclass
class ServeHandle:
    url: str
    config_path: Path
    models: list[str]
    champion: str | None
    sample_image: Path | None = None

    def default_model(self) -> str:
        """What a request without a model is answered by, for the console."""
        return (f"champion: {self.champion}" if self.champion else
                "no champion among them: a request without a model goes to the best loaded one (by test accuracy; "
                "checkpoint files by validation accuracy)")


class NothingServableError(RuntimeError):
    """The app answers, but every model it was given failed for good on its replica."""


def _wait_until_answering(url: str, token: str | None = None, timeout_s: float = 120.0) -> dict:
    """Wait until the app answers ``/healthz`` (200 or 503), at most ``timeout_s``, and return its body (empty
    when it does not answer in time, said in a warning). :class:`NothingServableError` when it answers that every
    model failed for good (none ok, none still to be verified): the stage passed, and printed a URL whose every
    request was refused."""
    import requests

    deadline = time.time() + timeout_s
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.time() < deadline:
        try:
            health = requests.get(f"{url}/healthz", headers=headers, timeout=5)
        except requests.RequestException:
            health = None
        if health is not None and health.status_code in (200, 503):
            try:
                body = health.json()
            except ValueError:
                body = {}
            if health.status_code == 503 and body.get("errors") and not body.get("not_verified_yet"):
                errors = body["errors"]
                if isinstance(errors, dict):  # each on a line of its own: the CLI's one-line error is cut short
                    for alias, error in errors.items():
                        logger.error("[serve] %s: %s", alias, error)
                    first = next(iter(errors.items()))
                    detail = f"{len(errors)} failed (above), the first: {first[0]}: {first[1]}"
                else:
                    detail = f"{errors} failed"
                raise NothingServableError(
                    f"the Serve app answers at {url} but can serve none of its models (on a cluster every replica "
                    "node must reach the tracking server and the checkpoints: a sqlite tracking.uri or a "
                    f"serve.checkpoints file on this node alone is not there): {detail}")
            return body if isinstance(body, dict) else {}
        time.sleep(0.5)
    logger.warning("[serve] %s does not answer yet after %.0f s; its replicas may still be starting (`serve status` "
                   "on the cluster says where they are)", url, timeout_s)
    return {}


def served_as_reported(models: list[str], champion: str | None, health: dict) -> tuple[list[str], str | None]:
    """The aliases and champion the console announces, less the models the replica's ``/healthz`` answer says
    failed for good (each named in a warning): it announced a champion whose every request was a 503, and
    requests without a model went to another model meanwhile."""
    failed = health.get("errors")
    if not isinstance(failed, dict) or not failed:  # (without the token: counts only)
        return models, champion
    for alias, error in failed.items():
        logger.warning("[serve] %s is not served (requests for it get a 503): %s", alias, error)
    return [m for m in models if m not in failed], None if champion in failed else champion


def _serve_runs_on_this_ray() -> bool:
    """Whether a Serve controller runs on the connected Ray (its proxy, then, is what holds the port)."""
    import ray

    if not ray.is_initialized():
        return False
    try:
        from ray.serve.context import _get_global_client  # Serve's own lookup: private, so guarded

        return _get_global_client(raise_if_no_controller_running=False) is not None
    except Exception:  # noqa: BLE001 - an API that moved: as if none ran (the port is then checked)
        return False


def check_port_free(s: ServeConfig, local: bool = False) -> None:
    """Before Serve starts on this Ray: ``serve.host``:``serve.port`` must be free on this node. Serve's proxy
    listens with SO_REUSEPORT, and so does another command's: a second `serve` started beside a running one
    shared its port without a word, the kernel splitting requests between the two apps; a port another program
    holds failed the stage after seconds with a traceback of the proxy's. A ConfigError naming the key instead.
    A Serve already running on this Ray (a cluster's, redeployed) holds the port itself: not checked.

    ``local``: for a Ray this command starts on this machine, where Serve's proxy binds: a host that is no
    address of it (another machine's, a typo) or does not resolve is refused too (it failed `run` at its serve
    stage, after the search and training)."""
    import errno
    import socket

    if _serve_runs_on_this_ray():
        return
    family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past connections in TIME_WAIT: no user
            probe.bind((s.host, s.port))  # no SO_REUSEPORT: refused while anyone listens there
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ConfigError("serve.port", f"{s.host}:{s.port} is already in use on this node (another "
                              "`serve` or `run` still serving, or another program); stop it, or choose another "
                              "serve.port") from None
        if local and isinstance(err, socket.gaierror):
            raise ConfigError("serve.host", f"{s.host!r} does not resolve on this machine ({err.strerror})") from None
        if local and err.errno == errno.EADDRNOTAVAIL:
            raise ConfigError("serve.host", f"{s.host} is not an address of this machine, where the Ray this "
                              "command starts serves: use 127.0.0.1, 0.0.0.0 (every address) or one of its own"
                              ) from None
        # Else a family this node lacks (IPv6 off in a container), or a cluster node's address: Serve's own start
        # says what is wrong


def check_serve_startable(cfg: PipelineConfig) -> None:
    """What the serve stage checks before it starts Serve, for ``run`` to check before its search and training:
    the route (:func:`check_route_free`), the port (:func:`check_port_free`), and a running Serve's HTTP
    options (:func:`_check_running_http_options`). A port another program held, or a running Serve at another
    port, failed ``run`` after hours of training (exit 2)."""
    check_route_free(cfg)
    check_port_free(cfg.serve)
    if _serve_runs_on_this_ray():
        _check_running_http_options(cfg.serve)


def check_route_free(cfg: PipelineConfig) -> None:
    """Every app is served at ``/``, and Serve routes a prefix to one app: another config's app running on this
    Ray (the other GPU preset's, on a shared cluster) made this one's deployment fail, after its whole search and
    training. A ConfigError naming ``name`` instead, before anything starts; nothing when no Serve runs here (a
    running app of the same name is redeployed in place)."""
    if not _serve_runs_on_this_ray():
        return
    try:  # Serve's client: its details are what `serve status` shows, with each app's route
        from ray.serve.context import _get_global_client

        applications = _get_global_client().get_serve_details().get("applications", {})
    except Exception:  # noqa: BLE001 - an API that moved: not checked; Serve's deployment then says it
        return
    # (an app being deleted gives its route up: Serve's own check leaves it out too)
    holders = sorted(app for app, details in applications.items()
                     if app != cfg.name and (details or {}).get("route_prefix") == "/"
                     and (details or {}).get("status") != "DELETING")
    if holders:
        raise ConfigError("name", f"Serve app {holders[0]!r} already answers at / on this Ray, and one endpoint "
                                  f"serves one app: stop it first (python -c \"import ray; from ray import serve; "
                                  f"ray.init(address='auto'); serve.delete('{holders[0]}')\", or `serve shutdown`, "
                                  "which stops every app), or serve this config on another Ray")


def _check_running_http_options(s: ServeConfig) -> None:
    """Serve's HTTP proxy keeps the options it started with: a second app on a cluster whose Serve runs already
    would, without a word, not be at ``serve.host``/``serve.port`` (the printed URL dead, a loopback-only config
    exposed on the running proxy's 0.0.0.0) nor have its proxy timeout. A ConfigError naming the key instead."""
    try:  # the running proxy's options: Serve's client, which has no public accessor for them
        from ray.serve.context import _get_global_client

        running = _get_global_client().http_config
    except Exception:  # noqa: BLE001 - an API that moved: not checked, as before
        return
    differ = {key: (value, getattr(running, key, value)) for key, value in (("host", s.host), ("port", s.port))
              if getattr(running, key, value) != value}
    if differ:
        found = ", ".join(f"{k} {theirs} (this config: {ours})" for k, (ours, theirs) in differ.items())
        raise ConfigError(f"serve.{next(iter(differ))}", f"Serve already runs on this Ray with other HTTP options: "
                          f"{found}. Its proxy keeps them for every app: use the same, or stop it first "
                          "(`serve shutdown`, which stops its other apps too)")
    timeout = getattr(running, "request_timeout_s", None)
    if timeout != proxy_timeout_s(s):  # the replica keeps its own deadline: only the proxy's backstop differs
        logger.warning("[serve] the running Serve proxy times requests out after %s s, not %.0f s "
                       "(serve.request_timeout_s + 5): it set that when it started", timeout, proxy_timeout_s(s))


def example_image(cfg: PipelineConfig, directory: Path) -> Path | None:
    """The image of the example request printed after serving: the one an earlier run saved in ``directory``,
    else the data set's first test image where the data is at hand. Never downloaded for it, nor an error:
    serving from checkpoints needs no data (the `serve` command downloaded CIFAR-10 for its example)."""
    from .data import SAMPLE_SUFFIXES, write_sample_image

    if saved := sorted(p for p in directory.glob(f"sample-{cfg.data.dataset}-*") if p.suffix in SAMPLE_SUFFIXES):
        return saved[0]
    # Digits and image folders are never downloaded: as they are, the splits training loaded are reused.
    data = cfg.data
    if data.dataset not in ("digits", "imagefolder"):
        data = data.model_copy(update={"download": False})
    try:
        return write_sample_image(data, directory)
    except Exception:  # noqa: BLE001 - a convenience: no data here, or none readable
        return None


def servable_models(cfg: PipelineConfig) -> tuple[list[ServedModel], str | None]:
    """The models the serve stage would deploy and the champion's alias, checked as it checks them: every
    ``serve.models`` entry found (some, with a warning), the decode budget admitting each model's input. Reads
    only MLflow (after sending the writes an earlier command left pending) and the checkpoint files: the
    ``serve`` command calls it before Ray starts (an unknown model took a local Ray's start, about 12 s)."""
    from .tracking_queue import send_pending_before_reading

    send_pending_before_reading(cfg)
    models, champion = ModelStore(cfg).discover()
    found = {m.alias for m in models} | ({CHAMPION} if champion else set())
    if missing := sorted(set(cfg.serve.models) - found):
        where = "serve.checkpoints" if cfg.serve.checkpoints else f"the registry ({cfg.data.dataset} versions)"
        if not models:
            raise ConfigError("serve.models", f"{', '.join(missing)}: not in {where}")
        logger.warning("[serve] serve.models: %s not in %s; serving the others", ", ".join(missing), where)
    if not models:
        raise LookupError(f"nothing to serve: no registered model alias trained on {cfg.data.dataset} (train first) "
                          "and no serve.checkpoints")
    # A model's input can be larger than data.image_size (EfficientNet-B4's 380 px, a searched member's
    # image_size * gamma^phi): under the decode budget, every request to it would be refused (400).
    budget = DecodeBudget.for_serving(cfg.serve)
    too_large = [m for m in models if m.input_size and not budget.admits_model_input(m.input_size)]
    if too_large:
        largest = max(m.input_size for m in too_large)
        raise ConfigError("serve.max_resized_pixels", f"{cfg.serve.max_resized_pixels:,} is below the input of "
                          f"{', '.join(f'{m.alias} ({m.input_size} px)' for m in too_large)}: every request to them "
                          f"would be refused; raise it to at least {largest ** 2:,}")
    return models, champion


def delete_app(name: str, wait_s: float | None = None) -> None:
    """Delete the Serve app ``name``; with ``wait_s``, waited for at most that long (the controller goes on with
    it after this process is gone: a SIGKILL follows ``ray job stop``'s SIGTERM in 3 s)."""
    if wait_s is None:
        serve.delete(name)
        return
    deleting = threading.Thread(target=serve.delete, args=(name,), daemon=True)
    deleting.start()
    deleting.join(timeout=wait_s)


@contextlib.contextmanager
def deleted_unless_started(cfg: PipelineConfig) -> Iterator[None]:
    """The app deployed in the block is deleted when the block does not finish: every model failed, a Ctrl-C or
    ``ray job stop`` while replicas start (minutes, on a cluster adding a GPU node), any error. A local Ray ends
    with the command; a cluster's detached Serve controller kept the app, its replicas' CPUs and GPUs and the
    port, though the command had failed. An app of the name already running (left up with ``--no-block``, and
    redeployed in place) is left to Serve, but where every model failed."""
    existed = cfg.name in serve.status().applications
    try:
        yield
    except BaseException as err:
        if isinstance(err, NothingServableError) or outlives_the_command(cfg) and not existed:
            logger.info("[serve] deleting the Serve app %r: it did not start (%s)", cfg.name, type(err).__name__)
            # SystemExit: Ray's own SIGTERM handler (`ray job stop`), a SIGKILL 3 s behind it.
            delete_app(cfg.name, wait_s=2.0 if isinstance(err, SystemExit) else None)
        raise


def serve_stage(cfg: PipelineConfig,
                servable: tuple[list[ServedModel], str | None] | None = None) -> ServeHandle:
    """Deploy the app on the running Ray (non-blocking) and wait until it answers ``/healthz``. ``servable``:
    what :func:`servable_models` returned for ``cfg`` (the ``serve`` command's check before Ray), else read now."""
    models, champion = servable if servable is not None else servable_models(cfg)
    check_serve_startable(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port,
                              "request_timeout_s": proxy_timeout_s(cfg.serve)})
    _check_running_http_options(cfg.serve)
    config_path = write_serve_config(cfg, (models, champion))
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.serve.port}"
    with deleted_unless_started(cfg):
        serve.run(build_app(cfg, (models, champion)), name=cfg.name, route_prefix="/", blocking=False)
        health = _wait_until_answering(url, cfg.serve.bearer_token())
    served, champion = served_as_reported([m.alias for m in models], champion, health)
    sample = example_image(cfg, config_path.parent)
    return ServeHandle(url=url, config_path=config_path, models=served, champion=champion, sample_image=sample)
