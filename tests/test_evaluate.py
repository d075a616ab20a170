"""The evaluation runner (`diffq eval`): input errors, seeding, reports, and 1- vs 2-process agreement.

Runs use the tiny random Stable Diffusion pipeline from `diffq.pipelines.testing` (32×32, 2 steps, no
guidance), a stand-in classifier, and the weight-only `w8a16` preset (no calibration pass), so each
test takes seconds. `test_two_process_accelerate_launch_matches_one_process` starts a real
two-process gloo group with `accelerate launch` in a subprocess (about 15-30 s).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_metrics import PixelClassifier  # the stand-in classifier both files use

import diffq
from diffq.errors import DiffQError, ModelLoadError, UnknownPresetError
from diffq.metrics.errors import EvaluationInputError
from diffq.metrics.evaluate import configure_parser, evaluate, main
from diffq.metrics.generation import generate_images
from diffq.metrics.store import ImageStore

REPORT_KEYS = {"model", "num_images", "feature_extractor", "fid_bootstrap", "results", "fid_differences"}
RESULT_KEYS = {"fid", "fid_std", "alignment", "clip_score", "psnr_vs_fp", "ssim_vs_fp", "weight_bytes", "seconds"}
TINY_CALL = {"height": 32, "width": 32, "guidance_scale": 1.0}
PROMPTS = [(f"a handwritten digit {d}", d) for d in range(10)]




def tiny_factory(name: str):
    from diffq.pipelines.testing import tiny_sd_pipeline

    return tiny_sd_pipeline()


def tiny_eval(out_dir: str | None, presets: list[str], num_images: int, **kwargs) -> dict:
    """`evaluate` on the tiny pipeline; shared by the in-process tests and the accelerate subprocess."""
    options = dict(
        out_dir=out_dir,
        prompts=PROMPTS,
        batch_size=2,
        steps=2,
        call_kwargs=TINY_CALL,
        classifier=PixelClassifier(),
        pipeline_factory=tiny_factory,
        progress=False,
    )
    return evaluate("tiny-sd", presets, num_images, **{**options, **kwargs})


def _never(name: str):
    raise AssertionError("bad input must be rejected before any pipeline is built")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_images": 0}, EvaluationInputError, "num_images"),
        ({"presets": ["fp", "w3a3"]}, UnknownPresetError, "w3a3"),
        ({"presets": " , "}, EvaluationInputError, "no presets"),
        ({"prompts_file": "/no/such/prompts.txt", "prompts": None}, EvaluationInputError, "does not exist"),
        ({"model": "no-such-model", "prompts": None}, EvaluationInputError, "not a bundled model"),
        ({"batch_size": 0}, EvaluationInputError, "batch_size"),
        ({"clip_model": "ViT-B-32"}, EvaluationInputError, "clip_weights"),
        ({"fid_bootstrap": -1}, EvaluationInputError, "fid_bootstrap"),
    ],
)
def test_bad_input_is_rejected_early(kwargs, error, match):
    args = {"model": "tiny-sd", "presets": ["fp", "w8a16"], "num_images": 4, "prompts": PROMPTS}
    args.update(kwargs)
    with pytest.raises(error, match=match) as info:
        evaluate(
            args.pop("model"), args.pop("presets"), args.pop("num_images"), pipeline_factory=_never, **args
        )
    assert isinstance(info.value, DiffQError)


def test_unknown_model_folder_is_a_load_error(tmp_path):
    not_a_pipeline = tmp_path / "model.bin"
    not_a_pipeline.write_bytes(b"")
    with pytest.raises(ModelLoadError):
        evaluate(
            str(not_a_pipeline), ["fp"], 2, prompts=PROMPTS, classifier=PixelClassifier(), progress=False
        )


def test_cli_prints_errors_and_returns_nonzero(tmp_path, capsys):
    assert main(["tiny-sd", "--num-images", "0", "--out", str(tmp_path)]) == 1
    assert "diffq eval: error:" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_parser_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args([])
    assert (args.model, args.presets, args.seed, args.no_progress) == ("digits-sd", "fp,w8a8,w4a8", 0, False)
    args = parser.parse_args(
        ["m", "--presets", "w4a8", "--num-images", "8", "--prompts", "p.txt", "--no-progress"]
    )
    assert (args.model, args.presets, args.num_images, args.prompts, args.no_progress) == (
        "m",
        "w4a8",
        8,
        "p.txt",
        True,
    )


def test_image_seed_depends_only_on_global_index():
    pipe = tiny_factory("tiny-sd")
    prompts = [p for p, _ in PROMPTS[:4]]
    call = {**TINY_CALL, "num_inference_steps": 2}
    batched, _ = generate_images(
        pipe, prompts, [range(0, 2), range(2, 4)], seed=5, call_kwargs=call, progress=False
    )
    single, _ = generate_images(
        pipe, prompts, [range(3, 4), range(1, 2)], seed=5, call_kwargs=call, progress=False
    )
    assert sorted(single) == [1, 3]
    for i in (1, 3):
        assert torch.allclose(batched[i], single[i], atol=1e-4)
    assert not torch.allclose(batched[0], batched[1], atol=1e-2)  # different seeds, different images


def test_fp_is_generated_as_reference_when_not_listed(tmp_path):
    report = tiny_eval(str(tmp_path), ["w8a16"], 2)
    assert list(report["results"]) == ["w8a16"]
    row = report["results"]["w8a16"]
    assert row["psnr_vs_fp"] is not None and row["psnr_vs_fp"] > 20
    assert 0.9 < row["ssim_vs_fp"] <= 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_launch_matches_one_process(tmp_path):
    """Same report from one process and from a 2-process gloo group (`accelerate launch`, subprocess)."""
    one = tiny_eval(str(tmp_path / "one"), ["fp", "w8a16"], 6)

    # The report shape, checked once here on the one-process run.
    assert (
        set(one) == REPORT_KEYS and one["num_images"] == 6 and one["feature_extractor"] == "digit-classifier"
    )
    assert list(one["results"]) == ["fp", "w8a16"]
    for row in one["results"].values():
        assert set(row) == RESULT_KEYS
        assert isinstance(row["weight_bytes"], int) and row["seconds"] > 0 and row["fid"] >= 0
        assert row["clip_score"] is None and 0 <= row["alignment"] <= 1 and row["fid_std"] >= 0
    assert one["fid_bootstrap"] > 0 and list(one["fid_differences"]) == ["fp vs w8a16"]
    pair = one["fid_differences"]["fp vs w8a16"]
    assert pair["difference"] == pytest.approx(one["results"]["fp"]["fid"] - one["results"]["w8a16"]["fid"])
    assert pair["low"] <= pair["high"] and 0 <= pair["a_lower"] <= 1
    fp, q = one["results"]["fp"], one["results"]["w8a16"]
    assert fp["psnr_vs_fp"] is None and fp["ssim_vs_fp"] is None
    assert q["psnr_vs_fp"] > 20 and q["weight_bytes"] < fp["weight_bytes"]
    assert json.loads((tmp_path / "one" / "report.json").read_text()) == one
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["grid.png", "images", "report.json", "report.md"]

    script = tmp_path / "two_process_eval.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_evaluate import tiny_eval\n"
        "from diffq.distributed import end_processes, process_state\n"
        "state = process_state()\n"
        "assert state.num_processes == 2, 'not a 2-process group'\n"
        "report = tiny_eval(sys.argv[1], ['fp', 'w8a16'], 6)\n"
        # One file per process: two processes printing to one pipe can interleave their lines.
        "with open(f'{sys.argv[2]}/returned-{state.process_index}.json', 'w') as f:\n"
        "    json.dump(report, f)\n"
        "end_processes(state)\n"
    )
    # `--cpu` makes accelerate 1.x use its single-process launcher; `--multi_gpu` with no visible GPU
    # starts torchrun, and the runner joins the processes in a gloo group on CPU.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(script), str(tmp_path / "two"), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("returned-*.json"))]
    assert len(reports) == 2 and reports[0] == reports[1]  # every process returns the main one's report
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two == reports[0]
    for preset in ("fp", "w8a16"):
        a, b = one["results"][preset], two["results"][preset]
        assert b["alignment"] == a["alignment"]
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-4, abs=1e-6)
        assert b["weight_bytes"] == a["weight_bytes"]
    assert two["results"]["w8a16"]["psnr_vs_fp"] == pytest.approx(
        one["results"]["w8a16"]["psnr_vs_fp"], abs=0.05
    )


def test_quantize_contract_is_available():
    assert callable(diffq.quantize) and callable(diffq.weight_bytes) and "w8a16" in diffq.available_presets()


def test_missing_inception_weights_stop_before_generation(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFQ_INCEPTION_WEIGHTS", raising=False)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(DiffQError, match="Inception"):
            tiny_eval(None, ["fp"], 2, feature_extractor="inception-v3", pipeline_factory=_never)
    finally:
        torch.hub.set_dir(old)


def test_cli_end_to_end_on_a_local_pipeline_folder(tmp_path, monkeypatch, capsys):
    import diffq.metrics.scoring as scoring

    tiny_factory("tiny-sd").save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("3\ta handwritten digit 3\na cat\n")
    monkeypatch.setattr(scoring, "_load_classifier", lambda classifier: PixelClassifier())
    out = tmp_path / "out"
    argv = [str(tmp_path / "model"), "--presets", "fp", "--num-images", "3", "--out", str(out)]
    argv += ["--prompts", str(tmp_path / "prompts.txt"), "--steps", "1", "--batch-size", "3", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "| fp |" in captured.out and "img/s" not in captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == str(tmp_path / "model") and report["num_images"] == 3
    assert report["results"]["fp"]["alignment"] in (0.0, 0.5, 1.0)  # two of three prompts name a digit


def test_methods_are_scored_beside_the_presets(tmp_path):
    """Other quantizers join the run on the same prompts and seeds; one that fails is a row with its error."""
    seen = []

    def same_as_preset(pipe):
        seen.append(type(pipe).__name__)
        diffq.quantize(pipe, "w8a16-rtn", progress=False)
        return None  # diffq.weight_bytes counts

    def own_count(pipe):
        diffq.quantize(pipe, "w8a16-rtn", progress=False)
        return 12345

    def broken(pipe):
        raise ValueError("no kernel\nfor this layer")

    methods = {"same": same_as_preset, "counted": own_count, "broken": broken}
    report = tiny_eval(str(tmp_path), ["w8a16-rtn"], 2, methods=methods)
    rows = report["results"]
    assert list(rows) == ["w8a16-rtn", "same", "counted", "broken"]
    assert seen == ["StableDiffusionPipeline"]  # a freshly loaded pipeline, once
    assert "error" not in rows["w8a16-rtn"] and rows["same"]["error"] is None
    for key in ("psnr_vs_fp", "ssim_vs_fp", "fid", "alignment", "weight_bytes"):
        assert rows["same"][key] == rows["w8a16-rtn"][key]  # same quantizer, prompts and seeds: same numbers
    assert rows["counted"]["weight_bytes"] == 12345
    assert rows["broken"] == {**dict.fromkeys(RESULT_KEYS), "error": "ValueError: no kernel for this layer"}
    assert json.loads((tmp_path / "report.json").read_text()) == report
    markdown = (tmp_path / "report.md").read_text()
    assert "| broken | – |" in markdown and "`broken` did not run: ValueError: no kernel for this layer" in markdown
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize(
    ("methods", "match"),
    [({"fp": lambda pipe: None}, "method name"), ({"w8a16": lambda pipe: None}, "method name"),
     ({"": lambda pipe: None}, "method name"), ({"x": "not a function"}, "not callable")],
)
def test_bad_methods_are_rejected_early(methods, match):
    with pytest.raises(EvaluationInputError, match=match):
        evaluate("tiny-sd", ["w8a16"], 2, prompts=PROMPTS, pipeline_factory=_never, methods=methods)


def _without_seconds(report: dict) -> dict:
    return {**report, "results": {p: {k: v for k, v in row.items() if k != "seconds"}
                                  for p, row in report["results"].items()}}


def _batch_files(out: Path) -> list[Path]:
    return sorted((out / "images").glob("*/*.safetensors"))


@pytest.mark.parametrize("kill_after", [2, 6])  # batch files written: inside fp's run, inside w8a16's
def test_an_interrupted_eval_resumes_and_gives_the_same_report(tmp_path, monkeypatch, kill_after):
    """Kill a running `evaluate` (SIGKILL, a subprocess) once it has kept some batches; the rerun
    generates only what is missing and writes the report an uninterrupted run writes."""
    out = tmp_path / "resumed"
    script = tmp_path / "slow_eval.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_evaluate import tiny_eval, tiny_factory\n"
        "def slow(name):\n"
        "    pipe = tiny_factory(name)\n"
        "    pipe.unet.register_forward_pre_hook(lambda *_: time.sleep(0.1))\n"
        "    return pipe\n"
        "tiny_eval(sys.argv[1], ['fp', 'w8a16'], 8, pipeline_factory=slow)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(_batch_files(out)) < kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the evaluation ended before it could be interrupted"
        proc.kill()
    finally:
        proc.wait()
    kept = len(_batch_files(out))
    assert kept >= kill_after and not (out / "report.json").exists()

    generated = []
    save = ImageStore.save
    monkeypatch.setattr(ImageStore, "save", lambda self, batch, *a: (generated.append(batch), save(self, batch, *a)))
    resumed = tiny_eval(str(out), ["fp", "w8a16"], 8)
    assert len(generated) == 8 - kept  # only the batches the killed run had not kept
    uninterrupted = tiny_eval(str(tmp_path / "whole"), ["fp", "w8a16"], 8)
    assert _without_seconds(resumed) == _without_seconds(uninterrupted)
    assert len(_batch_files(out)) == 8

    again = tiny_eval(str(out), ["fp", "w8a16"], 8, pipeline_factory=_never)  # all stored: no model is built
    assert again == resumed


def test_eval_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(DiffQError, match="did not write"):
        tiny_eval(str(tmp_path), ["fp"], 2, pipeline_factory=_never)
    report = tiny_eval(str(tmp_path), ["fp"], 2, overwrite=True)
    assert (tmp_path / "notes.md").read_text() == "mine" and report["num_images"] == 2
    tiny_eval(str(tmp_path), ["fp"], 2)  # now an evaluation folder: reruns need no --overwrite


def test_changed_settings_never_reuse_stored_images(tmp_path):
    first = tiny_eval(str(tmp_path), ["fp"], 2)
    other_seed = tiny_eval(str(tmp_path), ["fp"], 2, seed=5)
    assert other_seed["results"]["fp"]["fid"] != first["results"]["fp"]["fid"]
    assert len(list((tmp_path / "images").iterdir())) == 2  # one folder per setting, neither overwritten
