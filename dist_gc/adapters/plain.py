"""Any ``torch.optim.Optimizer`` whose parameters are whole tensors: single process,
DDP (gradients are already all-reduced when ``step`` runs), DataParallel.

Every rank holds every gradient whole (:class:`~dist_gc.engine.layout.Whole`), so GC
needs no communication."""

from __future__ import annotations

from typing import Any

import torch

from ..core.select import resolve_roles
from ..engine.layout import TensorLayout, Whole
from . import Description
from ._common import named_optimizer_params, param_names

__all__ = ["describe", "describe_params"]


def _refuse_sharded(name: str, p: torch.Tensor) -> None:
    kind = type(p).__name__
    if kind == "FlatParameter" or getattr(p, "_is_flat_param", False):
        raise ValueError(
            f"dist_gc.attach: parameter {name!r} is an FSDP1 FlatParameter (a flat 1-D shard of many tensors); "
            "pass model=<the FSDP-wrapped model> so dist_gc can read its layout"
        )
    if kind == "DTensor":
        raise ValueError(f"dist_gc.attach: parameter {name!r} is a DTensor (FSDP2/tensor parallel) and no adapter claimed it")


def describe_params(named: list[tuple[str, torch.Tensor]], first_source: int = 0) -> tuple[list[TensorLayout], list]:
    """Layouts and ``.grad`` sources of parameters held whole by this rank."""
    layouts, sources = [], []
    for name, p in named:
        layouts.append(TensorLayout(name, tuple(p.shape), Whole(first_source + len(sources))))
        sources.append(lambda p=p: p.grad)
    return layouts, sources


def describe(optimizer: Any, model: Any) -> Description | None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    named = named_optimizer_params(optimizer, param_names(model))
    for name, p in named:
        _refuse_sharded(name, p)
    layouts, sources = describe_params(named)
    ddp = type(model).__name__ == "DistributedDataParallel"
    return Description(
        optimizer=optimizer,
        layouts=layouts,
        sources=sources,
        label="DDP" if ddp else "single process",
        roles=resolve_roles(model) if model is not None else {},
        replannable=True,
        peer_groups=(model.process_group,) if ddp and hasattr(model, "process_group") else (),
    )
