"""Evaluation prompts: the bundled digit prompts, or a user file (``prompt`` or ``digit<TAB>prompt`` lines)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from diffq.metrics.errors import EvaluationInputError


def read_prompts_file(path: str | os.PathLike[str]) -> list[tuple[str, int | None]]:
    """Read one prompt per non-blank line; a line ``D<TAB>text`` with ``D`` in 0–9 also gives its digit."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise EvaluationInputError(
            f"prompts file {str(file)!r} does not exist; pass a text file with one prompt per line."
        )
    out: list[tuple[str, int | None]] = []
    for line in file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        head, sep, tail = line.partition("\t")
        if sep and head.strip().isdigit() and len(head.strip()) == 1 and tail.strip():
            out.append((tail.strip(), int(head)))
        else:
            out.append((line.strip(), None))
    if not out:
        raise EvaluationInputError(f"prompts file {str(file)!r} has no prompts; write one prompt per line.")
    return out


def bundled_model_names() -> list[str]:
    """Names of the bundled reference models (they come with evaluation prompts and call settings)."""
    from diffq.pipelines.reference import BUNDLED_MODELS

    return sorted(BUNDLED_MODELS)


def bundled_prompts(model: str, n: int) -> list[tuple[str, int | None]] | None:
    """The bundled ``(prompt, digit)`` list of a bundled reference model, or ``None`` for other models."""
    from diffq.pipelines.reference import eval_prompts

    if model not in bundled_model_names():
        return None
    return [(p, int(d)) for p, d in eval_prompts(n)]


def resolve_prompts(
    model: str,
    num_images: int,
    *,
    prompts_file: str | os.PathLike[str] | None = None,
    prompts: Sequence[str | tuple[str, int | None]] | None = None,
) -> tuple[list[str], list[int | None]]:
    """``num_images`` prompts and their digits (``None`` where unknown); a short list is cycled."""
    if prompts is not None and prompts_file is not None:
        raise EvaluationInputError("pass either prompts or a prompts file, not both.")
    if prompts is not None:
        pairs = [(p, None) if isinstance(p, str) else (str(p[0]), p[1]) for p in prompts]
        if not pairs:
            raise EvaluationInputError("the prompt list is empty.")
    elif prompts_file is not None:
        pairs = read_prompts_file(prompts_file)
    else:
        pairs = bundled_prompts(model, num_images)
        if pairs is None:
            bundled = ", ".join(bundled_model_names()) or "none installed"
            raise EvaluationInputError(
                f"{model!r} is not a bundled model ({bundled}), so diffq has no evaluation prompts for it; "
                "pass --prompts FILE (one prompt per line, optionally 'digit<TAB>prompt')."
            )
    chosen = [pairs[i % len(pairs)] for i in range(num_images)]
    return [p for p, _ in chosen], [d for _, d in chosen]
