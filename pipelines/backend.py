"""diffq as a diffusers (and transformers) quantization backend: plain ``from_pretrained`` loads diffq checkpoints.

diffusers has no public registry: its quantizers are looked up by ``quant_method`` in
``diffusers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` / ``AUTO_QUANTIZATION_CONFIG_MAPPING``, and
``quant_method`` must be a member of the ``QuantizationMethod`` enum. :func:`register` adds a
``DIFFQ = "diffq"`` member and the two mapping entries; ``import diffq`` calls it.

Loading then goes: diffusers builds the model from its config (weights on the meta device), our
quantizer swaps the planned layers for empty quantized modules (from the ``QuantPlan`` stored in
``config.json`` under ``quantization_config``), diffusers loads the packed state into them, and
the quantizer attaches the plan and the timestep hook. Quantized text encoders (transformers
models) load the same way through transformers' public ``register_quantizer`` hooks.
"""

from __future__ import annotations

from typing import Any

import torch

from diffq.convert import convert_structure
from diffq.errors import CheckpointError
from diffq.pipelines.patching import install_timestep_hook
from diffq.pipelines.serialization import QUANT_METHOD, attach_plan
from diffq.plan import QuantPlan

_REGISTERED = False


def _enum_member(enum_cls: type, name: str, value: str) -> Any:
    """Add a member to a ``str`` Enum after its creation (idempotent)."""
    if value in enum_cls._value2member_map_:
        return enum_cls(value)
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def _finish_loading(model: Any) -> None:
    """Check every tensor was loaded, and give each its own memory.

    Tensors assigned straight from a memory-mapped safetensors file can sit at addresses that are
    not 64-byte aligned; CPU GEMM kernels then take a different vectorized path and round
    differently, so outputs would not be bit-identical to the model that was saved. Owned copies
    also release the file, so the same folder can be saved over. Quantized layers then make the
    weight layout their device's kernel reads.
    """
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    on_meta = [n for n, t in tensors if t.is_meta]
    if on_meta:
        raise CheckpointError(
            f"the checkpoint left {len(on_meta)} tensors unloaded (e.g. {on_meta[0]!r}); it does not "
            "match its diffq plan. Re-save it with diffq."
        )
    with torch.no_grad():
        for _name, tensor in tensors:
            tensor.data = tensor.data.clone()
    for module in model.modules():
        if hasattr(module, "refresh_kernel_layout"):
            module.refresh_kernel_layout()  # the CPU kernel's int8 layout, made once at load


def _missing_plan() -> CheckpointError:
    return CheckpointError(
        "a diffq quantization_config needs its 'plan'; quantize with diffq.quantize and save the "
        "pipeline, then load it (diffq does not quantize while a library loads float weights)."
    )


class _PlanConfig:
    """What both libraries' ``quantization_config`` classes for diffq share: the stored plan."""

    def _set_plan(self, plan: dict | None, quant_method: Any) -> None:
        if plan is None:
            raise _missing_plan()
        self.quant_method = quant_method
        self.plan = plan

    def quant_plan(self) -> QuantPlan:
        return QuantPlan.from_dict(self.plan)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "plan": self.plan}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def register() -> None:
    """Teach diffusers and transformers the ``"diffq"`` quantization method (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _register_diffusers()
    _register_transformers()
    _REGISTERED = True


def let_flux_lora_loader_skip_expansion() -> None:
    """Flux's LoRA loader reads each target's float ``weight`` from ``state_dict()`` to see whether a
    Flux-Control LoRA needs wider inputs; diffq layers store no float weight. On a diffq-quantized
    transformer, check the shapes against the modules instead (expanding packed weights is not
    possible, so such a LoRA is a clear error) and pass the LoRA through unchanged.

    Installed (once) when a Flux transformer is quantized or loaded quantized, not on ``import diffq``."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    from diffq.errors import QuantizationInputError
    from diffq.pipelines.serialization import plan_of

    original = FluxLoraLoaderMixin.__dict__["_maybe_expand_lora_state_dict"].__func__
    if getattr(original, "_diffq_shim", False):
        return

    def expand(cls: type, transformer: Any, lora_state_dict: dict) -> dict:
        if plan_of(transformer) is None:
            return original(cls, transformer, lora_state_dict)
        prefix = f"{cls.transformer_name}."
        modules = dict(transformer.named_modules())
        for key, tensor in lora_state_dict.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[: -len(".lora_A.weight")].removeprefix(prefix)
            module = modules.get(name)
            module = getattr(module, "base_layer", module)
            if module is not None and getattr(module, "in_features", tensor.shape[1]) != tensor.shape[1]:
                raise QuantizationInputError(
                    f"this LoRA changes the input width of {name!r} (a Flux-Control LoRA); diffq cannot widen "
                    "quantized layers. Load it into the float pipeline before quantizing instead."
                )
        return lora_state_dict

    expand._diffq_shim = True
    FluxLoraLoaderMixin._maybe_expand_lora_state_dict = classmethod(expand)


def _register_transformers() -> None:
    from transformers.quantizers import auto
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return

    class DiffQTextConfig(_PlanConfig, QuantizationConfigMixin):
        """``quantization_config`` of a diffq-quantized transformers model (a text encoder)."""

        def __init__(self, plan: dict | None = None, **kwargs: Any) -> None:
            self._set_plan(plan, QUANT_METHOD)

    class DiffQTextQuantizer(HfQuantizer):
        """Loads diffq-quantized transformers models inside their ``from_pretrained``."""

        requires_calibration = True  # checkpoints are quantized by diffq.quantize, then loaded

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            self.quantization_config.quant_plan()

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
            convert_structure(model, self.quantization_config.quant_plan())

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            _finish_loading(model)
            attach_plan(model, self.quantization_config.quant_plan())
            return model

        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    auto.register_quantization_config(QUANT_METHOD)(DiffQTextConfig)
    auto.register_quantizer(QUANT_METHOD)(DiffQTextQuantizer)


def _register_diffusers() -> None:
    from diffusers.quantizers import auto
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin, QuantizationMethod

    method = _enum_member(QuantizationMethod, "DIFFQ", QUANT_METHOD)

    class DiffQConfig(_PlanConfig, QuantizationConfigMixin):
        """``quantization_config`` of a diffq checkpoint: the method and the :class:`QuantPlan`."""

        def __init__(self, plan: dict | None = None, **kwargs: Any) -> None:
            self._set_plan(plan, method)
            self.pre_quantized = True

    class DiffQQuantizer(DiffusersQuantizer):
        """Loads diffq-quantized models inside diffusers' ``from_pretrained``."""

        requires_calibration = False

        def __init__(self, quantization_config: DiffQConfig, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self.pre_quantized = True

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            self.quantization_config.quant_plan()  # a corrupt plan fails here, with a CheckpointError

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
            convert_structure(model, self.quantization_config.quant_plan())

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            _finish_loading(model)
            attach_plan(model, self.quantization_config.quant_plan())
            install_timestep_hook(model)
            return model

        @property
        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = DiffQQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = DiffQConfig
