"""Shared fixtures: one local Ray instance for the whole session, configs in temporary directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before Ray starts: quiet, no telemetry, no token prompts for the local test cluster.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


#: The smallest architecture of every block type (one or more per model file): these train for real in the
#: tests (a fixed batch, the worker loop); deeper and wider variants repeat the same blocks in other counts.
ONE_PER_BLOCK_TYPE = ["lenet5", "alexnet", "vgg11", "vgg11_bn", "se_vgg11_bn", "googlenet", "se_googlenet",
                      "resnet18", "resnet50", "se_resnet18", "se_resnet50", "densenet121", "efficientnet_b0",
                      "efficientnet"]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``own_ray`` (they start a Ray cluster of their own) run first, before ``ray_cluster`` starts
    the shared one: two Ray instances on one 2-core machine slowed the simulated cluster (now a system check in
    bench/system) from about 120 s to 150-170 s, though the idle one used under 0.1 of a core. test_serve.py's
    tests come right after test_pipeline.py's, whose Serve app they use and then stop (in whatever order the
    files were given: the app is gone after them; pytest's --ff/--lf/--nf reorder after this hook and can undo
    it). The rest keep their order."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is None)
    serving = [item for item in items if item.path.name == "test_serve.py"]
    pipeline = [i for i, item in enumerate(items) if item.path.name == "test_pipeline.py"]
    if serving and pipeline:
        rest = [item for item in items if item.path.name != "test_serve.py"]
        after = max(i for i, item in enumerate(rest) if item.path.name == "test_pipeline.py") + 1
        items[:] = rest[:after] + serving + rest[after:]


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray (2 CPUs, dashboard on: Ray Train's placement-group cleanup queries its state API)."""
    import logging

    import ray

    from pipelines.runtime import WORKER_ENV

    # address="local": a `ray start` head elsewhere on this machine (bench/system's job-flow check's) is not joined.
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=True, logging_level=logging.WARNING,
             runtime_env={"env_vars": dict(WORKER_ENV)})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _restore_pipelines_logger():
    """Each test gets the ``pipelines`` logger as it found it. ``configure_console`` (called by tests that run the
    CLI or the console in-process) adds handlers and stops propagation, which would otherwise hide every later
    test's records from ``caplog`` (it listens on the root logger): the suite's result would depend on its order."""
    import logging

    logger = logging.getLogger("pipelines")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """A new MLflow sqlite store, its tables made: creating them costs 0.8-1.5 s of schema migrations on 2 cores,
    so ``make_config`` copies this file instead (still MLflow's own store, as it leaves a new one)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}")
    client.search_experiments()
    client.search_registered_models()
    return path


@pytest.fixture
def make_config(tmp_path, empty_mlflow_store):
    """Build a validated config rooted in a temporary directory: ``make_config("train.epochs=2", ...)``. Its
    default tracking store starts as a copy of ``empty_mlflow_store``."""
    import shutil

    from pipelines.config import load_config

    def build(*overrides: str, workdir=None):
        base = [f"workdir={workdir or tmp_path / 'runs'}", "name=test"]
        cfg = load_config(None, base + list(overrides))
        if cfg.tracking.uri is None and not cfg.paths.mlflow_db.exists():
            cfg.paths.mlflow_db.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(empty_mlflow_store, cfg.paths.mlflow_db)
        return cfg

    return build


@pytest.fixture
def cuda_devices(monkeypatch):
    """``cuda_devices(2)``: this process's CUDA sees 2 GPUs, for configs of a GPU machine's local Ray (declaring
    more GPUs than CUDA sees is refused)."""
    import torch

    def see(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return see


@pytest.fixture
def pipelines_cli(monkeypatch, capsys):
    """``python -m pipelines ARGV`` run in this process, for commands that must end before Ray starts:
    ``pipelines_cli("train", "--set", ..., env={...})`` returns its exit code, stdout, stderr, and whether it
    reached Ray, which is refused (this process's session Ray would let such a command through, where a user's
    would start one, seconds on 2 cores, or hang on an address nothing answers). A subprocess per command cost
    4-8 s of imports each; ``python -m`` itself is run by the Ctrl-C and config-error tests in test_config.py."""
    import contextlib
    from types import SimpleNamespace

    import pipelines.runtime as runtime
    from pipelines.__main__ import main

    reached = []

    @contextlib.contextmanager
    def no_ray(cfg):
        reached.append(cfg)
        raise AssertionError("the command went on to start Ray")
        yield  # (a generator, as the real one)

    monkeypatch.setattr(runtime, "ray_session", no_ray)

    def run(*argv: str, env: dict[str, str] | None = None) -> SimpleNamespace:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err, started_ray=bool(reached))

    return run


@pytest.fixture
def refusing_credentials():
    """The URL of an HTTP server that answers every request 401, as MLflow (or the proxy in front of it) does to
    an expired token."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Refusing(BaseHTTPRequestHandler):
        def refuse(self):
            self.send_response(401)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"You are not authenticated.")

        do_GET = do_POST = do_PUT = refuse

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def write_split_folder(root: Path, rng, counts=(("train", 12), ("val", 3), ("test", 3))) -> None:
    """A split image folder of random 12x12 grey PNGs: ``root/<split>/{ant,bee}/<i>.png``, ``count`` per class."""
    import numpy as np
    from PIL import Image

    for split, count in counts:
        for name in ("ant", "bee"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / split / name / f"{i}.png")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The tiny end-to-end config: two models, one epoch, two Optuna search trials (the paper's point first) ranked
#: by the MnasNet objective with a target below every trial's MACs (so it is not val_acc's order), on a 150-image
#: subset of digits (the searched EfficientNet family itself is left out to keep the suite fast: `search.phis=[]`).
#: The grid's search runs in test_search.py's failed-search test.
TINY = [
    "train.models=[lenet5, resnet18]", "train.epochs=1", "train.optimizer=adamw", "train.lr=0.003",
    "train.weight_decay=0.0001", "data.image_size=16", "data.train_subset=150",
    "train.max_concurrent_models=2", "train.cpus_per_worker=0.95",
    "search.mode=optuna", "search.objective=mnas", "search.target_macs=1000",
    "search.num_trials=2", "search.epochs=1",
    "search.alpha=[1.0, 1.4]", "search.beta=[1.0, 1.3]", "search.gamma=[1.0, 1.3]", "search.phis=[]",
    "search.max_concurrent_trials=2", "serve.num_cpus=0.25", "serve.max_upload_mb=1",
    "serve.max_image_pixels=1000000",
]


@pytest.fixture(scope="session")
def pipeline_run(ray_cluster, tmp_path_factory, empty_mlflow_store):
    """``run_pipeline`` through every stage on the tiny config; the deployment stays up for the serve tests."""
    import shutil

    from pipelines.config import load_config
    from pipelines.pipeline import run_pipeline

    workdir = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(None, [f"workdir={workdir}", "name=tiny", f"serve.port={free_port()}", *TINY])
    shutil.copyfile(empty_mlflow_store, cfg.paths.mlflow_db)  # (as make_config does)
    result = run_pipeline(cfg)
    return cfg, result


class PlantedCode:
    """Unpickling this creates ``path``: proof that a pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture
def serve_replica_context(monkeypatch):
    """What Serve's multiplexer (``serve.multiplexed``) needs of a replica, given as a deployment has it: its
    context and metrics. For replicas built from the deployment's own methods, without Serve."""
    from types import SimpleNamespace

    import ray.serve.multiplex as multiplex

    class NoMetric:
        def __init__(self, *args, **kwargs):
            pass

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(multiplex, "_get_internal_replica_context",
                        lambda: SimpleNamespace(app_name="app", deployment="Classifier", replica_id="r1"))
    monkeypatch.setattr(multiplex, "metrics", SimpleNamespace(Histogram=NoMetric, Gauge=NoMetric, Counter=NoMetric))
    monkeypatch.setattr(multiplex, "MetricsPusher", NoMetric)
