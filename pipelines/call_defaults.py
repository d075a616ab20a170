"""The call arguments a pipeline is meant to run with, looked up in one place.

The bundled models need theirs: 32 px images, the guidance they were trained for, 20 steps and,
for the PixArt one, resolution binning off (PixArt's aspect-ratio bins exist for 256-1024 px
models only). Other pipelines have none. :func:`call_defaults` is the lookup the CLI, ``diffq
eval``, calibration, the sensitivity analysis and the demo all read. A saved checkpoint carries a
pipeline's defaults in :data:`FILE`, so a folder quantized from a bundled model keeps them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILE = "diffq_call_defaults.json"
ATTR = "_diffq_call_defaults"


def _bundled() -> dict[str, tuple[Path, dict[str, Any]]]:
    from diffq.pipelines import reference

    return {name: (Path(folder), reference.DEFAULT_CALL_KWARGS.get(name, {}))
            for name, folder in reference.BUNDLED_MODELS.items()}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _folder_defaults(folder: Path, depth: int = 0) -> dict[str, Any]:
    """Defaults of a local folder: a bundled model's own folder, a checkpoint's recorded defaults,
    or (for checkpoints older than :data:`FILE`) those of the model its ``diffq_report.json`` names."""
    resolved = folder.expanduser()
    name = bundled_name(resolved)
    if name is not None:
        return dict(_bundled()[name][1])
    recorded = _read_json(resolved / FILE)
    if isinstance(recorded, dict):
        return recorded
    source = recorded_source(resolved)
    if source is not None and depth < 2:
        return call_defaults(source, _depth=depth + 1)
    return {}


def recorded_source(folder: str | os.PathLike) -> str | None:
    """The model a checkpoint folder was quantized from, as its ``diffq_report.json`` records it."""
    report = _read_json(Path(folder).expanduser() / "diffq_report.json")
    source = report.get("model") if isinstance(report, dict) else None
    return source if isinstance(source, str) and source.strip() else None


def _source_folders(pipe: Any) -> list[Path]:
    from diffq.pipelines.serialization import source_folders

    return source_folders(pipe)


def call_defaults(model: Any, *, _depth: int = 0) -> dict[str, Any]:
    """Call arguments ``model`` is meant to run with (a fresh dict; ``{}`` when it has none).

    ``model`` is a bundled name (``"digits-dit"``), a local folder (a bundled model's, or a
    checkpoint saved from one) or a pipeline object (what it remembers, else its source folder).
    Hub ids and other pipelines have no defaults: diffusers' own apply.
    """
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        bundled = _bundled()
        if text in bundled:
            return dict(bundled[text][1])
        folder = Path(text).expanduser()
        return _folder_defaults(folder, _depth) if folder.is_dir() else {}
    remembered = getattr(model, ATTR, None)
    if isinstance(remembered, dict):
        return dict(remembered)
    for folder in _source_folders(model):
        if found := _folder_defaults(folder, _depth):
            return found
    return {}


def bundled_name(model: Any) -> str | None:
    """The bundled model ``model`` (name, folder or pipeline) was loaded from, if any."""
    if isinstance(model, (str, os.PathLike)):
        if os.fspath(model) in _bundled():
            return os.fspath(model)
        candidates = [Path(os.fspath(model)).expanduser()]
    else:
        candidates = _source_folders(model)
    for folder in candidates:
        try:
            resolved = folder.resolve()
        except OSError:
            continue
        for name, (bundled_folder, _) in _bundled().items():
            if bundled_folder.resolve() == resolved:
                return name
    return None


def write_call_defaults(pipe: Any, folder: Path) -> None:
    """Record ``pipe``'s call defaults in a checkpoint folder being written (nothing if it has none)."""
    defaults = call_defaults(pipe)
    if defaults:
        (folder / FILE).write_text(json.dumps(defaults, indent=1, sort_keys=True) + "\n")


__all__ = ["ATTR", "FILE", "bundled_name", "call_defaults", "recorded_source", "write_call_defaults"]
