"""Static GPU checks of the Triton kernels: compiled for sm_80/sm_89/sm_90 (and sm_120) on a machine with no GPU.

``tests/test_kernels.py`` checks what the kernels compute (in Triton's interpreter); this module
checks what the compiler makes of them at real layer shapes (SDXL and FLUX.1 attention and
feed-forward projections, 4096 tokens), for the presets' layer configs: each specialization the
launchers pick (block sizes and flags come from ``_gemm_blocks`` / ``_act_blocks`` through a real
``QuantizedLinear.forward``, specialized as Triton's JIT would at those shapes) compiles, keeps
every value in registers (no local-memory spills), runs its products on the tensor cores (int8
ones for the integer GEMMs), fits the target's shared memory and reads the packed weight codes at
least 32 bits per thread (vector or ``cp.async`` copies, no ``LDG.E.U8``). The activation pass and
the GEMM epilogues are also compiled at ranks 64, 128 and 256 (the largest Triton takes), where
register pressure is highest. SDXL's 3x3 convolutions (W8A8, W4A8 ± split ± zero points and a
rank-32 branch, the stride-2 downsampler, W4A16/W8A16, and W4A4, whose dynamic scales send its
input through the activation pass to be fake-quantized first) compile through a real
``QuantizedConv2d.forward`` to the implicit-GEMM kernels, checked the same way; their patch tiles
are 16-bit gathers (reported in the table's ``x loads`` column, not asserted).
:mod:`diffq.kernels.compiled` does the work, in one
fresh process per session (the session's Triton is the interpreter's); Triton's on-disk cache
makes later sessions faster.

``python tests/test_kernels_compiled.py`` prints the numbers as a table (kernel x target: registers,
stack, STL/LDL, shared memory, MMA instructions, weight-code loads).
"""

import dataclasses

import pytest

from diffq.presets import get_preset

compiled = pytest.importorskip("diffq.kernels.compiled")

_UNAVAILABLE = compiled.compile_unavailable_reason(in_this_process=False)
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None,
                                reason=f"Triton cannot compile for CUDA here: {_UNAVAILABLE}")

LayerCase = compiled.LayerCase

# Real projection shapes (tokens, in, out). SDXL runs in float16, FLUX.1 in bfloat16.
SDXL_ATTN, SDXL_FF = (4096, 1280, 1280), (4096, 1280, 5120)
FLUX_ATTN, FLUX_FF = (4096, 3072, 3072), (4096, 3072, 12288)
ALL = (80, 89, 90)
AMPERE_HOPPER = (80, 90)
AMPERE = (80,)
HOPPER = (90,)


def _cases(tag, shapes, dtype, preset, targets, bias=True, **overrides):
    return [LayerCase(f"{tag}-{i}", *shape, preset, overrides, bias, dtype, targets)
            for i, shape in zip(("attn", "ff"), shapes, strict=True)]


SDXL, FLUX = (SDXL_ATTN, SDXL_FF), (FLUX_ATTN, FLUX_FF)
CASES = [
    # W8A8: static per-tensor activation scale; dynamic per token with smoothing and a rank-32 branch.
    *_cases("sdxl-w8a8", SDXL, "float16", "w8a8", ALL),
    *_cases("sdxl-w8a8-dyn-smooth-r32", SDXL, "float16", "w8a8-rtn", AMPERE_HOPPER, a_mode="dynamic",
            smooth_alpha=0.5, rank=32),
    *_cases("flux-w8a8-dyn", FLUX, "bfloat16", "w8a8-rtn", HOPPER, bias=False, a_mode="dynamic"),
    # W4A8: group-64 weights, static activations; with zero points.
    *_cases("sdxl-w4a8", SDXL, "float16", "w4a8", HOPPER),
    *_cases("sdxl-w4a8-asym", SDXL, "float16", "w4a8", AMPERE_HOPPER, w_symmetric=False),
    # W4A4: group-64 weights and per-token-group-64 activations, with and without the rank-32 branch.
    *_cases("sdxl-w4a4-r32", SDXL, "float16", "w4a4", AMPERE_HOPPER),
    *_cases("flux-w4a4-r32", FLUX, "bfloat16", "w4a4", HOPPER),
    *_cases("sdxl-w4a4-rtn", SDXL, "float16", "w4a4-rtn", HOPPER, bias=False),
    # Weight-only: W4A16 group 64 (± zero points, ± rank 32), W8A16 per channel.
    *_cases("sdxl-w4a16", SDXL, "float16", "w4a16", ALL),
    *_cases("flux-w4a16", FLUX, "bfloat16", "w4a16", HOPPER),
    *_cases("sdxl-w4a16-asym", SDXL, "float16", "w4a16", HOPPER, w_symmetric=False),
    *_cases("sdxl-w4a16-r32", SDXL, "float16", "w4a16", HOPPER, rank=32),
    *_cases("sdxl-w4a16-r256", SDXL, "float16", "w4a16", HOPPER, rank=256),  # the largest rank Triton takes
    *_cases("sdxl-w8a16", SDXL, "float16", "w8a16", AMPERE_HOPPER),
    # The timestep-embedding layers: two rows (batch 2 with classifier-free guidance), W8A16.
    LayerCase("sdxl-time-emb-w8a16", 2, 1280, 1280, "w8a16", {}, True, "float16", HOPPER),
    # Low-rank branches of rank 64..256 through the activation pass and both GEMM epilogues (rank 64
    # is the last with 128 x 128 GEMM tiles, see _narrow_n).
    # sm_80 is where 128 x 128 GEMM tiles spilled at rank > 64; rank 256 is checked on both.
    *[LayerCase(f"sdxl-{p}-r{r}-attn", *SDXL_ATTN, p, {"rank": r, **extra}, True, "float16",
                AMPERE_HOPPER if r == 256 else AMPERE)
      for p, extra, ranks in (("w8a8-rtn", {"a_mode": "dynamic", "smooth_alpha": 0.5}, (128, 256)),
                              ("w4a4", {}, (64, 128, 256)))
      for r in ranks],
    LayerCase("sdxl-w4a16-r128-attn", *SDXL_ATTN, "w4a16", {"rank": 128}, True, "float16", AMPERE),
]
# Every autotuning candidate the pruner keeps, compiled for sm_90 (the GEMMs only; named "<name>@<tile>").
TUNED = [
    LayerCase("tune-sdxl-w8a8", *SDXL_ATTN, "w8a8", {}, True, "float16", HOPPER, tile_configs=True),
    LayerCase("tune-sdxl-w4a8", *SDXL_ATTN, "w4a8", {}, True, "float16", HOPPER, tile_configs=True),
    LayerCase("tune-sdxl-w4a16", *SDXL_ATTN, "w4a16", {}, True, "float16", HOPPER, tile_configs=True),
]
CASES += TUNED
# SDXL's UNet convolutions (3x3, implicit GEMM) at 1024x1024: batch 2 (classifier-free guidance), the
# 64x64 latent level with 640 channels; a resnet conv, an up-block conv over a skip concatenation
# (split 640 + 640 -> 640, a static scale per part) and the stride-2 downsampler.
CONV_640, CONV_SPLIT, CONV_DOWN = (3, 1, 1, 64), (3, 1, 1, 64), (3, 2, 1, 64)
CONVS = [
    LayerCase("sdxl-conv3x3-w8a8", 2, 640, 640, "w8a8", {}, True, "float16", ALL, conv=CONV_640),
    LayerCase("sdxl-conv3x3-w4a8", 2, 640, 640, "w4a8", {}, True, "float16", AMPERE_HOPPER, conv=CONV_640),
    LayerCase("sdxl-conv3x3-w4a8-split", 2, 1280, 640, "w4a8", {"a_split": 640}, True, "float16", HOPPER,
              conv=CONV_SPLIT),
    LayerCase("sdxl-conv3x3-w4a8-asym-r32", 2, 640, 640, "w4a8", {"w_symmetric": False, "rank": 32}, True,
              "float16", HOPPER, conv=CONV_640),
    LayerCase("sdxl-down-w8a8", 2, 640, 640, "w8a8", {}, True, "float16", HOPPER, conv=CONV_DOWN),
    LayerCase("sdxl-conv3x3-w4a16", 2, 640, 640, "w4a16", {}, True, "float16", ALL, conv=CONV_640),
    LayerCase("sdxl-conv3x3-w8a16", 2, 640, 640, "w8a16", {}, True, "float16", HOPPER, conv=CONV_640),
    # W4A4 (dynamic scales per pixel and 64 channels, smoothing, rank 32): fake-quantized input, 16-bit GEMM.
    LayerCase("sdxl-conv3x3-w4a4-r32", 2, 640, 640, "w4a4", {}, True, "float16", ALL, conv=CONV_640),
    LayerCase("sdxl-down-w4a4-rtn", 2, 640, 640, "w4a4-rtn", {}, True, "float16", HOPPER, conv=CONV_DOWN),
]
CASES += CONVS
# Consumer Blackwell (sm_120, e.g. RTX 50xx; 99 KiB of shared memory per block): the integer paths, linear and 3x3.
BLACKWELL = (120,)
SM120 = [
    LayerCase("sm120-sdxl-w8a8-attn", *SDXL_ATTN, "w8a8", {}, True, "float16", BLACKWELL),
    LayerCase("sm120-sdxl-w4a8-attn", *SDXL_ATTN, "w4a8", {}, True, "float16", BLACKWELL),
    LayerCase("sm120-flux-w4a4-r32-attn", *FLUX_ATTN, "w4a4", {}, True, "bfloat16", BLACKWELL),
    LayerCase("sm120-sdxl-conv3x3-w4a8", 2, 640, 640, "w4a8", {}, True, "float16", BLACKWELL, conv=CONV_640),
    LayerCase("sm120-sdxl-conv3x3-w4a16", 2, 640, 640, "w4a16", {}, True, "float16", BLACKWELL, conv=CONV_640),
    LayerCase("sm120-sdxl-conv3x3-w4a4-r32", 2, 640, 640, "w4a4", {}, True, "float16", BLACKWELL, conv=CONV_640),
]
# The convolution's autotuning candidates, where they spilled most (see triton_ops._conv_spills_registers):
# the integer GEMM with zero points and a rank-32 branch, and the weight-only GEMM.
CONV_TUNED = [
    LayerCase("tune-sdxl-conv3x3-w4a8-asym-r32", 2, 640, 640, "w4a8", {"w_symmetric": False, "rank": 32}, True,
              "float16", (89, 90), tile_configs=True, conv=CONV_640),
    LayerCase("tune-sdxl-conv3x3-w4a16", 2, 640, 640, "w4a16", {}, True, "float16", (90, 120), tile_configs=True,
              conv=CONV_640),
]
CASES += SM120
# The weight-only GEMM's 128 x 128 x 64 tile spilled on sm_120 (255 registers, 16 B of stack, 3 STL / 3 LDL;
# sm_80/89/90 do not): there it takes 64-column tiles (triton_ops._narrow_n), with the autotuner's candidates too.
SM120_WEIGHT_ONLY = LayerCase("sm120-sdxl-w4a16-attn", *SDXL_ATTN, "w4a16", {}, True, "float16", BLACKWELL,
                              tile_configs=True)
CASES.append(SM120_WEIGHT_ONLY)
TUNED.append(SM120_WEIGHT_ONLY)
CASES += CONV_TUNED
TUNED += CONV_TUNED

# What each case launches: the activation pass (quantized activations or a low-rank branch), then a GEMM;
# a convolution its low-rank down-projection (if any), the activation pass that fake-quantizes its input
# (dynamic scales), then the implicit GEMM.
ACT, INT_GEMM, WEIGHT_ONLY = "_act_kernel", "_int_gemm_kernel", "_weight_only_kernel"
CONV, CONV_LOWRANK = "_conv_kernel", "_conv_lowrank_kernel"


def _layer_config(case):
    return dataclasses.replace(get_preset(case.preset).layer, **case.overrides)


def _kernels(case):
    int_path = case.preset not in ("w4a16", "w8a16")
    has_rank = _layer_config(case).rank > 0
    if case.conv is not None:
        return ([CONV_LOWRANK] if has_rank else []) + ([ACT] if _dynamic_conv(case) else []) + [CONV]
    return ([ACT] if int_path or has_rank else []) + [INT_GEMM if int_path else WEIGHT_ONLY]


def _int_path(case):
    """Whether the case's GEMM multiplies int8 activations (a dynamic-scale convolution's does not)."""
    return case.preset not in ("w4a16", "w8a16") and not _dynamic_conv(case)


def _dynamic_conv(case):
    """A convolution with dynamic activation scales: its input is fake-quantized, then a 16-bit GEMM."""
    config = _layer_config(case)
    return case.conv is not None and config.a_bits is not None and config.a_mode == "dynamic"


ITEMS = [(c, k, t) for c in CASES if c.name.endswith("-attn") or c.m < 64 or c.conv
         for k in _kernels(c) for t in c.targets]

def _config(case):
    """The case's name without its shape (``-attn`` / ``-ff``)."""
    return case.name.removesuffix("-attn").removesuffix("-ff")


def _id(item):
    case, kernel, target = item
    return f"{_config(case)}/{kernel.strip('_')}/sm{target}"


@pytest.fixture(scope="session")
def reports():
    """Every case compiled once per session: ``{(case name, kernel, target): KernelReport}``."""
    out = {}
    for r in compiled.run_in_subprocess(CASES):
        for layer in r.layers:
            assert (layer, r.kernel, r.target) not in out, f"{layer} launches {r.kernel} twice"
            out[(layer, r.kernel, r.target)] = r
    return out


def _report(reports, item):
    case, kernel, target = item
    r = reports.get((case.name, kernel, target))
    assert r is not None, f"{case.name} did not launch {kernel} (launched: {sorted(k for k in reports if k[0] == case.name)})"
    assert r.error is None, f"{kernel} does not compile for sm_{target}: {r.error}"
    return r


@pytest.mark.parametrize("item", ITEMS, ids=_id)
def test_compiles(reports, item):
    _report(reports, item)


def test_layer_shapes_share_specializations(reports):
    """Attention and feed-forward shapes of one config compile to the same kernels (N, K only vary
    runtime arguments), which is why only one of them is checked per config below."""
    for case in CASES:
        if case.name.endswith("-ff") and case.name[: -len("ff")] + "attn" in {c.name for c in CASES}:
            attn = case.name[: -len("ff")] + "attn"
            for kernel in _kernels(case):
                for t in case.targets:
                    assert reports[(case.name, kernel, t)] is reports[(attn, kernel, t)]


@pytest.mark.parametrize("item", ITEMS, ids=_id)
def test_no_register_spills(reports, item):
    r = _report(reports, item)
    assert (r.stack, r.local, r.spill_stores, r.spill_loads) == (0, 0, 0, 0), (
        f"{r.kernel} sm_{r.target} {r.constexprs}: {r.regs} registers, {r.stack} B stack, "
        f"{r.spill_stores} STL / {r.spill_loads} LDL"
    )
    assert r.regs <= compiled.MAX_REGS and r.regs * r.threads <= 65536


@pytest.mark.parametrize("item", ITEMS, ids=_id)
def test_tensor_core_instructions(reports, item):
    case, kernel, target = item
    r = _report(reports, item)
    sass, ptx = " ".join(r.sass_mma), " ".join(r.ptx_mma)
    half = "BF16" if case.dtype == "bfloat16" else "F16"
    # sm_80/sm_89: mma.sync (IMMA/HMMA); sm_90: warpgroup MMA (IGMMA/HGMMA) for the 128-row GEMM tiles.
    wide = target == 90 and r.constexprs.get("BLOCK_M", 0) >= 64  # wgmma is Hopper-only (sm_120 has mma.sync)
    if kernel == INT_GEMM or (kernel == CONV and _int_path(case)):
        assert ("IGMMA" if wide else "IMMA") in sass and ".S8.S8" in sass, f"no int8 tensor-core MMA: {sass}"
        assert ".s32.s8.s8" in ptx, ptx
    if kernel in (WEIGHT_ONLY, CONV_LOWRANK) or (kernel == CONV and not _int_path(case)) or r.constexprs.get("HAS_LORA"):
        hmma = [op for op in r.sass_mma if op.startswith("HGMMA" if wide else "HMMA")]
        assert hmma, f"no 16-bit tensor-core MMA: {sass}"
        assert all(op.endswith(".BF16") == (half == "BF16") for op in hmma), hmma
    if kernel == ACT and not r.constexprs.get("HAS_LORA"):
        assert not r.sass_mma


@pytest.mark.parametrize("item", ITEMS, ids=_id)
def test_shared_memory_fits(reports, item):
    r = _report(reports, item)
    assert r.shared + r.static_shared <= r.shared_limit, (
        f"{r.shared + r.static_shared} B of shared memory, sm_{r.target} allows {r.shared_limit}"
    )


def test_autotuning_candidates_compile_without_spills(reports):
    """Each GEMM tile the autotuner may pick at these shapes compiles for its targets without spills, uses
    int8 / 16-bit tensor cores, fits shared memory and loads the weight codes >= 32 bits wide."""
    tuned = {k: r for k, r in reports.items() if "@" in k[0]}
    for case in TUNED:
        tiles = {k[0].split("@")[1] for k in tuned if k[0].startswith(case.name + "@")}
        assert tiles, f"{case.name}: the pruner kept no candidate"
    bad = []
    for (layer, kernel, target), r in sorted(tuned.items()):
        mma = " ".join(r.sass_mma)
        wide = target == 90 and r.constexprs["BLOCK_M"] >= 64  # wgmma is Hopper-only
        problems = [
            r.error and f"error {r.error[:200]}",
            (r.stack or r.spill_stores or r.spill_loads) and f"{r.regs} regs, {r.stack} B stack, "
                                                             f"{r.spill_stores} STL / {r.spill_loads} LDL",
            r.shared + r.static_shared > r.shared_limit and f"{r.shared + r.static_shared} B shared memory",
            (not r.code_loads or min(r.code_load_bits) < 32) and f"code loads {r.code_loads}",
            kernel in (INT_GEMM, CONV) and r.constexprs.get("MODE", 0) == 0 and ("IGMMA" if wide else "IMMA")
            not in mma and f"MMA {mma}",
            (kernel == WEIGHT_ONLY or r.constexprs.get("MODE") == 1) and ("HGMMA" if wide else "HMMA") not in mma
            and f"MMA {mma}",
        ]
        problems = [p for p in problems if p]
        if problems:
            bad.append(f"{layer} {kernel} sm_{target}: " + "; ".join(problems))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("item", [i for i in ITEMS if i[1] not in (ACT, CONV_LOWRANK)], ids=_id)
def test_weight_codes_load_at_least_32_bits(reports, item):
    """Packed weight codes are read 32..128 bits per thread (PTX ``ld.global.v*`` / ``cp.async``
    from ``qw_ptr``), and the SASS has no byte-wise global load but those of the zero points
    (one ``uint8`` per output channel and group, gathered with the row stride)."""
    r = _report(reports, item)
    assert r.code_loads, f"no load of qweight found in the {r.kernel} PTX"
    assert min(r.code_load_bits) >= 32, f"W{r.constexprs['W_BITS']} codes: {r.code_loads}"
    byte_loads = sum(n for op, n in r.sass_global_loads.items() if op.endswith((".U8", ".S8")))
    zero_byte_loads = sum(n for op, n in r.zero_loads.items() if op.startswith("8-bit"))
    assert byte_loads <= zero_byte_loads, (
        f"{byte_loads} byte-wise global loads in the SASS, {zero_byte_loads} of them zero points "
        f"({r.sass_global_loads}; zero points in the PTX: {r.zero_loads})"
    )


if __name__ == "__main__":  # the table behind these tests
    print(compiled.format_table(compiled.run_in_subprocess(CASES)))
