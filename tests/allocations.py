"""A dispatch mode that records the tensors aten ops return, for tests of what a computation allocates."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class ReturnedTensors(TorchDispatchMode):
    """Inside ``with ReturnedTensors() as seen:``, every tensor an op returns is recorded as
    ``(numel, nbytes, is_view)``; a view shares its base's memory and allocates nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[int, int, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((t.numel(), t.numel() * t.element_size(), func.is_view))
        return out

    def largest_numel(self) -> int:
        """Elements of the largest tensor returned, views included."""
        return max((numel for numel, _, _ in self.outputs), default=0)

    def largest_allocation(self) -> int:
        """Bytes of the largest tensor an op allocated (views left out)."""
        return max((nbytes for _, nbytes, view in self.outputs if not view), default=0)

    def allocations_of_at_least(self, numel: int) -> int:
        """How many allocated tensors (views left out) have ``numel`` elements or more."""
        return sum(1 for n, _, view in self.outputs if not view and n >= numel)
