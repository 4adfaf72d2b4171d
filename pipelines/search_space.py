"""The search space of EfficientNet's compound-scaling coefficients, and the ways to sample it.

Only feasible triples are ever trained: ``|alpha * beta^2 * gamma^2 - target| <= tolerance`` with every
coefficient in its configured range.

* :func:`grid_candidates`: the feasible points of a regular grid (``search.step``), at most
  ``search.num_trials`` of them, the paper's (1.2, 1.1, 1.15) first, the rest spread over the feasible set.
* :class:`FeasibleRegion` and :func:`optuna_space`: Optuna's define-by-run space; each trial draws three
  numbers in [0, 1] that are mapped into the feasible region (alpha first, then beta and gamma within the
  bounds the constraint leaves), so every sampled triple is feasible by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

from cnnmodels.scaling import PAPER_COEFFICIENTS, constraint_value, feasible_grid

from .config import SearchConfig

__all__ = ["PAPER", "paper_is_feasible", "same_triple", "feasible_points", "grid_candidates", "FeasibleRegion",
           "coefficients_label",
           "optuna_space"]

PAPER = (PAPER_COEFFICIENTS.alpha, PAPER_COEFFICIENTS.beta, PAPER_COEFFICIENTS.gamma)


# --------------------------------------------------------------------------------------------------
#: MnasNet's latency-aware objective's exponent: ``val_acc * (macs / target_macs) ** MNAS_EXPONENT``.
MNAS_EXPONENT = -0.07


def mnas_factor(macs: float, target_macs: float | None) -> float:
    """What ``val_acc`` is multiplied by under ``search.objective: mnas`` (1 without a target: plain val_acc)."""
    return 1.0 if not target_macs else (macs / target_macs) ** MNAS_EXPONENT


def _key(c: tuple[float, float, float]) -> tuple[float, float, float]:
    return tuple(round(v, 6) for v in c)


def same_triple(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Whether two coefficient triples are equal up to rounding noise."""
    return _key(a) == _key(b)


def paper_is_feasible(search: SearchConfig) -> bool:
    """Whether the paper's (1.2, 1.1, 1.15) is a candidate: inside the configured ranges and the constraint."""
    inside = all(low <= value <= high for value, (low, high) in zip(PAPER, (search.alpha, search.beta, search.gamma),
                                                                     strict=True))
    return inside and abs(constraint_value(*PAPER) - search.target) <= search.tolerance + 1e-12


def feasible_points(search: SearchConfig) -> list[tuple[float, float, float]]:
    """Every feasible triple of the grid (``search.step``), sorted, and the paper's where it is feasible."""
    grid = {_key(c): c for c in ((c.alpha, c.beta, c.gamma) for c in feasible_grid(
        search.alpha, search.beta, search.gamma, search.step, search.target, search.tolerance))}
    if paper_is_feasible(search):
        grid[_key(PAPER)] = PAPER
    return sorted(grid.values())


def grid_candidates(search: SearchConfig,
                    network: Callable[[tuple[float, float, float]], Hashable] | None = None
                    ) -> list[tuple[float, float, float]]:
    """At most ``num_trials`` feasible grid triples, the paper's first, the rest spread evenly.

    ``network`` says what a triple builds at the search's phi: of triples that build the same network (depths
    round up, widths to multiples of 8) only one is a candidate, the paper's or the one nearest the target,
    so no two trials train the same model (their tie was broken by Tune's result order)."""
    chosen: list[tuple[float, float, float]] = []
    points = feasible_points(search)
    if network is not None:
        first: dict[Hashable, tuple[float, float, float]] = {}
        nearest = sorted(points, key=lambda c: (_key(c) != _key(PAPER), abs(constraint_value(*c) - search.target), c))
        for c in nearest:
            first.setdefault(network(c), c)
        points = sorted(first.values())
    if paper_is_feasible(search):
        chosen.append(PAPER)
    others = [c for c in points if _key(c) != _key(PAPER)]
    slots = search.num_trials - len(chosen)
    if slots >= len(others):
        chosen += others
    elif slots > 0:
        step = len(others) / slots
        chosen += [others[int(i * step + step / 2)] for i in range(slots)]
    return chosen


def coefficients_label(alpha: float, beta: float, gamma: float) -> str:
    """``a1.2_b1.1_g1.15``: how search trials are named in Ray, MLflow and the results."""
    return f"a{alpha:g}_b{beta:g}_g{gamma:g}"


def _rounded_within(bounds: tuple[float, float], t: float, decimals: int = 4) -> float:
    """The point at ``t`` in [0, 1] between ``bounds``, rounded to ``decimals`` without leaving them (unrounded
    where no such number lies between them)."""
    low, high = bounds
    value = low + t * max(0.0, high - low)
    scale = 10**decimals
    inner_low, inner_high = math.ceil(low * scale - 1e-9) / scale, math.floor(high * scale + 1e-9) / scale
    if inner_low > inner_high:
        return value
    return min(max(round(value, decimals), inner_low), inner_high)


def _scaled_bounds(bounds: tuple[float, float], decimals: int = 4) -> tuple[int, int]:
    """The smallest and largest multiples of 10^-decimals between ``bounds``, times 10^decimals."""
    scale = 10**decimals
    return math.ceil(bounds[0] * scale - 1e-9), math.floor(bounds[1] * scale + 1e-9)


def _by_distance(bounds: tuple[float, float], value: float, decimals: int = 4) -> Iterator[float]:
    """The numbers of ``decimals`` decimals between ``bounds``, nearest ``value`` first (where no such number lies
    between them, the unrounded one nearest ``value``, as :func:`_rounded_within` leaves a draw there: the value
    of another beta's window was outside this one, and the triple :meth:`FeasibleRegion.has_points` counts for it
    out of reach)."""
    low, high = _scaled_bounds(bounds, decimals)
    if low > high:
        if bounds[0] <= bounds[1]:
            yield min(max(value, bounds[0]), bounds[1])
        return
    scale = 10**decimals
    start = min(max(round(value * scale), low), high)
    yield start / scale
    for step in range(1, high - low + 1):
        for k in (start - step, start + step):
            if low <= k <= high:
                yield k / scale


#: Up to how many Optuna trials :meth:`FeasibleRegion.has_points` hands out their triples to check a count that
#: includes unrounded triples (a second or two for 200, in regions that narrow far less); above, the count decides.
_CHECKED_TRIALS = 200


@dataclass(frozen=True)
class FeasibleRegion:
    """Maps (u, v, w) in [0, 1]^3 onto feasible (alpha, beta, gamma): every draw satisfies the constraint."""

    alpha: tuple[float, float]
    beta: tuple[float, float]
    gamma: tuple[float, float]
    low: float
    high: float

    @classmethod
    def of(cls, search: SearchConfig) -> FeasibleRegion:
        return cls(search.alpha, search.beta, search.gamma, search.target - search.tolerance,
                   search.target + search.tolerance)

    def alpha_bounds(self) -> tuple[float, float]:
        (blo, bhi), (glo, ghi) = self.beta, self.gamma
        return (max(self.alpha[0], self.low / (bhi**2 * ghi**2)), min(self.alpha[1], self.high / (blo**2 * glo**2)))

    def beta_bounds(self, a: float) -> tuple[float, float]:
        glo, ghi = self.gamma
        return (max(self.beta[0], math.sqrt(self.low / (a * ghi**2))),
                min(self.beta[1], math.sqrt(self.high / (a * glo**2))))

    def gamma_bounds(self, a: float, b: float) -> tuple[float, float]:
        return (max(self.gamma[0], math.sqrt(self.low / (a * b**2))),
                min(self.gamma[1], math.sqrt(self.high / (a * b**2))))

    def point(self, u: float, v: float, w: float) -> tuple[float, float, float]:
        """The feasible triple of a draw, each coefficient to 4 decimals (readable trial names): each is rounded
        inside its bounds, and the next one's bounds follow from the rounded value, so rounding never takes the
        triple off the constraint (rounding all three at the end missed it by up to 1e-4, 0.2% of draws)."""
        a = _rounded_within(self.alpha_bounds(), u)
        b = _rounded_within(self.beta_bounds(a), v)
        return a, b, _rounded_within(self.gamma_bounds(a, b), w)

    def free_point(self, point: tuple[float, float, float],
                   taken: set[tuple[float, float, float]]) -> tuple[float, float, float]:
        """``point``, or the feasible 4-decimal triple nearest it (gamma moved first, then beta, then alpha) that
        is not in ``taken``: two draws that round to one triple named one Ray Train run, and the second trial
        resumed the first's (trained nothing, or went on from where ASHA had stopped it). ``point`` itself when
        the region has no other (:meth:`has_points` refuses such searches up front). Triples are told apart by
        their names (:func:`coefficients_label`): unrounded ones, where a window holds no 4-decimal number, can
        differ past the six digits a name shows."""
        names = {coefficients_label(*t) for t in taken}
        if coefficients_label(*point) not in names:
            return point
        a, b, g = point
        for a2 in _by_distance(self.alpha_bounds(), a):
            for b2 in self._betas_with_gammas(a2, b):
                for g2 in _by_distance(self.gamma_bounds(a2, b2), g):
                    if coefficients_label(a2, b2, g2) not in names:
                        return a2, b2, g2
        return point

    def _betas_with_gammas(self, a: float, near: float) -> list[float]:
        """The betas (at 4 decimals, nearest ``near`` first) that leave some gamma at ``a``: under a tight
        tolerance most leave none, and trying each in turn took seconds."""
        import numpy as np

        low, high = _scaled_bounds(self.beta_bounds(a))
        if low > high:  # (no 4-decimal beta: an unrounded one, as :meth:`point` draws it)
            b_low, b_high = self.beta_bounds(a)
            return [min(max(near, b_low), b_high)] if b_low <= b_high else []
        betas = np.arange(low, high + 1) / 10**4
        g_low, g_high = self._gamma_bounds_of(a, betas)
        keep = betas[g_low <= g_high]
        return [float(round(b, 4)) for b in keep[np.argsort(np.abs(keep - near), kind="stable")]]

    def _gamma_bounds_of(self, a: float, betas):
        """:meth:`gamma_bounds` for an array of betas."""
        import numpy as np

        return (np.maximum(self.gamma[0], np.sqrt(self.low / (a * betas**2))),
                np.minimum(self.gamma[1], np.sqrt(self.high / (a * betas**2))))

    def has_points(self, count: int) -> bool:
        """Whether the region holds at least ``count`` different triples at 4 decimals that :meth:`free_point` can
        give trials: counted per alpha, the gammas of every beta at once (a pair at a time took seconds where a
        tight tolerance leaves few). Where the count includes unrounded triples (windows too narrow for a
        4-decimal number, which the trials may not reach), up to :data:`_CHECKED_TRIALS` trials are also given
        their triples one after another, as the search gives them."""
        enough, exact = self._counts_points(count)
        if not enough or exact or count > _CHECKED_TRIALS:
            return enough
        taken: set[tuple[float, float, float]] = set()
        start = self.point(0.5, 0.5, 0.5)
        for _ in range(count):
            point = self.free_point(start, taken)
            if coefficients_label(*point) in {coefficients_label(*t) for t in taken}:
                return False
            taken.add(point)
        return True

    def _counts_points(self, count: int) -> tuple[bool, bool]:
        """Whether the count reaches ``count``, and whether it counted only 4-decimal triples (every one of which
        :meth:`free_point` reaches)."""
        import numpy as np

        found, exact = 0, _scaled_bounds(self.alpha_bounds())[0] <= _scaled_bounds(self.alpha_bounds())[1]
        for a in _by_distance(self.alpha_bounds(), self.alpha[0]):
            low, high = _scaled_bounds(self.beta_bounds(a))
            if low > high:  # (no 4-decimal beta: the unrounded one :meth:`point` draws)
                b_low, b_high = self.beta_bounds(a)
                betas = np.array([b_low] if b_low <= b_high else [])
                exact = exact and not betas.size
            else:
                betas = np.arange(low, high + 1) / 10**4
            g_low, g_high = self._gamma_bounds_of(a, betas)
            rounded = np.floor(g_high * 10**4 + 1e-9) - np.ceil(g_low * 10**4 - 1e-9) + 1
            # (a gamma range with no 4-decimal number in it still holds its unrounded gamma)
            unrounded = (rounded <= 0) & (g_low <= g_high)
            exact = exact and not unrounded.any()
            found += int(np.where(rounded > 0, rounded, unrounded.astype(float)).sum())
            if found >= count:
                return True, exact
        return False, exact

    def inverse(self, a: float, b: float, g: float) -> tuple[float, float, float] | None:
        """The (u, v, w) of a triple, if it lies in the region."""
        result = []
        for (lo, hi), value in ((self.alpha_bounds(), a), (self.beta_bounds(a), b), (self.gamma_bounds(a, b), g)):
            if not lo - 1e-9 <= value <= hi + 1e-9:
                return None
            result.append(0.0 if hi - lo < 1e-12 else (value - lo) / (hi - lo))
        return tuple(result)


def optuna_space(region: FeasibleRegion, trial) -> dict[str, Any]:
    """OptunaSearch define-by-run space: three unit draws mapped to a feasible triple."""
    u, v, w = (trial.suggest_float(name, 0.0, 1.0) for name in ("u_alpha", "u_beta", "u_gamma"))
    taken = {tuple(t.user_attrs[TRIPLE]) for t in trial.study.trials
             if t.number != trial.number and TRIPLE in t.user_attrs}
    a, b, g = region.free_point(region.point(u, v, w), taken)
    trial.set_user_attr(TRIPLE, [a, b, g])
    return {"coefficients": {"alpha": a, "beta": b, "gamma": g}}


#: The Optuna trial attribute holding the triple a trial trains (its draws' point, or the free one next to it).
TRIPLE = "cnnzoo_coefficients"
