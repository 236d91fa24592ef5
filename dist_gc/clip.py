"""``dist_gc.clip_grad_norm_``: gradient-norm clipping that works when gradients live on
several device meshes (FSDP2 + tensor parallel, FSDP2 + expert parallel) and across
pipeline stages.

Where it sits relative to GC: call it after ``backward`` (after the engine's gradient
reduction) and before ``optimizer.step()``; GC then runs in the optimizer's step
pre-hook, on the clipped gradient. That is the documented order — clip measures the
norm of the raw gradient, GC (a projection) can only shrink it further — and what the
single-process oracle does (clip, then GC).

Why a new function: ``torch.nn.utils.clip_grad_norm_`` stacks one norm per gradient,
and ``torch.stack`` of DTensors requires one mesh: with TP'd layers on a 2-D
``(dp, tp)`` mesh and FSDP-only layers on the 1-D ``dp`` mesh it raises "All operands
in aten.stack.default must have the same mesh" (``torch/nn/utils/clip_grad.py``,
``_get_total_norm``), and its ``_foreach_mul_`` cannot mix meshes either. This follows
torchtitan's ``_clip_grad_norm_with_ep`` (``torchtitan/distributed/utils.py``): one
total norm per mesh, made global with ``full_tensor()``, combined, then each mesh's
gradients scaled with ``torch.nn.utils.clip_grads_with_norm_``.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable

import torch
import torch.distributed as dist

from .engine.collectives import comm_device

__all__ = ["clip_grad_norm_"]


def _dtensor_class() -> Any:
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else getattr(mod, "DTensor", None)


def _parts(params: list[torch.Tensor]) -> dict[Any, list[torch.Tensor]]:
    """Parameters with a gradient, grouped by the device mesh of the gradient (``None``:
    plain tensors), in parameter order — the same order on every rank that holds the
    same parameters, so the ``full_tensor()`` collectives match."""
    dtensor = _dtensor_class()
    parts: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        key = g.device_mesh if dtensor is not None and isinstance(g, dtensor) else None
        parts.setdefault(key, []).append(p)
    return parts


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    pp_group: Any = None,
) -> torch.Tensor:
    """Clip the gradient norm of ``parameters`` in place, like
    ``torch.nn.utils.clip_grad_norm_``: every gradient is multiplied by
    ``min(1, max_norm / (total_norm + 1e-6))``; returns ``total_norm``.

    ``total_norm`` is the ``norm_type``-norm of ALL gradients, each counted once
    globally: gradients may be DTensors on different device meshes (one total per mesh,
    made global with ``full_tensor()``, combined as ``(sum_m N_m^p)^(1/p)``, or the max
    for ``inf``) and plain tensors (counted as they are: replicated on every rank).
    ``pp_group``: the process group over which OTHER parameters live (pipeline-parallel
    stages, each holding its own layers); the partial norms are combined over it with
    one all-reduce, so every stage clips by the whole model's norm.

    Where ``torch.nn.utils.clip_grad_norm_`` works — all gradients plain, or all
    DTensors on one mesh, and no ``pp_group`` — this IS that call (same scale, same
    return value: a DTensor when the gradients are). Otherwise the return value is a
    plain 0-dim tensor, identical on every rank.

    Order with GC: call it after ``backward`` and before ``optimizer.step()``; GC runs
    in the optimizer's step pre-hook, on the clipped gradient (see the module docstring).

    Raises ``RuntimeError`` with ``error_if_nonfinite=True`` when the total norm is nan
    or inf (torch's message), and ``ValueError`` for a ``norm_type`` other than a
    positive number or ``inf`` on the multi-mesh / pipeline path (the per-part norms of
    other orders do not combine). Collective: every rank of every mesh involved (and of
    ``pp_group``) must call it with the same parameters in the same order."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = list(parameters)
    parts = _parts(params)
    if pp_group is None and len(parts) <= 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    norm_type = float(norm_type)
    if not norm_type > 0:  # (inf passes; -inf, 0, negative and nan do not combine)
        raise ValueError(f"dist_gc.clip_grad_norm_: norm_type={norm_type} (allowed: a positive number or inf when gradients "
                         "live on several meshes or pp_group is given)")
    dtensor = _dtensor_class()
    norms = []
    for ps in parts.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in ps], norm_type, False, foreach)
        # A DTensor norm is a partial (per-shard) value: full_tensor() completes it over
        # the mesh (torch's _NormPartial placement does the right reduction per norm type).
        norms.append(n.full_tensor() if dtensor is not None and isinstance(n, dtensor) else n)
    device = norms[0].device if norms else torch.device("cpu")
    stacked = torch.stack([n.to(device) for n in norms]) if norms else torch.zeros(0, device=device)
    if pp_group is None:
        total = torch.linalg.vector_norm(stacked, norm_type)  # torch's own combination of per-part norms
    else:
        # Each stage holds different parameters: sum the p-th powers (max for inf) over
        # the stages, on the group's comm device (the norms may be on another device).
        inf = math.isinf(norm_type)
        local = (stacked.max() if stacked.numel() else stacked.new_zeros(())) if inf else stacked.pow(norm_type).sum()
        wire = local.to(comm_device(pp_group, prefer=local.device), copy=True)
        dist.all_reduce(wire, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=pp_group)
        total = wire.to(device)
        total = total if inf else total.pow(1.0 / norm_type)
    if error_if_nonfinite and (torch.isnan(total) or torch.isinf(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    for ps in parts.values():
        # One call per mesh: torch's _foreach_mul_ cannot mix DTensors of different meshes.
        torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total, foreach)
    return total
