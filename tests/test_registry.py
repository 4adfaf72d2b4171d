"""The registered model on a real sqlite MLflow store, without Ray: a pyfunc model with no pickled code, what
serving downloads and caches, planted pickles, and which versions count for the current data set."""

from __future__ import annotations

import errno
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import PlantedCode

import cnnmodels
from pipelines.checkpoints import CheckpointError, ModelCheckpoint, load_checkpoint, save_checkpoint
from pipelines.model_store import ModelStore
from pipelines.preprocess import PreprocessSpec
from pipelines.serve import is_transient_load_error
from pipelines.tracking import CHAMPION, Tracker

SPEC = PreprocessSpec(image_size=32, channels=1, mean=(0.3,), std=(0.4,),
                      class_names=tuple(str(i) for i in range(10)), dataset="digits")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """lenet5 (random weights, with optimizer state in its checkpoint) registered as @lenet5 of digits."""
    from pipelines.config import load_config

    workdir = tmp_path_factory.mktemp("registry")
    cfg = load_config(None, [f"workdir={workdir}", "name=reg"])
    model = cnnmodels.create_model("lenet5", num_classes=10, in_chans=1)
    checkpoint = ModelCheckpoint(arch="lenet5", model_kwargs={}, spec=SPEC, state_dict=model.state_dict(),
                                 model_name="lenet5", training_state={"optimizer": {"momentum": torch.ones(8)}})
    save_checkpoint(checkpoint, workdir / "best" / "model.pt")
    tracker = Tracker.for_config(cfg)
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    version = tracker.log_and_register(run_id, workdir / "best", cfg.registered_model_name, "lenet5",
                                       tags={"test_acc": 0.5, "dataset": "digits", "fingerprint": "abc12345"})
    tracker.update_champion(cfg.registered_model_name)
    return cfg, tracker, version, model.eval()


def artifact_dir(tracker: Tracker, name: str, version: str) -> Path:
    """The version's logged-model directory in the local artifact store."""
    uri = tracker.client.get_model_version_download_uri(name, version)
    return Path(uri.removeprefix("file://"))


def test_registering_leaves_mlflows_process_wide_uris_as_they_were(registered, tmp_path, monkeypatch):
    """Registration set MLflow's process-wide tracking and registry URIs (and their environment variables) and
    left them: a notebook's own ``mlflow.set_tracking_uri`` afterwards still loaded ``models:/`` from the
    pipeline's store, the registry URI winning."""
    import os

    cfg, tracker, version, model = registered
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    mlflow.set_tracking_uri(mine)
    run_id = tracker.start_run("lenet5-uris", {"stage": "train"})
    source = tmp_path / "best"
    save_checkpoint(ModelCheckpoint(arch="lenet5", model_kwargs={}, spec=SPEC, state_dict=model.state_dict()),
                    source / "model.pt")
    tracker.log_and_register(run_id, source, cfg.registered_model_name, "uris", tags={"dataset": "digits"})
    tracker.client.delete_registered_model_alias(cfg.registered_model_name, "uris")
    assert mlflow.get_tracking_uri() == mine and mlflow.get_registry_uri() == mine  # the registry follows again
    assert os.environ.get("MLFLOW_REGISTRY_URI") is None and os.environ.get("MLFLOW_TRACKING_URI") == mine
    mlflow.set_tracking_uri(None)


def test_the_registered_model_is_a_pyfunc_from_code_without_optimizer_state(registered):
    cfg, tracker, version, model = registered
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.registered_model_name}@{CHAMPION}")
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(pyfunc.predict(x), expected, rtol=1e-5, atol=1e-6)
    assert pyfunc.unwrap_python_model().spec == SPEC
    # The signature comes from the spec (no forward at registration): images in, one logit per class out.
    signature = pyfunc.metadata.signature
    assert signature.inputs.inputs[0].shape == (-1, *SPEC.input_shape)
    assert signature.outputs.inputs[0].shape == (-1, SPEC.num_classes)
    with pytest.raises(mlflow.exceptions.MlflowException):
        pyfunc.predict(np.zeros((1, 3, 32, 32), np.float32))  # wrong channel count, refused by the signature
    files = {p.relative_to(artifact_dir(tracker, cfg.registered_model_name, version)).as_posix()
             for p in artifact_dir(tracker, cfg.registered_model_name, version).rglob("*") if p.is_file()}
    assert {"MLmodel", "pyfunc_model.py", "artifacts/model.pt", "artifacts/preprocess.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pth", ".pickle"))], files
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in (
        artifact_dir(tracker, cfg.registered_model_name, version) / "MLmodel").read_text()
    assert load_checkpoint(artifact_dir(tracker, cfg.registered_model_name, version) / "artifacts/model.pt"
                           ).training_state is None


def test_serving_downloads_only_the_checkpoint_once_into_a_cache_keyed_by_version(registered):
    cfg, tracker, version, model = registered
    store = ModelStore(cfg)
    [served], champion = store.discover()
    assert (served.alias, served.version, served.dataset, served.fingerprint) == ("lenet5", version, "digits",
                                                                                  "abc12345")
    assert champion == "lenet5"
    first = store.load(served, fold=False)
    second = store.load(served, fold=True, trace=True)  # as the server runs it
    cached = [p for p in store.cache_dir.rglob("*") if p.is_file()]
    assert len(cached) == 1 and cached[0].name == "model.pt" and f"v{version}-" in cached[0].parent.name
    assert not first.traced and second.traced and second.folded
    x = torch.randn(5, 1, 32, 32)  # not the batch size the trace was made with
    with torch.inference_mode():
        torch.testing.assert_close(first.model(x), model(x))
        torch.testing.assert_close(second.model(x), model(x), rtol=1e-4, atol=1e-4)



def test_a_verified_model_loads_again_while_the_registry_is_down(registered):
    """A replica verifies (downloads) every model at start; loading one again later (not the champion, or
    evicted from the LRU) must not need MLflow: down by then, it made the model unservable for good."""
    cfg, _, version, model = registered
    store = ModelStore(cfg)
    [served], _ = store.discover()
    store.verify([served])
    assert served.status == "ok"
    store.tracker = Tracker("http://127.0.0.1:9", cfg.name)  # nothing listens on port 9
    with pytest.raises(Exception) as down:
        store.tracker.download_checkpoint(cfg.registered_model_name, version, store.cache_dir)
    assert is_transient_load_error(down.value)  # what the replica would answer with: 503, retry later
    again = store.load(served, fold=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(again.model(x), model(x), rtol=1e-4, atol=1e-4)
    # A model first loaded by a request (left unchecked at start by an outage, verified by that load) is kept
    # as verified too: evicted from the LRU and asked for again, it needed the registry.
    store = ModelStore(cfg)
    [served], _ = store.discover()
    served.status = "unchecked"
    store.load(served, fold=True)
    store.tracker = Tracker("http://127.0.0.1:9", cfg.name)
    with torch.inference_mode():
        torch.testing.assert_close(store.load(served, fold=True).model(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_damaged_download_is_fetched_again(registered):
    """A downloaded checkpoint damaged on disk (it is kept for every replica on the node, across restarts) is
    downloaded again once, not a model failed for good."""
    cfg, _, _, model = registered
    store = ModelStore(cfg)
    [served], _ = store.discover()
    store.verify([served])
    cached = store.verified_files[served.alias]
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated
    again = store.load(served, fold=False)
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(again.model(x), model(x), rtol=1e-4, atol=1e-4)
    assert store.verified_files[served.alias].stat().st_size > 1000
    # Gone from the cache (another replica on the node removed it to fetch it again, the cache cleared): it was a
    # MissingCheckpointError, the model failed for the replica's life.
    cached = store.checkpoint_file(served)
    cached.unlink()  # ... after this replica found it, before it opened it
    with torch.inference_mode():
        torch.testing.assert_close(store.load(served, fold=False, path=cached).model(x), model(x), rtol=1e-4,
                                   atol=1e-4)


def test_a_model_unverifiable_at_start_for_a_passing_reason_is_served_once_the_outage_is_over(registered,
                                                                                              monkeypatch,
                                                                                              serve_replica_context):
    """A replica that starts while the registry is unreachable (after listing the versions): its models stay
    ``unchecked``, not failed for the replica's life, and are verified again until they load."""
    import asyncio
    import shutil

    from pipelines.serve import Classifier

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once: several rounds in the outage

    cfg, tracker, _, _ = registered
    store = ModelStore(cfg)
    models, registry_champion = store.discover()
    shutil.rmtree(store.cache_dir, ignore_errors=True)  # a node that has not downloaded the checkpoint yet
    store.tracker = Tracker("http://127.0.0.1:9", cfg.name)  # the outage begins: nothing listens on port 9
    store.verify(models)
    assert [(m.status, m.error.startswith("not verified yet: ")) for m in models] == [("unchecked", True)]
    replica = object.__new__(Classifier.func_or_class)  # the deployment's own methods, without Serve
    replica.store, replica.models, replica.registry_champion = store, models, registry_champion
    replica.cfg, replica.device, replica.loads, replica.load_expiries = cfg, torch.device("cpu"), {}, {}
    replica.by_alias = {m.alias: m for m in models}
    replica.champion = store.servable_champion(models, registry_champion)
    assert replica.champion is None

    async def outage_then_recovery():
        checking = asyncio.ensure_future(replica._verify_until_checked(interval_s=0.2))
        await asyncio.sleep(1.0)  # several rounds while still down
        assert models[0].status == "unchecked" and not checking.done()
        store.tracker = tracker  # the registry is back
        await asyncio.wait_for(checking, 60)

    replica._make_multiplexed_loader()
    asyncio.run(outage_then_recovery())
    assert models[0].status == "ok" and models[0].error is None
    assert replica.champion == "lenet5" == registry_champion
    assert replica._holds("lenet5")  # loaded before requests without a model went to it

    def unverified_at_start() -> None:  # verified again during an outage: unchecked, then the registry is back
        store.tracker = Tracker("http://127.0.0.1:9", cfg.name)
        shutil.rmtree(store.cache_dir, ignore_errors=True)
        store.verified_files.clear()
        store.verify(models)
        assert models[0].status == "unchecked"
        store.tracker = tracker

    # A request that failed the model for good while the next round waited: that round leaves it failed (the
    # round verified what was unchecked before its wait, and set the model back to "ok").
    unverified_at_start()

    async def failed_by_a_request_meanwhile():
        checking = asyncio.ensure_future(replica._verify_until_checked(interval_s=0.5))
        await asyncio.sleep(0.1)
        models[0].mark_failed(RuntimeError("CUDA error: an illegal memory access was encountered"))
        await asyncio.wait_for(checking, 60)

    asyncio.run(failed_by_a_request_meanwhile())
    assert models[0].status == "error" and "illegal memory access" in models[0].error

    # ... nor while the round's verification itself ran (in a thread: seconds, a download).
    unverified_at_start()
    verify = store.verify
    import time

    def slow_verify(pending):
        time.sleep(1.0)
        verify(pending)

    store.verify = slow_verify

    async def failed_while_the_round_verifies():
        checking = asyncio.ensure_future(replica._verify_until_checked(interval_s=0.1))
        await asyncio.sleep(0.6)  # the round's verification is in its thread now
        models[0].mark_failed(RuntimeError("CUDA error: an illegal memory access was encountered"))
        await asyncio.wait_for(checking, 60)

    asyncio.run(failed_while_the_round_verifies())
    assert models[0].status == "error" and "illegal memory access" in models[0].error

    # A round verifies in one of the replica's two load slots: with both held by requests' loads it waits (it
    # loaded a third model beside them, past the max_models_per_replica + 2 a replica is sized for).
    store.verify = verify
    unverified_at_start()
    replica._slots = None  # (this event loop's)

    async def verified_once_a_load_slot_is_free():
        slots, _, _ = replica._load_slots()
        await slots.acquire()
        await slots.acquire()
        checking = asyncio.ensure_future(replica._verify_until_checked(interval_s=0.1))
        await asyncio.sleep(1.0)
        assert models[0].status == "unchecked" and not checking.done()
        slots.release()
        await asyncio.wait_for(checking, 60)

    asyncio.run(verified_once_a_load_slot_is_free())
    assert models[0].status == "ok"


def test_which_load_failures_pass_and_which_stay():
    from mlflow.exceptions import MlflowException

    try:
        torch.empty(2**50, dtype=torch.uint8)  # the CPU allocator's own failure: a RuntimeError
    except RuntimeError as err:
        allocator_failure = err
    assert is_transient_load_error(allocator_failure) and is_transient_load_error(MemoryError())
    assert is_transient_load_error(MlflowException("API request to http://mlflow:5000 failed"))
    assert not is_transient_load_error(CheckpointError("checkpoint x is corrupt"))
    assert not is_transient_load_error(FileNotFoundError("x.pt"))
    assert is_transient_load_error(OSError(errno.EIO, "Input/output error"))  # the storage, not the file
    assert not is_transient_load_error(PermissionError(errno.EACCES, "Permission denied"))
    assert not is_transient_load_error(RuntimeError("Error(s) in loading state_dict for LeNet5"))


@pytest.mark.slow
def test_an_unreachable_artifact_store_can_pass_and_a_missing_checkpoint_or_deleted_version_cannot(registered,
                                                                                                   monkeypatch):
    """The registry answers, but a version's artifacts live on a server that does not: that can pass (503,
    verified again), where it used to read as "holds no weights-only checkpoint", failed for good. A version
    whose files are gone, or which was deleted in MLflow's UI, stays failed."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the unreachable store refuses at once
    cfg, tracker, _, _ = registered
    client, name = tracker.client, "elsewhere"
    client.create_registered_model(name)
    unreachable = client.create_model_version(name, source="http://127.0.0.1:9/api/2.0/mlflow-artifacts/artifacts/0")
    missing = client.create_model_version(name, source=str(Path(cfg.workdir) / "no-such-artifacts"))
    cache = Path(cfg.workdir) / "elsewhere-cache"
    with pytest.raises(Exception) as down:
        tracker.download_checkpoint(name, unreachable.version, cache)
    assert is_transient_load_error(down.value), repr(down.value)
    with pytest.raises(CheckpointError, match="holds no weights-only checkpoint") as gone:
        tracker.download_checkpoint(name, missing.version, cache)
    assert not is_transient_load_error(gone.value)
    with pytest.raises(Exception) as deleted:
        tracker.download_checkpoint(name, "99", cache)
    assert getattr(deleted.value, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"
    assert not is_transient_load_error(deleted.value)


def test_a_download_cut_short_by_a_full_disk_can_pass(registered, tmp_path):
    """A disk filling up while a replica downloads a checkpoint (here a file-size limit, EFBIG, in a child
    process) came back from MLflow as INTERNAL_ERROR, read as "holds no weights-only checkpoint": the model
    failed for good on that replica. The store lists the file, so it can pass; and the next download works."""
    import subprocess
    import sys
    import textwrap

    cfg, tracker, version, _ = registered
    cache = tmp_path / "cache"
    child = textwrap.dedent(f"""
        import resource, signal
        from pipelines.model_store import is_transient_load_error
        from pipelines.tracking import Tracker
        tracker = Tracker({tracker.tracking_uri!r}, "reg")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            tracker.download_checkpoint({cfg.registered_model_name!r}, {version!r}, {str(cache)!r})
        except Exception as err:
            print("FAILED", type(err).__name__, is_transient_load_error(err))
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert "FAILED MlflowException True" in done.stdout, done.stdout + done.stderr
    assert not list(cache.rglob("model.pt"))  # nothing half-written in the cache
    assert tracker.download_checkpoint(cfg.registered_model_name, version, cache).is_file()


def test_a_planted_pickle_is_never_executed_by_serving_or_the_pyfunc_loader(registered, tmp_path):
    cfg, tracker, version, model = registered
    name = cfg.registered_model_name
    # A second version, so the first one's files stay intact for the other tests.
    run_id = tracker.start_run("lenet5-planted", {"stage": "train"})
    source = tmp_path / "best"
    save_checkpoint(ModelCheckpoint(arch="lenet5", model_kwargs={}, spec=SPEC, state_dict=model.state_dict()),
                    source / "model.pt")
    planted_version = tracker.log_and_register(run_id, source, name, "planted", tags={"dataset": "digits"})
    try:  # (the other tests of the module serve the registered model's one alias, lenet5: whatever happens here)
        directory = artifact_dir(tracker, name, planted_version)
        marker = tmp_path / "pwned"
        for path in (directory / "python_model.pkl", directory / "artifacts" / "extra.pkl"):
            torch.save(PlantedCode(marker), path)
        mlflow.set_tracking_uri(cfg.tracking_uri)
        mlflow.set_registry_uri(cfg.tracking_uri)
        assert mlflow.pyfunc.load_model(f"models:/{name}@planted").predict(
            np.zeros((1, 1, 32, 32), np.float32)).shape == (1, 10)
        # Now the checkpoint itself: a pickle that runs code when unpickled.
        torch.save({"format": "cnnzoo.checkpoint", "version": 1, "payload": PlantedCode(marker)},
                   directory / "artifacts" / "model.pt")
        with pytest.raises(Exception, match="Unsupported global|unreadable"):
            mlflow.pyfunc.load_model(f"models:/{name}@planted")
        store = ModelStore(cfg)
        served = next(m for m in store.discover()[0] if m.alias == "planted")
        with pytest.raises(CheckpointError, match="unreadable or corrupt"):
            store.load(served)
        assert not marker.exists()
    finally:
        tracker.client.delete_registered_model_alias(name, "planted")


@pytest.fixture
def two_datasets(make_config, tmp_path):
    """One registered model with aliases from a digits run and from a fashion-mnist run of the same name."""
    cfg = make_config()
    tracker = Tracker.for_config(cfg)
    client, name = tracker.client, cfg.registered_model_name
    client.create_registered_model(name)
    source = tmp_path.as_uri()
    for alias, dataset, test_acc in (("lenet5", "digits", "0.99"), ("resnet18", "digits", "0.98"),
                                     ("alexnet", "fashion-mnist", "0.80"), ("lenet5", "fashion-mnist", "0.85")):
        version = client.create_model_version(name, source, tags={"test_acc": test_acc, "dataset": dataset})
        client.set_registered_model_alias(name, alias, version.version)  # lenet5 moves to fashion-mnist
    # A version registered before versions were tagged: its run's `dataset` param tells.
    run_id = tracker.start_run("old-vgg", {"stage": "train"})
    tracker.log_params(run_id, {"dataset": "digits"})
    old = client.create_model_version(name, source, run_id=run_id, tags={"test_acc": "0.995"})
    client.set_registered_model_alias(name, "vgg11_bn", old.version)
    return cfg, tracker


def test_only_versions_of_the_current_data_set_are_served_or_champion(two_datasets):
    cfg, _ = two_datasets
    digits = Tracker.for_config(cfg)
    fashion_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": "fashion-mnist"})})
    fashion = Tracker.for_config(fashion_cfg)
    name = cfg.registered_model_name
    assert fashion.update_champion(name) == ("lenet5", "4")
    assert [v.alias for v in fashion.registered_versions(name)[0]] == ["alexnet", "lenet5"]
    # The digits config sees only resnet18 (v2) and the old vgg11_bn: lenet5 now points at fashion-mnist.
    assert [v.alias for v in digits.registered_versions(name)[0]] == ["resnet18", "vgg11_bn"]
    assert digits.champion_alias(name) is None  # champion is a fashion-mnist version
    models, champion = ModelStore(fashion_cfg).discover()
    assert {m.alias: m.dataset for m in models} == {"alexnet": "fashion-mnist", "lenet5": "fashion-mnist"}
    assert champion == "lenet5"
    assert digits.update_champion(name) == ("vgg11_bn", "5")


def test_a_champion_left_on_other_data_is_removed_when_no_version_fits(two_datasets):
    cfg, tracker = two_datasets
    cifar_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": "cifar10"})})
    cifar = Tracker.for_config(cifar_cfg)
    name = cfg.registered_model_name
    tracker.update_champion(name)
    assert cifar.update_champion(name) is None
    assert CHAMPION not in tracker.client.get_registered_model(name).aliases
    assert ModelStore(cifar_cfg).discover() == ([], None)


def test_serving_falls_back_to_the_champion_the_registry_would_choose(make_config, tmp_path):
    """The champion's checkpoint fails to load: serving's stand-in is the next best by test_acc with ties broken
    by validation accuracy, as the registry's own choice (it went by test_acc alone, the first alias on a tie)."""
    cfg = make_config()
    tracker = Tracker.for_config(cfg)
    client, name = tracker.client, cfg.registered_model_name
    client.create_registered_model(name)
    for alias, test_acc, val_acc in (("alexnet", "0.91", "0.90"), ("vgg11_bn", "0.91", "0.93"),
                                     ("resnet18", "0.95", "0.94")):
        version = client.create_model_version(name, tmp_path.as_uri(), tags={
            "test_acc": test_acc, "best_val_acc": val_acc, "dataset": "digits"})
        client.set_registered_model_alias(name, alias, version.version)
    assert tracker.update_champion(name) == ("resnet18", "3")
    models, champion = ModelStore(cfg).discover()
    assert {m.alias: m.val_acc for m in models} == {"alexnet": 0.90, "vgg11_bn": 0.93, "resnet18": 0.94}
    for model in models:
        model.status = "error" if model.alias == champion else "ok"
    assert ModelStore.servable_champion(models, champion) == "vgg11_bn"
    client.delete_registered_model_alias(name, "resnet18")  # the registry agrees once the champion is gone
    assert tracker.update_champion(name) == ("vgg11_bn", "2")


def test_the_champion_is_chosen_among_versions_tested_on_the_same_images(make_config, tmp_path):
    """Another data.seed or data.test_fraction (digits, an image folder without test/) draws other test images,
    some of them the new models' training images: an older version's test accuracy on its own test split kept the
    champion alias against this training's."""
    from pipelines.data import describe_dataset

    cfg = make_config()
    tracker = Tracker.for_config(cfg)
    client, name = tracker.client, cfg.registered_model_name
    client.create_registered_model(name)
    first = describe_dataset(cfg.data).test_split
    reseeded = describe_dataset(cfg.data.model_copy(update={"seed": 1})).test_split
    assert first and reseeded and first != reseeded
    assert describe_dataset(cfg.data).test_split == first  # the same images: the same identity
    for alias, test_acc, split in (("legacy", "0.999", None), ("lenet5", "0.99", first),
                                   ("resnet18", "0.95", reseeded)):
        tags = {"test_acc": test_acc, "dataset": "digits", **({"test_split": split} if split else {})}
        version = client.create_model_version(name, tmp_path.as_uri(), tags=tags)
        client.set_registered_model_alias(name, alias, version.version)
    client.delete_registered_model_alias(name, "legacy")
    assert tracker.update_champion(name) == ("resnet18", "3")  # the newest version's test images by default
    assert tracker.update_champion(name, test_split=first) == ("lenet5", "2")
    client.set_registered_model_alias(name, "legacy", "1")  # a version that names no test images still counts
    assert tracker.update_champion(name, test_split=reseeded) == ("legacy", "1")
    # Serving's stand-in for a champion that fails to load is chosen as the registry chooses: lenet5's 0.99 was
    # measured on other test images than the champion's.
    tracker.client.set_model_version_tag(name, "1", "test_split", reseeded)
    models, champion = ModelStore(cfg).discover()
    assert champion == "legacy" and {m.alias: m.test_split for m in models}["resnet18"] == reseeded
    for model in models:
        model.status = "error" if model.alias == champion else "ok"
    assert ModelStore.servable_champion(models, champion) == "resnet18"
    # None tested on the champion's images loaded: the best of the others, not no default model (a 503 for every
    # request without a model, while lenet5 served).
    for model in models:
        model.status = "ok" if model.alias == "lenet5" else "error"
    assert ModelStore.servable_champion(models, champion) == "lenet5"


def test_an_imagefolder_version_counts_only_for_its_own_root(make_config, tmp_path):
    roots = [tmp_path / "cats", tmp_path / "cars"]
    for root in roots:
        (root / "a").mkdir(parents=True)
    cfg = make_config("data.dataset=imagefolder", f"data.root={roots[0]}")
    tracker = Tracker.for_config(cfg)
    name = cfg.registered_model_name
    tracker.client.create_registered_model(name)
    for alias, root in (("resnet18", roots[0]), ("lenet5", roots[1])):
        version = tracker.client.create_model_version(name, tmp_path.as_uri(), tags={
            "test_acc": "0.9", "dataset": "imagefolder", "data_root": str(root)})
        tracker.client.set_registered_model_alias(name, alias, version.version)
    assert [v.alias for v in tracker.registered_versions(name)[0]] == ["resnet18"]



def test_registration_retried_through_an_artifact_outage_leaves_one_logged_model(tmp_path, monkeypatch):
    """MLflow creates the logged model before it uploads: each attempt of a registration retried while the
    artifact store failed left a FAILED logged model behind (hundreds in an hour of retries). And an upload
    that went through before the registry failed is registered, not uploaded again."""
    import mlflow

    from pipelines.config import load_config

    cfg = load_config(None, [f"workdir={tmp_path}", "name=flaky"])
    store = tmp_path / "artifact-store"
    store.write_text("a file where the artifact store should be: every upload fails")
    tracker = Tracker(cfg.tracking_uri, "flaky", artifact_root=(store / "artifacts").as_uri())
    model = cnnmodels.create_model("lenet5", num_classes=10, in_chans=1)
    save_checkpoint(ModelCheckpoint(arch="lenet5", model_kwargs={}, spec=SPEC, state_dict=model.state_dict(),
                                    model_name="lenet5"), tmp_path / "best" / "model.pt")
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    tags = {"dataset": "digits", "fingerprint": "abc12345", "epochs": 3}
    for _ in range(3):
        with pytest.raises(OSError):
            tracker.log_and_register(run_id, tmp_path / "best", "flaky", "lenet5", tags=tags)
    store.unlink()  # the artifact store is back

    def logged_models():
        experiment_id = tracker.client.get_run(run_id).info.experiment_id
        return tracker.client.search_logged_models(experiment_ids=[experiment_id],
                                                   filter_string=f"source_run_id = '{run_id}'")

    real_register = mlflow.register_model

    def registry_down(*args, **kwargs):
        raise ConnectionError("the registry went down after the upload")

    monkeypatch.setattr(mlflow, "register_model", registry_down)
    with pytest.raises(ConnectionError):
        tracker.log_and_register(run_id, tmp_path / "best", "flaky", "lenet5", tags=tags)
    monkeypatch.setattr(mlflow, "register_model", real_register)
    [uploaded] = [m for m in logged_models() if str(m.status) == "READY"]
    version = tracker.log_and_register(run_id, tmp_path / "best", "flaky", "lenet5", tags=tags)
    assert [m.model_id for m in logged_models()] == [uploaded.model_id]  # the failed attempts' are gone
    registered = tracker.client.get_model_version("flaky", version)
    assert registered.source == f"models:/{uploaded.model_id}" and registered.run_id == run_id


def test_a_retried_registration_adds_no_second_version(tmp_path):
    """A registration retried after it went through (its reply lost, or the alias not set) finds its version
    and sets the alias, instead of registering the same training twice; another training of the run (more
    epochs) is a new version."""
    from pipelines.config import load_config

    cfg = load_config(None, [f"workdir={tmp_path}", "name=retry"])
    model = cnnmodels.create_model("lenet5", num_classes=10, in_chans=1)
    save_checkpoint(ModelCheckpoint(arch="lenet5", model_kwargs={}, spec=SPEC, state_dict=model.state_dict(),
                                    model_name="lenet5"), tmp_path / "best" / "model.pt")
    tracker = Tracker.for_config(cfg)
    run_id = tracker.start_run("lenet5", {"stage": "train"})
    tags = {"dataset": "digits", "fingerprint": "abc12345", "epochs": 3}
    first = tracker.log_and_register(run_id, tmp_path / "best", "retry", "lenet5", tags=tags)
    tracker.client.delete_registered_model_alias("retry", "lenet5")  # as if the alias had not been set
    assert tracker.log_and_register(run_id, tmp_path / "best", "retry", "lenet5", tags=tags) == first
    assert str(tracker.client.get_model_version_by_alias("retry", "lenet5").version) == first
    longer = tracker.log_and_register(run_id, tmp_path / "best", "retry", "lenet5", tags={**tags, "epochs": 6})
    assert longer != first
    assert len(tracker.client.search_model_versions("name = 'retry'")) == 2


def test_a_replica_started_while_the_registry_is_down_serves_what_its_app_was_built_with(registered, monkeypatch):
    """A replica replaced (or added by autoscaling) during an MLflow outage could not start: it listed the
    registry itself in its constructor. The app now carries the list, settled once where it is built, and the
    cached checkpoint is found by its key without asking the registry."""
    import asyncio
    from dataclasses import asdict

    from pipelines.serve import Classifier, _portable_config

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg, _, version, model = registered
    store = ModelStore(cfg)
    models, champion = store.discover()
    store.verify(models)  # the first replica on this node downloaded the checkpoint into the node's cache
    assert models[0].cache_key and champion == "lenet5"
    down = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": "http://127.0.0.1:9"})})
    with pytest.raises(Exception) as unreachable:  # the outage: nothing listens on port 9
        ModelStore(down).discover()
    assert is_transient_load_error(unreachable.value)

    import pipelines.serve

    # Without Serve there is no replica context for its LRU of loaded models: loads go straight to the store.
    monkeypatch.setattr(pipelines.serve.serve, "multiplexed", lambda **options: lambda load: load)

    async def start_a_replica():
        replica = object.__new__(Classifier.func_or_class)  # the deployment's own constructor, without Serve
        await replica.__init__(_portable_config(down), None, [asdict(m) for m in models], champion)
        replica.reverifying.cancel()
        return replica

    replica = asyncio.run(start_a_replica())
    assert [(m.alias, m.version, m.status) for m in replica.models] == [("lenet5", version, "ok")]
    assert replica.champion == "lenet5"
    loaded = replica.store.load(replica.by_alias["lenet5"], fold=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=1e-4, atol=1e-4)


def test_serving_refuses_a_decode_budget_below_a_registered_models_input(tmp_path):
    """serve.max_resized_pixels was checked against data.image_size only: a model with a larger input
    (EfficientNet-B4's 380 px, a searched member's) refused every request with a 400."""
    from pipelines.config import ConfigError, load_config
    from pipelines.serve import serve_stage

    # (Models the config trains are checked when it loads; the registry can hold others, trained before.)
    cfg = load_config(None, [f"workdir={tmp_path}", "name=budget", "data.image_size=16",
                             "serve.max_resized_pixels=300", "train.models=[resnet18]", "search.phis=[]"])
    tracker = Tracker.for_config(cfg)
    tracker.client.create_registered_model("budget")
    for alias, size in (("lenet5", 32), ("efficientnet_phi1", 18), ("resnet18", 16)):
        version = tracker.client.create_model_version("budget", tmp_path.as_uri(), tags={
            "test_acc": "0.9", "dataset": "digits", "input_size": str(size)})
        tracker.client.set_registered_model_alias("budget", alias, version.version)
    with pytest.raises(ConfigError, match=r"serve.max_resized_pixels: 300 is below the input of "
                                          r"efficientnet_phi1 \(18 px\), lenet5 \(32 px\).*at least 1,024"):
        serve_stage(cfg)  # refused before Serve starts
