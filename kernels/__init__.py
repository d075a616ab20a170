"""Kernels for quantized layers: the ``diffq::`` ops of :mod:`diffq.kernels.dispatch`, one implementation per device.

From the repository root this folder is also importable as a top-level ``kernels``, the name of
a Hugging Face package that transformers imports (and, since transformers 5.25, installs).
Imported under that name it hands over to that package when it is installed elsewhere on
``sys.path``; when it is not, it defines nothing and has no ``__file__``, which the probes of
transformers and diffusers read as "not installed". diffq itself always imports it as
``diffq.kernels``.
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

    def _hand_over_to_installed_kernels() -> bool:
        """Load a regular ``kernels`` package found on ``sys.path`` outside this repository in
        place of this one; the import statement returns what ``sys.modules`` holds afterwards."""
        import importlib.machinery
        import importlib.util
        import sys
        from pathlib import Path

        repository = Path(__path__[0]).resolve().parent
        elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != repository]
        spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
        if spec is None or spec.origin is None:  # none, or only namespace folders
            return False
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module
        spec.loader.exec_module(module)
        return True

    if not _hand_over_to_installed_kernels():
        __file__ = None  # noqa: A001  (see the docstring)
    del _hand_over_to_installed_kernels
