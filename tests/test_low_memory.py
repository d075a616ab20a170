"""Low-memory quantization: the float denoiser's weights stay on disk and each layer's are read just
before it runs or is quantized (diffq.offload); the quantized model is the in-memory path's, bit for bit."""

from itertools import chain

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from torch import nn

import diffq
import diffq.api
from diffq.errors import QuantizationInputError
from diffq.offload import Offloaded, denoiser_files, safetensors_index
from diffq.pipelines.adapters import denoiser_of
from diffq.pipelines.testing import tiny_call_kwargs, tiny_flux_pipeline, tiny_sd_pipeline

PROMPTS = ["a handwritten digit 3", "a handwritten digit 8"]


@pytest.fixture(scope="module", params=["sd", "flux"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    (tiny_sd_pipeline if request.param == "sd" else tiny_flux_pipeline)().save_pretrained(path)
    return path


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _quantized(folder, preset, low_memory, **options):
    pipe = diffq.load(folder)
    diffq.quantize(pipe, preset, calibration=PROMPTS, num_calibration_steps=2, low_memory=low_memory, progress=False,
                   **tiny_call_kwargs(pipe), **options)
    return pipe


@pytest.mark.parametrize("preset, options", [("w4a8", {}), ("w8a8", {}), ("w4a4", {}), ("w4a16-rtn", {})])
def test_low_memory_gives_the_in_memory_model_bit_for_bit(folder, preset, options):
    reference = _state(denoiser_of(_quantized(folder, preset, False, **options)))
    pipe = _quantized(folder, preset, True, **options)
    state = denoiser_of(pipe).state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state), [k for k in state if not torch.equal(state[k], reference[k])][:5]
    assert not any(t.is_meta for t in state.values())
    pipe(PROMPTS[0], num_inference_steps=1, **tiny_call_kwargs(pipe), output_type="latent")  # and it runs


def test_offloaded_model_reads_weights_from_its_files_and_holds_none(folder):
    pipe = diffq.load(folder)
    denoiser = denoiser_of(pipe)
    kwargs = tiny_call_kwargs(pipe)
    expected = pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
                    **kwargs)[0]
    files = denoiser_files(folder / ("unet" if (folder / "unet").exists() else "transformer"))
    offloaded = Offloaded(denoiser, safetensors_index(files))
    assert all(t.is_meta for t in denoiser.state_dict().values())
    got = pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
               **kwargs)[0]
    assert all(t.is_meta for t in denoiser.state_dict().values())  # dropped again after each layer ran
    assert torch.equal(got, expected)
    # Only tensors the files lack (buffers made at construction) go to the spill file.
    assert offloaded.spilled_bytes < 0.01 * sum(f.stat().st_size for f in files)
    offloaded.restore()
    assert not any(t.is_meta for t in denoiser.state_dict().values())


def test_a_changed_weight_is_taken_from_memory_not_from_the_file(folder):
    pipe = diffq.load(folder)
    denoiser = denoiser_of(pipe)
    layer = next(m for m in denoiser.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        layer.weight.add_(1.0)  # e.g. a fused LoRA: the file no longer holds the model
    changed = layer.weight.detach().clone()
    files = denoiser_files(folder / ("unet" if (folder / "unet").exists() else "transformer"))
    offloaded = Offloaded(denoiser, safetensors_index(files))
    assert offloaded.spilled_bytes >= changed.numel() * changed.element_size()
    offloaded.restore()
    assert torch.equal(layer.weight, changed)


def test_in_memory_pipeline_without_files_is_spilled_and_gives_the_same_model():
    def run(low_memory):
        pipe = tiny_sd_pipeline()
        diffq.quantize(pipe, "w8a8", calibration=PROMPTS[:1], num_calibration_steps=1, low_memory=low_memory,
                       progress=False, **tiny_call_kwargs(pipe))
        return denoiser_of(pipe).state_dict()

    reference, state = run(False), run(True)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_low_memory_refuses_mixed_precision_and_bad_values():
    pipe = tiny_sd_pipeline()
    with pytest.raises(QuantizationInputError, match="uniform presets"):
        diffq.quantize(pipe, "w3.5a8", low_memory=True, progress=False)
    with pytest.raises(QuantizationInputError, match="low_memory="):
        diffq.quantize(pipe, "w8a8-rtn", low_memory="yes", progress=False)


def test_weight_clip_search_in_row_chunks_gives_the_same_ratios(monkeypatch):
    from diffq import ranges
    from diffq.formats import IntFormat

    torch.manual_seed(0)
    weight, importance = torch.randn(300, 256), torch.rand(256)
    for fmt in (IntFormat(8), IntFormat(4, False, "group", 64), IntFormat(8, True, "tensor")):
        whole = ranges.search_weight_clip(weight, fmt, importance)
        monkeypatch.setattr(ranges, "SEARCH_CHUNK_ELEMENTS", 256 * 7)  # 7 rows at a time, a ragged last chunk
        chunked = ranges.search_weight_clip(weight, fmt, importance)
        monkeypatch.undo()
        assert torch.equal(whole, chunked)


# --- peak memory: one block of float weights at a time (issue #20 item 1), on the CPU and on CUDA ----------------


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in chain(module.parameters(), module.buffers()))


def _largest_block(denoiser: nn.Module) -> int:
    """Float bytes of the largest unit the denoiser runs in turn: a block of one of its block lists, or another child."""
    units = [u for child in denoiser.children() for u in (child if isinstance(child, nn.ModuleList) else [child])]
    return max(_bytes(u) for u in units)


def _flux_with_blocks(folder):
    """The tiny Flux pipeline with a 256-wide transformer of 1 + 10 blocks (48 MiB in float32, its largest block
    9 MiB), saved to ``folder``."""
    pipe = tiny_flux_pipeline()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=10, attention_head_dim=64, num_attention_heads=4,
        joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(16, 24, 24),
    ).eval()
    FluxPipeline(**{**pipe.components, "transformer": transformer}).save_pretrained(folder)


class _PeakMemory:
    """The most bytes allocated on ``device`` between :meth:`start` and :meth:`stop`, above the level at start.

    On CUDA, the caching allocator's statistics (``max_memory_allocated``). On the CPU, the profiler's record of
    every allocation and free, summed in order; a block allocated before ``start`` and freed after it is not
    recorded, so the CPU figure can only be overstated. (The profiler is driven by its own enable/disable calls:
    ``torch.profiler.profile`` parses every operator event on exit, which takes ten times the run.)"""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        from torch.autograd import profiler

        settings = profiler.profile(use_kineto=True, profile_memory=True)  # for this torch's config only
        config, activities = settings.config(), settings.kineto_activities
        profiler._prepare_profiler(config, activities)
        profiler._enable_profiler(config, activities)

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        from torch.autograd import profiler

        events = [e for e in profiler._disable_profiler().events() if e.name() == "[memory]"]
        level = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            level += event.nbytes()
            peak = max(peak, level)
        return peak


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU memory needs CUDA "
                                                  "(benchmarks/gpu_check.sh runs it on the GPU)")),
])
def test_peak_memory_is_one_block_of_float_weights_plus_the_quantized_model(device, tmp_path, monkeypatch):
    """From the moment the float weights are on disk, quantizing holds at most the largest block's float weights,
    the quantized model and what calibrating the float model in memory holds (activations; on the CPU also the
    statistics): measured, on the device the pipeline is on. A model whose float weights stayed would exceed it."""
    _flux_with_blocks(tmp_path)
    pipe = diffq.load(tmp_path).to(device)
    denoiser = denoiser_of(pipe)
    kwargs = tiny_call_kwargs(pipe)
    float_bytes, block = _bytes(denoiser), _largest_block(denoiser)
    meter = _PeakMemory(device)

    # The allowance for activations: the float model calibrated in memory, after one call (cuBLAS allocates its
    # workspace at the first matrix product and keeps it).
    pipe(PROMPTS[0], num_inference_steps=1, output_type="latent", **kwargs)
    meter.start()
    diffq.calibrate(pipe, PROMPTS, num_inference_steps=2, progress=False, **kwargs)
    activations = meter.stop()
    assert block + activations < float_bytes, "the model is too small for the bound to tell offloading apart"

    offload_denoiser, seen = diffq.api._offload_denoiser, {}
    before = torch.cuda.memory_allocated() if device == "cuda" else 0

    def offload_then_measure(*args, **options):
        offloaded = offload_denoiser(*args, **options)
        seen["on disk"] = offloaded is not None and all(t.is_meta for t in chain(denoiser.parameters(),
                                                                                  denoiser.buffers()))
        if device == "cuda":
            seen["freed"] = before - torch.cuda.memory_allocated()
        meter.start()
        return offloaded

    monkeypatch.setattr(diffq.api, "_offload_denoiser", offload_then_measure)
    diffq.quantize(pipe, "w8a8", calibration=PROMPTS, num_calibration_steps=2, low_memory=True, progress=False,
                   **kwargs)
    peak = meter.stop()
    quantized = _bytes(denoiser_of(pipe))
    assert seen["on disk"]
    if device == "cuda":  # the float weights left the GPU (they were all there: pipe.to("cuda"))
        assert seen["freed"] >= 0.99 * float_bytes, (seen["freed"], float_bytes)
    mib = {k: f"{v / 2**20:.1f} MiB" for k, v in dict(peak=peak, block=block, quantized=quantized,
                                                        activations=activations, float=float_bytes).items()}
    assert peak <= block + quantized + activations, mib
    assert peak < float_bytes + quantized, mib
