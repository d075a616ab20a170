"""Seeded, sharded image generation for evaluation.

Image ``i`` always uses ``torch.Generator("cpu").manual_seed(seed + i)`` and is generated in the same
batch (``i // batch_size``) whatever the number of processes: batches are dealt to processes
round-robin, so one process and many produce the same images.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from diffq.metrics.images import as_image_batch, batches
from diffq.metrics.store import ImageStore


def shard_batches(num_images: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """The global batches (index ranges) that process ``rank`` of ``world_size`` generates."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    return batches(num_images, batch_size)[rank::world_size]


def _accepted(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``fn`` takes (all of them if it has ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    shard: Sequence[range],
    *,
    seed: int,
    call_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "generating",
    store: ImageStore | None = None,
) -> tuple[dict[int, torch.Tensor], float]:
    """Generate the images of ``shard``: ``({global index: [C, H, W] float CPU image}, seconds)``.

    ``seconds`` is the wall time of the pipeline calls (with CUDA synchronised). With a ``store``,
    batches it holds are read back instead of generated and each new batch is kept in it as soon
    as it is made; ``pipe`` may then be ``None`` when every batch is stored.
    """
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    base = {**(call_kwargs or {}), "output_type": "pt"}
    out: dict[int, torch.Tensor] = {}
    seconds = 0.0
    total = sum(len(r) for r in shard)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for idx in shard:
            stored = store.load(idx, prompts) if store is not None else None
            if stored is not None:
                for i, image in zip(idx, stored[0], strict=True):
                    out[i] = image
                seconds += stored[1]
                bar.update(len(idx))
                continue
            if pipe is None:
                raise RuntimeError(f"images {idx.start}-{idx.stop - 1} are neither stored nor can be generated")
            kwargs = _accepted(
                pipe.__call__,
                {
                    **base,
                    "prompt": [prompts[i] for i in idx],
                    "generator": [torch.Generator("cpu").manual_seed(seed + i) for i in idx],
                },
            )
            start = time.perf_counter()
            with torch.no_grad():
                result = pipe(**kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            seconds += elapsed
            images = getattr(result, "images", result[0] if isinstance(result, tuple) else result)
            batch = as_image_batch(images)
            if batch.shape[0] != len(idx):
                raise RuntimeError(f"pipeline returned {batch.shape[0]} images for {len(idx)} prompts")
            for i, image in zip(idx, batch, strict=True):
                out[i] = image.clone()
            if store is not None:
                store.save(idx, torch.stack([out[i] for i in idx]).float().cpu(), prompts, elapsed)
            bar.update(len(idx))
    return out, seconds
