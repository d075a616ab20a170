"""The repository's top-level folders do not hide other distributions' packages of the same name.

From the repository root (``python -c``, ``python app.py``, ``python -m pytest``) the folder
``kernels/`` is importable as ``kernels``, the name of Hugging Face's package, which
transformers imports and, since 5.25, installs.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str, *python_flags: str, pythonpath: Path | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(
        [sys.executable, *python_flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_top_level_kernels_is_the_installed_package_when_there_is_one(tmp_path):
    hub = tmp_path / "kernels"
    hub.mkdir()
    (hub / "__init__.py").write_text("CUDAProperties = 'hub'\n")
    (hub / "layer.py").write_text("NAME = 'hub layer'\n")
    out = _run_from_root(
        "import kernels, kernels.layer; print(kernels.CUDAProperties, kernels.layer.NAME, kernels.__file__)",
        "-S",  # no site-packages: the stand-in is the only other kernels
        pythonpath=tmp_path,
    )
    assert out == f"hub hub layer {hub / '__init__.py'}"


def test_top_level_kernels_reads_as_absent_when_none_is_installed():
    out = _run_from_root(
        "import kernels; print(kernels.__file__, [n for n in vars(kernels) if not n.startswith('_')])", "-S"
    )
    assert out == "None []"


def test_diffq_kernels_is_ours_beside_the_installed_package(tmp_path):
    hub = tmp_path / "kernels"
    hub.mkdir()
    (hub / "__init__.py").write_text("CUDAProperties = 'hub'\n")
    out = _run_from_root(
        "import kernels, diffq.kernels; print(kernels.CUDAProperties, diffq.kernels.quantized_linear.__module__)",
        pythonpath=tmp_path,  # ahead of site-packages, where transformers may have installed the real one
    )
    assert out.splitlines()[-1] == "hub diffq.kernels.dispatch"


def test_no_other_module_of_ours_shares_a_name_with_an_installed_or_standard_one():
    """What the repository root, ``benchmarks/`` (a script's folder comes first on ``sys.path``)
    and ``tests/`` (pytest inserts it) make importable by a bare name, against what the installed
    distributions and the standard library provide: a clash hides theirs from every import,
    transformers' included. ``diffq`` is this distribution; ``kernels/`` hands over (above)."""
    import importlib.metadata

    handled = {ROOT / "diffq", ROOT / "kernels"}
    ours = [p for p in ROOT.iterdir() if (p / "__init__.py").exists() and p not in handled]
    ours += [p for folder in (ROOT, ROOT / "benchmarks", ROOT / "tests") for p in folder.glob("*.py")]
    theirs = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    assert [str(p.relative_to(ROOT)) for p in ours if p.stem in theirs] == []
