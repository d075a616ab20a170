"""Generated images kept in ``diffq eval``'s output folder as they are made, so a rerun resumes.

Each preset's images live in ``OUT/images/<preset>-<key>/``, one safetensors file per batch
(``00016-00032.safetensors``: the float32 images exactly as generated, the batch's prompts and its
seconds), beside ``settings.json`` (what the images depend on: model, preset, seed, batch size,
call arguments, device) and ``info.json`` (the quantized denoiser's weight bytes). ``key`` hashes
the settings, so a run with other settings uses another folder and never mixes images; a batch
whose file is missing, unreadable or made for other prompts is generated again. A rerun of the
same command therefore continues where an interrupted one stopped and writes the same report
(the seconds of stored batches are the ones measured when they were made).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from diffq.saving import write_file

IMAGES = "images"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text)[:60] or "preset"


class ImageStore:
    """The stored batches of one preset's run (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike, preset: str, settings: dict[str, Any]) -> None:
        text = json.dumps(settings, sort_keys=True, default=str)
        key = hashlib.sha256(text.encode()).hexdigest()[:12]
        self.folder = Path(out_dir) / IMAGES / f"{_slug(preset)}-{key}"
        self._settings = text

    def _batch_path(self, batch: range) -> Path:
        return self.folder / f"{batch.start:05d}-{batch.stop:05d}.safetensors"

    def _prepare(self) -> None:
        if not (self.folder / "settings.json").exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_file(self.folder / "settings.json", lambda t: t.write_text(self._settings + "\n"), overwrite=True)

    def _metadata(self, batch: range, prompts: Sequence[str]) -> dict[str, str] | None:
        path = self._batch_path(batch)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if json.loads(metadata.get("prompts", "null")) != [prompts[i] for i in batch]:
                return None
            float(metadata["seconds"])
            return metadata
        except (OSError, ValueError, KeyError, SafetensorError):
            return None  # a damaged file is made again

    def missing(self, shard: Sequence[range], prompts: Sequence[str]) -> list[range]:
        """The batches of ``shard`` not stored yet (for these prompts)."""
        return [batch for batch in shard if self._metadata(batch, prompts) is None]

    def load(self, batch: range, prompts: Sequence[str]) -> tuple[torch.Tensor, float] | None:
        """``(images, seconds)`` of a stored batch made for these prompts, else ``None``."""
        metadata = self._metadata(batch, prompts)
        if metadata is None:
            return None
        try:
            images = load_file(str(self._batch_path(batch)))["images"]
        except (OSError, KeyError, SafetensorError):
            return None
        return (images, float(metadata["seconds"])) if len(images) == len(batch) else None

    def save(self, batch: range, images: torch.Tensor, prompts: Sequence[str], seconds: float) -> None:
        """Keep one generated batch (atomically: a kill leaves the batch whole or absent)."""
        self._prepare()
        metadata = {"prompts": json.dumps([prompts[i] for i in batch]), "seconds": repr(float(seconds))}
        tensors = {"images": images.contiguous()}
        write_file(self._batch_path(batch), lambda t: save_file(tensors, str(t), metadata=metadata), overwrite=True)

    def weight_bytes(self) -> int | None:
        """The weight bytes recorded for this preset, if a run got as far as quantizing it."""
        try:
            return int(json.loads((self.folder / "info.json").read_text())["weight_bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record_weight_bytes(self, value: int) -> None:
        self._prepare()
        write_file(self.folder / "info.json", lambda t: t.write_text(json.dumps({"weight_bytes": int(value)}) + "\n"),
                   overwrite=True)


def is_eval_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier ``diffq eval`` run (its report or its stored images)."""
    try:
        report = json.loads((folder / "report.json").read_text())
        if isinstance(report, dict) and "results" in report:
            return True
    except (OSError, ValueError):
        pass
    return any((folder / IMAGES).glob("*/settings.json"))


__all__ = ["IMAGES", "ImageStore", "is_eval_folder"]
