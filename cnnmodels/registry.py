"""Model registry: builders registered by name, in the style of timm's ``register_model``.

Every builder is a keyword-only function ``builder(*, num_classes, in_chans, **options)`` returning an
``nn.Module``. :func:`create_model` validates the name and the keyword arguments before calling it, so
a typo fails with a message that names the problem instead of a traceback from deep inside a model.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = [
    "register_model",
    "register_family",
    "list_models",
    "create_model",
    "get_model_builder",
    "model_options",
    "resolve_model_name",
    "family_member_name",
    "is_family_member",
    "family_of",
]

M = TypeVar("M", bound=nn.Module)
_MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
#: Families of models named by one option's value (``efficientnet_phi1``): prefix -> (builder, option).
_FAMILIES: dict[str, tuple[str, str, dict[str, object]]] = {}


def register_model(name: str | None = None) -> Callable[[Callable[..., M]], Callable[..., M]]:
    """Decorator registering a model builder under ``name`` (default: the function's name)."""

    def wrapper(fn: Callable[..., M]) -> Callable[..., M]:
        key = name or fn.__name__
        if key in _MODEL_BUILDERS:
            raise ValueError(f"a model is already registered under the name {key!r}")
        _MODEL_BUILDERS[key] = fn
        return fn

    return wrapper


def register_family(prefix: str, builder: str, option: str, fixed: dict[str, object] | None = None) -> None:
    """Name the members of a scaled family ``<prefix><value>``: ``efficientnet_phi1`` is the registered
    ``efficientnet`` builder with ``phi=1.0`` (decimal points are written ``p``: ``efficientnet_phi0p5``).
    ``fixed``: options every member has (the paper's coefficients for ``efficientnet_paper_phi``), which
    :func:`create_model` holds to as it holds to the member's value.

    Family members are valid names for :func:`create_model` but are not listed by :func:`list_models`
    (there is one per value of the option).
    """
    if prefix in _FAMILIES:
        raise ValueError(f"a family is already registered under the prefix {prefix!r}")
    _FAMILIES[prefix] = (builder, option, dict(fixed or {}))


def family_member_name(builder: str, value: float, *, prefix: str | None = None) -> str:
    """The name of ``builder``'s family member at ``value``: ``("efficientnet", 1.0) -> "efficientnet_phi1"``.

    A builder may have several families (the EfficientNet members with searched coefficients and those with
    the paper's): ``prefix`` picks one, by default the first registered for ``builder``.
    """
    for family_prefix, (family_builder, option, _) in _FAMILIES.items():
        if family_builder == builder and prefix in (None, family_prefix):
            # The name is the value's shortest spelling: a value it cannot spell exactly would be named as
            # another member (1.2345678 as ..._phi1p23457, built at 1.23457).
            if not math.isfinite(value) or value < 0 or float(f"{value:g}") != value:
                raise ValueError(f"{builder!r} family members are named for finite {option} >= 0 of at most 6 "
                                 f"significant digits, got {value!r}")
            return f"{family_prefix}{value:g}".replace(".", "p")
    which = f" under the prefix {prefix!r}" if prefix else ""
    raise ValueError(f"{builder!r} has no registered family{which}")


def _parse_family_member(name: str) -> tuple[str, str, dict[str, float]] | None:
    """(prefix, builder, implied options) of a family member's name, or None."""
    for prefix, (builder, option, fixed) in _FAMILIES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            try:
                value = float(name[len(prefix):].replace("p", ".")) + 0.0  # (-0.0 is 0: "phi-0" no second name)
            except ValueError:
                continue  # maybe a longer prefix of another family matches
            # Only the canonical spelling of a finite value >= 0: "phi1.0" or "phi1e0" would be a second name
            # for "phi1" (the same model trained twice), "phinan" or "phi-1" no model at all.
            if not math.isfinite(value) or value < 0 or f"{prefix}{value:g}".replace(".", "p") != name:
                continue
            return prefix, builder, {option: value, **fixed}
    return None


def is_family_member(name: str) -> bool:
    """Whether ``name`` names a member of a scaled family (``efficientnet_phi1``) rather than a fixed model."""
    return _parse_family_member(name) is not None


def family_of(name: str) -> str | None:
    """The prefix of the family ``name`` belongs to (``"efficientnet_paper_phi1" -> "efficientnet_paper_phi"``),
    or None for a fixed model."""
    member = _parse_family_member(name)
    return None if member is None else member[0]


def resolve_model_name(name: str) -> tuple[str, dict[str, float]]:
    """The registered builder behind ``name`` and the options its name implies.

    ``"resnet18" -> ("resnet18", {})``; ``"efficientnet_phi1" -> ("efficientnet", {"phi": 1.0})``. Unknown
    names raise ``ValueError`` naming the closest known ones.
    """
    if name in _MODEL_BUILDERS:
        return name, {}
    member = _parse_family_member(name)
    if member is not None:
        return member[1], member[2]
    get_model_builder(name)  # raises with a did-you-mean
    raise AssertionError("unreachable")


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
    """The keyword options a model (or family member) accepts, with their defaults."""
    builder, implied = resolve_model_name(name)
    sig = inspect.signature(get_model_builder(builder))
    return {
        p.name: implied.get(p.name, p.default)
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _check_option_types(name: str, builder: Callable[..., nn.Module], options: dict) -> None:
    """``TypeError`` for an option whose value is not of its builder's type: ``small_input="no"`` built the
    small-input stem (a non-empty string is true), ``dropout=True`` a dropout of 1.0."""
    hints = typing.get_type_hints(builder)
    for key, value in options.items():
        expected = hints.get(key)
        allowed = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
        if value is None and type(None) in allowed:
            continue
        if bool in allowed:
            ok, kind = isinstance(value, bool), "true or false"
        elif float in allowed:
            ok, kind = isinstance(value, int | float) and not isinstance(value, bool), "a number"
        elif int in allowed:
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        else:
            continue  # other types are the builder's to check
        if not ok:
            raise TypeError(f"create_model({name!r}): {key} must be {kind}, got {value!r}")


def create_model(name: str, *, num_classes: int = 1000, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models`, e.g. ``"resnet50"`` or ``"efficientnet"``, or a family
            member such as ``"efficientnet_phi1"`` (see :func:`register_family`).
        num_classes: size of the classifier output.
        in_chans: number of input image channels (1 for grey-scale data).
        **kwargs: model options (see :func:`model_options`), e.g. ``small_input=True`` or, for
            ``"efficientnet"``, ``phi``, ``alpha``, ``beta``, ``gamma``.

    Raises:
        ValueError: unknown model name (the message lists the closest known names), a bad value, or an option
            that contradicts the name (``"efficientnet_phi1"`` with ``phi=2``).
        TypeError: an option the model does not accept (the message names it and lists the valid ones).
    """
    builder_name, implied = resolve_model_name(name)
    builder = get_model_builder(builder_name)
    options = model_options(builder_name)
    # A family member's name is its options: a model built otherwise would be recorded under a wrong name.
    conflicting = {key: kwargs[key] for key, value in implied.items() if key in kwargs and kwargs[key] != value}
    if conflicting:
        given = ", ".join(f"{key}={value!r}" for key, value in conflicting.items())
        implies = ", ".join(f"{key}={implied[key]!r}" for key in conflicting)
        raise ValueError(f"create_model({name!r}) got {given}, but the name means {implies}; "
                         f"pass {builder_name!r} with the options instead")
    kwargs = {**implied, **kwargs}
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
    _check_option_types(name, builder, kwargs)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
    model = builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
    model.model_name = name  # for messages (e.g. the input-size check); not part of the state dict
    return model
