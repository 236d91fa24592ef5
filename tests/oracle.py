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


def oracle_centralize_conv_transpose(g: torch.Tensor, groups: int) -> torch.Tensor:
    """GC of a ``ConvTranspose`` weight ``(in, out/groups, *k)`` in channel mode, one mean
    per OUTPUT channel: channel ``c = g * out_g + j`` of a grouped transposed conv is fed
    by input channels ``g*in_g : (g+1)*in_g`` through ``weight[g*in_g:(g+1)*in_g, j]``,
    so that block is what one mean covers. Written out channel by channel, in float64."""
    x = g.double().clone()
    in_g, out_g = g.shape[0] // groups, g.shape[1]
    for grp in range(groups):
        for j in range(out_g):
            block = x[grp * in_g : (grp + 1) * in_g, j]
            block -= block.mean()
    return x


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
    gc_before_clip: bool = False,
) -> dict[str, torch.Tensor]:
    """One SGD(lr=1) step on a copy of ``model``: grads of ``loss_fn`` on the global
    batch, optional norm clipping (before GC, as the optimizer-hook strategy runs; with
    ``gc_before_clip`` after it, as the comm-hook strategy runs), GC on the parameters
    named in ``output_dims`` (``None``: skipped). Returns the new parameters (fp64)."""
    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    loss_fn(m).backward()
    grads = {n: (p.grad.double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)) for n, p in m.named_parameters()}

    def centralize_all() -> None:
        for n, d in output_dims.items():
            if d is not None and n in grads:
                grads[n] = oracle_centralize(grads[n], mode, d)

    if gc_before_clip:
        centralize_all()
    if clip is not None:
        total = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        scale = min(1.0, clip / (float(total) + 1e-6))  # torch.nn.utils.clip_grad_norm_'s rule
        grads = {n: g * scale for n, g in grads.items()}
    if not gc_before_clip:
        centralize_all()
    return {n: p.detach().double() - grads[n] for n, p in m.named_parameters()}
