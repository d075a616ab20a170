"""Peak memory of quantizing while loading (``quantization_config=DiffQConfig(...)``) against loading the
float model and quantizing it after, on a Flux-layout transformer saved to a folder.

    python benchmarks/load_memory.py [--double-blocks 2] [--single-blocks 4] [--preset w4a16-rtn]
        [--shard-size 500MB] [--out benchmarks/results/load_memory]

The transformer has FLUX.1-dev's published widths (``benchmarks/memory.py``: 3072 hidden, 24 heads,
4096-wide text stream) at reduced depth, random bfloat16 weights, saved with ``save_pretrained``
in shards of ``--shard-size`` (as published checkpoints are sharded). Each way of loading runs in a
fresh process, which reports its peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs`` just before ``from_pretrained``) above what it held then (Python, torch,
diffusers and diffq imported; Linux only):

* ``float``: ``FluxTransformer2DModel.from_pretrained(folder)``;
* ``float, then diffq.quantize``: the same, then ``diffq.quantize(model, preset)``;
* ``quantization_config=DiffQConfig``: ``from_pretrained(folder, quantization_config=DiffQConfig(preset))``.

The quantized models of the last two are compared tensor for tensor in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import DEFAULT_RESULTS, machine, machine_line, markdown, mib, write_results

MODES = ["float", "float, then diffq.quantize", "quantization_config=DiffQConfig"]

_CHILD = r"""
import hashlib, json, sys
import torch
import diffq
from diffq.pipelines.loading import dtype_kwargs
from diffusers import FluxTransformer2DModel
folder, mode, preset = sys.argv[1:4]
torch.set_num_threads(2)
import threading, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
peak_anon, done = [status("RssAnon")], threading.Event()
def sample():  # anonymous memory has no high-water mark in /proc: sample it
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], status("RssAnon")); time.sleep(0.002)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to what is resident now
before, before_anon = status("VmRSS"), status("RssAnon")
sampler = threading.Thread(target=sample, daemon=True); sampler.start()
dtype = dtype_kwargs(getattr(torch, sys.argv[4]))  # dtype= where diffusers has it, torch_dtype= before
if mode == "quantization_config=DiffQConfig":
    model = FluxTransformer2DModel.from_pretrained(folder, **dtype, quantization_config=diffq.DiffQConfig(preset))
else:
    model = FluxTransformer2DModel.from_pretrained(folder, **dtype)
    if mode != "float":
        diffq.quantize(model, preset, progress=False)
peak = status("VmHWM"); done.set(); sampler.join()
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode()); digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
print(json.dumps({"peak_above_start": peak - before, "start": before,
                  "anon_peak_above_start": peak_anon[0] - before_anon, "weight_bytes": diffq.weight_bytes(model),
                  "state_sha256": digest.hexdigest()}))
"""


def save_model(folder: Path, double_blocks: int, single_blocks: int, shard_size: str) -> int:
    """Save the reduced-depth Flux-layout transformer; returns its float weight bytes."""
    import torch

    from memory import FLUX_DEV, ModelSpec, build

    spec = ModelSpec("Flux.1 transformer", "FluxTransformer2DModel",
                     {**FLUX_DEV, "num_layers": double_blocks, "num_single_layers": single_blocks}, False)
    torch.manual_seed(0)
    model = build(spec, device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder, max_shard_size=shard_size)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def measure(folder: Path, mode: str, preset: str, dtype: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), mode, preset, dtype], capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double-blocks", type=int, default=2)
    parser.add_argument("--single-blocks", type=int, default=4)
    parser.add_argument("--preset", default="w4a16-rtn")
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--dtype", default="bfloat16", help="the dtype every from_pretrained loads in")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "load_memory")
    args = parser.parse_args(argv)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="diffq-load-memory-") as tmp:
        folder = Path(tmp) / "transformer"
        float_bytes = save_model(folder, args.double_blocks, args.single_blocks, args.shard_size)
        results = {mode: measure(folder, mode, args.preset, args.dtype) for mode in MODES}
    same = results[MODES[1]]["state_sha256"] == results[MODES[2]]["state_sha256"]
    rows = [[mode, mib(r["anon_peak_above_start"], 0), f"{r['anon_peak_above_start'] / float_bytes:.2f}",
             mib(r["peak_above_start"], 0), f"{r['peak_above_start'] / float_bytes:.2f}", mib(r["weight_bytes"], 0)]
            for mode, r in results.items()]
    text = "\n\n".join([
        f"**Quantize while loading: peak memory** (`python benchmarks/load_memory.py --preset {args.preset}`)",
        f"Flux-layout transformer, FLUX.1-dev widths, {args.double_blocks} double + {args.single_blocks} single "
        f"blocks, bfloat16, {mib(float_bytes, 0)} MiB of weights in {args.shard_size} shards, loaded in "
        f"`torch.{args.dtype}`; peaks above the process's own memory before `from_pretrained`, one "
        "fresh process each. Anonymous memory is what the process allocates; the resident peak also counts "
        "the pages of the memory-mapped safetensors shards it has read, which the kernel can drop.",
        markdown(["load", "peak anonymous memory (MiB)", "x float weights", "peak resident, with mapped file pages (MiB)",
                  "x float weights", "weights after (MiB)"], rows),
        f"Quantized while loading and quantized after loading give the same state dict: {'yes' if same else 'NO'}.",
        machine_line(info),
    ])
    write_results(args.out, text, {"machine": info, "float_bytes": float_bytes, "preset": args.preset,
                                   "shard_size": args.shard_size, "results": results, "identical": same})
    print(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
