"""Ray Serve over real HTTP: routing, agreement with the models, bad input, load, auth, broken models."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from pipelines.checkpoints import load_checkpoint
from pipelines.preprocess import decode_image

pytestmark = pytest.mark.slow


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(pipeline_run):
    cfg, result = pipeline_run
    return cfg, result, result.serve.url


@pytest.fixture(scope="module")
def digit_png():
    from pipelines.config import DataConfig
    from pipelines.data import load_splits

    return png(load_splits(DataConfig(dataset="digits")).test.images[0])


def predict(url, data, *, params=None, headers=None, content_type="image/png"):
    headers = {"Content-Type": content_type, **(headers or {})}
    return requests.post(f"{url}/predict", data=data, params=params or {}, headers=headers, timeout=60)


def test_models_lists_every_alias_and_the_champion(server):
    cfg, result, url = server
    body = requests.get(f"{url}/models", timeout=30).json()
    aliases = {m["alias"]: m for m in body["models"]}
    assert set(aliases) == {"lenet5", "resnet18"}
    assert body["champion"] == result.train.champion
    assert [m["alias"] for m in body["models"] if m["champion"]] == [body["champion"]]
    for alias, model in aliases.items():
        trained = result.train.results[alias]
        assert model["arch"] == trained.arch and model["version"] == trained.version
        assert model["test_acc"] == pytest.approx(trained.test_acc)
        assert model["params_count"] == trained.params_count and model["macs"] == trained.macs
        assert model["status"] == "ok"
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    assert requests.get(f"{url}/openapi.json", timeout=30).json()["paths"].keys() >= {"/predict", "/models"}


@pytest.mark.parametrize("alias", ["lenet5", "resnet18"])
def test_http_predictions_equal_the_models_own_outputs(server, digit_png, alias):
    cfg, result, url = server
    checkpoint = load_checkpoint(result.train.results[alias].checkpoint_path)
    x = checkpoint.spec.tensor_from_image(decode_image(digit_png, 10_000))
    with torch.no_grad():
        expected = torch.softmax(checkpoint.build_model()(x), dim=1)[0]
    for how in ({"params": {"model": alias}}, {"headers": {"serve_multiplexed_model_id": alias}}):
        response = predict(url, digit_png, **how)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == alias and body["version"] == result.train.results[alias].version
        top = body["predictions"]
        scores, indices = expected.topk(5)
        assert [p["index"] for p in top] == indices.tolist()
        assert [p["score"] for p in top] == pytest.approx(scores.tolist(), abs=1e-4)
        assert top[0]["label"] == checkpoint.spec.class_names[indices[0]]
        assert body["latency_ms"] > 0


def test_default_is_the_champion_and_multipart_works(server, digit_png):
    cfg, result, url = server
    champion = requests.get(f"{url}/models", timeout=30).json()["champion"]
    raw = predict(url, digit_png).json()
    form = requests.post(f"{url}/predict", files={"file": ("digit.png", digit_png, "image/png")},
                         params={"top_k": 3}, timeout=60).json()
    assert raw["model"] == form["model"] == champion
    assert len(form["predictions"]) == 3 and form["predictions"] == raw["predictions"][:3]


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")  # 25 Mpixel, a few kB compressed
    return buffer.getvalue()


def test_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(server, digit_png):
    cfg, result, url = server
    noisy = png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    cases = [
        ("empty body", lambda: predict(url, b""), 400),
        ("not an image", lambda: predict(url, b"%PDF-1.4 hello"), 400),
        ("truncated image", lambda: predict(url, noisy[: len(noisy) // 2]), 400),
        ("decompression bomb", lambda: predict(url, _bomb()), (400, 413)),
        ("body over max_upload_mb", lambda: predict(url, b"\x89PNG" + b"0" * (2 * 1024 * 1024)), 413),
        ("unsupported content type", lambda: predict(url, b"{}", content_type="application/json"), 415),
        ("unknown alias", lambda: predict(url, digit_png, params={"model": "resnet9000"}), 404),
        ("top_k zero", lambda: predict(url, digit_png, params={"top_k": 0}), 422),
        ("top_k not a number", lambda: predict(url, digit_png, params={"top_k": "many"}), 422),
        ("top_k above the classes", lambda: predict(url, digit_png, params={"top_k": 11}), 422),
        ("multipart without file", lambda: requests.post(f"{url}/predict", files={"other": ("a", b"x")},
                                                         timeout=30), 400),
    ]
    for name, send, expected in cases:
        response = send()
        allowed = expected if isinstance(expected, tuple) else (expected,)
        assert response.status_code in allowed, (name, response.status_code, response.text)
        assert "error" in response.json(), name
        good = predict(url, digit_png)
        assert good.status_code == 200, (name, good.text)
    unknown = predict(url, digit_png, params={"model": "resnet9000"}).json()["error"]
    assert "lenet5" in unknown and "resnet18" in unknown


def test_two_hundred_requests_at_concurrency_16_all_succeed(server, digit_png):
    cfg, result, url = server
    aliases = ["lenet5", "resnet18", None]

    def one(i):
        params = {"model": aliases[i % 3]} if aliases[i % 3] else {}
        return predict(url, digit_png, params=params).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes == [200] * 200


def test_auth_token_and_a_broken_checkpoint(server, digit_png, tmp_path):
    """A second app serving checkpoint files: one good, one corrupt; with a bearer token required."""
    from ray import serve

    from pipelines.serve import build_app

    cfg, result, url = server
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint at all")
    files_cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={
        "auth_token": "s3cret", "checkpoints": {"good": result.train.results["lenet5"].checkpoint_path,
                                                "broken": str(broken)}})})
    serve.run(build_app(files_cfg), name="secure", route_prefix="/secure", blocking=False)
    try:
        base = f"{url}/secure"
        assert requests.get(f"{base}/models", timeout=60).status_code == 401
        assert predict(base, digit_png).status_code == 401
        wrong = predict(base, digit_png, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "error" in wrong.json()
        auth = {"Authorization": "Bearer s3cret"}
        models = requests.get(f"{base}/models", headers=auth, timeout=60).json()
        status = {m["alias"]: m for m in models["models"]}
        assert status["good"]["status"] == "ok" and status["broken"]["status"] == "error"
        assert "CheckpointError" in status["broken"]["error"]
        health = requests.get(f"{base}/healthz", timeout=60)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        failed = predict(base, digit_png, params={"model": "broken"}, headers=auth)
        assert failed.status_code == 503 and "failed to load" in failed.json()["error"]
        ok = predict(base, digit_png, params={"model": "good"}, headers=auth)
        assert ok.status_code == 200 and ok.json()["model"] == "good"
        assert models["champion"] == "good"
    finally:
        serve.delete("secure")
