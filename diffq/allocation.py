"""Bit allocation as an integer program (``scipy.optimize.milp``, HiGHS).

One binary variable per (layer, candidate); exactly one candidate per layer; the average weight
bits over the quantized parameters (the 16-bit low-rank branch counted in) must not exceed the
budget; optionally total bytes too. The objective is the summed, *normalized* sensitivity loss.
(With the ``"image"`` sensitivity metric every layer's loss is already the same quantity, the
final images' squared error, and the whole sum is normalized as one group.)

How the two metric groups are combined: MixDQ solves the content and quality groups separately
and scans how the budget is split between them. diffq solves one joint program instead. Each
group's losses are divided by that group's total loss at a reference candidate (the uniform
``reference`` config, ``w4a8`` by default), so both groups weigh 1 at the reference and their
different metrics (1 − SSIM, noise-to-signal ratio) become comparable. The joint program is the
exact optimum of the objective that the split scan approximates on a grid, at the cost of one
solve instead of one per split point. ``content_share`` gives MixDQ's split instead: the content
layers may use that fraction of the bit budget and the quality layers the rest, each group solved
on its own (``benchmarks/allocation_split.py`` compares the two on the bundled models).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from diffq.errors import DiffQError, QuantizationInputError
from diffq.sensitivity import Candidate, Sensitivity, weight_bits_cost

REFERENCE = Candidate(4, 8)  # the uniform config each group's losses are normalized at


class InfeasibleBudgetError(DiffQError, ValueError):
    """No choice of candidates fits the budget."""


@dataclass(frozen=True)
class LayerShape:
    """A weight's row length and row count, and whether it may carry a low-rank branch (Linear, or
    Conv2d with groups=1)."""

    in_features: int
    out_features: int
    branch: bool = True

    def allows(self, candidate: Candidate) -> bool:
        return self.branch or candidate.rank == 0

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass
class Allocation:
    """The chosen candidate per layer and what it costs."""

    choice: dict[str, Candidate]
    average_bits: float
    objective: float


def normalized_losses(
    sensitivity: Sensitivity, layers: list[str], candidates: list[Candidate], reference: Candidate
) -> np.ndarray:
    """``[layers, candidates]`` losses, each group scaled to total 1 at the reference candidate (one
    group of all layers under the ``"image"`` metric)."""
    losses = np.array(
        [[sensitivity.loss(n, c.label) if c.label in sensitivity.scores[n] else 0.0 for c in candidates] for n in layers],
        dtype=np.float64,
    )
    ref_label = reference.label
    if sensitivity.metric == "image":  # one quantity for every layer: one group
        groups = [list(range(len(layers)))]
    else:
        groups = [[i for i, n in enumerate(layers) if sensitivity.groups[n] == g] for g in ("content", "quality")]
    for rows in groups:
        if not rows:
            continue
        scale = sum(sensitivity.loss(layers[i], ref_label) for i in rows) if _has(sensitivity, layers, ref_label) else 0
        if scale <= 0:
            scale = float(losses[rows].mean()) * len(rows) or 1.0
        losses[rows] /= scale
    return losses


def _split_constraints(
    sensitivity: Sensitivity, layers: list[str], bits: np.ndarray, valid: np.ndarray, total_bits: float, share: float
) -> list[LinearConstraint]:
    """One bit budget per metric group: ``share`` of ``total_bits`` for content, the rest for quality."""
    constraints = []
    for group, fraction in (("content", share), ("quality", 1 - share)):
        mask = np.array([sensitivity.groups[n] == group for n in layers], dtype=float)
        smallest = float((np.where(valid, bits, np.inf).min(axis=1) * mask).sum())
        if smallest > fraction * total_bits + 1e-6:
            raise InfeasibleBudgetError(
                f"content_share={share:g} leaves the {group} layers {fraction * total_bits:.4g} bits, fewer than the "
                f"{smallest:.4g} they need at the fewest bits; move the share or raise the budget."
            )
        constraints.append(LinearConstraint((bits * mask[:, None]).reshape(1, -1), -np.inf, fraction * total_bits))
    return constraints


def _has(sensitivity: Sensitivity, layers: list[str], label: str) -> bool:
    return all(label in sensitivity.scores.get(n, {}) for n in layers)


def allocate_bits(
    sensitivity: Sensitivity,
    shapes: dict[str, LayerShape],
    candidates: list[Candidate],
    budget: float,
    reference: Candidate = REFERENCE,
    max_bytes: int | None = None,
    content_share: float | None = None,
) -> Allocation:
    """Solve for one candidate per layer minimising normalized loss under an average-bits budget.

    ``content_share`` (0 < share < 1) splits the bit budget between the groups as MixDQ does: the
    content layers get that fraction of it, the quality layers the rest.
    """
    if content_share is not None and not 0 < content_share < 1:
        raise QuantizationInputError(f"content_share={content_share!r}; use a fraction between 0 and 1, or None.")
    layers = list(shapes)
    valid = np.array([[shapes[n].allows(c) for c in candidates] for n in layers])
    missing = [
        n
        for i, n in enumerate(layers)
        if n not in sensitivity.scores or any(valid[i, k] and c.label not in sensitivity.scores[n] for k, c in enumerate(candidates))
    ]
    if missing:
        raise QuantizationInputError(
            f"sensitivity lacks scores for {len(missing)} layer(s) (e.g. {missing[0]!r}); measure them first."
        )
    n_layers, n_cands = len(layers), len(candidates)
    losses = normalized_losses(sensitivity, layers, candidates, reference)
    bits = np.array(
        [[weight_bits_cost(c, shapes[n].in_features, shapes[n].out_features) for c in candidates] for n in layers]
    )
    total_params = sum(shapes[n].params for n in layers)
    smallest = float(np.where(valid, bits, np.inf).min(axis=1).sum()) / total_params
    if budget < smallest - 1e-9:
        raise InfeasibleBudgetError(
            f"a budget of {budget:g} average weight bits is infeasible; the smallest feasible budget for these "
            f"candidates is {smallest:.4g} bits."
        )
    one_per_layer = np.kron(np.eye(n_layers), np.ones(n_cands))
    constraints = [
        LinearConstraint(one_per_layer, 1, 1),
        LinearConstraint(bits.reshape(1, -1), -np.inf, budget * total_params),
    ]
    if max_bytes is not None:
        constraints.append(LinearConstraint(bits.reshape(1, -1) / 8, -np.inf, max_bytes))
    if content_share is not None:
        constraints += _split_constraints(sensitivity, layers, bits, valid, budget * total_params, content_share)
    result = milp(
        c=losses.reshape(-1),
        constraints=constraints,
        integrality=np.ones(n_layers * n_cands),
        bounds=Bounds(0, valid.reshape(-1).astype(float)),
        options={"presolve": True},
    )
    if not result.success:
        raise InfeasibleBudgetError(
            f"the integer program found no solution ({result.message}); the smallest feasible budget is {smallest:.4g} bits."
        )
    picks = np.asarray(result.x).reshape(n_layers, n_cands).argmax(axis=1)
    choice = {n: candidates[int(k)] for n, k in zip(layers, picks, strict=True)}
    used = float(sum(bits[i, k] for i, k in enumerate(picks))) / total_params
    return Allocation(choice=choice, average_bits=used, objective=float(result.fun))
