"""Peak memory of ``diffq quantize FOLDER`` on a pipeline whose denoiser has a real model's size.

    python benchmarks/quantize_memory.py [--model sd15|flux|tiny] [--preset w4a8] [--prompts 4] [--steps 8]
        [--low-memory off on] [--out benchmarks/results/quantize_memory]

The folder is a diffusers pipeline saved with ``save_pretrained``: for ``sd15`` a
``StableDiffusionPipeline`` whose UNet has SD 1.5's published config (``benchmarks/memory.py``,
float32, random weights: 3.20 GiB) with a two-layer CLIP text encoder (768 wide, the real CLIP
vocabulary) and a small four-level VAE (so latents are 1/8 of the image, as SD's are); for ``flux``
a ``FluxPipeline`` whose transformer has FLUX.1-dev's widths at reduced depth (``--double-blocks``,
``--single-blocks``; bfloat16), with tiny CLIP and T5 encoders; ``tiny`` is the test suite's tiny
pipeline, which runs the script in seconds (tests/test_benchmarks.py; its figures mean nothing).
Calibration is the CLI's default: the generic prompts at the model's default resolution (512x512
for SD 1.5), 8 steps each, unless ``--prompts``/``--steps`` make the run shorter.

One fresh process runs ``diffq quantize FOLDER --preset P --out OUT`` (``diffq.cli.main``) while a
thread samples its anonymous memory (``RssAnon``: what the process allocated) and its resident set
(``VmRSS``: anonymous memory plus the pages of the memory-mapped safetensors files it has read,
which the kernel can drop) every few milliseconds; the peaks are above what it held before
loading (Python, torch, diffusers and diffq imported). Each stage (loading, calibration, plan,
conversion, save) reports its own peaks, so the table shows where memory goes. The quantized
checkpoint's state is hashed, so a low-memory run can be compared with an in-memory one.
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

_CHILD = r"""
import hashlib, json, sys, threading, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[4]))
import diffq, diffq.api, diffq.cli, diffq.pipelines.serialization as serialization
from safetensors.torch import load_file

folder, out, cli_args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

base = {"anon": status("RssAnon"), "rss": status("VmRSS")}
stage, peaks, done = ["load"], {}, threading.Event()

def sample():
    while not done.is_set():
        now = {"anon": status("RssAnon"), "rss": status("VmRSS")}
        entry = peaks.setdefault(stage[0], {"anon": 0, "rss": 0, "start": time.perf_counter()})
        for key in now:
            entry[key] = max(entry[key], now[key] - base[key])
        time.sleep(0.003)

def staged(name, fn):
    def wrapper(*args, **kwargs):
        stage[0] = name
        return fn(*args, **kwargs)
    return wrapper

diffq.api.calibrate_pipeline = staged("calibrate", diffq.api.calibrate_pipeline)
diffq.api.allocate = staged("plan", diffq.api.allocate)
diffq.api.convert_model = staged("convert", diffq.api.convert_model)  # what diffq.quantize calls
serialization.save_quantized = staged("save", serialization.save_quantized)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
code = diffq.cli.main(["quantize", folder, "--out", out, "--no-progress", *cli_args])
seconds = time.perf_counter() - start
done.set(); time.sleep(0.01)
digest = hashlib.sha256()
for path in sorted(Path(out).rglob("*.safetensors")):
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(f"{path.relative_to(out)}:{name}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
print(json.dumps({"code": code, "seconds": seconds, "stages": peaks, "state_sha256": digest.hexdigest()}))
"""


def build_sd15_folder(folder: Path) -> int:
    """An SD 1.5-size StableDiffusionPipeline saved in float32; returns the UNet's weight bytes."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from diffq.pipelines.testing import _tiny_clip_config, build_clip_tokenizer

    from memory import MODELS, build

    torch.manual_seed(0)
    unet = build(MODELS["sd15"], device="cpu", dtype=torch.float32)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, sample_size=512)
    text_encoder = CLIPTextModel(_tiny_clip_config(hidden_size=768))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(77), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in unet.state_dict().values())


def build_tiny_folder(folder: Path) -> int:
    """The test suite's tiny StableDiffusionPipeline (float32); returns its UNet's weight bytes."""
    from diffq.pipelines.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in pipe.unet.state_dict().values())


def build_flux_folder(folder: Path, double_blocks: int, single_blocks: int) -> int:
    """A FluxPipeline with a FLUX.1-dev-wide transformer at reduced depth (bfloat16); returns its weight bytes."""
    import torch
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from diffq.pipelines.testing import _tiny_clip_config, tiny_flux_pipeline

    from memory import FLUX_DEV, ModelSpec, build

    spec = ModelSpec("Flux.1 transformer", "FluxTransformer2DModel",
                     {**FLUX_DEV, "num_layers": double_blocks, "num_single_layers": single_blocks}, False)
    torch.manual_seed(0)
    pipe = tiny_flux_pipeline()
    transformer = build(spec, device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.02)
    # Text encoders as small as they can be at the widths the transformer reads (CLIP's pooled 768, T5's 4096).
    text_encoder = CLIPTextModel(_tiny_clip_config(hidden_size=768))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(pipe.tokenizer_2), d_model=FLUX_DEV["joint_attention_dim"], d_kv=16, num_heads=4, d_ff=64,
        num_layers=1, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    pipe.register_modules(transformer=transformer, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(folder, max_shard_size="500MB")
    return sum(t.numel() * t.element_size() for t in transformer.state_dict().values())


def measure(folder: Path, out: Path, cli_args: list[str], threads: int) -> dict[str, Any]:
    """Run the CLI in a fresh process; its per-stage peaks, time and the checkpoint's hash."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(out), json.dumps(cli_args), str(threads)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"diffq quantize {' '.join(cli_args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "flux", "tiny"), default="sd15")
    parser.add_argument("--preset", default="w4a8")
    parser.add_argument("--prompts", type=int, help="calibrate on the first N default prompts (default: all)")
    parser.add_argument("--steps", type=int, help="calibration steps per prompt (default: the CLI's)")
    parser.add_argument("--low-memory", choices=("auto", "on", "off"), nargs="+", default=["off", "on"],
                        help="the CLI's --low-memory settings to run, one process each")
    parser.add_argument("--double-blocks", type=int, default=2)
    parser.add_argument("--single-blocks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "quantize_memory")
    args = parser.parse_args(argv)
    from diffq.metrics.report import atomic_write_text

    info = machine()
    with tempfile.TemporaryDirectory(prefix="diffq-quantize-memory-") as tmp:
        folder = Path(tmp) / "pipeline"
        if args.model == "sd15":
            float_bytes = build_sd15_folder(folder)
        elif args.model == "tiny":
            float_bytes = build_tiny_folder(folder)
        else:
            float_bytes = build_flux_folder(folder, args.double_blocks, args.single_blocks)
        cli_args = ["--preset", args.preset]
        if args.model == "flux":
            cli_args += ["--dtype", "bfloat16"]  # as FLUX.1 is published (diffusers would load float32)
        prompt_note = "the CLI's default prompts"
        if args.prompts:
            from diffq.pipelines.calibrate import DEFAULT_PROMPTS

            prompts = Path(tmp) / "prompts.txt"
            prompts.write_text("\n".join(DEFAULT_PROMPTS[: args.prompts]) + "\n")
            cli_args += ["--prompts", str(prompts)]
            prompt_note = f"the first {args.prompts} default prompts"
        if args.steps:
            cli_args += ["--calibration-steps", str(args.steps)]
        results = {}
        partial = args.out / f"partial-{args.model}.json"  # each finished run, so a stopped benchmark resumes
        saved = json.loads(partial.read_text()) if partial.exists() else {}
        for setting in args.low_memory:
            key = json.dumps([args.model, args.preset, args.prompts, args.steps, setting, args.threads, float_bytes])
            if key in saved:
                print(f"--low-memory {setting}: measured earlier ({partial})", file=sys.stderr)
                results[setting] = saved[key]
                continue
            out = Path(tmp) / f"out-{setting}"
            results[setting] = saved[key] = measure(folder, out, [*cli_args, "--low-memory", setting], args.threads)
            partial.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(partial, json.dumps(saved, indent=1))
    hashes = {r["state_sha256"] for r in results.values()}
    rows = []
    for setting, result in results.items():
        for stage, peak in result["stages"].items():
            rows.append([setting, stage, mib(peak["anon"], 0), f"{peak['anon'] / float_bytes:.2f}",
                         mib(peak["rss"], 0), f"{peak['rss'] / float_bytes:.2f}"])
        rows.append([setting, f"**whole run** ({result['seconds']:.0f} s)",
                     mib(max(p["anon"] for p in result["stages"].values()), 0),
                     f"{max(p['anon'] for p in result['stages'].values()) / float_bytes:.2f}",
                     mib(max(p["rss"] for p in result["stages"].values()), 0),
                     f"{max(p['rss'] for p in result['stages'].values()) / float_bytes:.2f}"])
    command = f"python benchmarks/quantize_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}".strip()
    text = "\n\n".join([
        f"**Peak memory of `diffq quantize`** (`{command}`)",
        f"{args.model} denoiser: {mib(float_bytes, 0)} MiB of float weights; preset {args.preset}; calibration on "
        f"{prompt_note}{f', {args.steps} steps' if args.steps else ''}"
        " at the model's default resolution; "
        f"{args.threads} threads. Peaks above the process's memory before loading, per stage.",
        markdown(["--low-memory", "stage", "peak anonymous (MiB)", "x float weights",
                  "peak resident, with mapped file pages (MiB)", "x float weights"], rows),
        f"Quantized checkpoints identical across settings: {'yes' if len(hashes) == 1 else 'NO'}.",
        machine_line(info),
    ])
    write_results(args.out, text, {"machine": info, "float_bytes": float_bytes, "args": vars(args) | {"out": str(args.out)},
                                   "results": results, "identical": len(hashes) == 1})
    print(text)
    return 0 if len(hashes) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
