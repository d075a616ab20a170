"""``torch.compile(fullgraph=True)`` traces quantized denoisers on the CPU (Inductor): the
``diffq::`` ops are single graph nodes and the timestep lookup of static scales is traced too."""

import pytest
import torch

import diffq
from diffq.context import current_timestep
from diffq.modules import QUANTIZED_MODULES
from diffq.pipelines import reference
from diffq.pipelines.adapters import denoiser_of


def _denoiser_calls(pipe, model: str, steps: int) -> list[tuple[tuple, dict]]:
    """The arguments of each denoiser call of one short generation."""
    calls = []
    denoiser = denoiser_of(pipe)
    hook = denoiser.register_forward_pre_hook(lambda _m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    kwargs = {**reference.DEFAULT_CALL_KWARGS[model], "num_inference_steps": steps}
    try:
        pipe.set_progress_bar_config(disable=True)
        pipe(["a handwritten digit 3"], generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)
    finally:
        hook.remove()
    return calls


@pytest.mark.parametrize("model, preset", [("digits-sd", "w8a8"), ("digits-dit", "w4a8")])
def test_compiled_quantized_denoiser_matches_eager(model, preset):
    pipe = diffq.load(model)
    pipe = diffq.quantize(pipe, preset, calibration=["a handwritten digit 1", "a handwritten digit 7"],
                          num_calibration_steps=4, progress=False)
    denoiser = denoiser_of(pipe)
    layers = [m for m in denoiser.modules() if isinstance(m, QUANTIZED_MODULES)]
    assert any(m.act_bounds is not None for m in layers), "the test needs timestep-grouped static scales"
    calls = _denoiser_calls(pipe, model, steps=3)
    torch._dynamo.reset()
    compiled = torch.compile(denoiser, fullgraph=True)
    with torch.no_grad():
        for args, kwargs in (calls[0], calls[-1]):  # first and last step: different scale groups
            eager = denoiser(*args, **kwargs)[0]
            traced = compiled(*args, **kwargs)[0]
            # Inductor fuses the float ops around the quantized layers and rounds them differently in
            # the last bit; an activation that lands on a rounding boundary then takes the next code,
            # so the outputs agree to a small relative error rather than bit for bit.
            relative = float((traced - eager).norm() / eager.norm())
            print(f"{model} {preset}: relative L2 difference {relative:.2e}")
            assert relative < 5e-3
    assert current_timestep() is None  # the hooks ran inside the graph and cleared it


def test_compiled_graph_looks_the_scale_group_up_per_call():
    """One compiled graph serves every timestep: the group is found from the traced timestep tensor."""
    from torch import nn

    from diffq.modules import QuantizedLinear
    from diffq.pipelines.patching import install_timestep_hook
    from diffq.plan import LayerConfig

    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            config = LayerConfig(w_bits=8, a_bits=8, a_mode="static", a_groups=2)
            self.proj = QuantizedLinear.from_float(nn.Linear(16, 8), config)
            self.proj.set_activation_scale(torch.tensor([[0.5], [4.0]]), bounds=[500.0])

        def forward(self, sample, timestep):
            return self.proj(sample)

    denoiser = Denoiser()
    install_timestep_hook(denoiser)
    x = torch.linspace(-3, 3, 32).reshape(2, 16)
    torch._dynamo.reset()
    compiled = torch.compile(denoiser, fullgraph=True)
    with torch.no_grad():
        outputs = {}
        for t in (999.0, 10.0, 500.0, 499.0):
            eager = denoiser(x, torch.tensor([t]))
            outputs[t] = compiled(x, torch.tensor([t]))
            assert torch.allclose(outputs[t], eager, atol=1e-6), t
    assert torch.equal(outputs[999.0], outputs[500.0]) and torch.equal(outputs[10.0], outputs[499.0])
    assert not torch.allclose(outputs[999.0], outputs[10.0])  # the two groups clip differently
