"""Chores every adapter shares: parameter names, equal-partition math, checks of the
engine internals an adapter reads, and version warnings."""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence

import torch

from ..core.select import clean_name

__all__ = ["param_names", "named_optimizer_params", "equal_partition_ranges", "require_attrs", "warn_if_untested"]


def param_names(model: Any) -> dict[int, str]:
    """``{id(param): clean name}`` for every parameter of ``model`` (tied parameters take
    their first name); empty when ``model`` is ``None``."""
    names: dict[int, str] = {}
    if model is not None:
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), clean_name(name))
    return names


def named_optimizer_params(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, param)`` for every distinct parameter the optimizer updates, in param-group
    order; a parameter ``names`` does not know is called ``param_groups[i][j]``."""
    out, seen = [], set()
    for gi, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((names.get(id(p), f"param_groups[{gi}][{i}]"), p))
    return out


def equal_partition_ranges(offset: int, numel: int, partition_size: int, world: int) -> tuple[tuple[int, int], ...]:
    """Element ranges (of a tensor's own flattening) that each of ``world`` equal
    partitions of ``partition_size`` elements of a flat buffer hold, for a tensor stored
    at ``[offset, offset + numel)`` of that buffer. Empty ranges are ``(0, 0)``.

    The layout of DeepSpeed ZeRO-1/2 and ``BF16_Optimizer`` param groups and of FSDP1
    FlatParameters (rank ``r`` holds ``[r * partition_size, (r + 1) * partition_size)``)."""
    out = []
    for r in range(world):
        lo, hi = max(offset, r * partition_size), min(offset + numel, (r + 1) * partition_size)
        out.append((lo - offset, hi - offset) if hi > lo else (0, 0))
    return tuple(out)


def require_attrs(obj: Any, attrs: Iterable[str], what: str, *, package: str, version: str, tested: Sequence[str]) -> None:
    """Raise ``RuntimeError`` naming every attribute of an engine internal that ``obj``
    lacks: an adapter never guesses a layout from internals it does not recognise."""
    missing = [a for a in attrs if not hasattr(obj, a)]
    if missing:
        raise RuntimeError(
            f"dist_gc: unrecognised {package} {version} internals: {what} ({type(obj).__name__}) lacks "
            f"{', '.join(missing)}; dist_gc was tested with {package} {', '.join(v + '.x' for v in tested)}. "
            "Pin a tested version or report this."
        )


def warn_if_untested(package: str, version: str, tested: Sequence[str], safeguard: str) -> None:
    """Warn when ``package`` is not a ``major.minor`` version the adapter was tested with.
    Internals the adapter does not recognise raise separately (:func:`require_attrs`);
    ``safeguard`` says what still protects an untested version."""
    if not any(version == v or version.startswith(v + ".") for v in tested):
        warnings.warn(
            f"dist_gc: {package} {version} is untested (tested: {', '.join(v + '.x' for v in tested)}); {safeguard}",
            stacklevel=4,
        )
