"""Which parameters GC touches, and along which output dim. Imports only torch.

Selection is by composition, as in optax: ``include``/``exclude`` fnmatch patterns on
the user's own parameter names, ``min_ndim``, per-pattern ``output_dim`` overrides.
Every engine adapter calls :func:`resolve_targets` with the ORIGINAL (unsharded,
unflattened) names and shapes, so the same rules hold on every engine.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .centralize import Geometry, geometry_of, normalize_dim
from .config import GCConfig

__all__ = ["Target", "clean_name", "detect_output_dims", "resolve_targets", "warn_optimizer_risks"]

# Module wrappers that insert a path component the user never wrote.
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def clean_name(name: str) -> str:
    """The user's own parameter name: drops DDP/DeepSpeed/accelerate's leading
    ``module.`` and the FSDP / activation-checkpoint / ``torch.compile`` wrapper parts."""
    parts = name.split(".")
    while parts and parts[0] == "module" and len(parts) > 1:
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_PARTS)


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Recognised by duck type so that transformers need not be importable:
    # transformers.pytorch_utils.Conv1D stores weight as (in, out) and has `nf`.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _module_output_dim(module: nn.Module) -> int | None:
    if _is_hf_conv1d(module):
        return -1
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1  # weight is (in, out/groups, *kernel)
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag)):
        return 0
    return None


def detect_output_dims(model: nn.Module) -> dict[str, int]:
    """``{clean parameter name: output dim}`` for the ``weight`` of every recognised layer."""
    dims: dict[str, int] = {}
    for mod_name, module in model.named_modules():
        dim = _module_output_dim(module)
        if dim is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
            dims[clean_name(f"{mod_name}.weight" if mod_name else "weight")] = dim
    return dims


@dataclass(frozen=True, slots=True)
class Target:
    """The GC decision for one original parameter."""

    name: str
    shape: tuple[int, ...]
    output_dim: int | None
    geometry: Geometry | None
    """``None`` when the parameter is skipped; ``reason`` says why."""
    reason: str = ""


def _first_match(name: str, patterns: Iterable[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def resolve_targets(
    named_shapes: Sequence[tuple[str, Sequence[int]]],
    config: GCConfig,
    detected_dims: Mapping[str, int] | None = None,
) -> dict[str, Target]:
    """Apply ``config`` to ``(clean name, global shape)`` pairs.

    Raises ``ValueError`` (naming the key and value) when a pattern matches no
    parameter, an ``output_dim`` override is out of range, or — with
    ``skip_degenerate=False`` — a selected tensor has single-element means.
    Warns once, naming them, about degenerate tensors that are skipped."""
    detected_dims = detected_dims or {}
    names = [n for n, _ in named_shapes]
    errors = [
        f"{key}: pattern {pat!r} matches no parameter (parameters: {_preview(names)})"
        for key, pats in (("include", config.include), ("exclude", config.exclude), ("output_dim", config.output_dim))
        for pat in pats
        if not any(fnmatch.fnmatchcase(n, pat) for n in names)
    ]
    targets: dict[str, Target] = {}
    degenerate: list[str] = []
    for name, shape in named_shapes:
        shape = tuple(int(s) for s in shape)
        override = _first_match(name, config.output_dim)
        dim = config.output_dim[override] if override else detected_dims.get(name, 0)
        if len(shape) < config.min_ndim:
            targets[name] = Target(name, shape, None, None, f"ndim {len(shape)} < min_ndim {config.min_ndim}")
            continue
        if _first_match(name, config.include) is None:
            targets[name] = Target(name, shape, None, None, "matches no include pattern")
            continue
        if (pat := _first_match(name, config.exclude)) is not None:
            targets[name] = Target(name, shape, None, None, f"excluded by {pat!r}")
            continue
        try:
            geo = geometry_of(shape, config.mode, dim)
        except ValueError as exc:
            errors.append(f"output_dim: {exc}" if override else str(exc))
            continue
        if math.prod(shape) == 0:
            targets[name] = Target(name, shape, None, None, "empty tensor")
        elif geo.count == 1:
            degenerate.append(name)
            targets[name] = Target(name, shape, None, None, "degenerate: each mean covers one element")
        else:
            targets[name] = Target(name, shape, normalize_dim(dim, len(shape)) if config.mode == "channel" else None, geo)
    if degenerate and not config.skip_degenerate:
        errors.append(
            f"skip_degenerate=False but {', '.join(degenerate)} have single-element means: "
            "GC would zero their gradient (allowed: exclude them, or skip_degenerate=true)"
        )
    if errors:
        raise ValueError("gradient centralization config does not fit this model: " + "; ".join(errors))
    if degenerate:
        warnings.warn(
            f"dist_gc: skipping {', '.join(degenerate)}: each mean covers one element (fan-in 1), "
            "so GC would zero the gradient and the parameter would never learn",
            stacklevel=3,
        )
    return targets


def warn_optimizer_risks(optimizer: torch.optim.Optimizer) -> None:
    """Warn about trust-ratio optimizers (LAMB, LARS), whose per-layer adaptation
    divides by the gradient norm that GC changes."""
    name = type(optimizer).__name__.lower()
    if "lamb" in name or "lars" in name:
        warnings.warn(
            f"dist_gc: {type(optimizer).__name__} is a trust-ratio optimizer; GC changes the gradient norm it "
            "adapts to and may disturb its layer-wise learning rates. Validate convergence or exclude layers.",
            stacklevel=3,
        )


def _preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"
