"""Evaluation outputs: ``report.json``, ``report.md`` and ``grid.png``, each written atomically."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from diffq.metrics.images import resize, to_rgb
from diffq.saving import png_info, write_file

GRID_CELL = 64
"""Grid cells are at least this many pixels on a side (small digits are upscaled, nearest)."""


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (:func:`diffq.saving.write_file`; for files diffq owns)."""
    write_file(path, lambda temporary: temporary.write_bytes(data), overwrite=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def render_markdown(report: dict[str, Any], notes: list[str] | None = None) -> str:
    """A markdown page with one table row per preset."""
    lines = [
        f"# diffq evaluation: {report['model']}",
        "",
        f"{report['num_images']} images per preset; FID features: `{report['feature_extractor']}`.",
        "",
        "| preset | FID ↓ (± bootstrap sd) | alignment ↑ | CLIP score ↑ | PSNR vs fp (dB) ↑ | SSIM vs fp ↑ | denoiser weights (MiB) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    failed = []
    for preset, r in report["results"].items():
        if r.get("error"):
            failed.append(f"`{preset}` did not run: {r['error']}")
        mib = None if r["weight_bytes"] is None else r["weight_bytes"] / 2**20
        fid = _fmt(r["fid"], ".4g") + (f" ± {r['fid_std']:.2g}" if r.get("fid_std") is not None else "")
        lines.append(
            f"| {preset} | {fid} | {_fmt(r['alignment'])} | {_fmt(r['clip_score'], '.2f')} | "
            f"{_fmt(r['psnr_vs_fp'], '.2f')} | {_fmt(r['ssim_vs_fp'])} | {_fmt(mib, '.2f')} | {_fmt(r['seconds'], '.1f')} |"
        )
    if failed or notes:
        lines += [""] + [f"- {n}" for n in failed + list(notes or [])]
    lines += _fid_difference_lines(report)
    return "\n".join(lines) + "\n"


MAX_DIFFERENCE_ROWS = 15
"""Paired FID differences listed in ``report.md`` (all of them are in ``report.json``)."""


def _fid_difference_lines(report: dict[str, Any]) -> list[str]:
    pairs = report.get("fid_differences") or {}
    if not pairs:
        return []
    lines = [
        "",
        f"## FID differences (paired bootstrap, {report.get('fid_bootstrap')} resamples of the generated images)",
        "",
        "| a vs b | FID a − b | 90 % interval | resamples where a is lower |",
        "|---|---:|---:|---:|",
    ]
    for label, d in list(pairs.items())[:MAX_DIFFERENCE_ROWS]:
        lines.append(
            f"| {label} | {d['difference']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] | {d['a_lower']:.0%} |"
        )
    if len(pairs) > MAX_DIFFERENCE_ROWS:
        lines += ["", f"The first {MAX_DIFFERENCE_ROWS} of {len(pairs)} pairs; report.json has them all."]
    return lines


def make_grid(rows: dict[str, torch.Tensor], *, cell: int = GRID_CELL):
    """A PIL image: one row per entry of ``rows`` (label on the left, its images to the right)."""
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("no rows to draw")
    first = next(iter(rows.values()))
    h, w = first.shape[-2:]
    scale = max(1, math.ceil(cell / min(h, w)))
    ch, cw = h * scale, w * scale
    font = ImageFont.load_default()
    label_w = (
        8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(k, font=font)) for k in rows) + 8
    )
    ncols = max(r.shape[0] for r in rows.values())
    pad = 2
    grid = Image.new("RGB", (label_w + ncols * (cw + pad), len(rows) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (name, images) in enumerate(rows.items()):
        top = pad + i * (ch + pad)
        draw.text((8, top + ch // 2), name, fill="black", font=font, anchor="lm")
        x = to_rgb(images.float().cpu().clamp(0, 1))
        x = resize(x, (h, w)) if tuple(x.shape[-2:]) != (h, w) else x
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x
        arr = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j in range(arr.shape[0]):
            grid.paste(Image.fromarray(arr[j]), (label_w + j * (cw + pad), top))
    return grid


def write_report(
    out_dir: str | os.PathLike[str],
    report: dict[str, Any],
    grid_rows: dict[str, torch.Tensor],
    notes: list[str] | None = None,
) -> None:
    """Write ``report.json``, ``report.md`` and ``grid.png`` into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report, notes))
    buf = io.BytesIO()
    make_grid(grid_rows).save(buf, format="PNG", pnginfo=png_info())
    atomic_write_bytes(out / "grid.png", buf.getvalue())
