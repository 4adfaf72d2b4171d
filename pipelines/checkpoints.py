"""Model checkpoints: one file with everything needed to rebuild, resume, evaluate and serve a model.

A checkpoint holds the architecture name and its ``create_model`` keyword arguments, the weights, the
preprocessing spec (so serving applies exactly what training used), the epoch and its metrics, and
optionally the optimizer/scaler state for resuming. Files are written atomically and read with
``torch.load(weights_only=True)``; anything malformed, truncated, non-finite or not matching its
architecture is refused with :class:`CheckpointError` before a model is handed out.

Beside it, every training worker (DDP rank) writes its random-number generators' states
(``rng_state_rank<N>.pt``: Python's ``random``, NumPy's global generator, torch's CPU generator and, on a
GPU, its CUDA generator): a resumed run continues their streams, so it draws what an uninterrupted run
would have drawn. Checkpoints written before these files existed still load; they resume without them.
"""

from __future__ import annotations

import errno
import numbers
import os
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

import cnnmodels

from .paths import atomic_writer
from .preprocess import PreprocessSpec, is_out_of_memory

__all__ = ["ModelCheckpoint", "CheckpointError", "UnreadableCheckpointError", "save_checkpoint", "load_checkpoint",
           "check_archive",
           "CHECKPOINT_FILE", "capture_rng_state", "restore_rng_state", "save_rng_state", "load_rng_state",
           "rng_state_file"]

CHECKPOINT_FILE = "model.pt"
_FORMAT = "cnnzoo.checkpoint"
_VERSION = 1
_RNG_FORMAT = "cnnzoo.rng_state"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted; nothing was loaded from it."""


class MissingCheckpointError(CheckpointError):
    """No checkpoint file at the path: unlike a corrupt one, it may appear (a storage mount that is back)."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file this process may not read (its permissions, a directory in its place): no retry changes
    that, but nothing says the checkpoint itself is bad, so its model is not marked as unregistrable."""


@dataclass
class ModelCheckpoint:
    arch: str
    model_kwargs: dict[str, Any]
    spec: PreprocessSpec
    state_dict: dict[str, torch.Tensor]
    epoch: int = -1
    metrics: dict[str, float] = field(default_factory=dict)
    model_name: str = ""
    training_state: dict[str, Any] | None = None
    #: The model :func:`load_checkpoint` built to verify the weights, handed out by the first
    #: :meth:`build_model`: building a model is mostly its random initialisation (about 2 s for vgg16 on a CPU),
    #: which every load paid twice.
    _verified_model: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    def create_model(self) -> nn.Module:
        """A fresh model of this checkpoint's architecture (random weights)."""
        return cnnmodels.create_model(
            self.arch, num_classes=self.spec.num_classes, in_chans=self.spec.channels, **self.model_kwargs
        )

    def build_model(self) -> nn.Module:
        """The model with this checkpoint's weights, in eval mode: a new one at each call."""
        if self._verified_model is not None:
            model, self._verified_model = self._verified_model, None
            return model
        model = self.create_model()
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()

    def to_payload(self) -> dict[str, Any]:
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "arch": self.arch,
            "model_name": self.model_name or self.arch,
            "model_kwargs": dict(self.model_kwargs),
            "spec": self.spec.to_dict(),
            "state_dict": self.state_dict,
            "epoch": int(self.epoch),
            "metrics": {k: float(v) for k, v in self.metrics.items()},
        }
        if self.training_state is not None:
            payload["training_state"] = self.training_state
        return payload


def save_checkpoint(checkpoint: ModelCheckpoint, path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (a reader never sees a half-written file), readable as the
    umask allows."""
    with atomic_writer(path, binary=True) as f:
        torch.save(checkpoint.to_payload(), f)
    return Path(path)


def _require(payload: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in payload:
        raise CheckpointError(f"checkpoint has no {key!r} entry")
    value = payload[key]
    if not isinstance(value, kind):
        raise CheckpointError(f"checkpoint entry {key!r} has the wrong type ({type(value).__name__})")
    return value


def load_checkpoint(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True,
    keep_model: bool = True,
) -> ModelCheckpoint:
    """Read and validate a checkpoint file (or a directory holding ``model.pt``).

    With ``verify`` (default) the weights are also loaded into a fresh model of the recorded architecture
    (strict) and checked to be finite, so a checkpoint that returns from here is known to be servable. That model
    is the first :meth:`ModelCheckpoint.build_model` hands out; ``keep_model=False`` lets it go at once (a caller
    that builds none: a second copy of the weights held for nothing).
    """
    path = Path(path)
    if path.is_dir() and path.name != CHECKPOINT_FILE:
        path = path / CHECKPOINT_FILE
    if path.is_dir():  # not "does not exist": a storage mount's gap passes, a folder in its place stays
        raise UnreadableCheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise MissingCheckpointError(f"checkpoint {path} does not exist")
    check_archive(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt archives
        _raise_read_error(path, err)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a cnnzoo checkpoint")
    if payload.get("version") != _VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')!r}; this code reads {_VERSION}")
    state_dict = _require(payload, "state_dict", dict)
    if not all(isinstance(name, str) for name in state_dict):
        raise CheckpointError(f"checkpoint {path}: its state_dict has keys that are not parameter names")
    try:
        spec = PreprocessSpec.from_dict(_require(payload, "spec", dict))
    except (TypeError, ValueError, KeyError) as err:  # a missing field is a KeyError
        raise CheckpointError(f"checkpoint {path} has an invalid preprocessing spec: {type(err).__name__}: {err}") \
            from None
    metrics = _require(payload, "metrics", dict)
    if not all(isinstance(k, str) and isinstance(v, numbers.Real) for k, v in metrics.items()):
        raise CheckpointError(f"checkpoint {path}: entry 'metrics' must map names to numbers")
    training_state = payload.get("training_state")
    if training_state is not None and not isinstance(training_state, dict):
        raise CheckpointError(f"checkpoint entry 'training_state' has the wrong type ({type(training_state).__name__})")
    checkpoint = ModelCheckpoint(
        arch=_require(payload, "arch", str),
        model_kwargs=_require(payload, "model_kwargs", dict),
        spec=spec,
        state_dict=state_dict,
        epoch=_require(payload, "epoch", int),
        metrics=metrics,
        model_name=payload["model_name"] if isinstance(payload.get("model_name"), str) else "",
        training_state=training_state,
    )
    if verify:
        for name, tensor in state_dict.items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"checkpoint {path}: state entry {name!r} is not a tensor")
            # A meta or sparse tensor failed the finiteness check below with a raw RuntimeError, which reads as a
            # passing failure (a registration retried for ever); a complex one lost its imaginary part on loading.
            if tensor.is_meta or tensor.layout is not torch.strided or tensor.is_complex():
                raise CheckpointError(f"checkpoint {path}: state entry {name!r} is not a dense real tensor "
                                      f"({tensor.dtype}, {tensor.layout}, on {tensor.device.type})")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"checkpoint {path}: weights {name!r} hold NaN or infinity")
        try:
            model = checkpoint.build_model()
        except (RuntimeError, ValueError, TypeError) as err:
            if _can_pass(err):
                raise
            raise CheckpointError(f"checkpoint {path} does not fit architecture {checkpoint.arch!r}: {err}") from None
        _check_weight_kinds(model, state_dict, path)
        _check_outputs(model, spec, path)
        checkpoint._verified_model = model if keep_model else None
    return checkpoint


def _check_weight_kinds(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse integer or boolean tensors where the model holds floating-point weights: ``load_state_dict``
    converts them without a word (integer weights truncated to whole numbers, a model of zeros answering one class
    for every image), while a float16 or bfloat16 checkpoint of a float32 model loads as it should."""
    for name, expected in model.state_dict().items():
        given = state_dict.get(name)
        if isinstance(given, torch.Tensor) and expected.is_floating_point() and not given.is_floating_point():
            raise CheckpointError(f"checkpoint {path}: weights {name!r} are {given.dtype}, not floating point")


def _raise_read_error(path: Path, err: Exception) -> NoReturn:
    """Raise what reading ``path`` failing with ``err`` means: the file gone, the file unreadable to this
    process, the storage or the memory (raised as itself: it can pass), or the file corrupt."""
    if isinstance(err, FileNotFoundError):  # removed since it was found (a cache cleared by another replica)
        raise MissingCheckpointError(f"checkpoint {path} does not exist") from None
    if isinstance(err, LASTING_OS_ERRORS):
        raise UnreadableCheckpointError(f"checkpoint {path} is unreadable: {err}") from None
    if _can_pass(err):
        raise err
    raise CheckpointError(f"checkpoint {path} ({_size(path)}) is unreadable or corrupt: "
                          f"{type(err).__name__}: {err}") from None


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size} bytes"
    except OSError:
        return "size unknown"


def check_archive(path: Path) -> None:
    """Refuse a checkpoint whose bytes are not the ones written: a truncated file (an interrupted copy, a full
    disk) or changed bytes (a bad disk, a bit flip). ``torch.save`` writes a zip archive with a CRC-32 of every
    record but ``torch.load`` checks none of them: changed weights that stay finite would load as a model.

    Truncation must not pass for the storage's passing state either: torch's reader fails a truncated archive
    with a bare ``OSError(EINVAL)``, which a retry never mends (a model stuck "not verified yet", a
    registration retried for ever). Here a read error is the storage's (raised as such), anything the
    archive's own structure gets wrong is corruption. The check reads the file once more before ``torch.load``
    does (mostly from the page cache: about 0.3 s per GB here), once per load: a replica's, a resume's, a
    registration's."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile as err:
        raise CheckpointError(f"checkpoint {path} ({_size(path)}) is truncated or not a checkpoint archive: "
                              f"{err}") from None
    except OSError as err:
        if err.errno == errno.EINVAL:  # a seek to before the file's start: offsets a damaged archive records
            raise CheckpointError(f"checkpoint {path} ({_size(path)}) is truncated or corrupt: {err}") from None
        _raise_read_error(path, err)
    except (ValueError, EOFError, NotImplementedError, RuntimeError) as err:  # zipfile on a damaged directory
        raise CheckpointError(f"checkpoint {path} ({_size(path)}) is corrupt: {type(err).__name__}: {err}") \
            from None
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path}: its record {damaged!r} fails its CRC check (the file's bytes "
                              "changed after it was written)")


#: ``OSError``s about the file itself, which no retry changes: a file this user may not read, a directory.
LASTING_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def storage_can_pass(err: BaseException) -> bool:
    """Whether an ``OSError`` is the storage's passing state (an NFS or FUSE mount's EIO, a stale handle), not
    the file's (:data:`LASTING_OS_ERRORS`)."""
    return isinstance(err, OSError) and not isinstance(err, LASTING_OS_ERRORS)


def _can_pass(err: BaseException) -> bool:
    """Whether reading or checking a checkpoint failed for a reason outside the file, which can pass: the
    storage or the memory. Raised as itself, not as a :class:`CheckpointError`: that one says the file is bad
    for good (a registration dropped, a model failed)."""
    return storage_can_pass(err) or is_out_of_memory(err)


def _check_outputs(model: nn.Module, spec: PreprocessSpec, path: Path) -> None:
    """The recorded input size within the model's limits, and one forward pass with finite outputs: finite weights
    can still make every output NaN (a flipped sign in a batch norm's running variance). The pass runs at a small
    size (at most 64 px, where the model takes it): a load of EfficientNet-B7 would otherwise pay a 600 px forward,
    seconds on a replica's CPU."""
    try:  # the model's own check; it reads only the shape, so a tensor without data does
        model.check_input_size(torch.empty(1, *spec.input_shape, device="meta"))
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    side = min(spec.image_size, max(model.min_input_size, 64))
    probe = torch.randn(1, spec.channels, side, side, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            outputs = model(probe)
    except (RuntimeError, ValueError) as err:
        if _can_pass(err):
            raise
        raise CheckpointError(f"checkpoint {path}: the model fails on a {side} px input: {err}") from None
    if outputs.shape != (1, spec.num_classes):
        raise CheckpointError(f"checkpoint {path}: {tuple(outputs.shape)} outputs for {spec.num_classes} classes")
    if not torch.isfinite(outputs).all():
        raise CheckpointError(f"checkpoint {path}: the model's outputs are NaN or infinite")


def rng_state_file(rank: int) -> str:
    """The file name of one rank's generator states inside a checkpoint directory."""
    return f"rng_state_rank{rank}.pt"


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's generator states, in types ``torch.load(weights_only=True)`` reads back (tensors,
    numbers, tuples: NumPy's key array travels as a tensor)."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": (version, tuple(internal), gauss_next),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                  float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Set this process's generators to ``state`` (from :func:`capture_rng_state`). A CUDA state is applied
    only on a CUDA device: a run moved from GPU to CPU resumes its CPU streams."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_rng_state(directory: str | os.PathLike, rank: int, state: dict[str, Any]) -> Path:
    """Write one rank's generator states into a checkpoint directory."""
    path = Path(directory) / rng_state_file(rank)
    torch.save({"format": _RNG_FORMAT, "version": 1, "rank": rank, **state}, path)
    return path


def load_rng_state(directory: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """One rank's generator states from a checkpoint directory, or None when it has none (written before
    they were saved, or by fewer ranks). Read with ``weights_only=True``; a malformed file is refused with
    :class:`CheckpointError`, a storage's passing error raised as itself (as for the weights)."""
    path = Path(directory) / rng_state_file(rank)
    if not path.is_file():
        return None
    check_archive(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt archives
        _raise_read_error(path, err)
    if not isinstance(payload, dict) or payload.get("format") != _RNG_FORMAT or payload.get("rank") != rank:
        raise CheckpointError(f"{path} is not rank {rank}'s cnnzoo generator state")
    missing = [key for key in ("python", "numpy", "torch") if key not in payload]
    if missing:
        raise CheckpointError(f"generator state {path} lacks {', '.join(missing)}")
    state = {key: payload[key] for key in ("python", "numpy", "torch", "cuda") if key in payload}
    _check_rng_state(state, path)
    return state


def _check_rng_state(state: dict[str, Any], path: Path) -> None:
    """Refuse generator states that would not apply: tried on this process's generators, which are put back
    either way. A bad one failed the resume with a bare TypeError after Python's stream had already been set."""
    if "cuda" in state and not (isinstance(state["cuda"], torch.Tensor) and state["cuda"].dtype == torch.uint8):
        raise CheckpointError(f"generator state {path}: its 'cuda' entry is not a byte tensor")
    saved = capture_rng_state()
    try:
        restore_rng_state(state)
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError, OverflowError) as err:
        raise CheckpointError(f"generator state {path} is malformed: {type(err).__name__}: {err}") from None
    finally:
        restore_rng_state(saved)
