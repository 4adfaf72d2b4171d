"""Model checkpoints: one file with everything needed to rebuild, resume, evaluate and serve a model.

A checkpoint holds the architecture name and its ``create_model`` keyword arguments, the weights, the
preprocessing spec (so serving applies exactly what training used), the epoch and its metrics, and
optionally the optimizer/scaler state for resuming. Files are written atomically and read with
``torch.load(weights_only=True)``; anything malformed, truncated, non-finite or not matching its
architecture is refused with :class:`CheckpointError` before a model is handed out.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cnnmodels

from .preprocess import PreprocessSpec

__all__ = ["ModelCheckpoint", "CheckpointError", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "model.pt"
_FORMAT = "cnnzoo.checkpoint"
_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted; nothing was loaded from it."""


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

    def create_model(self) -> nn.Module:
        """A fresh model of this checkpoint's architecture (random weights)."""
        return cnnmodels.create_model(
            self.arch, num_classes=self.spec.num_classes, in_chans=self.spec.channels, **self.model_kwargs
        )

    def build_model(self) -> nn.Module:
        """The model with this checkpoint's weights, in eval mode."""
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
    """Write ``checkpoint`` to ``path`` atomically (a reader never sees a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint.to_payload(), f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _require(payload: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in payload:
        raise CheckpointError(f"checkpoint has no {key!r} entry")
    value = payload[key]
    if not isinstance(value, kind):
        raise CheckpointError(f"checkpoint entry {key!r} has the wrong type ({type(value).__name__})")
    return value


def load_checkpoint(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True
) -> ModelCheckpoint:
    """Read and validate a checkpoint file (or a directory holding ``model.pt``).

    With ``verify`` (default) the weights are also loaded into a fresh model of the recorded architecture
    (strict) and checked to be finite, so a checkpoint that returns from here is known to be servable.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt archives
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a cnnzoo checkpoint")
    if payload.get("version") != _VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')!r}; this code reads {_VERSION}")
    state_dict = _require(payload, "state_dict", dict)
    try:
        spec = PreprocessSpec.from_dict(_require(payload, "spec", dict))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid preprocessing spec: {err}") from None
    checkpoint = ModelCheckpoint(
        arch=_require(payload, "arch", str),
        model_kwargs=_require(payload, "model_kwargs", dict),
        spec=spec,
        state_dict=state_dict,
        epoch=_require(payload, "epoch", int),
        metrics=_require(payload, "metrics", dict),
        model_name=payload.get("model_name", ""),
        training_state=payload.get("training_state"),
    )
    if verify:
        for name, tensor in state_dict.items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"checkpoint {path}: state entry {name!r} is not a tensor")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"checkpoint {path}: weights {name!r} hold NaN or infinity")
        try:
            checkpoint.build_model()
        except (RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path} does not fit architecture {checkpoint.arch!r}: {err}") from None
    return checkpoint
