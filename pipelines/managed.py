"""Pipelines diffq hands back: plain calls use the model's call defaults, saves follow the policy.

:func:`manage` puts :class:`ManagedPipeline` in front of a pipeline's own class (the class keeps
its name, so ``model_index.json`` and ``isinstance`` checks are unchanged). Then

* ``pipe(prompt)`` runs with the arguments the model is meant to run with
  (:func:`~diffq.pipelines.call_defaults.call_defaults`: for the bundled PixArt model, 32 px and
  resolution binning off) wherever the caller gave none;
* ``pipe.save_pretrained(folder)`` writes through :mod:`diffq.saving`'s policy, as
  :func:`diffq.save` does (``overwrite=True`` to replace other files).

``diffq.load``, ``diffq.quantize`` and ``diffq.convert`` return managed pipelines.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

from diffq.pipelines.call_defaults import ATTR, call_defaults
from diffq.pipelines.serialization import save_with_policy

_CLASSES: dict[type, type] = {}


class ManagedPipeline:
    """Mixin placed before a diffusers pipeline class by :func:`manage` (which also gives the class
    a ``__call__`` that fills in the call defaults and keeps the pipeline's own signature)."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, overwrite: bool = False,
                        **kwargs: Any) -> Any:
        """diffusers' ``save_pretrained`` under :mod:`diffq.saving`'s policy: an existing file or a folder
        of other files is refused unless ``overwrite=True``; the model's own folders always."""
        return save_with_policy(self, super().save_pretrained, save_directory, *args,  # type: ignore[misc]
                                overwrite=overwrite, **kwargs)


def _unset(call: Any, defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """The defaults that the call did not give (by position or name) and that the pipeline takes."""
    try:
        signature = inspect.signature(call)
        given = signature.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return {}  # a malformed call: let the pipeline raise its own error
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    return {k: v for k, v in defaults.items() if k not in given and (takes_any or k in signature.parameters)}


def managed_class(cls: type) -> type:
    """``cls`` with :class:`ManagedPipeline` in front (one class per pipeline class)."""
    if issubclass(cls, ManagedPipeline):
        return cls
    if cls not in _CLASSES:
        call = cls.__call__

        @functools.wraps(call)  # inspect.signature(pipe.__call__) still shows the pipeline's parameters
        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            defaults = getattr(self, ATTR, None)
            if defaults:
                kwargs = {**_unset(call, defaults, (self, *args), kwargs), **kwargs}
            return call(self, *args, **kwargs)

        namespace = {"__call__": __call__, "__doc__": cls.__doc__, "__module__": __name__}
        _CLASSES[cls] = type(cls.__name__, (ManagedPipeline, cls), namespace)
    return _CLASSES[cls]


def manage(pipe: Any, defaults: dict[str, Any] | None = None) -> Any:
    """Make ``pipe`` (in place) a managed pipeline; ``defaults`` are its call defaults (looked up if ``None``)."""
    if not callable(getattr(pipe, "save_pretrained", None)) or not hasattr(pipe, "components"):
        return pipe  # a bare module, not a pipeline
    setattr(pipe, ATTR, call_defaults(pipe) if defaults is None else dict(defaults))
    pipe.__class__ = managed_class(type(pipe))
    return pipe


__all__ = ["ManagedPipeline", "manage", "managed_class"]
