"""Compound scaling (Tan & Le, "EfficientNet: rethinking model scaling for CNNs", 2019, Sec. 3.3).

A baseline network is scaled in depth by ``d = alpha ** phi``, in width by ``w = beta ** phi`` and in input
resolution by ``r = gamma ** phi``, under the constraint ``alpha * beta**2 * gamma**2 ~= 2`` with
``alpha, beta, gamma >= 1``. FLOPs grow with ``d * w**2 * r**2``, so by about ``2 ** phi``. The paper fixed
``phi = 1`` and grid-searched the coefficients on ImageNet, finding ``alpha=1.2, beta=1.1, gamma=1.15``.

Rounding follows the official code: channel counts to the nearest multiple of 8 (never more than 10% down),
layer counts rounded up.

Note: the published B1..B7 width/depth/resolution table is *not* exactly ``(beta**phi, alpha**phi,
224 * gamma**phi)`` for integer phi (see tensorflow/tpu#390); ``cnnmodels.efficientnet`` therefore
hard-codes that table for ``efficientnet_b0..b7`` and uses this formula only for the ``efficientnet``
compound builder.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

__all__ = [
    "CompoundCoefficients",
    "ScalingMultipliers",
    "PAPER_COEFFICIENTS",
    "constraint_value",
    "flops_growth",
    "scaled_resolution",
    "make_divisible",
    "scale_channels",
    "scale_depth",
    "feasible_grid",
]


@dataclass(frozen=True)
class ScalingMultipliers:
    """Depth and width multipliers and the input resolution for one phi."""

    depth: float
    width: float
    resolution: int


@dataclass(frozen=True)
class CompoundCoefficients:
    """The per-dimension growth bases alpha (depth), beta (width) and gamma (resolution)."""

    alpha: float
    beta: float
    gamma: float

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 1.0):
                raise ValueError(f"{name} must be a finite number >= 1, got {value!r}")

    @property
    def product(self) -> float:
        """The constrained quantity alpha * beta^2 * gamma^2 (about 2 in the paper)."""
        return constraint_value(self.alpha, self.beta, self.gamma)

    def multipliers(self, phi: float, base_resolution: int = 224) -> ScalingMultipliers:
        """Depth ``alpha**phi``, width ``beta**phi`` and resolution ``round(base * gamma**phi)``."""
        return ScalingMultipliers(
            depth=self.alpha**phi,
            width=self.beta**phi,
            resolution=scaled_resolution(base_resolution, self.gamma, phi),
        )

    def flops_growth(self, phi: float) -> float:
        """Predicted FLOPs ratio to the baseline, ``(alpha * beta^2 * gamma^2) ** phi``."""
        return flops_growth(self.alpha, self.beta, self.gamma, phi)

    def satisfies(self, target: float = 2.0, tolerance: float = 0.1) -> bool:
        """Whether ``|alpha * beta^2 * gamma^2 - target| <= tolerance``."""
        return abs(self.product - target) <= tolerance + 1e-12


#: The coefficients the paper found on ImageNet (product 1.92).
PAPER_COEFFICIENTS = CompoundCoefficients(alpha=1.2, beta=1.1, gamma=1.15)


def constraint_value(alpha: float, beta: float, gamma: float) -> float:
    """alpha * beta^2 * gamma^2."""
    return alpha * beta**2 * gamma**2


def flops_growth(alpha: float, beta: float, gamma: float, phi: float) -> float:
    """Predicted FLOPs growth of the scaled model: ``(alpha * beta^2 * gamma^2) ** phi``."""
    return constraint_value(alpha, beta, gamma) ** phi


def scaled_resolution(base_resolution: int, gamma: float, phi: float) -> int:
    """Input side length ``round(base * gamma ** phi)``."""
    return int(round(base_resolution * gamma**phi))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never more than 10% below ``value``.

    The channel rounding rule of the official EfficientNet/MobileNet code (torchvision's ``_make_divisible``).
    """
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def scale_channels(channels: int, width_multiplier: float, divisor: int = 8) -> int:
    """Channels of a width-scaled layer, rounded by :func:`make_divisible`."""
    return make_divisible(channels * width_multiplier, divisor)


def scale_depth(num_layers: int, depth_multiplier: float) -> int:
    """Layers of a depth-scaled stage, rounded up (``ceil``)."""
    return int(math.ceil(num_layers * depth_multiplier))


def _grid_values(low: float, high: float, step: float) -> list[float]:
    count = int(math.floor((high - low) / step + 1e-9))
    return [round(low + i * step, 10) for i in range(count + 1)]


def feasible_grid(
    alpha_range: tuple[float, float],
    beta_range: tuple[float, float],
    gamma_range: tuple[float, float],
    step: float,
    target: float = 2.0,
    tolerance: float = 0.1,
) -> list[CompoundCoefficients]:
    """Every (alpha, beta, gamma) on a regular grid whose product is within ``tolerance`` of ``target``.

    The grid runs from each range's low end in steps of ``step`` up to its high end. Triples are ordered by
    their distance to ``target``, then lexicographically, so the closest-to-constraint ones come first.
    """
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    triples = [
        CompoundCoefficients(a, b, g)
        for a, b, g in itertools.product(
            _grid_values(*alpha_range, step), _grid_values(*beta_range, step), _grid_values(*gamma_range, step)
        )
        if abs(constraint_value(a, b, g) - target) <= tolerance + 1e-12
    ]
    return sorted(triples, key=lambda c: (abs(c.product - target), c.alpha, c.beta, c.gamma))
