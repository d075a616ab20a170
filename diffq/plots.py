"""Matplotlib figures of calibration statistics (written as PNG; matplotlib is imported lazily)."""

from __future__ import annotations

import os
from pathlib import Path

from diffq.calibration import NO_TIMESTEP, CalibrationStats
from diffq.saving import png_is_ours, write_file


def save_figure(fig, out_dir: str | os.PathLike, name: str, *, overwrite: bool = False) -> Path:
    """Write ``fig`` to ``out_dir/name`` (:func:`diffq.saving.write_file`: an earlier diffq chart is
    replaced, another file only with ``overwrite``) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return write_file(Path(out_dir) / name,
                          lambda temporary: fig.savefig(temporary, format="png", dpi=110, metadata={"Software": "diffq"}),
                          overwrite=overwrite, replaceable=png_is_ours)
    finally:
        plt.close(fig)


def widest_drift(stats: CalibrationStats, top: int = 6) -> list[str]:
    """The ``top`` layers whose activation range moves most across denoising steps."""
    return sorted(stats.layers, key=stats.drift, reverse=True)[:top]


def plot_activation_ranges(stats: CalibrationStats, out_dir: str | os.PathLike, top: int = 6, *,
                           overwrite: bool = False) -> Path:
    """Plot |x| max and 99.9th percentile against the denoising step for the widest-drift layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = widest_drift(stats, top)
    cols = min(3, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        steps = [t for t in stats.timesteps(name) if t != NO_TIMESTEP]
        branches = sorted({b for (_t, b) in stats.layers[name]})
        for branch in branches:
            present = [t for t in steps if (t, branch) in stats.layers[name]]
            ax.plot(present, [stats.absmax(name, [t], branch) for t in present], marker="o", ms=3,
                    label=f"max |x| ({branch})")
        ax.plot(steps, [stats.percentile(name, 99.9, [t]) for t in steps], ls="--", label="99.9th pct")
        ax.set_title(f"{name}\ndrift x{stats.drift(name):.2f}", fontsize=8)
        ax.set_xlabel("timestep (noisy → clean)")
        ax.invert_xaxis()
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Activation range per denoising step (layers with the widest drift)")
    return save_figure(fig, out_dir, "activation_ranges.png", overwrite=overwrite)


def plot_bits(plan, out_dir: str | os.PathLike, groups: dict[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Bar chart of weight bits per layer (colour: content or quality group), with activation bits marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plan.layers)
    bits = [plan.layers[n].w_bits for n in names]
    colours = ["tab:orange" if (groups or {}).get(n) == "content" else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(max(8, 0.12 * len(names)), 4))
    ax.bar(range(len(names)), bits, color=colours, width=0.85)
    for i, name in enumerate(names):
        config = plan.layers[name]
        if config.a_bits == 4:
            ax.plot(i, bits[i] + 0.25, "v", color="black", ms=3)
        if config.rank:
            ax.plot(i, bits[i] + 0.6, "*", color="tab:green", ms=4)
    ax.set_ylabel("weight bits")
    ax.set_xlabel("layer (denoiser order)")
    ax.set_yticks([2, 3, 4, 8])
    params = sum(1 for _ in names)
    ax.set_title(f"{plan.preset}: bits per layer ({params} layers; orange = content, blue = quality, "
                 "▼ = 4-bit activations, ★ = low-rank branch)", fontsize=9)
    return save_figure(fig, out_dir, "bits_per_layer.png", overwrite=overwrite)
