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
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin, QuantizationMethod

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


def _finish_loading(model: Any, quantized_while_loading: frozenset[str] = frozenset()) -> None:
    """Check every tensor was loaded, and give each its own memory.

    Tensors assigned straight from a memory-mapped safetensors file can sit at addresses that are
    not 64-byte aligned; CPU GEMM kernels then take a different vectorized path and round
    differently, so outputs would not be bit-identical to the model that was saved. Owned copies
    also release the file, so the same folder can be saved over. Quantized layers then make the
    weight layout their device's kernel reads. Layers quantized while loading (their names in
    ``quantized_while_loading``) already own their memory and layout, and are left as they are.
    """
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    on_meta = [n for n, t in tensors if t.is_meta]
    if on_meta:
        raise CheckpointError(
            f"the checkpoint left {len(on_meta)} tensors unloaded (e.g. {on_meta[0]!r}); it does not "
            "match its diffq plan. Re-save it with diffq."
        )
    with torch.no_grad():
        for name, tensor in tensors:
            if name.rpartition(".")[0] not in quantized_while_loading:
                tensor.data = tensor.data.clone()
    for name, module in model.named_modules():
        if hasattr(module, "refresh_kernel_layout") and name not in quantized_while_loading:
            module.refresh_kernel_layout()  # the CPU kernel's int8 layout, made once at load


def _missing_plan() -> CheckpointError:
    return CheckpointError(
        "a diffq quantization_config needs its 'plan' (a diffq checkpoint) or a 'preset' to quantize with while "
        "loading, e.g. DiffQConfig('w4a16-rtn'); the checkpoint's config.json may be corrupt."
    )


def load_time_presets() -> list[str]:
    """The presets that need no calibration, so they can be applied while a model loads."""
    from diffq.presets import available_presets, get_preset

    return [name for name in available_presets() if not get_preset(name).needs_calibration()]


class _PlanConfig:
    """What both libraries' ``quantization_config`` classes for diffq share: the stored plan, or the
    preset (and its options) to quantize with while loading."""

    def _configure(self, quant_method: Any, preset: str | None, plan: dict | None, activations: str | None,
                   include: Any, exclude: Any) -> None:
        self.quant_method = quant_method
        self.plan = plan
        self.preset = preset
        self.activations = activations
        self.include = include
        self.exclude = exclude
        if plan is None and preset is None:
            raise _missing_plan()
        if plan is None:
            self._check_loadable()

    def _check_loadable(self) -> None:
        from diffq.errors import QuantizationInputError
        from diffq.presets import get_preset
        from diffq.selection import LayerSelection

        if self.activations not in (None, "dynamic", "static"):
            raise QuantizationInputError(f"activations={self.activations!r}; use 'dynamic' or 'static'.")
        recipe = get_preset(self.preset)
        if recipe.is_mixed or recipe.needs_calibration(**self._overrides()):
            raise QuantizationInputError(
                f"preset {self.preset!r} calibrates on the pipeline's own outputs, which do not exist while a model "
                f"loads. Load the float pipeline and call diffq.quantize(pipe, {self.preset!r}), or quantize while "
                f"loading with a preset that needs no calibration: {', '.join(load_time_presets())} (or "
                "w8a8-rtn / w4a8-rtn with activations='dynamic')."
            )
        LayerSelection.of(self.include, self.exclude)

    def _overrides(self) -> dict[str, Any]:
        return {"a_mode": self.activations} if self.activations else {}

    def quant_plan(self) -> QuantPlan:
        if self.plan is None:
            raise _missing_plan()
        return QuantPlan.from_dict(self.plan)

    def plan_for(self, model: Any) -> QuantPlan:
        """The plan of :attr:`preset` for ``model`` (its structure only: it may sit on the meta device)."""
        from diffq.api import allocate

        return allocate(model, preset=self.preset, include=self.include, exclude=self.exclude, progress=False,
                        **self._overrides())

    def to_dict(self) -> dict[str, Any]:
        if self.plan is not None:
            return {"quant_method": QUANT_METHOD, "plan": self.plan}
        options = {"activations": self.activations, "include": self.include, "exclude": self.exclude}
        return {"quant_method": QUANT_METHOD, "preset": self.preset} | {k: v for k, v in options.items() if v}

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

        def __init__(self, preset: str | None = None, plan: dict | None = None, activations: str | None = None,
                     include: Any = None, exclude: Any = None, **kwargs: Any) -> None:
            self._configure(QUANT_METHOD, preset, plan, activations, include, exclude)

    class DiffQTextQuantizer(HfQuantizer):
        """Loads diffq-quantized transformers models inside their ``from_pretrained``."""

        requires_calibration = False  # a float checkpoint is refused in validate_environment, with a DiffQError

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            if self.quantization_config.plan is None:
                from diffq.errors import QuantizationInputError

                raise QuantizationInputError(
                    "diffq quantizes transformers models (text encoders) after loading, not while: load the "
                    "pipeline, then diffq.quantize(pipe, preset, components=[denoiser, 'text_encoder', ...]); "
                    "pass DiffQConfig only for the denoiser (PipelineQuantizationConfig(quant_mapping=...))."
                )
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

    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = DiffQQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = DiffQConfig


class DiffQConfig(_PlanConfig, QuantizationConfigMixin):
    """diffq's ``quantization_config`` for diffusers models.

    ``DiffQConfig("w4a16-rtn")`` as ``quantization_config=`` on a float checkpoint's
    ``from_pretrained`` (or in ``PipelineQuantizationConfig(quant_mapping={"transformer": ...})``)
    quantizes each layer as its weights are read, so the float model is never whole in memory; the
    model is the one ``diffq.quantize(model, "w4a16-rtn")`` gives. Only presets that need no
    calibration can: ``w4a16-rtn``, ``w8a16-rtn``, ``w4a4-rtn``, and ``w8a8-rtn`` / ``w4a8-rtn`` with
    ``activations="dynamic"``; ``include`` / ``exclude`` choose layers as in :func:`diffq.quantize`.
    A diffq checkpoint's ``config.json`` holds the other form, the stored ``plan``.
    """

    def __init__(self, preset: str | None = None, plan: dict | None = None, activations: str | None = None,
                 include: Any = None, exclude: Any = None, **kwargs: Any) -> None:
        self._configure(_DIFFQ_METHOD, preset, plan, activations, include, exclude)


class DiffQQuantizer(DiffusersQuantizer):
    """diffq inside diffusers' ``from_pretrained``: loads diffq checkpoints, or quantizes a float one
    layer by layer as it loads (:mod:`diffq.pipelines.load_time`)."""

    requires_calibration = False

    def __init__(self, quantization_config: DiffQConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)  # pre_quantized: the checkpoint's config has a plan
        self._loader: Any = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.pre_quantized:
            self.quantization_config.quant_plan()  # a corrupt plan fails here, with a CheckpointError

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        if self.pre_quantized:
            convert_structure(model, self.quantization_config.quant_plan())
            return
        from diffq.pipelines.load_time import LayerLoader

        plan = self.quantization_config.plan_for(model)
        self._loader = LayerLoader(model, plan)
        self.quantization_config.plan = plan.to_dict()

    def check_if_quantized_param(self, model: Any, param_value: Any, param_name: str, state_dict: Any,
                                 **kwargs: Any) -> bool:
        return self._loader is not None and self._loader.wants(param_name)

    def create_quantized_param(self, model: Any, param_value: torch.Tensor, param_name: str, target_device: Any,
                               *args: Any, **kwargs: Any) -> None:
        self._loader.take(model, param_name, param_value, target_device)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if self._loader is not None:
            self._loader.finish()
        _finish_loading(model, frozenset(self._loader.plan.layers) if self._loader is not None else frozenset())
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


_DIFFQ_METHOD = _enum_member(QuantizationMethod, "DIFFQ", QUANT_METHOD)
