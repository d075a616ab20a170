"""include= / exclude= layer selection: patterns, the plan's record, the CLI, and the errors of a typo."""

import json

import pytest
from torch import nn

import diffq
from diffq.cli import main
from diffq.errors import QuantizationInputError
from diffq.modules import QUANTIZED_MODULES
from diffq.pipelines.serialization import plan_of
from diffq.pipelines.testing import tiny_call_kwargs, tiny_pixart_pipeline, tiny_sd_pipeline
from diffq.plan import QuantPlan
from diffq.selection import LayerSelection, matches


def _quantized(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, QUANTIZED_MODULES)}


def test_patterns_match_names_parents_and_classes():
    conv, linear = nn.Conv2d(2, 2, 1), nn.Linear(2, 2)
    assert matches("down_blocks", "down_blocks.0.resnets.0.conv1", conv)
    assert matches("down_blocks.*.resnets", "down_blocks.0.resnets.0.conv1", conv)
    assert not matches("resnets", "down_blocks.0.resnets.0.conv1", conv)  # a glob of the whole (parent) name
    assert matches("*conv1", "down_blocks.0.resnets.0.conv1", conv)
    assert matches("class:Conv2d", "anything", conv) and not matches("class:Conv2d", "anything", linear)
    assert LayerSelection.of(exclude=nn.Conv2d).exclude == ("class:Conv2d",)


@pytest.mark.parametrize("value", [[], "", "  ", 3, ["ok", None], "class:"])
def test_bad_patterns_are_refused(value):
    with pytest.raises(QuantizationInputError):
        LayerSelection.of(include=value)


def test_exclude_every_convolution_is_recorded_and_survives_a_round_trip(tmp_path):
    pipe = diffq.quantize(tiny_sd_pipeline(), "w8a8-rtn", exclude="class:Conv2d", progress=False)
    quantized = _quantized(pipe.unet)
    assert quantized and all(not issubclass(t, nn.Conv2d) for t in quantized.values())
    plan = plan_of(pipe.unet)
    assert plan.selection == {"exclude": ["class:Conv2d"]}
    assert plan.skipped["down_blocks.0.resnets.0.conv1"] == "exclude='class:Conv2d'"
    assert QuantPlan.from_json(plan.to_json()) == plan
    diffq.save(pipe, tmp_path / "q")
    loaded = diffq.load(tmp_path / "q")
    assert plan_of(loaded.unet).selection == plan.selection
    assert _quantized(loaded.unet).keys() == quantized.keys()


def test_include_blocks_of_a_transformer():
    pipe = tiny_pixart_pipeline()
    pipe = diffq.quantize(pipe, "w8a8-rtn", include="transformer_blocks.0", exclude="*.attn2.*", progress=False,
                          num_calibration_steps=2, **tiny_call_kwargs(pipe))
    names = set(_quantized(pipe.transformer))
    assert names and all(n.startswith("transformer_blocks.0.") and ".attn2." not in n for n in names)
    assert "transformer_blocks.0.attn1.to_q" in names
    assert plan_of(pipe.transformer).skipped["transformer_blocks.1.attn1.to_q"] == "not in include=['transformer_blocks.0']"


def test_a_plan_without_patterns_serializes_as_before():
    pipe = diffq.quantize(tiny_sd_pipeline(), "w8a8-rtn", progress=False)
    assert "selection" not in plan_of(pipe.unet).to_dict()


def test_a_pattern_that_matches_nothing_is_an_error_before_any_work():
    pipe = tiny_sd_pipeline()
    with pytest.raises(QuantizationInputError, match="'down_blockz' matches no quantizable layer"):
        diffq.quantize(pipe, "w4a8", include="down_blockz", progress=False)
    with pytest.raises(QuantizationInputError, match="keeps in 16-bit: conv_in"):
        diffq.quantize(pipe, "w4a8", include="conv_in", progress=False)
    with pytest.raises(QuantizationInputError, match="leave no layer to quantize"):
        diffq.quantize(pipe, "w4a8", exclude=["class:Conv2d", "class:Linear"], progress=False)
    assert not _quantized(pipe.unet)  # nothing was converted
    # excluding a layer diffq keeps anyway is not an error: the user's intent holds
    diffq.quantize(pipe, "w8a8-rtn", exclude="conv_in", progress=False)


def test_allocate_narrows_the_plan_too():
    pipe = tiny_sd_pipeline()
    plan = diffq.allocate(pipe, preset="w8a8-rtn", include="up_blocks")
    assert plan.layers and all(n.startswith("up_blocks.") for n in plan.layers)
    assert plan.selection == {"include": ["up_blocks"]}


def test_cli_quantize_with_exclude(tmp_path):
    folder = tmp_path / "fp"
    tiny_sd_pipeline().save_pretrained(folder)
    out = tmp_path / "q"
    code = main(["quantize", str(folder), "--preset", "w8a8-rtn", "--out", str(out), "--exclude", "class:Conv2d",
                 "--exclude", "mid_block", "--no-progress"])
    assert code == 0
    report = json.loads((out / "diffq_report.json").read_text())
    assert report["selection"] == {"exclude": ["class:Conv2d", "mid_block"]}
    assert report["kept_layers"]["mid_block.attentions.0.proj_in"] == "exclude='mid_block'"


def test_cli_bad_pattern_is_a_clean_error(tmp_path, capsys):
    folder = tmp_path / "fp"
    tiny_sd_pipeline().save_pretrained(folder)
    assert main(["quantize", str(folder), "--preset", "w8a8-rtn", "--out", str(tmp_path / "q"),
                 "--include", "nothing.like.this", "--no-progress"]) == 1
    assert "matches no quantizable layer" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
