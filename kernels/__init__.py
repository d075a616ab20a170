"""Kernels for quantized layers: the ``diffq::`` ops of :mod:`diffq.kernels.dispatch`, one implementation per device.

From the repository root this folder is also importable as a top-level ``kernels``, the name of
a Hugging Face package that transformers and diffusers probe for. Imported under that name it
defines nothing and has no ``__file__``, which those probes read as "not installed"; diffq itself
always imports it as ``diffq.kernels``.
"""

if __name__ == "diffq.kernels":
    from diffq.kernels.dispatch import (
        kernel_codes,
        pack,
        packed_cols,
        quantized_conv2d,
        quantized_linear,
        reference,
        reference_forced,
        unpack,
        unsupported_reason,
    )

    __all__ = [
        "kernel_codes",
        "pack",
        "packed_cols",
        "quantized_conv2d",
        "quantized_linear",
        "reference",
        "reference_forced",
        "unpack",
        "unsupported_reason",
    ]
else:
    __file__ = None  # noqa: A001  (see the docstring)
