"""The bit-allocation integer program on hand-made sensitivities."""

import itertools

import pytest

from diffq.allocation import InfeasibleBudgetError, LayerShape, allocate_bits, normalized_losses
from diffq.sensitivity import Candidate, Sensitivity

CANDS = [Candidate(2, 8), Candidate(4, 8), Candidate(8, 8)]


def make_sensitivity(scores, groups=None):
    groups = groups or {name: "quality" for name in scores}
    return Sensitivity("test", groups, {n: {c.label: v for c, v in zip(CANDS, s, strict=True)} for n, s in scores.items()})


def brute_force(sens, shapes, budget):
    layers = list(shapes)
    losses = normalized_losses(sens, layers, CANDS, Candidate(4, 8))
    total = sum(s.params for s in shapes.values())
    best = None
    for combo in itertools.product(range(len(CANDS)), repeat=len(layers)):
        bits = sum(CANDS[k].w_bits * shapes[n].params for n, k in zip(layers, combo, strict=True)) / total
        if bits <= budget + 1e-9:
            loss = sum(losses[i, k] for i, k in enumerate(combo))
            if best is None or loss < best[0] - 1e-12:
                best = (loss, combo)
    return best


def test_matches_brute_force_optimum():
    # SQNR in dB per candidate (2, 4, 8 bits): layer "a" is fragile, "c" robust, "b" in between.
    sens = make_sensitivity({"a": [5.0, 20.0, 40.0], "b": [12.0, 24.0, 42.0], "c": [25.0, 30.0, 45.0]})
    shapes = {"a": LayerShape(64, 64), "b": LayerShape(128, 64), "c": LayerShape(64, 256)}
    for budget in (2.0, 3.0, 4.0, 5.5, 8.0):
        result = allocate_bits(sens, shapes, CANDS, budget)
        loss, combo = brute_force(sens, shapes, budget)
        assert result.objective == pytest.approx(loss, rel=1e-9)
        assert [result.choice[n] for n in shapes] == [CANDS[k] for k in combo]
        assert result.average_bits <= budget + 1e-9


def test_budget_constraint_holds_exactly_when_binding():
    # Four equal layers; an average of 5 bits is best spent as 4, 4, 4, 8 (loss 0.03 against 0.2 for 2, 2, 8, 8).
    sens = make_sensitivity({n: [10.0, 20.0, 40.0] for n in "wxyz"})
    shapes = {n: LayerShape(64, 64) for n in "wxyz"}
    result = allocate_bits(sens, shapes, CANDS, 5.0)
    assert result.average_bits == pytest.approx(5.0)
    assert sorted(c.w_bits for c in result.choice.values()) == [4, 4, 4, 8]


def test_infeasible_budget_names_the_smallest_feasible_one():
    sens = make_sensitivity({"a": [5.0, 20.0, 40.0], "b": [5.0, 20.0, 40.0]})
    shapes = {"a": LayerShape(64, 64), "b": LayerShape(64, 64)}
    with pytest.raises(InfeasibleBudgetError, match=r"smallest feasible budget .* is 2 bits"):
        allocate_bits(sens, shapes, CANDS, 1.5)


def test_low_rank_branch_counts_in_the_budget_and_only_on_linear_layers():
    cands = [Candidate(4, 8), Candidate(4, 8, rank=8)]
    sens = Sensitivity(
        "test", {"lin": "quality", "conv": "quality"},
        {"lin": {"w4a8": 10.0, "w4a8r8": 30.0}, "conv": {"w4a8": 10.0}},
    )
    shapes = {"lin": LayerShape(64, 64), "conv": LayerShape(64, 64, branch=False)}
    # rank 8 costs 16 * 8 * (64 + 64) bits = 4 bits per weight of a 64x64 layer: 8 bits on 'lin'.
    roomy = allocate_bits(sens, shapes, cands, 6.0)
    assert roomy.choice == {"lin": cands[1], "conv": cands[0]}
    assert roomy.average_bits == pytest.approx(6.0)
    tight = allocate_bits(sens, shapes, cands, 5.0)
    assert tight.choice["lin"] == cands[0]


def test_groups_are_normalized_at_the_reference():
    sens = make_sensitivity(
        {"content": [0.5, 0.9, 0.99], "quality": [10.0, 20.0, 30.0]}, {"content": "content", "quality": "quality"}
    )
    losses = normalized_losses(sens, ["content", "quality"], CANDS, Candidate(4, 8))
    assert losses[0, 1] == pytest.approx(1.0) and losses[1, 1] == pytest.approx(1.0)


def test_image_metric_losses_are_one_group_of_squared_errors():
    # PSNR 20 and 30 dB at the reference: squared errors 1e-2 and 1e-3, normalized by their sum only.
    scores = {"content": [10.0, 20.0, 40.0], "quality": [20.0, 30.0, 50.0]}
    sens = make_sensitivity(scores, {"content": "content", "quality": "quality"})
    sens.metric = "image"
    losses = normalized_losses(sens, ["content", "quality"], CANDS, Candidate(4, 8))
    assert losses[0, 1] == pytest.approx(1e-2 / 1.1e-2) and losses[1, 1] == pytest.approx(1e-3 / 1.1e-2)
    assert losses[0, 0] == pytest.approx(1e-1 / 1.1e-2)
    # with one budget for both, the layer whose error is ten times larger gets the bits
    choice = allocate_bits(sens, {"content": LayerShape(8, 8), "quality": LayerShape(8, 8)}, CANDS, 5.0).choice
    assert choice == {"content": Candidate(8, 8), "quality": Candidate(2, 8)}


def test_unknown_metric_is_refused():
    with pytest.raises(Exception, match="unknown sensitivity metric 'ssim'"):
        Sensitivity("x", metric="ssim")


def test_missing_scores_are_reported():
    sens = make_sensitivity({"a": [5.0, 20.0, 40.0]})
    with pytest.raises(Exception, match="lacks scores"):
        allocate_bits(sens, {"a": LayerShape(8, 8), "b": LayerShape(8, 8)}, CANDS, 4.0)


def test_content_share_splits_the_budget_between_groups():
    # Content scores are SSIM, quality scores SQNR dB; equal shapes so bits per layer are w_bits * 4096.
    scores = {"c1": [0.6, 0.9, 0.99], "c2": [0.8, 0.95, 0.995], "q1": [5.0, 20.0, 40.0], "q2": [15.0, 25.0, 42.0]}
    groups = {"c1": "content", "c2": "content", "q1": "quality", "q2": "quality"}
    sens = make_sensitivity(scores, groups)
    shapes = {n: LayerShape(64, 64) for n in scores}
    joint = allocate_bits(sens, shapes, CANDS, 4.0)
    losses = normalized_losses(sens, list(shapes), CANDS, Candidate(4, 8))
    for share in (0.25, 0.5, 0.75):
        split = allocate_bits(sens, shapes, CANDS, 4.0, content_share=share)
        # 4 equal layers at an average of 4 bits: 16 bits per weight position, shared between the groups.
        assert sum(split.choice[n].w_bits for n in ("c1", "c2")) <= share * 16 + 1e-9
        assert sum(split.choice[n].w_bits for n in ("q1", "q2")) <= (1 - share) * 16 + 1e-9
        # Brute force over the split constraints gives the same objective.
        best = min(
            sum(losses[i, k] for i, k in enumerate(combo))
            for combo in itertools.product(range(len(CANDS)), repeat=4)
            if sum(CANDS[k].w_bits for k in combo[:2]) <= share * 16 + 1e-9
            and sum(CANDS[k].w_bits for k in combo[2:]) <= (1 - share) * 16 + 1e-9
        )
        assert split.objective == pytest.approx(best)
        assert joint.objective <= split.objective + 1e-12  # the joint program is never worse on its objective
    with pytest.raises(InfeasibleBudgetError, match="content_share=0.1 leaves the content layers"):
        allocate_bits(sens, shapes, CANDS, 4.0, content_share=0.1)
    with pytest.raises(ValueError, match="fraction between 0 and 1"):
        allocate_bits(sens, shapes, CANDS, 4.0, content_share=1.0)
