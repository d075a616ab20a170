"""Quantized drop-in replacements for ``nn.Linear`` and ``nn.Conv2d``.

They hold what a deployment holds: packed integer weights, their scales (and zero points when
asymmetric), the bias, and the activation quantization settings (dynamic per token, or a static
scale from calibration). ``forward`` calls one ``diffq::`` op of :mod:`diffq.kernels`, whose
implementation PyTorch picks for the device. On the CPU the layer also keeps its weight as signed
int8 values in the layout the CPU kernel reads (``kernel_codes``, a buffer that is not saved): it
is made once when the weights are stored or loaded, or when the layer moves to the CPU, and
dropped when the layer moves to another device.
"""

from __future__ import annotations

import torch
from torch import nn

from diffq import kernels
from diffq.context import timestep_tensor
from diffq.errors import QuantizationInputError
from diffq.formats import IntFormat, compute_scales, pack, packed_cols, quantize
from diffq.gptq import SampledHessian, gptq_round
from diffq.lowrank import split_low_rank
from diffq.plan import LayerConfig

QMODULES: dict[type[nn.Module], type[nn.Module]] = {}
"""Float module class -> its quantized twin (see :func:`register_qmodule`)."""


def register_qmodule(float_class: type[nn.Module]):
    """Class decorator: the decorated quantized module replaces ``float_class`` (and its subclasses).

    A quantized module provides ``from_float(module, config, *, smooth, clip_ratio, bos_input,
    lowrank, hessian)``, ``empty_like(module, config)`` (the right shapes, for loading a checkpoint) and
    ``input_channels``.
    """

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        QMODULES[float_class] = cls
        return cls

    return register


def quantized_class(module: nn.Module) -> type[nn.Module] | None:
    """The quantized twin registered for ``module``'s class (or the nearest base class), if any."""
    for base in type(module).__mro__:
        if base in QMODULES:
            return QMODULES[base]
    return None


def weight_format(config: LayerConfig) -> IntFormat:
    """The integer format of a layer's weights."""
    if config.w_group_size is None:
        return IntFormat(config.w_bits, config.w_symmetric, "channel")
    return IntFormat(config.w_bits, config.w_symmetric, "group", config.w_group_size)


class _QuantizedWeightMixin(nn.Module):
    """Buffers and helpers shared by the quantized Linear and Conv2d."""

    config: LayerConfig
    rows: int
    cols: int

    def _init_buffers(self, rows: int, cols: int, config: LayerConfig, dtype: torch.dtype, device) -> None:
        self.config = config
        self.rows, self.cols = rows, cols
        blocks = 1 if config.w_group_size is None else cols // config.w_group_size
        self.register_buffer(
            "qweight", torch.zeros(rows, packed_cols(cols, config.w_bits), dtype=torch.uint8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(rows, blocks, dtype=dtype, device=device))
        zero = None if config.w_symmetric else torch.zeros(rows, blocks, dtype=torch.uint8, device=device)
        self.register_buffer("weight_zero", zero)
        segments = 2 if config.a_split else 1
        static = config.static_activations
        act_scale = torch.ones(config.a_groups, segments, dtype=torch.float32, device=device) if static else None
        self.register_buffer("act_scale", act_scale)
        bounds = torch.zeros(config.a_groups - 1, dtype=torch.float32, device=device) if static else None
        self.register_buffer("act_bounds", bounds if config.a_groups > 1 else None)
        self.register_buffer("kernel_codes", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_kernel_layout())

    def refresh_kernel_layout(self) -> None:
        """(Re)make the weight layout the kernel of the layer's device reads (the CPU's int8 codes)."""
        qweight = self.qweight
        if qweight.device.type != "cpu" or qweight.is_meta:
            self.kernel_codes = None
            return
        self.kernel_codes = kernels.kernel_codes(
            qweight, self.weight_scale, self.weight_zero, w_bits=self.config.w_bits,
            w_code_offset=weight_format(self.config).code_offset, cols=self.cols, **self._kernel_geometry(),
        )

    def _kernel_geometry(self) -> dict:
        return {}

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        on_cpu = self.qweight.device.type == "cpu" and not self.qweight.is_meta
        if on_cpu != (self.kernel_codes is not None):  # moved: the layout follows the device, never travels
            self.refresh_kernel_layout()
        return self

    def _init_branch_buffers(self, in_channels: int, config: LayerConfig, dtype: torch.dtype, device) -> None:
        """The smoothing vector (per input channel) and the low-rank factors, where the config has them."""
        smooth = torch.ones(in_channels, dtype=dtype, device=device) if config.smooth_alpha is not None else None
        self.register_buffer("smooth", smooth)
        rank = config.rank
        self.register_buffer("lowrank_down", torch.zeros(self.cols, rank, dtype=dtype, device=device) if rank else None)
        self.register_buffer("lowrank_up", torch.zeros(rank, self.rows, dtype=dtype, device=device) if rank else None)

    def _store_smoothed_weight(
        self,
        weight2d: torch.Tensor,
        smooth: torch.Tensor | None,
        lowrank: tuple[torch.Tensor, torch.Tensor] | None,
        clip_ratio: torch.Tensor | float,
        hessian: torch.Tensor | SampledHessian | None = None,
    ) -> None:
        """Store a float ``[rows, cols]`` weight: smoothed, its low-rank branch kept (``lowrank``, or
        from an SVD), and only the residual quantized (by GPTQ against ``hessian`` when given)."""
        if (smooth is None) != (self.config.smooth_alpha is None):
            raise QuantizationInputError("pass a smoothing vector exactly when config.smooth_alpha is set.")
        weight2d = weight2d.float()
        if smooth is not None:
            self.smooth.copy_(smooth)  # per input channel: repeated over a convolution's kernel taps
            weight2d = weight2d * self.smooth.float().repeat_interleave(self.cols // smooth.numel())
        if self.config.rank:
            down, up = lowrank if lowrank is not None else split_low_rank(weight2d, self.config.rank)[:2]
            self.lowrank_down.copy_(down)
            self.lowrank_up.copy_(up)
            # Quantize what the stored (rounded) branch leaves, so the two parts add up.
            weight2d = weight2d - (self.lowrank_down.float() @ self.lowrank_up.float()).t()
        self._store_weight(weight2d, clip_ratio, hessian)

    def _store_weight(self, weight2d: torch.Tensor, clip_ratio: torch.Tensor | float = 1.0,
                      hessian: torch.Tensor | SampledHessian | None = None) -> None:
        fmt = weight_format(self.config)
        weight2d = weight2d.detach()
        scale, zero = compute_scales(weight2d, fmt, clip_ratio)
        if hessian is not None:  # other codes on the same grid (diffq.gptq)
            weight2d = gptq_round(weight2d, hessian, fmt, scale, zero, taps=self.cols // hessian.shape[0],
                                  overwrite_hessian=True)  # a [cols, cols] matrix: factored in place
        q = quantize(weight2d, fmt, scale, zero)
        self.qweight.copy_(pack(q.codes, self.config.w_bits))
        self.weight_scale.copy_(scale.to(self.weight_scale.dtype))
        if self.weight_zero is not None:
            assert zero is not None
            self.weight_zero.copy_(zero.to(torch.uint8))
        self.refresh_kernel_layout()

    def set_activation_scale(self, absmax: float | torch.Tensor, bounds: list[float] | None = None) -> None:
        """Set static activation scales from calibrated absolute maxima.

        ``absmax`` is a scalar, or ``[groups, segments]`` for timestep groups (split by the
        ascending timestep ``bounds``) and concatenation segments.
        """
        if self.act_scale is None:
            raise QuantizationInputError("this layer quantizes activations dynamically; it has no static scale.")
        absmax = torch.as_tensor(absmax, dtype=torch.float32).expand_as(self.act_scale)
        if not torch.isfinite(absmax).all():
            raise QuantizationInputError(
                "calibration produced a non-finite activation range; run calibration in float32."
            )
        qmax = 2 ** (self.config.a_bits - 1) - 1
        self.act_scale.copy_(torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax)))
        if self.act_bounds is not None:
            if bounds is None or len(bounds) != self.act_bounds.numel():
                raise QuantizationInputError(
                    f"{self.config.a_groups} timestep groups need {self.act_bounds.numel()} bounds, got {bounds}."
                )
            self.act_bounds.copy_(torch.tensor(bounds, dtype=torch.float32))

    def current_act_scale(self) -> torch.Tensor | None:
        """The static activation scale(s) for the timestep in progress (``[segments]``).

        The group is the number of bounds at or below the timestep, found with tensor operations
        (in float64, as a Python float comparison would) so that compiled graphs need no sync."""
        if self.act_scale is None:
            return None
        if self.act_bounds is None:
            return self.act_scale[0]
        t = timestep_tensor()
        if t is None:  # outside a denoiser call: the widest range is the safe choice
            return self.act_scale.amax(dim=0)
        bounds = self.act_bounds.to(torch.float64)
        group = torch.searchsorted(bounds, t.to(bounds.device), right=True)
        return self.act_scale.index_select(0, group)[0]

    def _weight_kwargs(self) -> dict:
        fmt = weight_format(self.config)
        return {
            "w_bits": self.config.w_bits,
            "w_code_offset": fmt.code_offset,
            "act_bits": self.config.a_bits,
            "codes": self.kernel_codes,
        }

    @property
    def weight(self) -> torch.Tensor:
        """The float weight this layer computes with, materialized on access (nothing is stored).

        For libraries that read ``module.weight`` (its dtype, device or shape — T5 does in every
        forward, LoRA loaders do); it includes the low-rank branch and undoes smoothing.
        """
        weight = self.dequantize_weight()
        down, up = getattr(self, "lowrank_down", None), getattr(self, "lowrank_up", None)
        if down is not None and up is not None:
            weight = weight + (down.float() @ up.float()).t()
        smooth = getattr(self, "smooth", None)
        if smooth is not None:  # per input channel: repeated over a convolution's kernel taps
            weight = weight / smooth.float().repeat_interleave(self.cols // smooth.numel())
        return weight.reshape(self.weight_shape).to(self.weight_scale.dtype)

    def dequantize_weight(self) -> torch.Tensor:
        """The float weight these codes represent, ``[rows, cols]`` float32 (for inspection)."""
        return kernels.reference.dequantize_weight(
            self.qweight,
            self.weight_scale,
            self.weight_zero,
            bits=self.config.w_bits,
            cols=self.cols,
            code_offset=weight_format(self.config).code_offset,
        )


@register_qmodule(nn.Linear)
class QuantizedLinear(_QuantizedWeightMixin, nn.Linear):
    """``nn.Linear`` with packed integer weights and quantized activations.

    It subclasses ``nn.Linear`` (without its float ``weight`` parameter) so that libraries which
    wrap linear layers, such as PEFT for LoRA adapters, accept it; ``weight`` is a read-only view.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LayerConfig,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no float weight to allocate
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers(out_features, in_features, config, dtype, device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._init_branch_buffers(in_features, config, dtype, device)
        self.register_buffer("bos_input", torch.zeros(in_features, dtype=dtype, device=device) if config.bos else None)
        self.register_buffer("bos_output", torch.zeros(out_features, dtype=dtype, device=device) if config.bos else None)

    @classmethod
    def empty_like(cls, linear: nn.Linear, config: LayerConfig) -> QuantizedLinear:
        """An unfilled layer of ``linear``'s shapes (a checkpoint's tensors are loaded into it)."""
        return cls(linear.in_features, linear.out_features, config, linear.bias is not None, linear.weight.dtype)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        config: LayerConfig,
        *,
        smooth: torch.Tensor | None = None,
        clip_ratio: torch.Tensor | float = 1.0,
        bos_input: torch.Tensor | None = None,
        lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
        hessian: torch.Tensor | SampledHessian | None = None,
    ) -> QuantizedLinear:
        """Quantize a float ``nn.Linear`` (its weights are read, not modified).

        ``smooth`` divides activations per input channel and multiplies the weight columns
        (required when ``config.smooth_alpha`` is set); ``clip_ratio`` shrinks each weight
        block's range; ``bos_input`` is the constant first-token input of a ``bos`` layer;
        ``hessian`` (``E[x xᵀ]`` of the smoothed inputs, or its :class:`~diffq.gptq.SampledHessian`) has
        the weight rounded by GPTQ (a float64 tensor is factored in place, to hold no copy: pass a copy
        to keep it);
        ``lowrank`` is ``(down [in, r], up [r, out])`` of the smoothed weight (computed here
        from an SVD when ``config.rank`` is set and it is not given).
        """
        weight = linear.weight
        module = cls(
            linear.in_features, linear.out_features, config, linear.bias is not None, weight.dtype, weight.device
        )
        module._store_smoothed_weight(weight, smooth, lowrank, clip_ratio, hessian)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        if config.bos:
            if bos_input is None:
                raise QuantizationInputError("a bos layer needs the BOS input vector from calibration.")
            module.bos_input.copy_(bos_input)
            module.bos_output.copy_(linear(module.bos_input.unsqueeze(0)).squeeze(0).detach())
        return module

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def input_channels(self) -> int:
        """Channels of the input (what smoothing and activation scales are per)."""
        return self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.current_act_scale()
        y = kernels.quantized_linear(
            x,
            self.qweight,
            self.weight_scale,
            self.weight_zero,
            in_features=self.in_features,
            bias=self.bias,
            act_scale=None if scale is None else scale[0],
            act_group_size=self.config.a_group_size,
            smooth=self.smooth,
            lowrank_down=self.lowrank_down,
            lowrank_up=self.lowrank_up,
            **self._weight_kwargs(),
        )
        if self.bos_input is not None and x.dim() >= 3:
            y = self._restore_bos(x, y)
        return y

    def _restore_bos(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Put the full-precision output back on rows whose first token is the calibrated BOS."""
        first = x[..., 0, :]
        is_bos = torch.isclose(first, self.bos_input.to(first.dtype), rtol=1e-4, atol=1e-5).all(dim=-1)
        if not torch.compiler.is_compiling() and not bool(is_bos.any()):  # eager: skip the copy
            return y
        y = y.clone()
        y[..., 0, :] = torch.where(is_bos.unsqueeze(-1), self.bos_output.to(y.dtype), y[..., 0, :])
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.config.label}, {self.config}"


@register_qmodule(nn.Conv2d)
class QuantizedConv2d(_QuantizedWeightMixin, nn.Conv2d):
    """``nn.Conv2d`` with packed integer weights and quantized activations (an ``nn.Conv2d`` to
    libraries that wrap convolutions, without its float ``weight`` parameter)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        config: LayerConfig,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Conv2d.__init__: there is no float weight to allocate
        self.in_channels, self.out_channels = in_channels, out_channels
        self.padding_mode = "zeros"
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), padding, tuple(dilation), groups
        if not isinstance(padding, str):
            self.padding = tuple(padding)
        cols = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_buffers(out_channels, cols, config, dtype, device)
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device)) if bias else None
        if (config.smooth_alpha is not None or config.rank) and groups != 1:
            raise QuantizationInputError("smoothing and the low-rank branch need a convolution with groups=1.")
        self._init_branch_buffers(in_channels, config, dtype, device)

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, config: LayerConfig) -> QuantizedConv2d:
        """An unfilled layer of ``conv``'s shapes (a checkpoint's tensors are loaded into it)."""
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, config, conv.stride, conv.padding,
                   conv.dilation, conv.groups, conv.bias is not None, conv.weight.dtype)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        config: LayerConfig,
        *,
        smooth: torch.Tensor | None = None,
        clip_ratio: torch.Tensor | float = 1.0,
        bos_input: torch.Tensor | None = None,
        lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
        hessian: torch.Tensor | SampledHessian | None = None,
    ) -> QuantizedConv2d:
        """Quantize a float ``nn.Conv2d`` (zero padding only; its weights are read, not modified).

        ``smooth`` divides the input per channel and multiplies the weight's input channels
        (required when ``config.smooth_alpha`` is set); ``lowrank`` is ``(down [cols, r], up [r,
        out])`` of the smoothed ``[out, cols]`` weight (from an SVD when ``config.rank`` is set and
        it is not given); ``hessian`` is ``E[x xᵀ]`` over input channels (GPTQ, taps taken as
        uncorrelated; a float64 one is factored in place). As for :class:`QuantizedLinear`, only the residual is quantized; a
        convolution has no BOS handling (``bos_input`` must be ``None``).
        """
        if bos_input is not None or config.bos:
            raise QuantizationInputError("BOS handling is for linear layers of a text sequence, not convolutions.")
        if conv.padding_mode != "zeros":
            raise QuantizationInputError(
                f"Conv2d with padding_mode={conv.padding_mode!r} is not supported; keep this layer in 16-bit."
            )
        weight = conv.weight
        module = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            config,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            weight.dtype,
            weight.device,
        )
        module._store_smoothed_weight(weight.reshape(conv.out_channels, -1), smooth, lowrank, clip_ratio, hessian)
        if conv.bias is not None:
            module.bias.data.copy_(conv.bias.detach())
        return module

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def input_channels(self) -> int:
        """Channels of the input (what smoothing and activation scales are per)."""
        return self.in_channels

    def _kernel_geometry(self) -> dict:
        if self.config.a_bits is None:  # weight-only: dequantized in the stored order
            return {}
        segments = (self.config.a_split,) if self.config.a_split else ()
        return {"conv": (self.in_channels // self.groups, self.kernel_size[0] * self.kernel_size[1], segments)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.quantized_conv2d(
            x,
            self.qweight,
            self.weight_scale,
            self.weight_zero,
            weight_shape=self.weight_shape,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            act_scale=self.current_act_scale(),
            act_segments=(self.config.a_split,) if self.config.a_split else (),
            act_group_size=self.config.a_group_size,
            smooth=self.smooth,
            lowrank_down=self.lowrank_down,
            lowrank_up=self.lowrank_up,
            **self._weight_kwargs(),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"{self.config.label}, {self.config}"
        )


QUANTIZED_MODULES = tuple(QMODULES.values())
"""The quantized module classes (for ``isinstance`` checks)."""


def stored_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's parameters and saved buffers: what its checkpoint stores (not the layouts that
    kernels derive from them at load time, such as the CPU's ``kernel_codes``)."""
    saved = {
        id(b): b for m in module.modules() for name, b in m._buffers.items()
        if b is not None and name not in m._non_persistent_buffers_set
    }
    return list(module.parameters()) + list(saved.values())


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and saved buffers (what its checkpoint stores)."""
    return sum(t.numel() * t.element_size() for t in stored_tensors(module))
