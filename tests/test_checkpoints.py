"""Checkpoints: round trip, and every kind of corruption refused before a model is handed out."""

from __future__ import annotations

import errno

import pytest
import torch
from conftest import PlantedCode

import cnnmodels
from pipelines.checkpoints import (
    CheckpointError,
    MissingCheckpointError,
    ModelCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipelines.preprocess import PreprocessSpec

SPEC = PreprocessSpec(image_size=32, channels=1, mean=(0.3,), std=(0.4,), class_names=tuple("0123456789"))


def _checkpoint(arch="lenet5", **kwargs):
    model = cnnmodels.create_model(arch, num_classes=10, in_chans=1, **kwargs)
    return ModelCheckpoint(arch=arch, model_kwargs=kwargs, spec=SPEC, state_dict=model.state_dict(), epoch=3,
                           metrics={"val_acc": 0.5}, model_name=arch), model


def test_round_trip_rebuilds_the_same_model(tmp_path):
    checkpoint, model = _checkpoint("resnet18", small_input=True)
    path = save_checkpoint(checkpoint, tmp_path / "model.pt")
    loaded = load_checkpoint(path)
    assert loaded.arch == "resnet18" and loaded.epoch == 3 and loaded.spec == SPEC
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.build_model()(x), model.eval()(x))
    assert load_checkpoint(tmp_path).arch == "resnet18"  # a directory holding model.pt works too


def test_a_load_builds_its_model_once_and_each_build_is_a_new_model(tmp_path, monkeypatch):
    """The model built to verify the weights is the first one handed out: every load built it twice, and the
    random initialisation of the discarded copy was most of a replica's load (about 2 s for vgg16)."""
    checkpoint, model = _checkpoint("resnet18", small_input=True)
    path = save_checkpoint(checkpoint, tmp_path / "model.pt")
    built = []
    create = ModelCheckpoint.create_model
    monkeypatch.setattr(ModelCheckpoint, "create_model", lambda self: built.append(1) or create(self))
    loaded = load_checkpoint(path)
    first, second = loaded.build_model(), loaded.build_model()
    assert len(built) == 2 and first is not second and not first.training and not second.training
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(first(x), model.eval()(x))
        torch.testing.assert_close(second(x), model(x))
    import dataclasses

    assert dataclasses.replace(load_checkpoint(path), training_state=None)._verified_model is None
    assert load_checkpoint(path, keep_model=False)._verified_model is None  # (registration builds none)


def test_truncated_and_garbage_files_are_refused(tmp_path):
    path = save_checkpoint(_checkpoint()[0], tmp_path / "model.pt")
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 100)
    for name in ("truncated.pt", "garbage.pt", "missing.pt"):
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / name)


def test_a_checkpoint_cut_short_anywhere_is_corrupt_not_a_storage_error(tmp_path):
    """torch's reader fails many truncated archives with a bare OSError(EINVAL), which passed for the storage's
    passing state: a served model stayed "not verified yet" for ever (its cached copy never fetched again),
    a registration was retried for ever, a resume failed naming no file."""
    data = save_checkpoint(_checkpoint()[0], tmp_path / "model.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    for percent in range(1, 100):
        cut.write_bytes(data[: len(data) * percent // 100])
        with pytest.raises(CheckpointError, match="cut.pt"):
            load_checkpoint(cut, verify=False)
    cut.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"\(0 bytes\)"):
        load_checkpoint(cut)


def test_changed_weight_bytes_are_refused_by_their_crc(tmp_path):
    """torch.load checks none of the CRC-32s torch.save writes: weights changed on disk (a bad sector, a bit
    flip) that stay finite loaded and served as the model."""
    checkpoint, _ = _checkpoint()
    path = save_checkpoint(checkpoint, tmp_path / "model.pt")
    data = bytearray(path.read_bytes())
    weights = checkpoint.state_dict["c3.weight"].numpy().tobytes()
    start = bytes(data).find(weights)
    assert start > 0
    for offset in range(3, 64, 4):  # the sign bits of 16 float32 weights (little-endian): still finite
        data[start + offset] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        load_checkpoint(path)


def test_a_saved_checkpoint_is_readable_as_the_umask_allows(tmp_path):
    """A temporary file's 0600 followed the checkpoint into MLflow's artifact store, unreadable to a tracking
    server or a replica running as another user."""
    import os

    from pipelines.paths import write_text_atomically

    previous = os.umask(0o022)
    try:
        path = save_checkpoint(_checkpoint()[0], tmp_path / "model.pt")
        # The same for the report, the search result and the train records (they were 0600: other users of a
        # shared workdir could not read them, nor an MLflow server running as another user their copies).
        record = write_text_atomically(tmp_path / "report" / "models.csv", "a,b\n")
        os.umask(0o077)
        private = write_text_atomically(tmp_path / "private.json", "{}")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644 and record.stat().st_mode & 0o777 == 0o644
    assert private.stat().st_mode & 0o777 == 0o600 and record.read_text() == "a,b\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "private.json", "report"]


@pytest.mark.parametrize("failure", [OSError(errno.EIO, "Input/output error"),
                                     RuntimeError("DefaultCPUAllocator: can't allocate memory")])
def test_a_failing_storage_or_memory_is_not_a_corrupt_checkpoint(tmp_path, monkeypatch, failure):
    """An NFS mount's EIO, or the memory running out, while a good checkpoint is read: that can pass, so it is
    raised as itself. As a CheckpointError ("corrupt") it dropped the model's registration for good and marked
    the model unregistrable in its record, so no later run registered it."""
    path = save_checkpoint(_checkpoint()[0], tmp_path / "model.pt")

    def failing_load(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(type(failure)) as raised:
        load_checkpoint(path)
    assert raised.value is failure and not isinstance(raised.value, CheckpointError)


@pytest.mark.parametrize("failure", [PermissionError(errno.EACCES, "Permission denied"),
                                     IsADirectoryError(errno.EISDIR, "Is a directory")])
def test_an_unreadable_checkpoint_stays_a_checkpoint_error(tmp_path, monkeypatch, failure):
    """What no retry changes (a file this user may not read) is not a passing storage error: retried, its
    registration held up every write behind it, in every later command."""
    path = save_checkpoint(_checkpoint()[0], tmp_path / "model.pt")

    def failing_load(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_a_checkpoint_removed_while_it_is_opened_is_missing_not_corrupt(tmp_path, monkeypatch):
    path = save_checkpoint(_checkpoint()[0], tmp_path / "model.pt")
    real_load = torch.load

    def removed_first(file, *args, **kwargs):
        path.unlink()  # another replica clearing the download cache, between the check and the open
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", removed_first)
    with pytest.raises(MissingCheckpointError):
        load_checkpoint(path)


def test_pickled_code_is_refused_by_weights_only_loading(tmp_path):
    # A well-formed torch archive (not a bare pickle, which torch would refuse for its format alone): only
    # weights_only loading stands between this payload and running its code.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "cnnzoo.checkpoint", "version": 1, "state_dict": PlantedCode(marker)}, path)
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: loaded without the guard, it runs
    assert marker.exists()


def test_mismatched_and_non_finite_weights_are_refused(tmp_path):
    checkpoint, _ = _checkpoint()
    wrong_arch = ModelCheckpoint(**{**checkpoint.__dict__, "arch": "alexnet"})
    with pytest.raises(CheckpointError, match="does not fit architecture 'alexnet'"):
        load_checkpoint(save_checkpoint(wrong_arch, tmp_path / "a.pt"))
    poisoned = dict(checkpoint.state_dict)
    poisoned["c1.weight"] = torch.full_like(poisoned["c1.weight"], float("nan"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(save_checkpoint(ModelCheckpoint(**{**checkpoint.__dict__, "state_dict": poisoned}),
                                        tmp_path / "b.pt"))
    torch.save({"format": "something else"}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="not a cnnzoo checkpoint"):
        load_checkpoint(tmp_path / "c.pt")


def test_integer_weights_are_refused_and_half_precision_ones_load(tmp_path):
    """load_state_dict converts integer weights into the model's float ones without a word: every weight truncated
    to a whole number (LeNet-5's to zero) served one class for every image."""
    checkpoint, _ = _checkpoint()
    as_integers = {k: v.to(torch.int64) if v.is_floating_point() else v for k, v in checkpoint.state_dict.items()}
    with pytest.raises(CheckpointError, match=r"weights 'c1.weight' are torch.int64, not floating point"):
        load_checkpoint(save_checkpoint(ModelCheckpoint(**{**checkpoint.__dict__, "state_dict": as_integers}),
                                        tmp_path / "int.pt"))
    as_half = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint.state_dict.items()}
    model = load_checkpoint(save_checkpoint(ModelCheckpoint(**{**checkpoint.__dict__, "state_dict": as_half}),
                                            tmp_path / "half.pt")).build_model()
    assert model.c1.weight.dtype == torch.float32
    assert torch.equal(model.c1.weight, checkpoint.state_dict["c1.weight"].half().float())


def test_finite_weights_whose_outputs_are_not_are_refused(tmp_path):
    """A flipped sign in a batch norm's running variance is finite, but makes every output NaN; and a spec whose
    input size the model cannot take (LeNet-5 at 64 px) would fail on every request."""
    checkpoint, _ = _checkpoint("resnet18", small_input=True)
    flipped = dict(checkpoint.state_dict)
    flipped["bn1.running_var"] = -flipped["bn1.running_var"]
    with pytest.raises(CheckpointError, match="outputs are NaN or infinite"):
        load_checkpoint(save_checkpoint(ModelCheckpoint(**{**checkpoint.__dict__, "state_dict": flipped}),
                                        tmp_path / "flipped.pt"))
    lenet, _ = _checkpoint()
    too_large = ModelCheckpoint(**{**lenet.__dict__, "spec": PreprocessSpec(**{**SPEC.to_dict(), "image_size": 64})})
    with pytest.raises(CheckpointError, match="lenet5 takes inputs of at most 35x35 pixels, got 64x64"):
        load_checkpoint(save_checkpoint(too_large, tmp_path / "large.pt"))


def test_save_is_atomic(tmp_path):
    checkpoint, _ = _checkpoint()
    path = save_checkpoint(checkpoint, tmp_path / "model.pt")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind
    # A save that fails part-way (an unpicklable training state) leaves the previous checkpoint whole: a plain
    # torch.save onto the path would already have truncated it.
    broken = ModelCheckpoint(**{**checkpoint.__dict__, "epoch": 4, "training_state": {"step": lambda: 0}})
    with pytest.raises(Exception, match="pickle|lambda"):
        save_checkpoint(broken, path)
    assert load_checkpoint(path).epoch == 3
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_atomic_write_follows_a_link_and_reaches_the_disk_before_its_rename(tmp_path, monkeypatch):
    """A linked record (a workdir's file linked elsewhere) became a plain file and the file it named kept the old
    text; and nothing was synced before the rename, which after a power loss can show the file empty."""
    import os

    from pipelines import paths
    from pipelines.paths import write_text_atomically

    target = tmp_path / "shared" / "best.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "best.json"
    link.symlink_to(target)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(paths.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                       real_fsync(fd))[1])
    monkeypatch.setattr(paths.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    write_text_atomically(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].endswith(".tmp") and events[1][1] == str(target) and events[2][1] == str(target.parent)


def test_generator_states_round_trip_weights_only(tmp_path):
    import random

    import numpy as np

    from pipelines.checkpoints import capture_rng_state, load_rng_state, restore_rng_state, save_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state: it must travel too
    save_rng_state(tmp_path, 1, capture_rng_state(torch.device("cpu")))
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_rng_state(tmp_path, 1), torch.device("cpu"))
    again = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


def test_a_checkpoint_without_generator_states_still_loads(tmp_path):
    """Checkpoints written before the generator states existed: the model loads, the state is simply absent;
    another rank's file or a malformed one is refused."""
    from pipelines.checkpoints import capture_rng_state, load_rng_state, rng_state_file, save_rng_state

    save_checkpoint(_checkpoint()[0], tmp_path / "model.pt")
    assert load_checkpoint(tmp_path).epoch == 3 and load_rng_state(tmp_path, 0) is None
    save_rng_state(tmp_path, 1, capture_rng_state())
    (tmp_path / rng_state_file(1)).rename(tmp_path / rng_state_file(0))
    with pytest.raises(CheckpointError, match="rank 0"):
        load_rng_state(tmp_path, 0)
    (tmp_path / rng_state_file(2)).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="rng_state_rank2.pt .* not a checkpoint archive"):
        load_rng_state(tmp_path, 2)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p["spec"].pop("mean"), "invalid preprocessing spec: KeyError"),
    (lambda p: p["spec"].update(std=[float("nan")]), "must be finite"),
    (lambda p: p["spec"].update(mean=[float("inf")]), "must be finite"),
    (lambda p: p["state_dict"].update({7: torch.zeros(1)}), "keys that are not parameter names"),
    (lambda p: p.update(metrics={"val_acc": "high"}), "must map names to numbers"),
    (lambda p: p.update(training_state=[1, 2]), "'training_state' has the wrong type"),
    (lambda p: p["spec"].update(class_names="0123456789"), "class_names must be a list"),
])
def test_a_foreign_or_hand_edited_checkpoint_is_refused_with_a_checkpoint_error(tmp_path, damage, message):
    """Each of these crashed with a KeyError or AttributeError traceback, or (NaN normalisation) loaded and
    answered every request with NaN scores."""
    payload = _checkpoint()[0].to_payload()
    damage(payload)
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "model.pt")


@pytest.mark.parametrize(("layout", "message"), [
    (lambda t: t.to("meta"), "on meta"),
    (lambda t: t.to_sparse(), "sparse"),
    (lambda t: t.to(torch.complex64), "complex64"),
])
def test_a_weight_that_is_not_a_dense_real_tensor_is_a_checkpoint_error(tmp_path, layout, message):
    """A meta or sparse weight failed the check with a bare RuntimeError or NotImplementedError, which the
    registration took for a passing failure and retried for ever; a complex one loaded without its imaginary
    part."""
    payload = _checkpoint()[0].to_payload()
    payload["state_dict"]["c1.weight"] = layout(payload["state_dict"]["c1.weight"])
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=f"'c1.weight' is not a dense real tensor .*{message}"):
        load_checkpoint(tmp_path / "model.pt")


def test_a_folder_in_place_of_the_checkpoint_file_is_unreadable_not_missing(tmp_path):
    """Named as the file or as the folder holding it: "does not exist" read as a storage that may come back (a
    registration retried for ever)."""
    from pipelines.checkpoints import UnreadableCheckpointError

    (tmp_path / "model.pt").mkdir()
    for path in (tmp_path, tmp_path / "model.pt"):
        with pytest.raises(UnreadableCheckpointError, match="is a directory"):
            load_checkpoint(path)


@pytest.mark.parametrize(("key", "value"), [("torch", torch.zeros(5)), ("python", (3, (1, 2), None)),
                                            ("numpy", ("MT19937", torch.zeros(3, dtype=torch.int64), 0, 0, 0.0)),
                                            ("cuda", [1, 2])])
def test_malformed_generator_states_are_refused_and_change_no_generator(tmp_path, key, value):
    """They loaded, then failed the resume with a bare TypeError or ValueError naming no file, at every attempt,
    after Python's generator had already been set from the file."""
    import random

    from pipelines.checkpoints import capture_rng_state, load_rng_state, save_rng_state

    state = capture_rng_state()
    state[key] = value
    save_rng_state(tmp_path, 0, state)
    random.seed(5)
    expected = random.random()
    random.seed(5)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'rng_state_rank0.pt'}"):
        load_rng_state(tmp_path, 0)
    assert random.random() == expected


@pytest.mark.parametrize(("field", "value"), [("interpolation", "Bilinear"), ("image_size", 0), ("background", "white"),
                                            ("background", 12.5), ("background", 300), ("class_names", (1, 2)),
                                            ("class_names", ("0", "")), ("dataset", 7)])
def test_a_spec_no_request_could_use_is_refused_at_load(tmp_path, field, value):
    """A spec that loaded but fails on every image made every request a 400 (the client's fault) while
    /healthz said ok; refused at load, the model is reported failed instead."""
    import copy
    import dataclasses

    spec = copy.copy(SPEC)
    object.__setattr__(spec, field, value)  # as a hand-edited or foreign checkpoint would carry it
    path = save_checkpoint(dataclasses.replace(_checkpoint()[0], spec=spec), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=field):
        load_checkpoint(path)



def _trained_checkpoint():
    """lenet5 after one SGD step with momentum, as a checkpoint with its optimizer state and history."""
    import dataclasses

    trained = cnnmodels.create_model("lenet5", num_classes=10, in_chans=1)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    trained(torch.randn(4, 1, 32, 32)).sum().backward()
    optimizer.step()
    return dataclasses.replace(_checkpoint()[0], state_dict=trained.state_dict(), training_state={
        "optimizer": optimizer.state_dict(), "scaler": {}, "history": [{"epoch": 3}]}), optimizer


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_a_resumed_run_gets_its_weights_momentum_and_history_and_steps_on_its_device(device):
    """torch puts loaded optimizer state where the parameters are at that moment: loaded before the model moved
    to its GPU, the momentum stayed on the CPU and the resumed run failed at its first step. A CPU run saves an
    empty scaler state, which an enabled scaler (fp16 on a GPU) refused."""
    from pipelines.worker import load_training_state

    checkpoint, trained_optimizer = _trained_checkpoint()
    model = cnnmodels.create_model("lenet5", num_classes=10, in_chans=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=device == "cuda")
    history = load_training_state(checkpoint, model, optimizer, scaler, torch.device(device))
    assert history == [{"epoch": 3}]
    saved = trained_optimizer.state_dict()["state"]
    for index, parameter in enumerate(model.parameters()):
        momentum = optimizer.state[parameter]["momentum_buffer"]
        assert parameter.device == momentum.device and parameter.device.type == device
        torch.testing.assert_close(momentum.cpu(), saved[index]["momentum_buffer"])
    model(torch.randn(4, 1, 32, 32, device=device)).sum().backward()
    optimizer.step()  # on a GPU this raised "Expected all tensors to be on the same device"


def test_a_run_resumes_from_its_own_checkpoint_only(tmp_path):
    """Ray hands a restarted run its latest checkpoint: this model's is resumed, another model's (a run
    directory reused by hand) ignored, and one that is not there fails the attempt (Ray tries again)."""
    from types import SimpleNamespace

    import ray.train

    from pipelines.checkpoints import MissingCheckpointError
    from pipelines.worker import checkpoint_to_resume

    storage = tmp_path / "storage"
    checkpoint, _ = _checkpoint("lenet5")
    save_checkpoint(checkpoint, storage / "lenet5-run" / "checkpoint_000003" / "model.pt")
    latest = ray.train.Checkpoint(str(storage / "lenet5-run" / "checkpoint_000003"))
    run = SimpleNamespace(model_name="lenet5", arch="lenet5", storage_path=str(storage),
                          hyper=SimpleNamespace(epochs=6))

    assert checkpoint_to_resume(None, run, rank=0) == (None, None)
    resumed, rng_state = checkpoint_to_resume(latest, run, rank=0)
    assert resumed.epoch == 3 and rng_state is None  # written without generator states
    other = SimpleNamespace(model_name="resnet18", arch="resnet18", storage_path=str(storage))
    assert checkpoint_to_resume(latest, other, rank=0) == (None, None)  # a run directory reused by hand
    # An interrupted longer run of the same settings, resumed with fewer epochs: refused, not recorded as a
    # 3-epoch run (it would have recorded a model trained 4 epochs on a longer schedule).
    shorter = SimpleNamespace(**{**vars(run), "hyper": SimpleNamespace(epochs=3)})
    with pytest.raises(RuntimeError, match="checkpoint is of epoch 4, beyond train.epochs=3"):
        checkpoint_to_resume(latest, shorter, rank=0)
    assert checkpoint_to_resume(latest, SimpleNamespace(**{**vars(run), "hyper": SimpleNamespace(epochs=4)}),
                                rank=0)[0].epoch == 3  # at its end: a run that only registers
    # A damaged meta.json (a disk filled while it was written) failed every attempt with a JSONDecodeError: the
    # checkpoint itself says whose it is.
    from pipelines.worker import CHECKPOINT_META

    for damaged in ('{"model_name": "len', "[1, 2]"):
        (storage / "lenet5-run" / "checkpoint_000003" / CHECKPOINT_META).write_text(damaged)
        assert checkpoint_to_resume(latest, run, rank=0)[0].epoch == 3
        assert checkpoint_to_resume(latest, other, rank=0) == (None, None)

    (storage / "lenet5-run" / "checkpoint_000003" / "model.pt").unlink()
    with pytest.raises(MissingCheckpointError):
        checkpoint_to_resume(latest, run, rank=0)
