"""Who may call the endpoint: a non-loopback bind needs a token, the token comes from the environment and is
never printed or written in clear; the GPU presets and cluster.yaml agree on it."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipelines.config import ConfigError, is_loopback, load_config

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tok-3f9a1c-never-shown"


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.53", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("::", False),
                                            ("10.0.0.5", False), ("head.internal", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_a_public_bind_without_a_token_exits_2_before_ray_starts(make_config, pipelines_cli):
    refused = pipelines_cli("check-config", "--set", "serve.host=0.0.0.0")
    assert refused.returncode == 2
    assert "serve.host" in refused.stderr and "allow_unauthenticated" in refused.stderr
    assert make_config("serve.host=0.0.0.0", "serve.allow_unauthenticated=true").serve.bearer_token() is None


def test_the_token_comes_from_the_environment_and_is_never_printed(make_config, monkeypatch):
    monkeypatch.setenv("MY_SERVE_TOKEN", TOKEN)
    from_env = make_config("serve.host=0.0.0.0", "serve.auth_token_env=MY_SERVE_TOKEN")
    assert from_env.serve.bearer_token() == TOKEN
    literal = make_config(f"serve.auth_token={TOKEN}")
    assert literal.serve.bearer_token() == TOKEN
    for cfg in (from_env, literal):  # what check-config prints
        assert TOKEN not in cfg.to_yaml() + repr(cfg) + str(cfg)
    assert "auth_token: '**********'" in literal.to_yaml()
    with pytest.raises(ConfigError, match="serve.auth_token_env: environment variable NO_SUCH_VARIABLE"):
        make_config("serve.auth_token_env=NO_SUCH_VARIABLE")
    with pytest.raises(ConfigError, match="not both"):
        make_config("serve.auth_token_env=MY_SERVE_TOKEN", "serve.auth_token=x")


def test_a_token_is_taken_without_its_newline_and_only_in_printable_ascii(make_config, monkeypatch):
    """A token read from a file or a secret kept its newline: HTTP strips the header's value, so no client could
    ever match it (401 for everyone). A non-ASCII token matched from one HTTP client and not another."""
    from pipelines.http_api import RequestError, authorize

    monkeypatch.setenv("MY_SERVE_TOKEN", TOKEN + "\n")
    token = make_config("serve.host=0.0.0.0", "serve.auth_token_env=MY_SERVE_TOKEN").serve.bearer_token()
    assert token == TOKEN
    request = SimpleNamespace(headers={"authorization": f"Bearer {TOKEN}"})
    authorize(request, token)  # what a client sends now matches
    with pytest.raises(RequestError):
        authorize(SimpleNamespace(headers={"authorization": "Bearer other"}), token)
    for bad in ("t\u00f6ken-1234", "two words"):
        monkeypatch.setenv("MY_SERVE_TOKEN", bad)
        with pytest.raises(ConfigError, match="printable ASCII") as refused:
            make_config("serve.host=0.0.0.0", "serve.auth_token_env=MY_SERVE_TOKEN")
        assert refused.value.key == "serve.auth_token_env" and bad not in str(refused.value)
    monkeypatch.setenv("MY_SERVE_TOKEN", " \n")
    with pytest.raises(ConfigError, match="is not set or empty"):
        make_config("serve.auth_token_env=MY_SERVE_TOKEN")


def test_serve_config_yaml_holds_no_token_and_only_its_owner_reads_it(make_config, monkeypatch, tmp_path):
    from pipelines.serve import app_builder, write_serve_config

    monkeypatch.setenv("MY_SERVE_TOKEN", TOKEN)
    for overrides in (["serve.auth_token_env=MY_SERVE_TOKEN"], [f"serve.auth_token={TOKEN}"]):
        cfg = make_config("serve.host=0.0.0.0", *overrides)
        path = write_serve_config(cfg)
        text = path.read_text()
        assert TOKEN not in text and "*****" not in text
        assert path.stat().st_mode & 0o777 == 0o600
        args = yaml.safe_load(text)["applications"][0]["args"]
        assert args["require_token"] is True and args["config"]["workdir"] == str(cfg.paths.workdir)
    # `serve deploy` of the file with the literal token: it refuses to build without a token to enforce.
    with pytest.raises(ConfigError, match="serve.auth_token_env|serve.host"):
        app_builder(args)
    monkeypatch.delenv("MY_SERVE_TOKEN")
    # The app settles what it serves where it is built: a checkpoint here (a registry would do as well).
    import cnnmodels
    from pipelines.checkpoints import ModelCheckpoint, save_checkpoint
    from pipelines.preprocess import PreprocessSpec

    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.5,), class_names=("a", "b"))
    checkpoint = save_checkpoint(ModelCheckpoint("lenet5", {}, spec, cnnmodels.create_model(
        "lenet5", num_classes=2, in_chans=1).state_dict()), tmp_path / "lenet5.pt")
    env_args = yaml.safe_load(write_serve_config(make_config(f"serve.checkpoints={{a: {checkpoint}}}")).read_text()
                              )["applications"][0]["args"]
    assert env_args["require_token"] is False
    app_builder(env_args)  # loopback, no token: builds
    # The file edited before `serve deploy`: checked as `serve` checks its config (a serve.models typo deployed an
    # app of no models, every request refused; a replica that could never fill a batch deployed as well).
    edited = {**env_args, "config": {**env_args["config"], "serve": {**env_args["config"]["serve"],
                                                                      "models": ["b"]}}}
    with pytest.raises(ConfigError, match="b: not among serve.checkpoints"):
        app_builder(edited)
    edited["config"]["serve"].update(models=[], max_ongoing_requests=1, max_batch_size=8)
    with pytest.raises(ConfigError, match="a replica could never fill a batch"):
        app_builder(edited)


def test_serve_config_yaml_changes_with_what_it_serves_so_serve_deploy_rebuilds_the_app(make_config):
    """Serve rebuilds a running app only when its import path, runtime env or args change: the file written
    after a new champion was registered was byte for byte the earlier one, and `serve deploy` of it kept
    serving the old versions without a word."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    from pipelines.model_store import ServedModel
    from pipelines.serve import app_builder, write_serve_config

    cfg = make_config()

    def code_version(models, champion):
        document = yaml.safe_load(write_serve_config(cfg, (models, champion)).read_text())
        return get_app_code_version(ServeDeploySchema.model_validate(document).applications[0]), document

    resnet = ServedModel(alias="resnet18", source="models:/m/1", version="1")
    before, document = code_version([resnet], "resnet18")
    assert document["applications"][0]["args"]["served"] == {"champion": "resnet18", "models": {"resnet18": "1"}}
    assert code_version([resnet], "resnet18")[0] == before  # unchanged: no needless rebuild
    vgg = ServedModel(alias="vgg11", source="models:/m/2", version="2")
    assert code_version([resnet, vgg], "vgg11")[0] != before  # a new version, the champion moved: rebuilt
    retrained = ServedModel(alias="resnet18", source="models:/m/3", version="3")
    assert code_version([retrained], "resnet18")[0] != before
    with pytest.raises(LookupError, match="train first"):  # the builder takes the stamp (and reads MLflow)
        app_builder(document["applications"][0]["args"])
    # serve.checkpoints: a retrained checkpoint copied over the same path is another model
    checkpoint = cfg.paths.run_dir / "best.pt"
    checkpoint.write_bytes(b"first weights")
    os.utime(checkpoint, ns=(1_000_000_000, 1_000_000_000))
    served_file = ServedModel(alias="resnet18", source=str(checkpoint))
    before = code_version([served_file], None)[0]
    assert code_version([served_file], None)[0] == before
    checkpoint.write_bytes(b"other weights")  # (the same size: its time tells)
    assert code_version([served_file], None)[0] != before
    # ... and a directory holding model.pt, as serve.checkpoints takes it: by its model.pt
    directory = cfg.paths.run_dir / "best"
    directory.mkdir()
    (directory / "model.pt").write_bytes(b"first weights")
    os.utime(directory / "model.pt", ns=(1_000_000_000, 1_000_000_000))
    served_dir = ServedModel(alias="resnet18", source=str(directory))
    before = code_version([served_dir], None)[0]
    (directory / "model.pt").write_bytes(b"other weights")
    assert code_version([served_dir], None)[0] != before


def test_serve_config_yaml_holds_no_tracking_password_and_the_deployment_reads_it_from_the_environment(
        make_config, monkeypatch, tmp_path):
    """The file kept the tracking URI's password in clear (the Serve controller keeps what `serve deploy`
    sends), while check-config, the logged config.yaml and the pending file mask it."""
    from pipelines.serve import _with_tracking_password, write_serve_config

    uri = "http://alice:hunter2@mlflow.internal:5000"
    text = write_serve_config(make_config(f"tracking.uri={uri}")).read_text()
    assert "hunter2" not in text and "MLFLOW_TRACKING_URI" in text
    config = yaml.safe_load(text)["applications"][0]["args"]["config"]
    assert config["tracking"]["uri"] == "http://alice:***@mlflow.internal:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="export MLFLOW_TRACKING_URI") as info:
        _with_tracking_password(config)
    assert info.value.key == "tracking.uri"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:other@elsewhere:5000")  # another server's
    with pytest.raises(ConfigError, match="export MLFLOW_TRACKING_URI"):
        _with_tracking_password(config)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert _with_tracking_password(config)["tracking"]["uri"] == uri
    plain = yaml.safe_load(write_serve_config(make_config("tracking.uri=http://10.0.0.1:5000")).read_text())
    assert plain["applications"][0]["args"]["config"]["tracking"]["uri"] == "http://10.0.0.1:5000"


def test_gpu_presets_read_the_token_that_cluster_yaml_exports(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNZOO_STORAGE_PATH", "s3://bucket/prefix")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    monkeypatch.setenv("CNNZOO_DATA_ROOT", str(tmp_path))
    monkeypatch.delenv("CNNZOO_SERVE_TOKEN", raising=False)
    presets = sorted((ROOT / "pipelines" / "configs").glob("*-gpu.yaml"))
    assert presets
    for preset in presets:
        with pytest.raises(ConfigError, match="serve.auth_token_env"):
            load_config(preset)
    monkeypatch.setenv("CNNZOO_SERVE_TOKEN", TOKEN)
    for preset in presets:
        cfg = load_config(preset)
        assert not is_loopback(cfg.serve.host) and cfg.serve.bearer_token() == TOKEN
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = " ".join(cluster["head_setup_commands"])
    assert "export CNNZOO_SERVE_TOKEN=" in head and "umask 077" in head


def test_the_decode_budget_must_admit_one_model_input(make_config):
    with pytest.raises(ConfigError, match="serve.max_resized_pixels"):
        make_config("data.image_size=64", "serve.max_resized_pixels=4000")


def test_the_decode_budget_must_admit_the_paper_family_trained_beside_the_searched_one(make_config):
    """The paper's phi-4 member takes 112 px from 64 (its gamma 1.15, above the search's lowest): the budget
    passed, and the serve stage refused it after the search and every model had trained."""
    searched_only = ("data.image_size=64", "search.phis=[0, 4]", "search.gamma=[1.0, 1.2]",
                     "serve.max_resized_pixels=10000")
    make_config(*searched_only)  # the searched family may take 64 px (gamma 1.0)
    with pytest.raises(ConfigError, match=r"efficientnet_paper_phi4 \(112 px\)") as refused:
        make_config(*searched_only, "search.compare_paper=true")
    assert refused.value.key == "serve.max_resized_pixels"
    # 8 px digits: the family's phi-1 member takes the model's smallest input, 16 px, not round(8 * gamma)
    with pytest.raises(ConfigError, match=r"efficientnet_phi1 \(at least 16 px\)"):
        make_config("data.image_size=8", "search.phis=[0, 1]", "train.models=[resnet18]",
                    "serve.max_resized_pixels=100")


@pytest.mark.parametrize("alias", ["champion", "''"])
def test_a_checkpoint_alias_no_request_could_reach_is_refused(make_config, tmp_path, alias):
    """``champion`` answers with the best servable model and an empty alias is never asked for: a checkpoint
    under either would never be served."""
    with pytest.raises(ConfigError, match="serve.checkpoints: the alias") as refused:
        make_config(f"serve.checkpoints={{a: {tmp_path / 'a.pt'}, {alias}: {tmp_path / 'b.pt'}}}")
    assert refused.value.key == "serve.checkpoints"


def test_relative_paths_are_made_absolute_where_the_command_runs(tmp_path, monkeypatch):
    """A Serve replica (or a Ray job) works in another directory: ``serve.checkpoints`` and a relative sqlite
    ``tracking.uri`` are resolved where the command runs, as ``data.root`` is; a replica found neither."""
    from pipelines.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["tracking.uri=sqlite:///runs/mlflow.db?timeout=30", "serve.checkpoints={best: runs/m.pt}"])
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/runs/mlflow.db?timeout=30"
    assert cfg.serve.checkpoints == {"best": str(tmp_path / "runs" / "m.pt")}
    assert load_config(None, ["tracking.uri=sqlite:////srv/mlflow.db"]).tracking.uri == "sqlite:////srv/mlflow.db"


def test_predict_says_in_one_line_what_is_wrong_with_its_image_or_the_answer(tmp_path, capsys, monkeypatch):
    """Another service on the port (a 200 that is not a prediction) and an image path that cannot be read
    ended in tracebacks; an answer slower than the client's wait was "cannot reach"."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pipelines.__main__ import main

    class NotAClassifier(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            if "slow" in self.path:
                time.sleep(2)
            body = b"<html>a dashboard</html>" if "html" in self.path else b'["a", "list"]'
            self.send_response(200 if "html" in self.path or "slow" in self.path else 500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotAClassifier)
    # The slow answer goes to a client that stopped waiting: its broken pipe is expected, and its traceback would
    # land in a later test's captured stderr.
    server.handle_error = lambda request, client_address: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    image = tmp_path / "digit.png"
    image.write_bytes(b"\x89PNG not really")
    try:
        assert main(["predict", str(image), "--url", f"{base}/html"]) == 1
        assert main(["predict", str(image), "--url", f"{base}/list"]) == 1  # an error body that is no object
        assert main(["predict", str(image), "--url", f"{base}/slow", "--timeout", "0.5"]) == 1
        assert main(["predict", str(tmp_path), "--url", base]) == 2  # a directory, not an image file
        with pytest.raises(SystemExit) as refused:  # urllib3's ValueError, a traceback, before
            main(["predict", str(image), "--url", base, "--timeout", "0"])
        assert refused.value.code == 2
        with pytest.raises(SystemExit) as refused:  # urllib3's OverflowError, a traceback, before
            main(["predict", str(image), "--url", base, "--timeout", "inf"])
        assert refused.value.code == 2
        assert main(["predict", str(image), "--url", base.removeprefix("http://")]) == 2  # no scheme
        # A token no server can hold: a curly quote was a UnicodeEncodeError traceback, a line break inside
        # "cannot reach" the server with the token printed
        assert main(["predict", str(image), "--url", base, "--token", "abc\u201cdef"]) == 2
        monkeypatch.setenv("CNNZOO_SERVE_TOKEN", "secret-first-line\nsecret-second-line")
        assert main(["predict", str(image), "--url", base]) == 2
        monkeypatch.undo()
        errors = capsys.readouterr().err
        assert "--token: the bearer token may hold only printable ASCII" in errors
        assert "CNNZOO_SERVE_TOKEN: the bearer token may hold only" in errors and "secret" not in errors
        assert f"needs its scheme: {base}" in errors
        assert "answered 200 with something that is not a prediction: <html>" in errors
        assert 'error 500: ["a", "list"]' in errors
        assert "/slow/predict gave no answer within" in errors and "(--timeout)" in errors
        assert f"cannot read {tmp_path}" in errors
        assert "--timeout: 0 is not a finite number above 0" in errors
        assert "--timeout: inf is not a finite number above 0" in errors
        assert "Traceback" not in errors
    finally:
        server.shutdown()


def test_a_port_another_listener_holds_is_refused_before_serve_starts(monkeypatch, make_config, tmp_path):
    """Serve's proxy listens with SO_REUSEPORT: a second `serve` beside a running one shared port 8000 without a
    word, the kernel splitting requests between the two apps; a port another program held failed the stage after
    seconds with a cut-off traceback of the proxy's. Checked before Serve starts (a Serve already running on the
    connected Ray holds the port itself, and is not checked)."""
    import socket

    import pipelines.serve as serve_module
    from pipelines.config import ServeConfig

    monkeypatch.setattr(serve_module, "_serve_runs_on_this_ray", lambda: False)
    with socket.socket() as proxy:  # as Serve's proxy listens
        proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        port = proxy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port} is already in use") as refused:
            serve_module.check_port_free(ServeConfig(port=port))
        assert refused.value.key == "serve.port"
        # `run` checks it before its search and training (it failed after them, hours later).
        from pipelines.pipeline import run_pipeline

        cfg = make_config(f"serve.port={port}", workdir=tmp_path / "run")
        with pytest.raises(ConfigError, match="is already in use"):
            run_pipeline(cfg, ["train", "serve"])
        assert not cfg.paths.run_dir.exists()  # nothing trained, nothing written
    serve_module.check_port_free(ServeConfig(port=port))  # free again
    monkeypatch.setattr(serve_module, "_serve_runs_on_this_ray", lambda: True)
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        serve_module.check_port_free(ServeConfig(port=port))  # this Ray's own Serve holds it: redeployed


def test_a_serve_host_that_is_no_address_of_this_machine_is_refused_before_a_local_ray_starts(pipelines_cli):
    """A LAN address copied from another machine passed every check: `run` failed at its serve stage, after the
    search and training, where Serve's proxy could not bind it."""
    refused = pipelines_cli("serve", "--set", "serve.host=192.0.2.1", "--set", "serve.allow_unauthenticated=true")
    assert refused.returncode == 2 and not refused.started_ray, refused.stderr
    assert "serve.host: 192.0.2.1 is not an address of this machine" in refused.stderr


def test_the_console_says_what_answers_a_request_without_a_model():
    """With serve.models leaving the registry's champion out, the console said "champion: None" while requests
    without a model were answered by the best model served."""
    from pipelines.serve import ServeHandle

    assert ServeHandle("http://h", Path("c.yaml"), ["lenet5"], "lenet5").default_model() == "champion: lenet5"
    assert "goes to the best loaded" in ServeHandle("http://h", Path("c.yaml"), ["lenet5"], None).default_model()


def test_serve_with_nothing_registered_fails_before_ray_starts(tmp_path, pipelines_cli):
    """`serve` looked for its models only once Ray had started (a local Ray: about 12 s; a cluster's address had
    to answer, and one that did not hung it)."""
    refused = pipelines_cli("serve", "--set", f"workdir={tmp_path}", "--set", "name=test",
                            "--set", "ray.address=127.0.0.1:1")
    assert refused.returncode == 1 and not refused.started_ray, refused.stderr
    assert "registered model 'test' not found" in refused.stderr and "train first" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_run_of_the_serve_stage_alone_finds_its_models_before_ray_starts(tmp_path, pipelines_cli):
    """`run --stages serve` looked for its models once a local Ray had started (12-20 s), as `serve` did before;
    with the report before it, after the report too."""
    for stages in ("serve", "report,serve"):
        refused = pipelines_cli("run", "--stages", stages, "--set", f"workdir={tmp_path}", "--set", "name=test")
        assert refused.returncode == 1 and not refused.started_ray, refused.stderr
        assert "registered model 'test' not found" in refused.stderr and "train first" in refused.stderr, \
            refused.stderr


def test_the_example_request_names_the_sample_images_own_content_type(make_config, caplog):
    """The example image of 16-bit or float data is a TIFF: the printed curl said image/png for it."""
    import logging
    from pathlib import Path
    from types import SimpleNamespace

    from pipelines.pipeline import log_serving_hints

    cfg = make_config()
    for sample, content_type in (("sample-x-cat.tiff", "image/tiff"), ("sample-x-cat.png", "image/png")):
        serving = SimpleNamespace(sample_image=Path(sample), models=["lenet5"], url="http://127.0.0.1:8000",
                                  config_path=Path("serve.yaml"), default_model=lambda: "champion: lenet5")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipelines"):
            log_serving_hints(serving, cfg)
        assert f"--data-binary @{sample} -H 'Content-Type: {content_type}'" in caplog.text
