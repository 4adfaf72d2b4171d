"""Ray Serve: the registered best models behind one HTTP endpoint (FastAPI ingress).

Routes (OpenAPI docs at ``/docs``):

* ``POST /predict``: the image as the raw body (``Content-Type: image/png``, ``image/jpeg``, ...) or as the
  multipart field ``file``. The model is chosen by ``?model=<alias>`` or the ``serve_multiplexed_model_id``
  header (Serve routes such requests to a replica that already holds the model), default ``champion``.
  ``top_k`` (default 5). Returns ``{"model", "requested", "version", "predictions": [{"label", "index",
  "score"}], "latency_ms"}``.
* ``GET /models``: every servable alias with its architecture, version, ``test_acc``, ``params_count``,
  ``macs``, load status, and which one is the champion.
* ``GET /healthz``: 200 while at least one model is servable, 503 otherwise.

Models come from the MLflow registry of the pipeline (registered model = pipeline name, aliases = model
names and ``champion``) or from checkpoint files (``serve.checkpoints``). Each replica keeps a bounded LRU
of loaded models (Serve model multiplexing), batches requests per model (``@serve.batch``), runs in eval
mode under ``torch.inference_mode()`` and folds batch norm into the preceding convolutions after checking
that the folded model's outputs match. Preprocessing is the checkpoint's own spec. Bad input gets a 4xx
JSON ``{"error": ...}``, never a 500; a model that fails to load is reported by ``/models`` and
``/healthz`` instead of crashing the replica.
"""

# No ``from __future__ import annotations`` here: Serve pickles the route handlers by value, and FastAPI must
# see real types (not strings to resolve against module globals) in their signatures.
import asyncio
import hmac
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from .checkpoints import CHECKPOINT_FILE, CheckpointError, ModelCheckpoint, load_checkpoint
from .config import PipelineConfig
from .preprocess import ImageDecodeError, PreprocessSpec, decode_image
from .tracking import CHAMPION

__all__ = ["ServedModel", "LoadedModel", "discover_models", "load_served_model", "fold_batchnorm", "build_app",
           "app_builder", "serve_stage", "write_serve_config", "MULTIPLEX_HEADER"]

logger = logging.getLogger(__name__)
MULTIPLEX_HEADER = "serve_multiplexed_model_id"
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")


@dataclass
class ServedModel:
    """What the server knows about one alias before loading it."""

    alias: str
    source: str  # "models:/<name>/<version>" or a checkpoint path
    version: str = ""
    arch: str = ""
    model_name: str = ""
    test_acc: float | None = None
    params_count: int | None = None
    macs: int | None = None
    status: str = "unchecked"
    error: str | None = None


@dataclass
class LoadedModel:
    alias: str
    version: str
    model: nn.Module
    spec: PreprocessSpec
    folded: bool
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def _tag_number(tags: dict, key: str, kind=float):
    try:
        return kind(float(tags[key])) if key in tags else None
    except (TypeError, ValueError):
        return None


def discover_models(cfg: PipelineConfig) -> tuple[list[ServedModel], str | None]:
    """The aliases to serve and the champion's alias, from ``serve.checkpoints`` or the registry."""
    wanted = set(cfg.serve.models)
    if cfg.serve.checkpoints:
        models = [ServedModel(alias=a, source=str(Path(p).expanduser())) for a, p in cfg.serve.checkpoints.items()]
        return [m for m in models if not wanted or m.alias in wanted], None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    name = cfg.registered_model_name
    try:
        registered = client.get_registered_model(name)
    except Exception as err:  # noqa: BLE001 - MlflowException when missing
        raise LookupError(f"registered model {name!r} not found at {cfg.tracking_uri}; train first") from err
    by_version = {}
    models = []
    for alias, version in sorted(registered.aliases.items()):
        if alias == CHAMPION or (wanted and alias not in wanted):
            continue
        if version not in by_version:
            by_version[version] = client.get_model_version(name, version)
        tags = by_version[version].tags
        models.append(ServedModel(
            alias=alias, source=f"models:/{name}/{version}", version=str(version), arch=tags.get("arch", ""),
            model_name=tags.get("model_name", alias), test_acc=_tag_number(tags, "test_acc"),
            params_count=_tag_number(tags, "params_count", int), macs=_tag_number(tags, "macs", int)))
    champion_version = registered.aliases.get(CHAMPION)
    champion = next((m.alias for m in models if m.version == str(champion_version)), None)
    return models, champion


def _checkpoint_file(source: str, tracking_uri: str) -> Path:
    if not source.startswith("models:/"):
        return Path(source)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
    found = sorted(local.rglob(CHECKPOINT_FILE))
    if not found:
        raise CheckpointError(f"{source} holds no {CHECKPOINT_FILE}")
    return found[0]


def fold_batchnorm(model: nn.Module, spec: PreprocessSpec) -> tuple[nn.Module, bool]:
    """Fold eval-mode batch norm into the preceding convolutions (torch.fx conv-BN fusion).

    The folded model is used only if its outputs match the original's on a random batch; otherwise (or if
    the model cannot be traced) the original is returned. Returns ``(model, folded)``.
    """
    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    try:
        folded = fuse(model, inplace=False)
    except Exception as err:  # noqa: BLE001 - untraceable models are served unfolded
        logger.info("batch-norm folding skipped: %s", err)
        return model, False
    probe = torch.randn(2, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, actual = model(probe), folded(probe)
    tolerance = 1e-4 * max(1.0, expected.abs().max().item())
    if not torch.allclose(actual, expected, atol=tolerance, rtol=1e-4):
        logger.warning("batch-norm folding changed the outputs (max diff %.2e); serving unfolded",
                       (actual - expected).abs().max().item())
        return model, False
    return folded, True


def load_served_model(served: ServedModel, tracking_uri: str, *, fold: bool = True,
                      device: str | torch.device = "cpu") -> LoadedModel:
    """Download (registry) or open (file) the checkpoint, verify it and build the serving model."""
    checkpoint: ModelCheckpoint = load_checkpoint(_checkpoint_file(served.source, tracking_uri))
    model = checkpoint.build_model()
    folded = False
    if fold:
        model, folded = fold_batchnorm(model, checkpoint.spec)
    device = torch.device(device)
    return LoadedModel(alias=served.alias, version=served.version or f"epoch{checkpoint.epoch}",
                       model=model.to(device).eval(), spec=checkpoint.spec, folded=folded, device=device)


class RequestError(Exception):
    """A client error: HTTP ``status`` and a message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _read_limited(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise RequestError(413, f"body of {int(declared):,} bytes exceeds the {limit:,}-byte limit")
        except ValueError:
            raise RequestError(400, "invalid Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body exceeds the {limit:,}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_bytes(request, limit: int) -> bytes:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await _read_limited(request, limit)
    if content_type.startswith(RAW_IMAGE_TYPES) or (not content_type and body):
        return body
    if content_type == "multipart/form-data":
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as err:  # noqa: BLE001 - malformed multipart
            raise RequestError(400, f"malformed multipart body: {err}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "multipart body needs the image in a field named 'file'")
        return await upload.read()
    if not content_type and not body:
        raise RequestError(400, "empty body: send the image bytes")
    raise RequestError(415, f"unsupported content type {content_type!r}: send image/* bytes or multipart/form-data "
                            "with a 'file' field")


def _image_tensor(data: bytes, spec: PreprocessSpec, max_pixels: int) -> torch.Tensor:
    """Decode an upload and preprocess it as in training: a (1, C, H, W) tensor."""
    return spec.tensor_from_image(decode_image(data, max_pixels))


def _classify(loaded: LoadedModel, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Class probabilities (on the CPU) for a batch of preprocessed images."""
    batch = torch.cat(tensors).to(loaded.device)
    with torch.inference_mode():
        return torch.softmax(loaded.model(batch).float(), dim=1).cpu()


def make_deployment(cfg: PipelineConfig):
    """The Serve deployment class for ``cfg`` (decorator arguments come from the config).

    Route annotations must name module-level types: FastAPI resolves them through the module's globals.
    """
    settings = cfg.serve
    api = FastAPI(
        title="cnnzoo classifier",
        description="Image classification with the pipeline's registered models. POST an image to /predict.",
        version="1",
    )

    @api.exception_handler(RequestError)
    async def _request_error(_, err: RequestError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        return JSONResponse({"error": problems}, status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_, err: StarletteHTTPException):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @api.exception_handler(Exception)
    async def _unexpected(_, err: Exception):  # last resort: a JSON 500, the replica keeps serving
        logger.exception("unexpected error")
        return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)

    @serve.deployment(name="Classifier", max_ongoing_requests=settings.max_ongoing_requests,
                      health_check_period_s=10)
    @serve.ingress(api)
    class Classifier:
        async def __init__(self, config: dict) -> None:  # Serve awaits async constructors
            self.cfg = PipelineConfig.model_validate(config)
            s = self.cfg.serve
            torch.set_num_threads(max(1, int(round(s.num_cpus)) or 1))
            self.device = torch.device("cuda" if s.num_gpus > 0 and torch.cuda.is_available() else "cpu")
            self.models, self.champion = discover_models(self.cfg)
            self.by_alias = {m.alias: m for m in self.models}
            for served in self.models:  # verify every source up front; failures are reported, not raised
                try:
                    loaded = load_served_model(served, self.cfg.tracking_uri, fold=False)
                    served.status = "ok"
                    if not served.arch:
                        served.arch = type(loaded.model).__name__
                except Exception as err:  # noqa: BLE001
                    served.status, served.error = "error", f"{type(err).__name__}: {err}"
                    logger.error("model %s failed to load: %s", served.alias, served.error)
            if self.champion is None or self.by_alias.get(self.champion, ServedModel("", "")).status != "ok":
                ranked = sorted((m for m in self.models if m.status == "ok"),
                                key=lambda m: -(m.test_acc if m.test_acc is not None else -1.0))
                self.champion = ranked[0].alias if ranked else None
            self._infer.set_max_batch_size(s.max_batch_size)
            self._infer.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
            self.max_bytes = int(s.max_upload_mb * 1024 * 1024)
            if self.champion is not None:
                # Load (and BN-fold) the default model before the first request rather than during it.
                try:
                    await self.get_model(self.champion)
                except Exception:  # noqa: BLE001 - the first request retries and reports it
                    logger.exception("could not preload the champion %s", self.champion)

        def _authorize(self, request: Request) -> None:
            token = self.cfg.serve.auth_token
            if not token:
                return
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

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

        @serve.multiplexed(max_num_models_per_replica=settings.max_models_per_replica)
        async def get_model(self, alias: str) -> LoadedModel:
            served = self.by_alias[alias]
            return await asyncio.to_thread(load_served_model, served, self.cfg.tracking_uri,
                                           fold=self.cfg.serve.fold_batchnorm, device=self.device)

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
                probabilities = _classify(loaded, [items[i][1] for i in indices])
                for row, i in enumerate(indices):
                    outputs[i] = probabilities[row]
            return outputs

        @api.post("/predict", summary="Classify one image")
        async def predict(
            self,
            request: Request,
            model: str | None = Query(None, description="alias (default: the champion)"),
            top_k: int = Query(settings.default_top_k, ge=1, le=1000, description="number of classes returned"),
        ) -> dict[str, Any]:
            started = time.perf_counter()
            self._authorize(request)
            requested = model or request.headers.get(MULTIPLEX_HEADER) or CHAMPION
            served = self._resolve(requested)
            data = await _image_bytes(request, self.max_bytes)
            loaded = await self.get_model(served.alias)
            if top_k > loaded.spec.num_classes:
                raise RequestError(422, f"top_k must be at most {loaded.spec.num_classes} for {served.alias}")
            try:
                tensor = await asyncio.to_thread(_image_tensor, data, loaded.spec, self.cfg.serve.max_image_pixels)
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
            self._authorize(request)
            return {"champion": self.champion, "registered_model": self.cfg.registered_model_name,
                    "models": [dict(asdict(m), champion=m.alias == self.champion) for m in self.models]}

        @api.get("/healthz", summary="Liveness: 200 while some model is servable")
        async def healthz(self):
            ok = [m.alias for m in self.models if m.status == "ok"]
            failed = {m.alias: m.error for m in self.models if m.status != "ok"}
            body = {"status": "ok" if ok and not failed else ("degraded" if ok else "unavailable"),
                    "models": ok, "errors": failed}
            return JSONResponse(body, status_code=200 if ok else 503)

    return Classifier


def build_app(cfg: PipelineConfig):
    """The Serve application for ``cfg``: replicas, autoscaling and resources from ``serve.*``."""
    s = cfg.serve
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}}
    if s.autoscaling:
        options["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                         "target_ongoing_requests": max(1, s.max_batch_size // 2)}
    else:
        options["num_replicas"] = s.num_replicas
    return make_deployment(cfg).options(**options).bind(cfg.model_dump(mode="json"))


def app_builder(args: dict):
    """Application builder for ``serve deploy``/``serve run`` configs: ``args: {config: {...}}``."""
    return build_app(PipelineConfig.model_validate(args["config"]))


def write_serve_config(cfg: PipelineConfig) -> Path:
    """A Serve config file for ``serve deploy`` on a running cluster, next to the run's outputs."""
    import yaml

    s = cfg.serve
    path = cfg.run_dir / "serve" / "serve_config.yaml"
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


def serve_stage(cfg: PipelineConfig) -> ServeHandle:
    """Deploy the app on the running Ray (non-blocking) and wait until it answers ``/healthz``."""
    import requests

    models, champion = discover_models(cfg)
    if not models:
        raise LookupError("nothing to serve: no registered model aliases (train first) and no serve.checkpoints")
    config_path = write_serve_config(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    url = f"http://{host}:{cfg.serve.port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code in (200, 503):
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    try:
        from .data import write_sample_image

        sample = write_sample_image(cfg.data, config_path.parent)
    except Exception:  # noqa: BLE001 - the example image is a convenience; serving from checkpoints needs no data
        sample = None
    return ServeHandle(url=url, config_path=config_path, models=[m.alias for m in models], champion=champion,
                       sample_image=sample)
