"""Ray Serve over real HTTP: routing, agreement with the models, bad input, load, auth, broken models, and
requests that try to exhaust a replica (decode bombs, stalled bodies)."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
import torch
from conftest import PlantedCode
from PIL import Image
from pydantic import SecretStr

import cnnmodels
from pipelines.checkpoints import CHECKPOINT_FILE, ModelCheckpoint, load_checkpoint, save_checkpoint
from pipelines.preprocess import PreprocessSpec, decode_image

pytestmark = pytest.mark.slow

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png(array: np.ndarray) -> bytes:
    return encode(Image.fromarray(array))


@pytest.fixture(scope="module", autouse=True)
def _serve_stops_after_these_tests():
    """No later test needs the session's Serve apps (test_pipeline's, the strict one), and while their replicas
    hold CPUs every later stage's free_resources waits 2 s for a release: about 40 s over the suite."""
    yield
    import ray
    from ray import serve

    if ray.is_initialized():  # (serve.shutdown would start a Ray to find nothing)
        serve.shutdown()


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
    assert body["dataset"] == "digits"
    for alias, model in aliases.items():
        trained = result.train.results[alias]
        assert model["arch"] == trained.arch and model["version"] == trained.version
        assert model["dataset"] == "digits" and model["fingerprint"] == trained.fingerprint
        assert model["test_acc"] == pytest.approx(trained.test_acc)
        assert model["params_count"] == trained.params_count and model["macs"] == trained.macs
        assert model["input_size"] == trained.input_size
        assert model["status"] == "ok"
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    assert requests.get(f"{url}/-/healthz", timeout=30).status_code == 200  # the proxy's own (README: liveness)
    openapi = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert openapi["paths"].keys() >= {"/predict", "/models"}
    # /docs can send an image (the route reads the raw request, which FastAPI cannot describe by itself), and
    # documents the errors as they are sent: {"error": ...}, 422 too (FastAPI's default says {"detail": [...]})
    predict = openapi["paths"]["/predict"]["post"]
    assert {"multipart/form-data", "image/png", "application/octet-stream"} <= set(predict["requestBody"]["content"])
    assert {"400", "401", "404", "413", "415", "422", "503"} <= set(predict["responses"])
    assert predict["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    # This Ray's Serve holds the port: the busy-port check must see it runs (a redeploy, not another program).
    from pipelines.serve import _serve_runs_on_this_ray, check_port_free

    assert _serve_runs_on_this_ray()
    check_port_free(cfg.serve)


def test_another_configs_pipeline_is_refused_before_it_trains_when_an_app_holds_the_route(server, tmp_path):
    """Every app is served at /, and Serve routes it to one app: another config's `run` on this Ray (the other
    GPU preset, on a shared cluster) failed at its serve stage, after its whole search and training."""
    from pipelines.config import ConfigError
    from pipelines.pipeline import run_pipeline
    from pipelines.serve import check_route_free

    cfg, _, url = server
    check_route_free(cfg)  # the same app: redeployed in place
    other = cfg.model_copy(update={"name": "another", "workdir": str(tmp_path)})
    with pytest.raises(ConfigError) as refused:
        run_pipeline(other, ["train", "serve"])
    assert refused.value.key == "name" and f"Serve app {cfg.name!r} already answers at /" in str(refused.value)
    assert not (tmp_path / "another").exists()  # nothing trained, nothing written
    # Serve runs here at another port: its proxy keeps it for every app, so this config's URL would be dead.
    moved = cfg.model_copy(update={"workdir": str(tmp_path / "moved"),
                                   "serve": cfg.serve.model_copy(update={"port": cfg.serve.port + 1})})
    with pytest.raises(ConfigError, match="Serve already runs on this Ray with other HTTP options") as refused:
        run_pipeline(moved, ["train", "serve"])
    assert refused.value.key == "serve.port" and not (tmp_path / "moved").exists()
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


@pytest.mark.parametrize("alias", ["lenet5", "resnet18"])
def test_http_predictions_equal_the_models_own_outputs(server, digit_png, alias):
    cfg, result, url = server
    checkpoint = load_checkpoint(result.train.results[alias].checkpoint_path)
    x = checkpoint.spec.tensor_from_image(decode_image(digit_png, 10_000))
    with torch.no_grad():
        expected = torch.softmax(checkpoint.build_model()(x), dim=1)[0]
    # The header in both spellings Serve's proxy routes by (proxies such as nginx drop headers with underscores).
    for how in ({"params": {"model": alias}}, {"headers": {"serve_multiplexed_model_id": alias}},
                {"headers": {"serve-multiplexed-model-id": alias}}):
        response = predict(url, digit_png, **how)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == body["requested"] == alias
        assert body["version"] == result.train.results[alias].version
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
        ("aspect-ratio bomb", lambda: predict(url, encode(Image.new("L", (1_000_000, 1)))), 400),
        ("EPS", lambda: predict(url, encode(Image.new("RGB", (8, 8)), "EPS")), 415),
        ("body over max_upload_mb", lambda: predict(url, b"\x89PNG" + b"0" * (2 * 1024 * 1024)), 413),
        ("unsupported content type", lambda: predict(url, b"{}", content_type="application/json"), 415),
        ("GET", lambda: requests.get(f"{url}/predict", timeout=30), 405),
        ("unknown alias", lambda: predict(url, digit_png, params={"model": "resnet9000"}), 404),
        ("top_k zero", lambda: predict(url, digit_png, params={"top_k": 0}), 422),
        ("top_k not a number", lambda: predict(url, digit_png, params={"top_k": "many"}), 422),
        ("top_k above the classes", lambda: predict(url, digit_png, params={"top_k": 11}), 422),
        ("multipart without file", lambda: requests.post(f"{url}/predict", files={"other": ("a", b"x")},
                                                         timeout=30), 400),
        ("multipart file as text", lambda: requests.post(f"{url}/predict", files={"file": (None, digit_png)},
                                                         timeout=30), 400),
        ("multipart cut off", lambda: requests.post(f"{url}/predict", data=cut_off, timeout=30,
                                                    headers={"content-type": "multipart/form-data; boundary=b0"}),
         400),
    ]
    cut_off = (b'--b0\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
               b"Content-Type: image/png\r\n\r\n" + digit_png[:40])
    for name, send, expected in cases:
        response = send()
        allowed = expected if isinstance(expected, tuple) else (expected,)
        assert response.status_code in allowed, (name, response.status_code, response.text)
        assert "error" in response.json(), name
        good = predict(url, digit_png)
        assert good.status_code == 200, (name, good.text)
    unknown = predict(url, digit_png, params={"model": "resnet9000"}).json()["error"]
    assert "lenet5" in unknown and "resnet18" in unknown
    assert requests.get(f"{url}/predict", timeout=30).headers.get("allow") == "POST"  # (RFC 9110: a 405 says)
    text = requests.post(f"{url}/predict", files={"file": (None, digit_png)}, timeout=30).json()["error"]
    assert "must be a file upload" in text
    text = requests.post(f"{url}/predict", data=cut_off, headers={"content-type": "multipart/form-data; boundary=b0"},
                         timeout=30).json()["error"]
    assert "ends before its closing boundary" in text  # not "needs the image in a field named 'file'"


def test_a_client_that_disconnects_mid_body_is_a_client_error():
    """Starlette's ClientDisconnect reached the catch-all handler: logged as the server's own error, a 500."""
    from starlette.requests import Request

    from pipelines.http_api import RequestError, read_image_bytes

    messages = [{"type": "http.request", "body": b"\x89PNG", "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    request = Request({"type": "http", "method": "POST", "path": "/predict", "headers": [
        (b"content-type", b"image/png")]}, receive)
    with pytest.raises(RequestError) as refused:
        asyncio.run(read_image_bytes(request, limit=1024, timeout_s=5))
    assert refused.value.status == 400 and "disconnected" in refused.value.message


def test_a_numeric_tag_that_is_not_finite_is_left_out():
    """A NaN tag (edited in the MLflow UI) made /models answer 500: JSON has no NaN."""
    from pipelines.model_store import _number

    assert _number({"test_acc": "nan"}, "test_acc") is None and _number({"macs": "inf"}, "macs", int) is None
    assert _number({"test_acc": "0.9"}, "test_acc") == 0.9 and _number({"macs": "12.0"}, "macs", int) == 12


def test_two_hundred_requests_at_concurrency_16_all_succeed(server, digit_png):
    cfg, result, url = server
    aliases = ["lenet5", "resnet18", None]

    def one(i):
        params = {"model": aliases[i % 3]} if aliases[i % 3] else {}
        return predict(url, digit_png, params=params).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes == [200] * 200


def test_odd_but_valid_images_are_answered(server):
    cfg, result, url = server
    for name, data in (("LAB TIFF", encode(Image.new("LAB", (24, 24), (128, 200, 128)), "TIFF")),
                       ("CMYK JPEG", encode(Image.new("CMYK", (24, 24), (0, 80, 200, 0)), "JPEG")),
                       ("16-bit PNG", encode(Image.new("I;16", (24, 24), 40000))),
                       ("WebP", encode(Image.new("RGB", (24, 24), (9, 9, 9)), "WEBP"))):
        response = predict(url, data)
        assert response.status_code == 200, (name, response.text)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(pid)


def replica_pid(app: str) -> int:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,  # other Ray instances may run here
                         filters=[("class_name", "=", f"ServeReplica:{app}:Classifier"), ("state", "=", "ALIVE")])
    assert len(actors) == 1, actors
    return actors[0].pid


def test_twenty_concurrent_oversized_decodes_leave_the_replica_healthy_and_its_memory_flat(server, digit_png):
    """A 1,000,000 x 1 PNG (1 KB, a million pixels: within serve.max_image_pixels) would resize to a strip of
    16-32 million pixels per request; 20 at once, and 20 images at the pixel limit. (This app's limit is 1 M
    pixels, a few MB a decode: the bound on decodes at once is tested on a replica, test_replica.py.)"""
    cfg, result, url = server
    pid = replica_pid(cfg.name)
    strip = encode(Image.new("L", (1_000_000, 1)))
    at_the_limit = encode(Image.new("L", (1000, 1000), 128))
    baseline, peak, sampling = rss_mb(pid), [0.0], threading.Event()

    def sample():
        while not sampling.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(20) as pool:
            strips = list(pool.map(lambda _: predict(url, strip), range(20)))
            large = list(pool.map(lambda _: predict(url, at_the_limit), range(20)))
    finally:
        sampling.set()
        sampler.join()
    assert [r.status_code for r in strips] == [400] * 20
    assert "aspect ratio" in strips[0].json()["error"]
    assert [r.status_code for r in large] == [200] * 20
    assert peak[0] - baseline < 150, (baseline, peak[0])
    assert predict(url, digit_png).status_code == 200
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"


@pytest.fixture(scope="module")
def strict_app(server, tmp_path_factory):
    """A second app serving checkpoint files, with a bearer token, 2 s / 4 s deadlines, two requests at a time,
    one model in memory and eager (untraced) models: a good model, a 3-class one, a corrupt file, a planted
    pickle, and a good file that disappears once the app is up."""
    from ray import serve

    from pipelines.serve import build_app

    cfg, result, url = server
    directory = tmp_path_factory.mktemp("strict")
    (directory / "broken.pt").write_bytes(b"not a checkpoint at all")
    marker = directory / "pickle-ran"
    torch.save({"format": "cnnzoo.checkpoint", "payload": PlantedCode(marker)}, directory / "planted.pt")
    shutil.copy(Path(result.train.results["lenet5"].checkpoint_path) / CHECKPOINT_FILE, directory / "vanishing.pt")
    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.25,), class_names=("x", "y", "z"))
    save_checkpoint(ModelCheckpoint("lenet5", {}, spec, cnnmodels.create_model("lenet5", num_classes=3,
                                                                               in_chans=1).state_dict()),
                    directory / "three.pt")
    wide = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.25,),
                          class_names=tuple(f"class{i}" for i in range(1200)))  # more classes than top_k's 1000
    save_checkpoint(ModelCheckpoint("lenet5", {}, wide, cnnmodels.create_model("lenet5", num_classes=1200,
                                                                               in_chans=1).state_dict()),
                    directory / "wide.pt")
    # "three" (random weights, no metrics) first: the champion is the file with the best validation accuracy.
    checkpoints = {"three": str(directory / "three.pt"), "wide": str(directory / "wide.pt"),
                   "good": result.train.results["lenet5"].checkpoint_path,
                   **{name: str(directory / f"{name}.pt") for name in ("broken", "planted", "vanishing")}}
    strict = cfg.serve.model_copy(update={
        "auth_token": SecretStr(TOKEN), "checkpoints": checkpoints, "body_timeout_s": 2.0, "request_timeout_s": 4.0,
        "max_ongoing_requests": 2, "max_queued_requests": 1, "max_models_per_replica": 1,
        "trace_models": False})  # eager forwards here
    serve.run(build_app(cfg.model_copy(update={"serve": strict})), name="strict", route_prefix="/strict",
              blocking=False)
    deadline = time.time() + 120
    while requests.get(f"{url}/strict/healthz", timeout=30).status_code not in (200, 503) and time.time() < deadline:
        time.sleep(0.5)
    (directory / "vanishing.pt").unlink()  # verified at start, gone when first requested
    # (Deleted with the others by the module's serve.shutdown, at once rather than one 2 s drain after another.)
    return f"{url}/strict", marker


def test_auth_token_and_broken_checkpoints(server, strict_app, digit_png, caplog):
    _, result, _ = server
    base, marker = strict_app
    assert requests.get(f"{base}/models", timeout=60).status_code == 401
    assert predict(base, digit_png).status_code == 401
    wrong = predict(base, digit_png, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "error" in wrong.json()
    assert wrong.headers["WWW-Authenticate"] == "Bearer"  # the challenge every 401 carries (RFC 9110)
    for bad_top_k in (0, "abc"):  # the token first: FastAPI's query check answered 422 to clients without it
        assert predict(base, digit_png, params={"top_k": bad_top_k}).status_code == 401
    assert predict(base, digit_png, params={"top_k": 0}, headers=AUTH).status_code == 422
    models = requests.get(f"{base}/models", headers=AUTH, timeout=60).json()
    status = {m["alias"]: m for m in models["models"]}
    assert status["good"]["status"] == "ok" and status["broken"]["status"] == "error"
    # What the files themselves say (no registry tags): architecture, validation accuracy, input size, parameters.
    trained = load_checkpoint(result.train.results["lenet5"].checkpoint_path)
    assert status["good"]["arch"] == "lenet5" and status["good"]["val_acc"] == pytest.approx(trained.metrics["val_acc"])
    assert status["good"]["input_size"] == trained.spec.image_size
    assert status["good"]["params_count"] == result.train.results["lenet5"].params_count
    assert status["three"]["val_acc"] is None and status["three"]["input_size"] == 32
    assert "CheckpointError" in status["broken"]["error"]
    assert status["planted"]["status"] == "error" and "unreadable or corrupt" in status["planted"]["error"]
    assert not marker.exists()  # the planted pickle was refused, never run
    health = requests.get(f"{base}/healthz", headers=AUTH, timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    # (vanishing fails once a test asks for it after its file is gone: this test may run after that one)
    gone = {"vanishing"} if status["vanishing"]["status"] == "error" else set()
    assert set(health.json()["errors"]) == {"broken", "planted"} | gone
    # Without the token (a load balancer): the status and counts, not the aliases and error texts (file paths,
    # the tracking server) that /models keeps for callers with it.
    anonymous = requests.get(f"{base}/healthz", timeout=60)
    assert anonymous.status_code == 200 and anonymous.json() == {
        "status": "degraded", "models": 4 - len(gone), "errors": 2 + len(gone), "not_verified_yet": 0}
    failed = predict(base, digit_png, params={"model": "broken"}, headers=AUTH)
    assert failed.status_code == 503 and "failed to load" in failed.json()["error"]
    ok = predict(base, digit_png, params={"model": "good"}, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["model"] == "good"
    # A checkpoint file's version in /models is the one /predict answers with ("" there before)
    assert ok.json()["version"] == status["good"]["version"] == f"epoch{trained.epoch}"
    assert models["champion"] == "good"
    # What the console announces once the app answers: the failed ones left out, each in a warning (it listed
    # every model it was given, and a champion that failed).
    import logging

    from pipelines.serve import _wait_until_answering, served_as_reported

    with caplog.at_level(logging.WARNING, logger="pipelines"):
        served, champion = served_as_reported(["good", "broken", "planted", "three"], "broken",
                                              _wait_until_answering(base, TOKEN))
    assert served == ["good", "three"] and champion is None
    assert "[serve] broken is not served (requests for it get a 503): CheckpointError" in caplog.text
    assert served_as_reported(["good", "broken"], "good", {"errors": 1}) == (["good", "broken"], "good")


def test_an_app_whose_every_model_failed_is_not_reported_as_serving(server, tmp_path):
    """The serve stage took a 503 from /healthz as "answering": on a cluster whose replicas could reach neither
    the sqlite registry nor the checkpoint files on the head, every model failed for good on its replica, and the
    stage passed, printing a URL that refused every request. It fails now, with each model's error."""
    from ray import serve

    from pipelines.serve import NothingServableError, _wait_until_answering, build_app

    cfg, _, url = server
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint at all")
    broken = cfg.serve.model_copy(update={"auth_token": SecretStr(TOKEN),
                                          "checkpoints": {"broken": str(tmp_path / "broken.pt")}})
    serve.run(build_app(cfg.model_copy(update={"serve": broken})), name="allbroken", route_prefix="/allbroken",
              blocking=False)
    try:
        with pytest.raises(NothingServableError, match=r"can serve none of its models \(on a cluster every replica "
                           r"node must reach .*\): 1 failed \(above\), the first: broken: CheckpointError"):
            _wait_until_answering(f"{url}/allbroken", TOKEN)
        with pytest.raises(NothingServableError, match=r"none of its models .*: 1 failed$"):
            _wait_until_answering(f"{url}/allbroken")  # without the token: the count
        _wait_until_answering(url)  # an app serving a model answers as before
    finally:
        serve.delete("allbroken")


def test_a_load_failing_at_request_time_is_503_and_reported(strict_app, digit_png):
    base, _ = strict_app
    before = requests.get(f"{base}/models", headers=AUTH, timeout=60).json()
    assert {m["alias"]: m["status"] for m in before["models"]}["vanishing"] == "ok"
    failed = predict(base, digit_png, params={"model": "vanishing"}, headers=AUTH)
    assert failed.status_code == 503 and "does not exist" in failed.json()["error"]
    after = {m["alias"]: m for m in requests.get(f"{base}/models", headers=AUTH, timeout=60).json()["models"]}
    assert after["vanishing"]["status"] == "error"
    assert "vanishing" in requests.get(f"{base}/healthz", headers=AUTH, timeout=60).json()["errors"]
    assert predict(base, digit_png, params={"model": "vanishing"}, headers=AUTH).status_code == 503
    assert predict(base, digit_png, params={"model": "good"}, headers=AUTH).status_code == 200


def test_top_k_defaults_to_the_class_count_of_a_small_model(strict_app, digit_png, tmp_path, capsys, monkeypatch):
    from pipelines.__main__ import main

    base, _ = strict_app
    clamped = predict(base, digit_png, params={"model": "three"}, headers=AUTH)
    assert clamped.status_code == 200 and len(clamped.json()["predictions"]) == 3
    assert len(predict(base, digit_png, params={"model": "three", "top_k": 2}, headers=AUTH).json()["predictions"]) == 2
    too_many = predict(base, digit_png, params={"model": "three", "top_k": 4}, headers=AUTH)
    assert too_many.status_code == 422 and "at most 3" in too_many.json()["error"]
    # Up to the model's class count, as README says: the query's own cap of 1000 refused 1100 of 1200 classes.
    wide = predict(base, digit_png, params={"model": "wide", "top_k": 1100}, headers=AUTH)
    assert wide.status_code == 200 and len(wide.json()["predictions"]) == 1100, wide.text
    image = tmp_path / "digit.png"
    image.write_bytes(digit_png)
    # The token from CNNZOO_SERVE_TOKEN, as the pipeline's hint has it: out of the process list.
    monkeypatch.setenv("CNNZOO_SERVE_TOKEN", TOKEN)
    assert main(["predict", str(image), "--url", base, "--model", "three"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]  # after the header and the column names
    assert sorted(row.split()[0] for row in rows) == ["x", "y", "z"]


def test_a_stalled_body_frees_its_slot_at_the_body_deadline(strict_app, digit_png):
    """Two clients send headers and a few bytes, then stall: the replica's two slots. A third request gets
    through once the 2 s body deadline answers them 408, even though they asked the proxy for no timeout."""
    base, _ = strict_app
    where = urlparse(base)
    head = (f"POST {where.path}/predict?model=good HTTP/1.1\r\nHost: {where.netloc}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n"
            "x-request-timeout-seconds: 0\r\n\r\n").encode()
    stalled = [socket.create_connection((where.hostname, where.port), timeout=30) for _ in range(2)]
    for connection in stalled:
        connection.sendall(head + digit_png[:20])
        time.sleep(0.2)  # each taken by the replica before the next comes: requests waiting count as queued
    time.sleep(0.3)
    started = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(predict, base, digit_png, params={"model": "good"}, headers=AUTH)
        time.sleep(0.3)
        # The queue (serve.max_queued_requests: 1) is full with the request above: this one is refused at once,
        # not buffered until a slot frees (a client can lift the proxy's own timeout for a queued request).
        refused = predict(base, digit_png, params={"model": "good"}, headers={**AUTH, "x-request-timeout-seconds": "0"})
        refused_after = time.perf_counter() - started
        answered = waiting.result()
    assert refused.status_code == 503 and refused_after < 1.0, (refused.status_code, refused_after, refused.text)
    # Not before the stalled bodies' deadline (2 s after they came, 0.5 s before this): both slots were held.
    assert answered.status_code == 200 and 1.0 <= time.perf_counter() - started < 8
    for connection in stalled:
        reply = _read_http_response(connection)
        connection.close()
        assert reply.startswith("HTTP/1.1 408") and "did not arrive within 2 s" in reply, reply


def _read_http_response(connection: socket.socket) -> str:
    """The whole response on a raw socket: its head and body may come in separate packets (CI once read
    the 408's head alone with one recv)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(4096)
        if not chunk:
            return received.decode()
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while length is not None and len(body) < length:
        chunk = connection.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_an_app_that_does_not_finish_starting_on_a_cluster_is_deleted(server):
    """Ctrl-C or ``ray job stop`` while the replicas start (minutes where a GPU node is added), or an error: the
    app was deleted only once serving had started, and a cluster's detached controller kept it, with its
    replicas' CPUs and GPUs and the port, though the command had ended with 130 (or 15)."""
    from ray import serve

    from pipelines.serve import deleted_unless_started

    cfg, _, _ = server

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=0)
    class Placeholder:
        def __call__(self, request) -> str:
            return "up"

    on_cluster = cfg.model_copy(update={"name": "starting", "ray": cfg.ray.model_copy(update={"address": "auto"})})
    for stop in (KeyboardInterrupt(), SystemExit(15), RuntimeError("the deployment failed")):
        with pytest.raises(type(stop)), deleted_unless_started(on_cluster):
            serve.run(Placeholder.bind(), name="starting", route_prefix="/starting", blocking=False)
            assert "starting" in serve.status().applications
            raise stop
        deadline = time.monotonic() + 30
        while "starting" in serve.status().applications and time.monotonic() < deadline:
            time.sleep(0.5)  # (the SIGTERM's deletion is asked, waited for at most 2 s)
        assert "starting" not in serve.status().applications, stop
    assert cfg.name in serve.status().applications  # the other apps are left alone
    # An app of the name already running (left up with --no-block): its redeploy cut short leaves it to Serve.
    serve.run(Placeholder.bind(), name="starting", route_prefix="/starting", blocking=False)
    with pytest.raises(KeyboardInterrupt), deleted_unless_started(on_cluster):
        serve.run(Placeholder.bind(), name="starting", route_prefix="/starting", blocking=False)
        raise KeyboardInterrupt
    assert "starting" in serve.status().applications
    serve.delete("starting")
    local = cfg.model_copy(update={"name": "starting"})  # a local Ray ends with the command: nothing to delete
    with pytest.raises(KeyboardInterrupt), deleted_unless_started(local):
        serve.run(Placeholder.bind(), name="starting", route_prefix="/starting", blocking=False)
        raise KeyboardInterrupt
    assert "starting" in serve.status().applications
    serve.delete("starting")


def test_ctrl_c_of_a_blocking_command_on_a_cluster_deletes_its_serve_app(server, monkeypatch):
    """On a cluster the Serve controller is detached: Ctrl-C printed "shutting down" and returned while the app
    went on holding its replicas' CPUs and GPUs and the port."""
    import signal

    from ray import serve

    import pipelines.__main__ as cli
    from pipelines.config import outlives_the_command

    cfg, _, _ = server

    # (No graceful drain: each delete waited Serve's default 2 s for requests this app never gets.)
    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=0)
    class Placeholder:
        def __call__(self, request) -> str:
            return "up"

    serve.run(Placeholder.bind(), name="blocking", route_prefix="/blocking", blocking=False)
    assert "blocking" in serve.status().applications
    on_cluster = cfg.model_copy(update={"name": "blocking",
                                        "ray": cfg.ray.model_copy(update={"address": "auto"})})
    assert outlives_the_command(on_cluster)

    class Interrupted:  # the command's own wait, Ctrl-C at once (serve.delete's polls keep the real sleep)
        @staticmethod
        def sleep(seconds):
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "time", Interrupted)
    try:
        cli._block_until_interrupted("http://127.0.0.1:0", on_cluster)
        # A second Ctrl-C while the command ends (its Ray's shutdown) ended it with 130 and "re-run the same
        # command to resume": it only says so now (main puts the handler back once the command is done).
        assert signal.getsignal(signal.SIGINT) is cli._say_shutting_down
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert "blocking" not in serve.status().applications
    assert cfg.name in serve.status().applications  # the other apps are left alone

    # `ray job stop` of a blocking `run` or `serve` job: SIGTERM, which left the app serving.
    import os
    import time

    serve.run(Placeholder.bind(), name="blocking", route_prefix="/blocking", blocking=False)

    class Terminated:
        @staticmethod
        def sleep(seconds):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this

    def unhandled(signum, frame):  # (the default action would end the test session)
        raise AssertionError("SIGTERM reached the handler in place before the command's")

    monkeypatch.setattr(cli, "time", Terminated)
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        cli._block_until_interrupted("http://127.0.0.1:0", on_cluster)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # restored
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    deadline = time.monotonic() + 30
    while "blocking" in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)  # asked, not waited for
    assert "blocking" not in serve.status().applications
