"""Forecasts of a cached branch between full steps, as factors on its divided differences.

A branch keeps its value ``F(s0)`` at the last full step and the Newton divided differences
``d_1 = f[s0, s1], d_2 = f[s0, s1, s2], ...`` over its last full steps ``s0 > s1 > ...``
(``state.BlockCache``). Every forecaster here is linear in them and exact for constants, so a forecast
at step ``s`` is ``F(s0) + sum_i c_i d_i`` and a forecaster is only its factors ``c_i``:

- ``newton``: the interpolating polynomial, ``c_i = (s - s0)(s - s1) ... (s - s_{i-1})``; exact for
  polynomials of the degree of its order, at any spacing (the Taylor forecast of TaylorSeer agrees at
  order 1).
- ``hermite`` (HiCache): TaylorSeer's monomials ``k^i`` (``k = s - s0``; ``d_i`` standing for the
  Taylor coefficient ``D^i / i!``) replaced by the scaled physicists' Hermite polynomials
  ``sigma^i H_i(sigma k)``, ``sigma`` in (0, 1]: the argument and the coefficient both scaled, which keeps
  long horizons from growing like ``k^i``.
- ``bdf2_heun`` (FoCa): the features as an ODE in the step. The slope at ``s0`` is BDF2's (the
  derivative of the quadratic through the last three full steps), the predictor
  ``P = F(s0) + k g0`` steps along it, and Heun's corrector averages ``g0`` with the BDF2 slope at the
  predicted point (the quadratic through ``s1, s0`` and ``(s, P)``): ``F(s0) + k (g0 + g(s, P)) / 2``.
  In divided differences: ``c_1 = k`` and ``c_2 = (k h / 2) (3 k + 2 h) / (k + h)``, ``h = s0 - s1``;
  the quadratic term grows like ``k`` rather than ``k^2``. With two full steps only, the line.
"""

from __future__ import annotations

from dataclasses import dataclass

FORECASTERS = ("newton", "hermite", "bdf2_heun")


def hermite(n: int, x: float) -> float:
    """The physicists' Hermite polynomial ``H_n(x)`` (``H_0 = 1, H_1 = 2x, H_{n+1} = 2x H_n - 2n H_{n-1}``)."""
    previous, current = 1.0, 2.0 * x
    if n == 0:
        return previous
    for k in range(1, n):
        previous, current = current, 2.0 * x * current - 2.0 * k * previous
    return current


@dataclass(frozen=True)
class Forecaster:
    """Which forecast a partial step uses (``kind`` one of ``FORECASTERS``), HiCache's scale, and the most
    differences it uses (``order``; None: every one kept), which error control's order choice lowers."""

    kind: str = "newton"
    hermite_scale: float = 0.5
    order: int | None = None

    def terms(self, count: int) -> int:
        """How many of ``count`` kept differences the forecast uses."""
        return count if self.order is None else min(count, self.order)

    def factors(self, step: int, nodes: list[int], count: int) -> list[float]:
        """The factors ``c_1 ... c_n`` of the first ``n = terms(count)`` divided differences at ``step``, from the
        full steps ``nodes`` (latest first); with ``n`` below the kept ``count``, the forecast of order ``n``."""
        count = self.terms(count)
        if count == 0:
            return []
        offset = step - nodes[0]
        if self.kind == "hermite":
            scale = self.hermite_scale
            return [scale**i * hermite(i, scale * offset) for i in range(1, count + 1)]
        if self.kind == "bdf2_heun":
            factors = [float(offset)]
            if count > 1:
                spacing = nodes[0] - nodes[1]
                factors.append(offset * spacing / 2 * (3 * offset + 2 * spacing) / (offset + spacing))
            return factors
        factors, product = [], 1.0
        for node in nodes[:count]:
            product *= step - node
            factors.append(product)
        return factors


NEWTON = Forecaster()
