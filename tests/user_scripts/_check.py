"""Test instrumentation the user scripts share; it knows nothing about dist_gc.

A tiny model, one fixed global batch, and the single-process oracle of one SGD(lr=1)
step (so the parameter change is minus the gradient) with and without channel GC
(``G - G.mean(dims except 0)`` for tensors with >= 2 dims). Each script calls
:func:`report` with its updated, full parameters; the line it prints,
``USER-SCRIPT-CHECK script=... rank=... gc_err=... raw_err=...``, is what the tests
read: ``gc_err`` is max |update - oracle with GC|, ``raw_err`` the same without GC,
``dist_gc_loaded`` whether any ``dist_gc`` module is in ``sys.modules``.
The oracle is computed with plain tensor arithmetic (no optimizer), so the wrapper's
global step hook never sees it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

GLOBAL_BATCH = 8


def make_model() -> nn.Module:
    """39 parameters; ZeRO-2 splits the flat buffer at element 20 (2 ranks, padded to
    40), inside a row of the second weight: that row's mean needs both ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 6))


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 4, generator=g), torch.randint(0, 6, (GLOBAL_BATCH,), generator=g)


def local_batch(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch()
    n = GLOBAL_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def _oracle() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = make_model()
    x, y = global_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    with_gc, without = {}, {}
    for name, p in model.named_parameters():
        g = p.grad.detach().double()
        gc = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True) if g.dim() >= 2 else g
        with_gc[name], without[name] = p.detach().double() - gc, p.detach().double() - g
    return with_gc, without


def report(script: str, rank: int, named_params) -> None:
    with_gc, without = _oracle()
    params = {name: p.detach().cpu().double() for name, p in named_params}
    assert set(params) == set(with_gc), (sorted(params), sorted(with_gc))
    gc_err = max(float((params[n] - with_gc[n]).abs().max()) for n in with_gc)
    raw_err = max(float((params[n] - without[n]).abs().max()) for n in without)
    loaded = any(name == "dist_gc" or name.startswith("dist_gc.") for name in sys.modules)
    print(f"USER-SCRIPT-CHECK script={script} rank={rank} gc_err={gc_err:.3e} raw_err={raw_err:.3e} "
          f"dist_gc_loaded={loaded}", flush=True)
