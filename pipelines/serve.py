"""Ray Serve: the registered best models behind one HTTP endpoint (FastAPI ingress).

Routes (OpenAPI docs at ``/docs``):

* ``POST /predict``: the image as the raw body (``Content-Type: image/png``, ``image/jpeg``, ...) or as the
  multipart field ``file``. The model is chosen by ``?model=<alias>`` or the ``serve_multiplexed_model_id``
  header (Serve routes such requests to a replica that already holds the model), default ``champion``.
  ``top_k`` (default ``serve.default_top_k``). Returns ``{"model", "requested", "version", "predictions":
  [{"label", "index", "score"}], "latency_ms"}``.
* ``GET /models``: every servable alias with its architecture, version, ``test_acc``, ``params_count``,
  ``macs``, load status, and which one is the champion.
* ``GET /healthz``: 200 while at least one model is servable, 503 otherwise.

:class:`Classifier` is the deployment, defined here once; :func:`build_app` configures it from
``serve.*`` with ``.options()``. Each replica keeps a bounded LRU of loaded models (Serve model
multiplexing), batches requests per model (``@serve.batch``) and serves the model store's verified,
batch-norm folded models (:mod:`pipelines.model_store`); the HTTP plumbing is :mod:`pipelines.http_api`.
"""

# No ``from __future__ import annotations`` here: Serve pickles the route handlers by value, and FastAPI must
# see real types (not strings to resolve against module globals) in their signatures.
import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import Query, Request
from fastapi.responses import JSONResponse
from ray import serve

from .config import PipelineConfig
from .http_api import MULTIPLEX_HEADER, RequestError, api, authorize, image_tensor, read_image_bytes
from .model_store import LoadedModel, ModelStore, ServedModel
from .preprocess import ImageDecodeError
from .tracking import CHAMPION

__all__ = ["Classifier", "build_app", "app_builder", "serve_stage", "write_serve_config", "ServeHandle"]

logger = logging.getLogger(__name__)


def classify(loaded: LoadedModel, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Class probabilities (on the CPU) for a batch of preprocessed images."""
    batch = torch.cat(tensors).to(loaded.device)
    with torch.inference_mode():
        return torch.softmax(loaded.model(batch).float(), dim=1).cpu()


@serve.deployment(name="Classifier", health_check_period_s=10)
@serve.ingress(api)
class Classifier:
    """One replica: the config's models, verified at start, the champion preloaded."""

    async def __init__(self, config: dict) -> None:  # Serve awaits async constructors
        self.cfg = PipelineConfig.model_validate(config)
        s = self.cfg.serve
        torch.set_num_threads(max(1, int(round(s.num_cpus)) or 1))
        self.device = torch.device("cuda" if s.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.store = ModelStore(self.cfg)
        self.models, champion = self.store.discover()
        self.by_alias = {m.alias: m for m in self.models}
        self.store.verify(self.models)
        self.champion = self.store.servable_champion(self.models, champion)
        self._infer.set_max_batch_size(s.max_batch_size)
        self._infer.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.max_bytes = int(s.max_upload_mb * 1024 * 1024)

        async def load(alias: str) -> LoadedModel:
            return await asyncio.to_thread(self.store.load, self.by_alias[alias], fold=s.fold_batchnorm,
                                           device=self.device)

        # The LRU size is a config value, so the multiplexed loader is made here rather than as a decorated
        # method (Serve detects loaders wired up at init).
        self.get_model = serve.multiplexed(max_num_models_per_replica=s.max_models_per_replica)(load)
        if self.champion is not None:
            # Load (and BN-fold) the default model before the first request rather than during it.
            try:
                await self.get_model(self.champion)
            except Exception:  # noqa: BLE001 - the first request retries and reports it
                logger.exception("could not preload the champion %s", self.champion)

    def _resolve(self, requested: str) -> ServedModel:
        alias = self.champion if requested == CHAMPION else requested
        served = self.by_alias.get(alias) if alias else None
        if served is None:
            known = ", ".join(sorted(self.by_alias)) or "none"
            if requested == CHAMPION:
                raise RequestError(503, "no servable champion model")
            raise RequestError(404, f"unknown model {requested!r}; known aliases: {CHAMPION}, {known}")
        if served.status != "ok":
            raise RequestError(503, f"model {alias!r} failed to load: {served.error}")
        return served

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _infer(self, items: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        outputs: list[torch.Tensor | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (alias, _) in enumerate(items):
            groups.setdefault(alias, []).append(i)
        for alias, indices in groups.items():
            loaded = await self.get_model(alias)
            # On the event loop on purpose: in a worker thread the forward's many short Python steps
            # queue for the GIL behind request handling (bench/serve.py: 0.58 of the ceiling against 0.69-0.71).
            probabilities = classify(loaded, [items[i][1] for i in indices])
            for row, i in enumerate(indices):
                outputs[i] = probabilities[row]
        return outputs

    @api.post("/predict", summary="Classify one image")
    async def predict(
        self,
        request: Request,
        model: str | None = Query(None, description="alias (default: the champion)"),
        top_k: int | None = Query(None, ge=1, le=1000,
                                  description="number of classes returned (default: serve.default_top_k)"),
    ) -> dict[str, Any]:
        started = time.perf_counter()
        authorize(request, self.cfg.serve.auth_token)
        requested = model or request.headers.get(MULTIPLEX_HEADER) or CHAMPION
        served = self._resolve(requested)
        data = await read_image_bytes(request, self.max_bytes)
        loaded = await self.get_model(served.alias)
        top_k = top_k or self.cfg.serve.default_top_k
        if top_k > loaded.spec.num_classes:
            raise RequestError(422, f"top_k must be at most {loaded.spec.num_classes} for {served.alias}")
        try:
            tensor = await asyncio.to_thread(image_tensor, data, loaded.spec, self.cfg.serve.max_image_pixels)
        except ImageDecodeError as err:
            raise RequestError(400, str(err)) from None
        probabilities = await self._infer((served.alias, tensor))
        scores, indices = probabilities.topk(top_k)
        return {
            "model": served.alias,
            "requested": requested,
            "version": loaded.version,
            "predictions": [{"label": loaded.spec.class_names[i], "index": int(i), "score": float(p)}
                            for p, i in zip(scores.tolist(), indices.tolist(), strict=True)],
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }

    @api.get("/models", summary="Servable models and the champion")
    async def list_models(self, request: Request) -> dict[str, Any]:
        authorize(request, self.cfg.serve.auth_token)
        return {"champion": self.champion, "registered_model": self.cfg.registered_model_name,
                "models": [dict(asdict(m), champion=m.alias == self.champion) for m in self.models]}

    @api.get("/healthz", summary="Liveness: 200 while some model is servable")
    async def healthz(self):
        ok = [m.alias for m in self.models if m.status == "ok"]
        failed = {m.alias: m.error for m in self.models if m.status != "ok"}
        body = {"status": "ok" if ok and not failed else ("degraded" if ok else "unavailable"),
                "models": ok, "errors": failed}
        return JSONResponse(body, status_code=200 if ok else 503)


def build_app(cfg: PipelineConfig):
    """The Serve application for ``cfg``: replicas, autoscaling and resources from ``serve.*``."""
    s = cfg.serve
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
                               "max_ongoing_requests": s.max_ongoing_requests}
    if s.autoscaling:
        options["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                         "target_ongoing_requests": max(1, s.max_batch_size // 2)}
    else:
        options["num_replicas"] = s.num_replicas
    return Classifier.options(**options).bind(cfg.model_dump(mode="json"))


def app_builder(args: dict):
    """Application builder for ``serve deploy``/``serve run`` configs: ``args: {config: {...}}``."""
    return build_app(PipelineConfig.model_validate(args["config"]))


def write_serve_config(cfg: PipelineConfig) -> Path:
    """A Serve config file for ``serve deploy`` on a running cluster, next to the run's outputs."""
    import yaml

    s = cfg.serve
    path = cfg.paths.serve_config
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "proxy_location": "EveryNode",
        "http_options": {"host": s.host, "port": s.port},
        "applications": [{
            "name": cfg.name,
            "route_prefix": "/",
            "import_path": "pipelines.serve:app_builder",
            "args": {"config": cfg.model_dump(mode="json")},
        }],
    }
    header = f"# serve deploy {path}   (on a running Ray cluster)\n"
    path.write_text(header + yaml.safe_dump(document, sort_keys=False))
    return path


@dataclass
class ServeHandle:
    url: str
    config_path: Path
    models: list[str]
    champion: str | None
    sample_image: Path | None = None


def _wait_until_answering(url: str, timeout_s: float = 120.0) -> None:
    import requests

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code in (200, 503):
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)


def serve_stage(cfg: PipelineConfig) -> ServeHandle:
    """Deploy the app on the running Ray (non-blocking) and wait until it answers ``/healthz``."""
    models, champion = ModelStore(cfg).discover()
    if not models:
        raise LookupError("nothing to serve: no registered model aliases (train first) and no serve.checkpoints")
    config_path = write_serve_config(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    url = f"http://{host}:{cfg.serve.port}"
    _wait_until_answering(url)
    try:
        from .data import write_sample_image

        sample = write_sample_image(cfg.data, config_path.parent)
    except Exception:  # noqa: BLE001 - the example image is a convenience; serving from checkpoints needs no data
        sample = None
    return ServeHandle(url=url, config_path=config_path, models=[m.alias for m in models], champion=champion,
                       sample_image=sample)
