"""The saving policy (diffq.saving): no save deletes or overwrites a user's files or the model's own,
an interrupted save leaves one whole checkpoint, a failing disk leaves nothing partial."""

import errno
import hashlib
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import diffq
from diffq.cli import main as cli_main
from diffq.pipelines.testing import run_tiny, tiny_sd_pipeline
from diffq.saving import MARKER, OverwriteRefusedError, SaveError


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def quantized_tiny():
    return diffq.quantize(tiny_sd_pipeline(), "w8a8-rtn", progress=False)


@pytest.fixture
def float_folder(tmp_path):
    """A float pipeline saved by diffusers, as a user's own model folder."""
    folder = tmp_path / "my-model"
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def test_saving_over_the_folder_the_model_came_from_is_refused(float_folder, tmp_path):
    before = tree_digest(float_folder)
    pipe = diffq.quantize(diffq.load(float_folder), "w8a8-rtn", progress=False)
    link = tmp_path / "link-to-model"
    link.symlink_to(float_folder)
    for target in (float_folder, link, float_folder / "unet", tmp_path):  # itself, a symlink, a part, a parent
        for overwrite in (False, True):
            with pytest.raises(OverwriteRefusedError, match="loaded from"):
                diffq.save(pipe, target, overwrite=overwrite)
    assert tree_digest(float_folder) == before
    diffq.save(pipe, float_folder / "quantized")  # a new folder inside it adds files, removes none
    assert tree_digest(float_folder).items() >= before.items()


def test_cli_refuses_to_quantize_into_the_models_own_folder(float_folder, capsys):
    before = tree_digest(float_folder)
    code = cli_main(["quantize", str(float_folder), "--preset", "w8a8-rtn", "--out", str(float_folder),
                     "--no-progress"])
    assert code != 0 and "loaded from" in capsys.readouterr().err
    assert tree_digest(float_folder) == before


def test_a_folder_of_other_files_is_refused_unless_overwrite(tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    pipe = quantized_tiny()
    with pytest.raises(OverwriteRefusedError, match="did not write"):
        diffq.save(pipe, target)
    assert tree_digest(target) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    diffq.save(pipe, target, overwrite=True)  # asked for exactly that
    assert not (target / "notes.txt").exists() and (target / MARKER).exists()


def test_an_existing_file_is_refused_unless_overwrite(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    pipe = quantized_tiny()
    with pytest.raises(OverwriteRefusedError, match="existing file"):
        diffq.save(pipe, target)
    assert target.read_bytes() == b"precious"
    diffq.save(pipe, target, overwrite=True)
    assert target.is_dir() and np.array_equal(run_tiny(diffq.load(target)), run_tiny(pipe))


def test_replacing_an_earlier_checkpoint_keeps_the_users_files(tmp_path):
    target = tmp_path / "q"
    first = quantized_tiny()
    diffq.save(first, target)
    (target / "notes.txt").write_text("mine")
    (target / "unet" / "my-readme.md").write_text("also mine")
    second = diffq.quantize(tiny_sd_pipeline(), "w4a8-rtn", progress=False)
    diffq.save(second, target)
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "unet" / "my-readme.md").read_text() == "also mine"
    assert np.array_equal(run_tiny(diffq.load(target)), run_tiny(second))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failing_disk_leaves_nothing_partial(tmp_path, monkeypatch, code):
    pipe = quantized_tiny()
    earlier = tmp_path / "q"
    diffq.save(pipe, earlier)
    before = tree_digest(earlier)
    original = type(pipe).save_pretrained

    def failing(self, folder, **kwargs):
        original(self, folder, **kwargs)  # half of a checkpoint on disk, then the disk fails
        raise OSError(code, "simulated")

    monkeypatch.setattr(type(pipe), "save_pretrained", failing)
    for target in (tmp_path / "new", earlier):
        with pytest.raises(SaveError, match="Nothing partial"):
            diffq.save(pipe, target)
    assert not (tmp_path / "new").exists()
    assert tree_digest(earlier) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


_SAVER = textwrap.dedent("""
    import sys, diffq
    from diffq.pipelines.testing import tiny_sd_pipeline
    pipes = [diffq.quantize(tiny_sd_pipeline(), p, progress=False) for p in ("w8a8-rtn", "w4a8-rtn")]
    for i, pipe in enumerate(pipes):
        diffq.save(pipe, f"{sys.argv[1]}-reference-{i}")  # what a whole checkpoint of each looks like
    print("ready", flush=True)
    for i in range(1000):
        diffq.save(pipes[i % 2], sys.argv[1])
""")


def test_a_killed_save_leaves_one_whole_checkpoint(tmp_path):
    target = tmp_path / "q"
    candidates = None
    for delay in (0.15, 0.5, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        if candidates is None:
            candidates = [run_tiny(diffq.load(f"{target}-reference-{i}")) for i in range(2)]
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if not target.exists() and not list(tmp_path.glob(".q.old-*")):
            continue  # killed before the first save finished: nothing was there to keep
        images = run_tiny(diffq.load(target))  # recovers a checkpoint left aside between two renames
        assert any(np.array_equal(images, c) for c in candidates)
        assert (target / MARKER).exists()


def test_save_pretrained_of_a_quantized_pipeline_follows_the_policy(float_folder, tmp_path):
    """``pipe.save_pretrained`` (diffusers' own verb) and the denoiser's refuse what ``diffq.save`` refuses."""
    pipe = diffq.quantize(diffq.load(float_folder), "w8a8-rtn", progress=False)
    before = tree_digest(float_folder)
    for target in (float_folder, float_folder / "unet"):
        with pytest.raises(OverwriteRefusedError, match="loaded from"):
            pipe.save_pretrained(target, overwrite=True)
    with pytest.raises(OverwriteRefusedError, match="loaded from"):
        pipe.unet.save_pretrained(float_folder / "unet")
    assert tree_digest(float_folder) == before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    for save in (pipe.save_pretrained, pipe.unet.save_pretrained):
        with pytest.raises(OverwriteRefusedError, match="did not write"):
            save(notes)
        assert [p.name for p in notes.iterdir()] == ["todo.txt"]

    out = tmp_path / "quantized"
    pipe.save_pretrained(out)
    (out / "README.md").write_text("my notes")
    pipe.save_pretrained(out)  # an earlier checkpoint is replaced, the user's file beside it kept
    assert (out / "README.md").read_text() == "my notes" and (out / MARKER).is_file()
    reloaded = diffq.load(out)
    assert np.array_equal(run_tiny(reloaded, steps=2), run_tiny(pipe, steps=2))

    unet_folder = tmp_path / "unet-only"
    pipe.unet.save_pretrained(unet_folder)
    pipe.unet.save_pretrained(unet_folder)  # a model folder diffq wrote is replaced too
    assert (unet_folder / "config.json").is_file() and not list(tmp_path.glob(".unet-only.*"))


def test_single_files_replace_their_own_kind_only(tmp_path):
    """Plans, sensitivity analyses, statistics and charts: an earlier file diffq wrote is replaced, a
    user's file of the same name is refused (nothing written) unless overwrite=True."""
    from PIL import Image

    from diffq.plots import plot_bits
    from diffq.sensitivity import Sensitivity

    pipe = tiny_sd_pipeline()
    plan = diffq.allocate(pipe, None, preset="w8a8-rtn")
    sens = Sensitivity("key", {"a": "quality"}, {"a": {"w8a8": 40.0}})
    stats = diffq.calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False, height=32, width=32)
    writers = {
        "plan.json": lambda path, **kw: plan.save(path, **kw),
        "sensitivity.json": lambda path, **kw: sens.save(path, **kw),
        "stats.safetensors": lambda path, **kw: stats.save(path, **kw),
        "charts/bits_per_layer.png": lambda path, **kw: plot_bits(plan, path.parent, **kw),
    }
    for name, write in writers.items():
        path = tmp_path / name
        write(path)
        write(path)  # its own earlier file: replaced
        path.unlink()
        if path.suffix == ".png":
            Image.new("RGB", (2, 2)).save(path)  # a user's image
        else:
            path.write_text("mine")
        before = path.read_bytes()
        with pytest.raises(OverwriteRefusedError, match="did not write"):
            write(path)
        assert path.read_bytes() == before, name
        write(path, overwrite=True)
        assert path.read_bytes() != before, name
    assert Sensitivity.load(tmp_path / "sensitivity.json") == sens
    assert diffq.QuantPlan.from_json((tmp_path / "plan.json").read_text()) == plan


def test_a_failing_disk_leaves_an_earlier_file_whole(tmp_path, monkeypatch):
    from diffq import saving

    target = tmp_path / "plan.json"
    plan = diffq.allocate(tiny_sd_pipeline(), None, preset="w8a8-rtn")
    plan.save(target)
    before = target.read_bytes()

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "simulated")

    monkeypatch.setattr(saving.os, "replace", full_disk)
    with pytest.raises(SaveError, match="the disk is full"):
        plan.save(target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_cli_generate_replaces_its_own_image_and_refuses_others(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "digit.png"
    argv = ["generate", "digits-sd", "--prompt", "a handwritten digit 3", "--steps", "2", "--out", str(out),
            "--no-progress"]
    assert cli_main(argv) == 0 and cli_main(argv) == 0  # the second run replaces its own image
    Image.new("RGB", (2, 2)).save(out)
    before = out.read_bytes()
    assert cli_main(argv) == 1 and "did not write" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert cli_main([*argv, "--overwrite"]) == 0 and out.read_bytes() != before
