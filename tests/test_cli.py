import json

import pytest

from diffq.cli import main
from diffq.pipelines.testing import tiny_sd_pipeline


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def test_quantize_then_generate(float_folder, tmp_path, capsys):
    out = tmp_path / "q"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    code = main([
        "quantize", str(float_folder), "--preset", "w4a8", "--out", str(out),
        "--prompts", str(prompts), "--calibration-steps", "2", "--temporal-bits", "8", "--no-progress",
    ])
    assert code == 0
    report = json.loads((out / "diffq_report.json").read_text())
    assert report["temporal_bits"] == 8 and not any(n.endswith("time_emb_proj") for n in report["kept_layers"])
    assert report["preset"] == "w4a8" and report["denoiser"] == "UNet2DConditionModel"
    assert report["weight_bytes"] < report["weight_bytes_fp"]
    assert "conv_in" in report["kept_layers"]
    assert (out / "unet" / "config.json").exists()
    assert json.loads((out / "unet" / "config.json").read_text())["quantization_config"]["quant_method"] == "diffq"
    assert (float_folder / "unet" / "config.json").read_text().find("quantization_config") == -1  # input untouched

    image = tmp_path / "img.png"
    code = main(["generate", str(out), "--prompt", "a red circle", "--out", str(image), "--steps", "2",
                 "--height", "32", "--width", "32", "--no-progress"])
    assert code == 0 and image.stat().st_size > 0


def test_bad_preset_is_a_clean_error(float_folder, tmp_path, capsys):
    assert main(["quantize", str(float_folder), "--preset", "w5a7", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "unknown preset 'w5a7'" in err and "w4a8" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_missing_model_is_a_clean_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nothing-here"), "--prompt", "x", "--out", str(tmp_path / "a.png")]) == 1
    assert "could not load" in capsys.readouterr().err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("quantize", "generate", "eval", "calibrate", "allocate", "demo"):
        assert command in out


def test_calibrate_plots_and_saves(float_folder, tmp_path):
    stats_path = tmp_path / "stats.safetensors"
    code = main(["calibrate", str(float_folder), "--plot", str(tmp_path / "plots"), "--out", str(stats_path),
                 "--steps", "3", "--height", "32", "--width", "32", "--top", "4", "--no-progress"])
    assert code == 0
    png = tmp_path / "plots" / "activation_ranges.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from diffq.calibration import CalibrationStats

    stats = CalibrationStats.load(stats_path)
    assert all(len({t for t, _ in steps}) == 3 for steps in stats.layers.values())


def test_quantize_writes_a_model_card_and_keeps_a_users_readme(float_folder, tmp_path):
    out = tmp_path / "q"
    args = ["quantize", str(float_folder), "--preset", "w8a8-rtn", "--out", str(out), "--calibration-steps", "2",
            "--no-progress"]
    assert main(args) == 0
    card = (out / "README.md").read_text()
    assert "`w8a8-rtn`" in card and "## Bits per layer" in card and "| int8 per channel | int8 static |" in card
    assert "Calibration: 4 prompt(s) × 2 denoising steps" in card and "diffq eval " in card and f'diffq.load("{out}")' in card
    assert "16-bit (kept)" in card and "first layer" in card
    assert main(args) == 0  # our own card is replaced
    assert "## Bits per layer" in (out / "README.md").read_text() and not (out / "DIFFQ_MODEL_CARD.md").exists()
    (out / "README.md").write_text("my notes on this checkpoint\n")
    assert main(args) == 0  # a card the user edited is theirs now: kept, ours goes beside it
    assert (out / "README.md").read_text() == "my notes on this checkpoint\n"
    assert "## Load it" in (out / "DIFFQ_MODEL_CARD.md").read_text()


def test_quantize_weight_rounding_overrides_the_preset(float_folder, tmp_path):
    """``--weight-rounding nearest`` on ``w4a16`` (GPTQ by default): every layer of the saved plan rounds
    to nearest, and the report says so."""
    out = tmp_path / "q"
    assert main(["quantize", str(float_folder), "--preset", "w4a16", "--weight-rounding", "nearest",
                 "--calibration-steps", "1", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "diffq_report.json").read_text())
    assert report["weight_rounding"] == "nearest"
    layers = json.loads((out / "unet" / "config.json").read_text())["quantization_config"]["plan"]["layers"]
    assert layers and all(c.get("w_round", "nearest") == "nearest" for c in layers.values())
    assert "GPTQ" not in (out / "README.md").read_text()  # the card's bits table lists GPTQ layers
    with pytest.raises(SystemExit):
        main(["quantize", str(float_folder), "--weight-rounding", "stochastic", "--out", str(tmp_path / "x")])


def test_quantize_loads_the_float_pipeline_in_the_dtype_asked(float_folder, tmp_path):
    """``--dtype bfloat16``: the pipeline is loaded (and quantized, and saved) in bfloat16, as FLUX.1 is
    published; without it diffusers loads float32, twice the memory."""
    from safetensors import safe_open

    out = tmp_path / "q"
    assert main(["quantize", str(float_folder), "--preset", "w8a16-rtn", "--dtype", "bfloat16", "--out", str(out),
                 "--no-progress"]) == 0
    for component in ("unet", "text_encoder"):
        (path,) = (out / component).glob("*.safetensors")
        with safe_open(str(path), "pt") as f:
            dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        assert "BF16" in dtypes and "F32" not in dtypes, (component, dtypes)
    with pytest.raises(SystemExit):
        main(["quantize", str(float_folder), "--dtype", "float8", "--out", str(tmp_path / "x")])
