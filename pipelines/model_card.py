"""The model card (README.md) of a quantized checkpoint: what it is, how it was made, how to load it.

A model hub shows a folder's README.md first; ``diffq quantize --out`` writes one from the plan and
the run's report. A README.md of the user's in an earlier checkpoint at ``--out`` is kept: the card
then goes to ``DIFFQ_MODEL_CARD.md`` beside it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from diffq.plan import QuantPlan
from diffq.saving import written_files

CARD = "README.md"
FALLBACK = "DIFFQ_MODEL_CARD.md"
MARK = "<!-- written by diffq quantize -->"


def card_file_name(out: Path) -> str:
    """``README.md``, unless ``out`` already holds a README.md that diffq did not write."""
    existing = out / CARD
    if not existing.is_file():
        return CARD
    ours = written_files(out) or set()
    try:
        marked = MARK in existing.read_text(errors="replace")[:4096]
    except OSError:
        marked = False
    return CARD if CARD in ours and marked else FALLBACK


def _bits_table(plan: QuantPlan, layer_params: Mapping[str, int]) -> str:
    counts: Counter[str] = Counter()
    params: Counter[str] = Counter()
    for name, config in plan.layers.items():
        label = f"int{config.w_bits}" + (f" group {config.w_group_size}" if config.w_group_size else " per channel")
        acts = "16-bit" if config.a_bits is None else f"int{config.a_bits} {config.a_mode}"
        extras = ", ".join(filter(None, [f"rank-{config.rank} branch" if config.rank else "",
                                         "GPTQ" if config.w_round == "gptq" else ""]))
        key = f"| {label} | {acts} | {extras or '–'} |"
        counts[key] += 1
        params[key] += layer_params.get(name, 0)
    kept = sum(layer_params.get(name, 0) for name in plan.skipped)
    total = sum(params.values()) + kept or 1
    rows = [f"{key} {counts[key]} | {100 * params[key] / total:.1f}% |" for key in counts]
    rows.append(f"| 16-bit (kept) | – | – | {len(plan.skipped)} | {100 * kept / total:.1f}% |")
    return "\n".join(["| weights | activations | extras | layers | share of layer parameters |",
                      "|---|---|---|---:|---:|", *rows])


def _kept_reasons(plan: QuantPlan) -> str:
    reasons = Counter(plan.skipped.values())
    return "; ".join(f"{reason} ({n})" for reason, n in reasons.most_common(6)) or "none"


def model_card(report: Mapping[str, Any], plan: QuantPlan, layer_params: Mapping[str, int], out_name: str) -> str:
    """The card's Markdown: ``report`` is ``diffq_report.json``'s content, ``layer_params`` the weight
    count of each Linear/Conv2d layer of the float denoiser (for the bits summary)."""
    import diffq

    preset = report["preset"]
    calibration = report.get("calibration_prompts")
    calibrated = (f"{calibration} prompt(s) × {report.get('calibration_steps')} denoising steps"
                  if calibration else "none (this preset needs no calibration)")
    source = report["model"]
    fidelity = f"The plan check measured: {plan.note}." if plan.note else (
        "Not measured when quantizing (a uniform preset makes no end-to-end check). `diffq eval "
        f"{source} --presets fp,{preset}` measures PSNR/SSIM against full precision on the same prompts and "
        "seeds; diffq's benchmarks/RESULTS.md has this preset on its bundled models.")
    selection = ", ".join(f"`{k}={v}`" for k, v in (plan.selection or {}).items())
    return "\n".join([
        "---",
        "library_name: diffusers",
        f"tags: [diffq, quantized, {preset}]",
        "---",
        MARK,
        "",
        f"# {Path(str(source)).name or source} — diffq `{preset}`",
        "",
        f"`{source}` quantized by [diffq](https://pypi.org/project/diffq/) {diffq.__version__} with the "
        f"`{preset}` preset: its {report['denoiser']} went from {report['weight_bytes_fp'] / 2**20:,.2f} MiB to "
        f"{report['weight_bytes'] / 2**20:,.2f} MiB of weights ({report['compression']}× smaller) in "
        f"{report['seconds']:.0f} s. The other components are unchanged.",
        "",
        "## Bits per layer",
        "",
        _bits_table(plan, layer_params),
        "",
        f"Kept in 16-bit: {_kept_reasons(plan)}." + (f" Layers chosen with {selection}." if selection else ""),
        "The full per-layer plan is in the denoiser's `config.json` (`quantization_config`).",
        "",
        "## Calibration",
        "",
        f"Calibration: {calibrated}.",
        "",
        "## Fidelity",
        "",
        fidelity,
        "",
        "## Load it",
        "",
        "```python",
        "import diffq",
        "",
        f'pipe = diffq.load("{out_name}")    # or, after `import diffq`, DiffusionPipeline.from_pretrained(...)',
        'image = pipe("...").images[0]',
        "```",
        "",
        f"Or from the command line: `diffq generate {out_name} --prompt \"...\"`.",
        "",
    ])


def layer_parameter_counts(denoiser: nn.Module) -> dict[str, int]:
    """The weight count of each Linear/Conv2d layer (call before quantizing)."""
    return {name: module.weight.numel() for name, module in denoiser.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))}


__all__ = ["card_file_name", "layer_parameter_counts", "model_card"]
