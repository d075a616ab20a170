"""What the benchmark scripts share: the machine line, markdown tables, and writing results.

The scripts run as ``python benchmarks/<name>.py`` (this folder is then first on ``sys.path``);
tests import them with ``benchmarks/`` put on ``sys.path`` the same way.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Platform, CPU count, torch version and CUDA device ("no GPU" without one), and the date."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    info = info or machine()
    return (
        f"Machine: {info['platform']}, {info['cpu_count']} CPUs ({info['processor']}), torch {info['torch']}, "
        f"CUDA device: {info['cuda_device']}. Date: {info['date']}."
    )


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; cells are written with ``str`` (``None`` as an en dash)."""
    def cell(value: Any) -> str:
        return "–" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def mib(num_bytes: int | float | None, digits: int = 2) -> str | None:
    return None if num_bytes is None else f"{num_bytes / 2**20:,.{digits}f}"


def publish(out_dir: str | os.PathLike[str], body: str, data: dict[str, Any]) -> list[Path]:
    """``body`` with the machine line under it: printed, and written with ``data`` by :func:`write_results`."""
    text = f"{body}\n{machine_line()}\n"
    print(text)
    return write_results(out_dir, text, data)


def write_results(out_dir: str | os.PathLike[str], text: str, data: dict[str, Any]) -> list[Path]:
    """Write ``results.md`` and ``results.json`` into ``out_dir`` (atomically); returns their paths."""
    from diffq.metrics.report import atomic_write_text

    out = Path(out_dir)
    md, js = out / "results.md", out / "results.json"
    atomic_write_text(md, text if text.endswith("\n") else text + "\n")
    atomic_write_text(js, json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")
    return [md, js]
