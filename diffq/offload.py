"""Run a model with its weights on disk, one module at a time: low-memory calibration and conversion.

:class:`Offloaded` takes every parameter and buffer out of a model and leaves a ``meta`` placeholder of
the same shape and dtype. Each module that owns tensors gets forward hooks that read its own tensors
from disk just before it runs and drop them just after, so a forward pass holds one layer's weights
at a time. :meth:`Offloaded.materialized` does the same around other work (converting a layer), and
:meth:`Offloaded.restore` puts back what is left and removes the hooks.

The tensors are read from the safetensors files the model was loaded from, with plain file reads
(never a memory map, so the pages go to the kernel's page cache, not to the process), and converted
to the dtype the model held them in, exactly as loading converted them. A tensor the files do not
hold as the model holds it (a buffer made at construction, a weight changed after loading) is
written once to a temporary spill file and read from there; that file is deleted by ``restore``.
A module that uses a tensor of another module outside that module's forward (rare) meets a
``meta`` tensor and fails loudly, never silently.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffq.errors import CheckpointError
from diffq.memory import return_freed_memory

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CHECKED_ELEMENTS = 4096
"""A tensor is taken from the files only if it matches the model's copy: whole below this many
elements, on its first this-many elements above (reading all of a large tensor would map it in)."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: a file, an offset, and the stored dtype and shape."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize

    def read(self) -> torch.Tensor:
        """The tensor, read from its file into new memory."""
        data = torch.empty(self.nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            if handle.readinto(memoryview(data.numpy())) != self.nbytes:
                raise CheckpointError(f"{self.path} is shorter than its header says; the checkpoint is truncated.")
        return data.view(self.dtype).reshape(self.shape)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def safetensors_index(files: list[Path]) -> dict[str, StoredTensor]:
    """Every tensor of some safetensors files, from their headers (nothing else is read)."""
    index: dict[str, StoredTensor] = {}
    for path in files:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for key, entry in header.items():
            if key == "__metadata__" or entry["dtype"] not in SAFETENSORS_DTYPES:
                continue
            start = 8 + length + entry["data_offsets"][0]
            index[key] = StoredTensor(path, start, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
    return index


class SpillFile:
    """A temporary file that tensors are written to once and read back from."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        handle, name = tempfile.mkstemp(prefix="diffq-offload-", suffix=".bin", dir=directory)
        os.close(handle)
        self.path = Path(name)
        self._size = 0

    def write(self, tensor: torch.Tensor) -> StoredTensor:
        data = tensor.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8) if data.numel() else torch.empty(0, dtype=torch.uint8)
        with open(self.path, "ab") as handle:
            handle.write(memoryview(raw.numpy()))
        stored = StoredTensor(self.path, self._size, data.dtype, tuple(data.shape))
        self._size += raw.numel()
        return stored

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class _Slot:
    """One tensor of one module: where it lives on disk and how the model held it."""

    module: nn.Module
    name: str
    is_parameter: bool
    stored: StoredTensor
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool

    def load(self) -> None:
        tensor = self.stored.read().to(self.dtype).to(self.device)  # converted on the CPU, then one copy on a GPU
        if self.is_parameter:
            self.module._parameters[self.name] = nn.Parameter(tensor, requires_grad=self.requires_grad)
        else:
            self.module._buffers[self.name] = tensor

    def drop(self) -> None:
        placeholder = torch.empty(self.stored.shape, dtype=self.dtype, device="meta")
        if self.is_parameter:
            self.module._parameters[self.name] = nn.Parameter(placeholder, requires_grad=self.requires_grad)
        else:
            self.module._buffers[self.name] = placeholder


def _same(tensor: torch.Tensor, stored: StoredTensor) -> bool:
    """Whether the stored tensor, converted as loading converts it, is the model's tensor (checked on
    at most :data:`CHECKED_ELEMENTS` leading elements)."""
    if tuple(tensor.shape) != stored.shape or tensor.is_meta:
        return False
    count = min(tensor.numel(), CHECKED_ELEMENTS)
    if count == 0:
        return True
    with open(stored.path, "rb") as handle:
        handle.seek(stored.offset)
        head = torch.frombuffer(bytearray(handle.read(count * stored.dtype.itemsize)), dtype=stored.dtype)
    mine = tensor.detach().reshape(-1)[:count].cpu()
    return torch.equal(head.to(tensor.dtype), mine)


class Offloaded:
    """A model whose tensors stay on disk except while the module owning them runs.

    Args:
        model: the model; its parameters and buffers are replaced by ``meta`` placeholders now.
        stored: tensors on disk by state-dict name (:func:`safetensors_index` of the files the model was
            loaded from); a tensor missing there, or different, is spilled to a temporary file.
        spill_dir: where that file goes (default: the system's temporary folder).
    """

    def __init__(self, model: nn.Module, stored: Mapping[str, StoredTensor] | None = None,
                 spill_dir: str | os.PathLike | None = None) -> None:
        self.model = model
        self._spill: SpillFile | None = None
        self._spill_dir = spill_dir
        self._slots: dict[nn.Module, list[_Slot]] = {}
        self._active: dict[nn.Module, int] = {}
        self.spilled_bytes = 0
        stored = stored or {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            if module in self._slots:
                continue
            slots = []
            tensors = [(n, t, True) for n, t in module._parameters.items()]
            tensors += [(n, t, False) for n, t in module._buffers.items()]
            for name, tensor, is_parameter in tensors:
                if tensor is None:
                    continue
                key = f"{prefix}.{name}" if prefix else name
                source = stored.get(key)
                if source is None or not _same(tensor, source):
                    source = self._spill_file().write(tensor)
                    self.spilled_bytes += source.nbytes
                slots.append(_Slot(module, name, is_parameter, source, tensor.dtype, tensor.device,
                                   bool(getattr(tensor, "requires_grad", False))))
            if slots:
                self._slots[module] = slots
                _OWNERS[module] = self
        self._hooks = []
        for module, slots in self._slots.items():
            for slot in slots:
                slot.drop()
            self._hooks.append(module.register_forward_pre_hook(self._enter_hook))
            self._hooks.append(module.register_forward_hook(self._exit_hook, always_call=True))
        # Each forward reads every weight into new memory and frees it; glibc keeps what is freed (its
        # mmap threshold grows with the freed blocks), so without a trim per forward of the whole model
        # the heap grew over a calibration run to ~3x the float weights (SD 1.5 size, 4 prompts x 8 steps).
        self._hooks.append(model.register_forward_hook(lambda *_: return_freed_memory(), always_call=True))

    def _spill_file(self) -> SpillFile:
        if self._spill is None:
            self._spill = SpillFile(self._spill_dir)
        return self._spill

    def _enter(self, module: nn.Module) -> None:
        depth = self._active.get(module, 0)
        if depth == 0:
            for slot in self._slots.get(module, []):
                slot.load()
        self._active[module] = depth + 1

    def _exit(self, module: nn.Module) -> None:
        depth = self._active.get(module, 0) - 1
        if depth <= 0:
            self._active.pop(module, None)
            for slot in self._slots.get(module, []):
                slot.drop()
        else:
            self._active[module] = depth

    def _enter_hook(self, module: nn.Module, _args: tuple) -> None:
        self._enter(module)

    def _exit_hook(self, module: nn.Module, _args: tuple, _output) -> None:
        self._exit(module)

    @contextmanager
    def materialized(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module``'s own tensors (not its children's) loaded for the block, dropped after it."""
        self._enter(module)
        try:
            yield module
        finally:
            self._exit(module)

    def forget(self, module: nn.Module) -> None:
        """Stop managing ``module`` (it left the model, e.g. replaced by its quantized twin)."""
        self._slots.pop(module, None)
        self._active.pop(module, None)
        _OWNERS.pop(module, None)

    def restore(self) -> None:
        """Load every tensor still offloaded back into the model, remove the hooks and the spill file."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for module, slots in self._slots.items():
            _OWNERS.pop(module, None)
            if module not in self._active:
                for slot in slots:
                    slot.load()
        self._slots.clear()
        self._active.clear()
        if self._spill is not None:
            self._spill.delete()
            self._spill = None


_OWNERS: weakref.WeakKeyDictionary[nn.Module, Offloaded] = weakref.WeakKeyDictionary()


@contextmanager
def loaded(module: nn.Module) -> Iterator[nn.Module]:
    """``module``'s own tensors in memory inside the block, whether or not it is offloaded."""
    owner = _OWNERS.get(module)
    if owner is None:
        yield module
        return
    with owner.materialized(module):
        yield module


def release(module: nn.Module) -> bool:
    """Stop offloading ``module`` (it is leaving its model); whether it was offloaded."""
    owner = _OWNERS.get(module)
    if owner is not None:
        owner.forget(module)
    return owner is not None


def denoiser_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers model folder (sharded or not); empty if it has none."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    single = folder / "diffusion_pytorch_model.safetensors"
    return [single] if single.exists() else []
