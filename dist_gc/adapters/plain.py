"""Any ``torch.optim.Optimizer`` whose parameters are whole tensors: single process,
DDP (gradients are already all-reduced when ``step`` runs), DataParallel.

Every rank holds every gradient whole, so GC needs no communication."""

from __future__ import annotations

from typing import Any

import torch

from ..core.config import GCConfig
from ..core.select import clean_name, detect_output_dims, resolve_targets
from ..engine.layout import plan_full_tensor
from . import Binding

__all__ = ["bind", "named_optimizer_params"]


def named_optimizer_params(optimizer: torch.optim.Optimizer, model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """``(clean name, param)`` for every parameter the optimizer updates, named after
    the model when given (tied parameters take their first name)."""
    names: dict[int, str] = {}
    if model is not None:
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), clean_name(name))
    out, seen = [], set()
    for gi, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((names.get(id(p), f"param_groups[{gi}][{i}]"), p))
    return out


def _refuse_sharded(name: str, p: torch.Tensor) -> None:
    kind = type(p).__name__
    if kind == "FlatParameter" or getattr(p, "_is_flat_param", False):
        raise ValueError(
            f"dist_gc.attach: parameter {name!r} is an FSDP1 FlatParameter (a flat 1-D shard of many tensors); "
            "pass model=<the FSDP-wrapped model> so dist_gc can read its layout"
        )
    if kind == "DTensor":
        raise ValueError(f"dist_gc.attach: parameter {name!r} is a DTensor (FSDP2/tensor parallel) and no adapter claimed it")


def bind(optimizer: Any, model: Any, config: GCConfig) -> Binding | None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    named = named_optimizer_params(optimizer, model)
    for name, p in named:
        _refuse_sharded(name, p)
    dims = detect_output_dims(model) if model is not None else {}
    targets = resolve_targets([(n, tuple(p.shape)) for n, p in named], config, dims)
    plans, sources = [], []
    for name, p in named:
        t = targets[name]
        if t.geometry is None:
            continue
        plans.append(plan_full_tensor(name, t.geometry, len(sources), t.shape, t.output_dim))
        sources.append(lambda p=p: p.grad)
    ddp = type(model).__name__ == "DistributedDataParallel"
    return Binding(optimizer, plans, sources, targets, engine="DDP" if ddp else "single process")
