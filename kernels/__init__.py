"""Kernels for quantized layers (:mod:`diffq.kernels.dispatch` picks one per device).

From the repository root this folder is also importable as a top-level ``kernels``, the name of
a Hugging Face package that transformers and diffusers probe for. Imported under that name it
defines nothing and has no ``__file__``, which those probes read as "not installed"; diffq itself
always imports it as ``diffq.kernels``.
"""

if __name__ == "diffq.kernels":
    from diffq.kernels.dispatch import (
        _KERNELS,
        _REFERENCE,
        backend_for,
        pack,
        packed_cols,
        quantized_conv2d,
        quantized_linear,
        reference,
        register_kernel,
        unpack,
    )

    __all__ = [
        "_KERNELS",
        "_REFERENCE",
        "backend_for",
        "pack",
        "packed_cols",
        "quantized_conv2d",
        "quantized_linear",
        "reference",
        "register_kernel",
        "unpack",
    ]
else:
    __file__ = None  # noqa: A001  (see the docstring)
