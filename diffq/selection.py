"""Which of a model's layers are quantized: ``include=`` / ``exclude=`` patterns on top of the adapter's rules.

A pattern is a shell-style glob (:mod:`fnmatch`) matched against a layer's qualified name and each
of its parents' names, so ``"time_embedding"`` selects ``time_embedding.linear_1`` as diffusers'
``modules_to_not_convert`` does and ``"down_blocks.*.attentions.*"`` a family of blocks as
optimum-quanto's ``include``/``exclude`` do; ``"class:Conv2d"`` selects by layer type (any class in
the layer's hierarchy with that name; an ``nn.Module`` subclass may be passed instead).
A layer is quantized when the adapter allows it, ``include`` (if given) matches it and ``exclude``
does not; the adapter's own 16-bit layers (first and last layers, embeddings, …) stay 16-bit. A
pattern that matches no layer is an error, so a typo fails instead of quantizing everything.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from diffq.errors import QuantizationInputError

CLASS_PREFIX = "class:"
Patterns = str | type | Sequence[str | type] | None


def _pattern(item: Any, argument: str) -> str:
    if isinstance(item, type) and issubclass(item, nn.Module):
        return CLASS_PREFIX + item.__name__
    if isinstance(item, str) and item.strip() and item.strip() != CLASS_PREFIX:
        return item.strip()
    raise QuantizationInputError(
        f"{argument} takes layer-name patterns such as 'down_blocks.*' or 'time_embedding', 'class:Conv2d', "
        f"or nn.Module classes; got {item!r}."
    )


def _patterns(value: Patterns, argument: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, (str, type)) else value
    if not isinstance(items, Iterable):
        raise QuantizationInputError(f"{argument} must be a pattern or a list of patterns, got {value!r}.")
    patterns = tuple(_pattern(item, argument) for item in items)
    if not patterns:
        raise QuantizationInputError(f"{argument} is an empty list; pass None to leave it out.")
    return patterns


def _names_of(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b", "a.b.c"]``: a layer and its parents."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    """Whether one pattern selects the layer ``name``."""
    if pattern.startswith(CLASS_PREFIX):
        wanted = pattern[len(CLASS_PREFIX):]
        return any(fnmatch.fnmatchcase(cls.__name__, wanted) for cls in type(module).__mro__)
    return any(fnmatch.fnmatchcase(part, pattern) for part in _names_of(name))


@dataclass(frozen=True)
class LayerSelection:
    """``include`` / ``exclude`` patterns, validated; ``LayerSelection()`` selects every allowed layer."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    @classmethod
    def of(cls, include: Patterns = None, exclude: Patterns = None) -> LayerSelection:
        return cls(_patterns(include, "include"), _patterns(exclude, "exclude"))

    def __bool__(self) -> bool:
        return self.include is not None or self.exclude is not None

    def to_dict(self) -> dict[str, list[str]]:
        """What a plan records (keys only for the patterns given)."""
        return {key: list(value) for key, value in (("include", self.include), ("exclude", self.exclude)) if value}

    def apply(
        self, layers: dict[str, nn.Module], kept: dict[str, str]
    ) -> tuple[dict[str, nn.Module], dict[str, str]]:
        """``(layers, kept)`` of an adapter narrowed by the patterns; the layers left out join ``kept``
        with the pattern that left them out."""
        if not self:
            return layers, kept
        candidates = {**layers}
        self._check_each_matches(candidates, kept)
        selected: dict[str, nn.Module] = {}
        kept = dict(kept)
        for name, module in candidates.items():
            reason = self._reason_to_keep(name, module)
            if reason is None:
                selected[name] = module
            else:
                kept[name] = reason
        if not selected:
            raise QuantizationInputError(
                f"include={list(self.include or [])} exclude={list(self.exclude or [])} leave no layer to quantize; "
                f"the quantizable layers are e.g. {_examples(candidates)}."
            )
        return selected, kept

    def allows(self, name: str, module: nn.Module) -> bool:
        """Whether the patterns let ``name`` be quantized (the adapter's rules aside)."""
        return self._reason_to_keep(name, module) is None

    def _reason_to_keep(self, name: str, module: nn.Module) -> str | None:
        if self.include is not None and not any(matches(p, name, module) for p in self.include):
            return f"not in include={list(self.include)}"
        for pattern in self.exclude or ():
            if matches(pattern, name, module):
                return f"exclude={pattern!r}"
        return None

    def _check_each_matches(self, layers: dict[str, nn.Module], kept: dict[str, str]) -> None:
        """A pattern that selects nothing is a typo: an error, not a silent no-op. An ``exclude`` that
        matches only layers kept in 16-bit anyway is fine; an ``include`` of those is not (the adapter's
        rules are not overridden)."""
        for argument, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns or ():
                if any(matches(pattern, name, module) for name, module in layers.items()):
                    continue
                kept_matches = [name for name in kept if not pattern.startswith(CLASS_PREFIX)
                                and any(fnmatch.fnmatchcase(part, pattern) for part in _names_of(name))]
                if kept_matches and argument == "exclude":
                    continue
                why = (f" (it matches only layers diffq keeps in 16-bit: "
                       f"{', '.join(f'{n} ({kept[n]})' for n in kept_matches[:3])})") if kept_matches else ""
                raise QuantizationInputError(
                    f"{argument} pattern {pattern!r} matches no quantizable layer{why}; patterns are globs on "
                    f"layer names (a parent's name selects its layers) or 'class:Conv2d'. Quantizable layers are "
                    f"e.g. {_examples(layers)}."
                )


def _examples(names: Iterable[str], count: int = 4) -> str:
    names = list(names)
    shown = ", ".join(names[:count])
    return shown + (f", … ({len(names)} in all)" if len(names) > count else "")


__all__ = ["LayerSelection", "Patterns", "matches"]
