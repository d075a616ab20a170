"""Compile the Triton kernels for a CUDA target without a GPU, and read what the compiler made.

Triton compiles for any NVIDIA target on a machine with no GPU: its wheel bundles ``ptxas`` and
``cuobjdump``. This module drives the launchers of :mod:`diffq.kernels.triton_ops` exactly as
a layer's forward does, at real layer shapes, on ``meta`` tensors, records each kernel launch
instead of running it, specializes it the way Triton's JIT would on a GPU (the JIT's own
argument binder: 16-byte aligned pointers and integers divisible by 16 get ``tt.divisibility``,
integers equal to 1 become constants), compiles that specialization for ``sm_80``/``sm_89``/
``sm_90`` and reports, per kernel: registers, stack and spill instructions, shared memory,
the matrix instructions in the PTX and the SASS, and the width of the loads of packed weight
codes.

Triton must be imported without ``TRITON_INTERPRET=1`` for kernels to compile (its own library
functions are created for the interpreter otherwise), and the test session runs the
interpreter; so the test runs this module as a script in a fresh process::

    python -m diffq.kernels.compiled < layers.json > reports.json   # see main()
    python -m diffq.kernels.compiled --table < layers.json          # the same, as a table

Nothing here needs a GPU or launches anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "SHARED_LIMIT",
    "LayerCase",
    "Launch",
    "KernelReport",
    "compile_unavailable_reason",
    "load_compiled_kernels",
    "record_launches",
    "compile_launch",
    "compile_cases",
    "run_in_subprocess",
    "format_table",
]

# Largest shared memory one block may use (the opt-in maximum, bytes): CUDA C Programming Guide,
# "Technical Specifications per Compute Capability" (163 KB on 8.0, 99 KB on 8.6/8.9, 227 KB on 9.0).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 120: 101376}
MAX_REGS = 255  # per thread, every target here

_KERNELS = ("_act_kernel", "_int_gemm_kernel", "_weight_only_kernel", "_conv_kernel", "_conv_lowrank_kernel")
_KERNELS_FILE = Path(__file__).with_name("triton_ops.py")


# --------------------------------------------------------------------------- what to compile


@dataclass(frozen=True)
class LayerCase:
    """One quantized linear layer call: ``x [m, k] -> [m, n]`` of a preset's layer config, or with
    ``conv=(kernel, stride, padding, size)`` a convolution from ``k`` to ``n`` channels on
    ``x [m, k, size, size]``.

    ``overrides`` replace fields of the preset's :class:`diffq.plan.LayerConfig` (``rank``,
    ``w_symmetric``, ``smooth_alpha``, ...); ``targets`` are the compute capabilities to compile for.
    ``tile_configs``: also compile the GEMM with every autotuning candidate the pruner keeps for
    this call (``triton_ops.prune_for_call``, the target's shared memory); those reports' layer
    names are ``<name>@<BLOCK_M>x<BLOCK_N>x<BLOCK_K>w<warps>s<stages>``.
    """

    name: str
    m: int
    k: int
    n: int
    preset: str
    overrides: dict = field(default_factory=dict)
    bias: bool = True
    dtype: str = "float16"
    targets: tuple[int, ...] = (90,)
    tile_configs: bool = False
    conv: tuple[int, int, int, int] | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> LayerCase:
        conv = None if d.get("conv") is None else tuple(d["conv"])
        return cls(**{**d, "targets": tuple(d["targets"]), "conv": conv})


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its grid and its arguments."""

    kernel: str
    fn: Any
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class KernelReport:
    """What the compiler made of one kernel specialization for one target."""

    kernel: str
    target: int
    layers: list[str]
    constexprs: dict  # the launch's constexpr keyword arguments and options (num_warps, num_stages)
    error: str | None = None
    regs: int = 0
    stack: int = 0  # bytes of stack frame per thread (cuobjdump -res-usage STACK)
    local: int = 0  # bytes of local memory per thread (LOCAL)
    spill_stores: int = 0  # STL instructions in the SASS (the kernels declare no local arrays)
    spill_loads: int = 0  # LDL instructions
    shared: int = 0  # dynamic shared memory Triton requests at launch (metadata.shared), bytes
    static_shared: int = 0  # static shared memory in the cubin (SHARED), bytes
    threads: int = 0
    ptx_mma: dict = field(default_factory=dict)  # PTX matrix instruction -> count
    sass_mma: dict = field(default_factory=dict)  # SASS matrix instruction -> count
    code_loads: dict = field(default_factory=dict)  # PTX loads of packed weight codes: "<bits>-bit <op>" -> count
    input_loads: dict = field(default_factory=dict)  # PTX loads from x_ptr (activations or patches), likewise
    zero_loads: dict = field(default_factory=dict)  # PTX loads of uint8 zero points (wz_ptr), likewise
    sass_global_loads: dict = field(default_factory=dict)  # SASS LDG/LDGSTS variants -> count
    compile_s: float = 0.0
    code: bytes = field(default=b"", repr=False)  # machine code until add_sass() reads it

    @property
    def shared_limit(self) -> int:
        return SHARED_LIMIT[self.target]

    @property
    def code_load_bits(self) -> list[int]:
        """Widths (bits) of the loads of packed weight codes (empty: the kernel reads none)."""
        return sorted({int(k.split("-")[0]) for k in self.code_loads})

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "code"}

    @classmethod
    def from_json(cls, d: dict) -> KernelReport:
        return cls(**d)


# --------------------------------------------------------------------------- availability


def compile_unavailable_reason(in_this_process: bool = True) -> str | None:
    """Why CUDA kernels cannot be compiled (``None``: they can).

    ``in_this_process=False`` asks about a fresh process (:func:`run_in_subprocess`), which
    does not inherit ``TRITON_INTERPRET``.
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if in_this_process and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: Triton's library functions are interpreter functions in this process"
    try:
        import triton
        from triton import knobs
        from triton.backends import backends
    except Exception as e:  # pragma: no cover - broken install
        return f"triton does not import: {e!r}"
    if "nvidia" not in backends:
        return "this Triton has no NVIDIA backend"
    from triton.runtime import jit

    if not (hasattr(jit, "create_function_from_signature") and hasattr(jit.JITFunction, "_pack_args")):
        return f"Triton {triton.__version__}'s JIT specializes arguments differently (this module follows 3.8)"
    for tool in ("ptxas", "cuobjdump", "nvdisasm"):
        try:
            path = getattr(knobs.nvidia, tool).path
        except Exception as e:  # noqa: BLE001 - knobs raise various errors for a missing binary
            return f"{tool} not found ({e!r})"
        if not path or not os.path.exists(path):
            return f"{tool} not found"
    return None


# --------------------------------------------------------------------------- recording launches


def load_compiled_kernels() -> ModuleType:
    """A private copy of :mod:`diffq.kernels.triton_ops` built for compilation (not interpreted).

    A copy, so that ``sys.modules["diffq.kernels.triton_ops"]`` (the dispatch's, or the
    interpreter tests') is left alone and its kernels can be replaced by recorders.
    """
    reason = compile_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"cannot compile Triton kernels here: {reason}")
    name = "diffq.kernels._triton_ops_compiled"
    spec = importlib.util.spec_from_file_location(name, _KERNELS_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    if module.INTERPRET:  # pragma: no cover - guarded by compile_unavailable_reason
        raise RuntimeError("the kernels module was built for the interpreter")
    return module


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` appends a :class:`Launch`."""

    def __init__(self, name: str, fn: Any, log: list[Launch]) -> None:
        self.name, self.fn, self.log = name, fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(Launch(self.name, self.fn, tuple(grid), args, kwargs))

        return launch


@contextlib.contextmanager
def _meta_counts_as_cuda(ops: ModuleType):
    """Let ``_input_reason`` accept ``meta`` tensors, as it does CPU ones under the interpreter
    (its only use of ``INTERPRET``); every other check still applies."""
    original = ops._input_reason

    def reason(x, *args, **kwargs):
        saved, ops.INTERPRET = ops.INTERPRET, x.device.type == "meta"
        try:
            return original(x, *args, **kwargs)
        finally:
            ops.INTERPRET = saved

    ops._input_reason = reason
    try:
        yield
    finally:
        ops._input_reason = original


def record_launches(case: LayerCase, ops: ModuleType, capability: int) -> list[Launch]:
    """The kernel launches one forward of ``case``'s layer makes on ``sm_<capability>``, recorded
    on ``meta`` tensors.

    The layer is a real :class:`diffq.modules.QuantizedLinear` of the preset's config (its
    buffers' shapes and dtypes) and its ``forward`` builds the kernel call, so the launchers pick
    block sizes and flags from the code (``_gemm_blocks``, ``_act_blocks``) as on a GPU of that
    target (``triton_ops.device_capability`` answers ``capability`` meanwhile).
    """
    import torch

    from diffq import modules
    from diffq.presets import get_preset

    config = dataclasses.replace(get_preset(case.preset).layer, **case.overrides)
    dtype = getattr(torch, case.dtype)
    if case.conv is None:
        layer = modules.QuantizedLinear(case.k, case.n, config, bias=case.bias, dtype=dtype, device="meta")
        x = torch.empty(case.m, case.k, dtype=dtype, device="meta")
    else:
        kernel, stride, padding, size = case.conv
        layer = modules.QuantizedConv2d(case.k, case.n, (kernel, kernel), config, (stride, stride), (padding, padding),
                                        (1, 1), 1, case.bias, dtype, "meta")
        x = torch.empty(case.m, case.k, size, size, dtype=dtype, device="meta")
    log: list[Launch] = []
    saved = {name: getattr(ops, name) for name in (*_KERNELS, "device_capability")}
    for name in _KERNELS:
        setattr(ops, name, _Recorder(name, saved[name], log))
    ops.device_capability = lambda device: capability

    def on_triton(op: str):
        check = ops.unsupported_reason if op == "quantized_linear" else ops.conv2d_unsupported_reason
        launcher = ops.quantized_linear_triton if op == "quantized_linear" else ops.quantized_conv2d_triton

        def run(x, qweight, w_scale, w_zero, *, codes=None, **kwargs):
            reason = check(x, qweight, w_scale, w_zero, **kwargs)
            if reason is not None:
                raise ValueError(f"{case.name}: Triton would not run this layer: {reason}")
            return launcher(x, qweight, w_scale, w_zero, **kwargs)

        return run

    dispatch = modules.kernels
    originals = {op: getattr(dispatch, op) for op in ("quantized_linear", "quantized_conv2d")}
    try:
        for op in originals:
            setattr(dispatch, op, on_triton(op))
        with _meta_counts_as_cuda(ops):
            layer(x)
    finally:
        for op, fn in originals.items():
            setattr(dispatch, op, fn)
        for name, fn in saved.items():
            setattr(ops, name, fn)
    return log


# --------------------------------------------------------------------------- compiling


def _jit_specialization(launch: Launch, backend) -> tuple:
    """``(signature, constexprs, attrs, options)`` as ``JITFunction.run`` computes them.

    The JIT's own binder reads each argument: a tensor's ``data_ptr()`` (0 for ``meta``
    tensors: aligned, as the CUDA caching allocator's blocks are) and each integer's value.
    """
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _key(launch: Launch, capability: int) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    signature, constexprs, attrs, options = _jit_specialization(launch, make_backend(GPUTarget("cuda", capability, 32)))
    return repr((launch.kernel, capability, signature, sorted(constexprs.items()), sorted(attrs.items()), options))


def _run_tool(tool: str, *args: str) -> str:
    from triton import knobs

    return subprocess.run([getattr(knobs.nvidia, tool).path, *args], check=True, capture_output=True,
                          text=True).stdout


def resource_usage(cubin: bytes, kernel: str) -> dict[str, int]:
    """``cuobjdump -res-usage`` of ``kernel``: ``{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = _run_tool("cuobjdump", "-res-usage", f.name)
    block = out.split(f"Function {kernel}:", 1)[1]
    line = block.strip().splitlines()[0]
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


def sass(cubin: bytes) -> str:
    """The SASS of a cubin (``cuobjdump -sass``), for reading by hand."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return _run_tool("cuobjdump", "-sass", f.name)


def text_section(cubin: bytes, kernel: str) -> bytes:
    """The machine code of ``kernel`` (the ELF64 section ``.text.<kernel>`` of a cubin)."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    want = f".text.{kernel}".encode()
    for name, _type, _flags, _addr, offset, size, *_ in headers:
        if cubin[names + name: cubin.index(b"\0", names + name)] == want:
            return cubin[offset: offset + size]
    raise ValueError(f"no section .text.{kernel} in the cubin")


def disassemble(codes: list[bytes], capability: int) -> list[str]:
    """SASS of several kernels' machine code for ``sm_<capability>``, in one ``nvdisasm`` call.

    ``nvdisasm`` takes about half a second to start whatever it reads, so the codes (16-byte
    instructions) are concatenated into one raw binary and the listing is split at their offsets.
    """
    arch = f"SM{capability}{'a' if capability >= 90 else ''}"
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(b"".join(codes))
        f.flush()
        listing = _run_tool("nvdisasm", "--binary", arch, f.name)
    ends, total = [], 0
    for code in codes:
        total += len(code)
        ends.append(total)
    out = [[] for _ in codes]
    part = 0
    for line in listing.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/", line)
        if m is None:
            continue
        while int(m.group(1), 16) >= ends[part]:
            part += 1
        out[part].append(line)
    return ["\n".join(lines) for lines in out]


def sass_opcodes(text: str) -> Counter:
    """Opcode (with modifiers) -> count, over the instructions of a SASS listing."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)", text)
    return Counter(ops)


_PTX_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*?);\s*$")
_PTX_REG = re.compile(r"%[a-z]+\d+")


def ptx_loads_from_param(ptx: str, param_index: int) -> Counter:
    """Global loads whose address derives from kernel parameter ``param_index``: ``"<bits>-bit <op>"`` -> count.

    A def-use closure over PTX's virtual registers: the parameter's ``ld.param`` taints its
    destination, any instruction other than a load with a tainted source taints its
    destinations (pointer arithmetic, moves, selects), until nothing changes; then every
    ``ld.global`` or ``cp.async`` whose address register is tainted is counted with its width
    (``.v4.b32``: 128 bits; ``cp.async ..., 16``: 128 bits).
    """
    instrs = []
    for line in ptx.splitlines():
        m = _PTX_INSTR.match(line)
        if m:
            instrs.append((m.group(1), m.group(2)))
    tainted: set[str] = set()
    param = re.compile(rf"\[\w+_param_{param_index}\]")
    for op, rest in instrs:
        if op.startswith("ld.param") and param.search(rest):
            tainted.update(_PTX_REG.findall(rest.split(",")[0]))
    changed = True
    while changed:
        changed = False
        for op, rest in instrs:
            if op.startswith(("ld.", "st.", "cp.", "mma", "wgmma", "ldmatrix", "stmatrix", "bar", "ret")):
                continue
            if rest.startswith("{"):  # a vector destination: { %r1, %r2 }, ...
                dst, _, srcs = rest.partition("}")
            else:
                dst, _, srcs = rest.partition(",")
            if set(_PTX_REG.findall(srcs)) & tainted:
                new = set(_PTX_REG.findall(dst)) - tainted
                if new:
                    tainted |= new
                    changed = True
    loads: Counter = Counter()
    for op, rest in instrs:
        if op.startswith("ld.global"):
            addr = re.search(r"\[\s*(%\w+)", rest)
            if addr and addr.group(1) in tainted:
                vec = re.search(r"\.v(\d)", op)
                bits = int(re.search(r"\.[bsuf](\d+)$", op).group(1)) * (int(vec.group(1)) if vec else 1)
                loads[f"{bits}-bit {op}"] += 1
        elif op.startswith("cp.async") and ".global" in op:
            parts = [p.strip() for p in re.findall(r"\[[^\]]*\]|[^,\[\]]+", rest) if p.strip()]
            addr = re.search(r"(%\w+)", parts[1]) if len(parts) > 2 else None
            if addr and addr.group(1) in tainted:
                loads[f"{int(parts[2], 0) * 8}-bit {op}"] += 1
    return loads


def compile_launch(launch: Launch, capability: int, with_sass: bool = True) -> KernelReport:
    """Compile ``launch``'s specialization for ``sm_<capability>`` and inspect the result.

    ``with_sass=False`` leaves the SASS fields empty and keeps the machine code in ``report.code``
    for :func:`add_sass` (one disassembler call for many kernels).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = _jit_specialization(launch, backend)
    flags = {k: v for k, v in launch.kwargs.items() if k not in ("INTERPRET",)}
    report = KernelReport(launch.kernel, capability, [], flags)
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
        report.error = f"{type(e).__name__}: {e}"[:2000]
        return report
    report.compile_s = time.perf_counter() - start
    cubin, ptx = compiled.asm["cubin"], compiled.asm["ptx"]
    usage = resource_usage(cubin, launch.kernel)
    report.regs, report.stack, report.local = usage.get("REG", 0), usage.get("STACK", 0), usage.get("LOCAL", 0)
    report.static_shared = usage.get("SHARED", 0)
    report.shared = int(compiled.metadata.shared)
    report.threads = 32 * options.num_warps
    report.ptx_mma = dict(Counter(re.findall(r"\b((?:wgmma\.mma_async|mma)\.[\w.]+)", ptx)))
    names = [p.name for p in launch.fn.params]
    if "qw_ptr" in names:
        runtime = [n for n in names if signature[n] != "constexpr"]  # PTX parameters, in order
        report.code_loads = dict(ptx_loads_from_param(ptx, runtime.index("qw_ptr")))
        if launch.kwargs.get("HAS_ZERO"):
            report.zero_loads = dict(ptx_loads_from_param(ptx, runtime.index("wz_ptr")))
    if "x_ptr" in names:
        runtime = [n for n in names if signature[n] != "constexpr"]
        report.input_loads = dict(ptx_loads_from_param(ptx, runtime.index("x_ptr")))
    report.code = text_section(cubin, launch.kernel)
    if with_sass:
        add_sass([report])
    return report


def add_sass(reports: list[KernelReport]) -> None:
    """Fill the SASS fields (spill instructions, MMA, global loads) of compiled reports."""
    for capability in sorted({r.target for r in reports}):
        todo = [r for r in reports if r.target == capability and r.code]
        for r, listing in zip(todo, disassemble([r.code for r in todo], capability), strict=True):
            ops = sass_opcodes(listing)
            r.spill_stores = sum(n for op, n in ops.items() if op.startswith("STL"))
            r.spill_loads = sum(n for op, n in ops.items() if op.startswith("LDL"))
            r.sass_mma = {op: n for op, n in ops.items() if re.match(r"[HIQ]G?MMA", op)}
            r.sass_global_loads = {op: n for op, n in ops.items() if op.startswith("LDG")}
            r.code = b""


def compile_cases(cases: list[LayerCase]) -> list[KernelReport]:
    """Record every case's launches and compile each distinct specialization once per target."""
    ops = load_compiled_kernels()
    reports: dict[str, KernelReport] = {}
    for case in cases:
        for capability in case.targets:
            for launch in record_launches(case, ops, capability):
                variants = [(case.name, launch)]
                if case.tile_configs and launch.kernel not in ("_act_kernel", "_conv_lowrank_kernel"):
                    variants += _tile_variants(case.name, launch, ops, capability)
                for name, variant in variants:
                    key = _key(variant, capability)
                    if key not in reports:
                        reports[key] = compile_launch(variant, capability, with_sass=False)
                    reports[key].layers.append(name)
    add_sass(list(reports.values()))
    return list(reports.values())


def _tile_variants(name: str, launch: Launch, ops: ModuleType, capability: int) -> list[tuple[str, Launch]]:
    """``launch`` with each autotuning candidate the pruner keeps for it on ``sm_<capability>``."""
    if launch.kernel == "_conv_kernel":
        int_path, configs = launch.kwargs["MODE"] == 0, ops.CONV_CONFIGS
    else:
        int_path = launch.kernel == "_int_gemm_kernel"
        configs = ops.INT_CONFIGS if int_path else ops.WEIGHT_ONLY_CONFIGS
    named = dict(zip(launch.fn.arg_names, launch.args, strict=False))
    out = []
    for b in ops.prune_for_call(configs, int_path, named, launch.kwargs, SHARED_LIMIT[capability], capability):
        kwargs = {**launch.kwargs, "BLOCK_M": b.m, "BLOCK_N": b.n, "BLOCK_K": b.k, "GROUP_M": b.group_m,
                  "num_warps": b.warps, "num_stages": b.stages}
        out.append((f"{name}@{b.m}x{b.n}x{b.k}w{b.warps}s{b.stages}",
                    Launch(launch.kernel, launch.fn, launch.grid, launch.args, kwargs)))
    return out


def run_in_subprocess(cases: list[LayerCase], timeout: float = 600) -> list[KernelReport]:
    """:func:`compile_cases` in a fresh Python without ``TRITON_INTERPRET`` (what the tests call)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")  # compile only, never touch a GPU
    proc = subprocess.run(
        [sys.executable, "-m", "diffq.kernels.compiled"],
        input=json.dumps([c.to_json() for c in cases]), capture_output=True, text=True, env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the kernels failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [KernelReport.from_json(d) for d in json.loads(proc.stdout)]


# --------------------------------------------------------------------------- reporting


def _short(counts: dict) -> str:
    return " ".join(f"{op}x{n}" for op, n in sorted(counts.items())) or "-"


def format_table(reports: list[KernelReport]) -> str:
    """One line per kernel x target: registers, spills, shared memory, MMA, weight-code loads."""
    rows = [("kernel", "sm", "flags", "regs", "stack", "STL/LDL", "smem KiB", "MMA (SASS)", "code loads (PTX)", "x loads (PTX)",
             "compile s")]
    for r in reports:
        flags = ",".join(f"{k}={v}" for k, v in r.constexprs.items() if v not in (False, None))
        if r.error:
            rows.append((r.kernel, str(r.target), flags, "ERROR", r.error.splitlines()[0][:60], "", "", "", "", "", ""))
            continue
        rows.append((
            r.kernel, str(r.target), flags, str(r.regs), str(r.stack), f"{r.spill_stores}/{r.spill_loads}",
            f"{(r.shared + r.static_shared) / 1024:.1f}", _short(r.sass_mma), _short(r.code_loads), _short(r.input_loads),
            f"{r.compile_s:.1f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    """Read a JSON list of :class:`LayerCase` from stdin; write the reports (JSON, or ``--table``)."""
    argv = sys.argv[1:] if argv is None else argv
    cases = [LayerCase.from_json(d) for d in json.load(sys.stdin)]
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the result
        reports = compile_cases(cases)
    if "--table" in argv:
        print(format_table(reports))
    else:
        json.dump([r.to_json() for r in reports], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
