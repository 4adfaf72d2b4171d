"""Model registry: builders registered by name, in the style of timm's ``register_model``.

Every builder is a keyword-only function ``builder(*, num_classes, in_chans, **options)`` returning an
``nn.Module``. :func:`create_model` validates the name and the keyword arguments before calling it, so
a typo fails with a message that names the problem instead of a traceback from deep inside a model.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = ["register_model", "list_models", "create_model", "get_model_builder", "model_options"]

M = TypeVar("M", bound=nn.Module)
_MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str | None = None) -> Callable[[Callable[..., M]], Callable[..., M]]:
    """Decorator registering a model builder under ``name`` (default: the function's name)."""

    def wrapper(fn: Callable[..., M]) -> Callable[..., M]:
        key = name or fn.__name__
        if key in _MODEL_BUILDERS:
            raise ValueError(f"a model is already registered under the name {key!r}")
        _MODEL_BUILDERS[key] = fn
        return fn

    return wrapper


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of all registered models, optionally filtered by a shell-style ``pattern``."""
    names = sorted(_MODEL_BUILDERS)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def closest_model_names(name: str, n: int = 3) -> list[str]:
    """Registered names closest to ``name`` (for did-you-mean messages)."""
    return difflib.get_close_matches(name, list(_MODEL_BUILDERS), n=n, cutoff=0.5)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; raises ``ValueError`` naming the closest known names."""
    try:
        return _MODEL_BUILDERS[name]
    except KeyError:
        close = closest_model_names(name)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint} (cnnmodels.list_models() lists all {len(_MODEL_BUILDERS)} models)"
        ) from None


def model_options(name: str) -> dict[str, object]:
    """The keyword options a model accepts, with their defaults."""
    sig = inspect.signature(get_model_builder(name))
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def create_model(name: str, *, num_classes: int = 1000, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models`, e.g. ``"resnet50"`` or ``"efficientnet"``.
        num_classes: size of the classifier output.
        in_chans: number of input image channels (1 for grey-scale data).
        **kwargs: model options (see :func:`model_options`), e.g. ``small_input=True`` or, for
            ``"efficientnet"``, ``phi``, ``alpha``, ``beta``, ``gamma``.

    Raises:
        ValueError: unknown model name (the message lists the closest known names) or a bad value.
        TypeError: an option the model does not accept (the message names it and lists the valid ones).
    """
    builder = get_model_builder(name)
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        suggestions = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(options), n=1)
            suggestions.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"create_model({name!r}) got unknown keyword argument(s) {', '.join(suggestions)}; "
            f"{name} accepts: {', '.join(sorted(options))}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
    return builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
