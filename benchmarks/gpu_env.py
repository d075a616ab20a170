"""The GPU machine's Python environment: what it has, what to carry there, and diffq installed from the tree.

    python benchmarks/gpu_env.py download DIR      # here (pip works): the pure-Python wheels to carry
    python benchmarks/gpu_env.py check             # the carried wheels' requirements against the image
    python benchmarks/gpu_env.py stage SITE        # diffq from this tree into SITE (no pip, no build)
    python benchmarks/gpu_env.py simulate [-m MODULE | SCRIPT] ARGS...   # run as the GPU machine would

The GPU machine (``nvidia-h200``) has its own Python 3.12, torch 2.11 and Triton 3.6 and no
package registry. ``IMAGE`` lists the distributions its image holds (as read there, 2026-11-17) and
``IMAGE_VERSIONS`` the versions seen; what diffq's GPU run needs beyond them is ``CARRIED``, carried
as wheels at the versions installed here (the ones CI tests). diffq itself is staged by copying its
folders as ``pyproject.toml``'s ``package-dir`` maps them, so no build backend is needed there.

``simulate`` rehearses the GPU run on this machine: it drops the editable install's import hook (so
diffq must come from the staged copy on ``PYTHONPATH``) and refuses any import *made by this
repository's code* (diffq, ``benchmarks/``, ``tests/``) of a distribution that is neither in the image
nor carried, so a missing package fails here, not in the first GPU minute.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CARRIED = ["diffusers", "importlib_metadata", "lazy-importer", "zipp"]

IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis
idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
IMAGE_VERSIONS = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
    "tokenizers": "0.23.2", "torch": "2.11.0", "torchmetrics": "1.9.0", "transformers": "5.17.0",
    "triton": "3.6.0", "sentencepiece": "0.2.2",
}
PYTHON = "3.12"


def norm(name: str) -> str:
    """A distribution name as pip compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


ALLOWED = {norm(n) for n in IMAGE | set(CARRIED)} | {"diffq"}


def download(dest: Path) -> list[str]:
    """``pip download`` each carried distribution at the version installed here, for the GPU's Python."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", PYTHON, "--implementation", "py", "--abi", "none", "--platform", "any",
                    "-d", str(dest), *pins], check=True)
    return pins


def check() -> list[str]:
    """Each carried distribution's requirements, met by the image (at its seen versions) or carried;
    returns the lines checked and raises on the first unmet one."""
    from packaging.requirements import Requirement

    lines = []
    env = {"python_version": PYTHON, "python_full_version": PYTHON + ".3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    for name in CARRIED:
        for text in importlib.metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dist = norm(req.name)
            if dist not in ALLOWED:
                raise SystemExit(f"{name} needs {req}, which the GPU image lacks: add it to CARRIED.")
            seen = IMAGE_VERSIONS.get(dist)
            if seen and dist not in {norm(c) for c in CARRIED} and not req.specifier.contains(seen, prereleases=True):
                raise SystemExit(f"{name} needs {req}; the GPU image has {dist} {seen}: carry another {name}.")
            lines.append(f"{name}: {req} -> {'carried' if dist in map(norm, CARRIED) else 'image ' + (seen or '')}")
    return lines


def stage(site: Path) -> Path:
    """Copy diffq's folders into ``site`` as ``pyproject.toml`` maps them; returns ``site / 'diffq'``."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package, folder in sorted(config["package-dir"].items(), key=lambda kv: kv[0].count(".")):
        shutil.copytree(REPO / folder, site / package.replace(".", "/"), ignore=ignore, dirs_exist_ok=True)
    return site / "diffq"


class _OutsideImage(importlib.abc.MetaPathFinder):
    """Refuses imports by this repository's code of distributions the GPU image lacks and nobody carries."""

    def __init__(self, ours: list[str] | None = None) -> None:
        self.owners = importlib.metadata.packages_distributions()
        staged = [os.environ["DIFFQ_STAGED"]] if os.environ.get("DIFFQ_STAGED") else []
        self.ours = ours if ours is not None else [str(REPO / d) for d in ("benchmarks", "tests")] + staged

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        dists = {norm(d) for d in self.owners.get(top, [])}
        if not dists or dists & ALLOWED or top in sys.stdlib_module_names:
            return None
        importer = self._importer()
        if importer and any(importer.startswith(p) for p in self.ours):
            raise ModuleNotFoundError(f"{importer} imports {fullname} ({', '.join(sorted(dists))}), which the GPU "
                                      "image lacks: carry it (benchmarks/gpu_env.py CARRIED) or import it lazily.")
        return None

    @staticmethod
    def _importer() -> str | None:
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename.startswith("<frozen") or
                                     "importlib" in frame.f_code.co_filename):
            frame = frame.f_back
        return frame.f_code.co_filename if frame is not None else None


def simulate(argv: list[str]) -> None:
    """Run ``-m MODULE ARGS`` or ``SCRIPT ARGS`` as on the GPU machine (see the module docstring)."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()
                        and "editable" not in getattr(f, "__name__", "").lower()]
    sys.meta_path.insert(0, _OutsideImage())
    import diffq

    staged = os.environ.get("DIFFQ_STAGED")
    if staged and not diffq.__file__.startswith(staged):
        raise SystemExit(f"diffq was imported from {diffq.__file__}, not the staged copy in {staged}.")
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # this script's folder; a target script gets its own, as Python would give it
    if argv[:1] == ["-m"]:
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        runpy.run_path(argv[0], run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "download" and len(rest) == 1:
        print("\n".join(download(Path(rest[0]))))
    elif command == "check" and not rest:
        print("\n".join(check()))
    elif command == "stage" and len(rest) == 1:
        print(stage(Path(rest[0])))
    elif command == "simulate" and rest:
        simulate(rest)
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
