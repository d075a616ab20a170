"""Low-memory quantization: the float denoiser's weights stay on disk and each layer's are read just
before it runs or is quantized (diffq.offload); the quantized model is the in-memory path's, bit for bit."""

import pytest
import torch
from torch import nn

import diffq
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
