"""The single-process oracle: full tensors, full global batch, GC by the formula
written out independently of dist_gc, then SGD(lr=1) so the update equals the
centralized gradient."""

from __future__ import annotations

import copy
from typing import Callable

import torch


def oracle_centralize(g: torch.Tensor, mode: str, output_dim: int = 0) -> torch.Tensor:
    """``G - mean(G)`` over every dim except ``output_dim`` (channel) or over all dims
    (tensor), computed in float64."""
    x = g.double()
    if mode == "tensor":
        return x - x.mean()
    d = output_dim % g.dim()
    dims = tuple(i for i in range(g.dim()) if i != d)
    return x - x.mean(dims, keepdim=True)


def naive_centralize(g: torch.Tensor) -> torch.Tensor:
    """What every peer implementation does: dim 0, and only when ``g.dim() > 1``."""
    if g.dim() > 1:
        g = g - g.mean(tuple(range(1, g.dim())), keepdim=True)
    return g


def oracle_step(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module], torch.Tensor],
    output_dims: dict[str, int | None],
    mode: str,
    clip: float | None = None,
) -> dict[str, torch.Tensor]:
    """One SGD(lr=1) step on a copy of ``model``: grads of ``loss_fn`` on the global
    batch, optional norm clipping (before GC, as the engines do), GC on the parameters
    named in ``output_dims`` (``None``: skipped). Returns the new parameters (fp64)."""
    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    loss_fn(m).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
    out = {}
    for name, p in m.named_parameters():
        g = p.grad.double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
        if name in output_dims and output_dims[name] is not None:
            g = oracle_centralize(g, mode, output_dims[name])
        out[name] = p.detach().double() - g
    return out
