"""``--verify``: one real distributed step checked against the single-process oracle.

The step: a fresh copy of the model (same seed), ``torch.optim.SGD(lr=1)`` (no
momentum, no weight decay) so that ``params_before - params_after`` IS the final
gradient, GC attached exactly as in training, the engine's own clipping. Then, in one
process, the oracle: the same parameters, the concatenated global batch (every rank's
micro-batch, in rank order), the mean loss (what data parallelism averages), the same
clipping rule, then ``dist_gc.centralize_`` on each full tensor. The max difference must
be <= 1e-5 (fp32).

Also reported: how much GC changed the update, and the error a naive implementation
makes (GC of the tensors the optimizer holds, dim 0 and only when ``dim() > 1``: a
no-op on ZeRO's 1-D flat shards, wrong on GPT-2's ``Conv1D``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..core.centralize import centralize_
from ..core.config import GCConfig
from ..core.select import clean_name
from ..engine.layout import TensorLayout, Whole
from ..planner import plan
from . import common
from .tasks import Task

__all__ = ["TOLERANCE", "VerifyResult", "verify_step"]

TOLERANCE = 1e-5


@dataclass
class VerifyResult:
    error: float
    """max |update - oracle|"""
    gc_effect: float
    """max |oracle - oracle without GC|: how much GC changed the update"""
    naive_error: float
    """max |naive GC update - oracle|"""
    naive_label: str
    clip_note: str = "no clipping"

    @property
    def ok(self) -> bool:
        return self.error <= TOLERANCE

    def message(self) -> str:
        return (
            f"verify: max |update - oracle| = {self.error:.3e} (tolerance {TOLERANCE:g}) "
            f"{'OK' if self.ok else 'FAILED'} ({self.clip_note}); GC changed the update by up to {self.gc_effect:.3e}; "
            f"naive GC ({self.naive_label}) would be off by {self.naive_error:.3e}"
        )


# --------------------------------------------------------------------------- parameters
def _gathered(accelerator: Any, module: nn.Module):
    """Context in which ``module``'s parameters are full tensors on every rank. Under
    ZeRO-3 each rank holds only a partition; GatheredParameters all-gathers them
    (a collective: every rank must enter it)."""
    if common.zero_stage(accelerator) == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def full_params(accelerator: Any, model: Any, names: set[str]) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of the parameters ``names`` (the user's parameter names),
    whatever the engine shards. Collective: every rank must call it."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        # FSDP1 FlatParameter shards / FSDP2 DTensors: torch's full state dict all-gathers
        # them (on every rank) under the user's names, wrapper prefixes removed.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        full = {clean_name(k): v for k, v in state.items()}
    else:
        module = accelerator.unwrap_model(model)
        with _gathered(accelerator, module):
            full = {clean_name(n): p.detach().float().cpu().clone() for n, p in module.named_parameters()}
    missing = names - full.keys()
    if missing:
        raise RuntimeError(f"verify: could not gather parameters {sorted(missing)[:5]}")
    return {n: full[n].detach().float().cpu().clone() for n in names}


# --------------------------------------------------------------------------- oracle
def _output_dim(module: nn.Module) -> int:
    """Output dim written out independently of dist_gc's detection: HF ``Conv1D``
    (GPT-2) stores ``(in, out)``; transposed convs ``(in, out/groups, *k)``."""
    kind = type(module).__name__
    if kind == "Conv1D":
        return -1
    if kind.startswith("ConvTranspose"):
        return 1
    return 0


def oracle_gradients(task: Task, before: dict[str, torch.Tensor], batch: dict, clip: float | None) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    """Gradients (fp64) of the mean loss on the global batch at ``before``, clipped by
    the engine's rule ``g * min(1, clip / (||g|| + 1e-6))`` over all gradients; and a
    note saying whether clipping was active."""
    model = task.build_model()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    loss, _, _ = task.forward(model, batch)
    loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    if clip is None:
        return model, grads, "no clipping"
    total = float(torch.sqrt(sum((g * g).sum() for g in grads.values())))
    scale = min(1.0, clip / (total + 1e-6))
    note = f"clipping {'active' if scale < 1 else 'inactive'}: grad norm {total:.3g}, max {clip:g}"
    return model, {n: g * scale for n, g in grads.items()}, note


def centralized(model: nn.Module, grads: dict[str, torch.Tensor], config: GCConfig) -> dict[str, torch.Tensor]:
    """Full-tensor GC of the selected tensors with ``dist_gc.centralize_``."""
    dims = {f"{mn}.{pn}" if mn else pn: _output_dim(m) for mn, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
    layouts = [TensorLayout(n, tuple(g.shape), Whole(k)) for k, (n, g) in enumerate(grads.items())]
    targets = plan(layouts, config, dims).targets
    out = dict(grads)
    for n, t in targets.items():
        if t.geometry is not None:
            out[n] = centralize_(grads[n].clone(), mode=config.mode, output_dim=dims.get(n, 0))
    return out


def naive(grads: dict[str, torch.Tensor], sharded: bool) -> dict[str, torch.Tensor]:
    """What per-tensor GC inside ``optimizer.step`` does: nothing on 1-D flat shards
    (ZeRO), else dim 0 of every tensor with ``dim() > 1``."""
    if sharded:
        return dict(grads)
    return {n: (g - g.mean(tuple(range(1, g.dim())), keepdim=True)) if g.dim() > 1 else g for n, g in grads.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


# --------------------------------------------------------------------------- the step
def verify_step(accelerator: Any, task: Task, *, batch_size: int, seed: int, gc_config: GCConfig, max_grad_norm: float | None) -> VerifyResult:
    """One SGD(lr=1) step with GC attached by ``common.attach_gc`` (as training does),
    compared with the oracle. Collective: every rank calls it; every rank returns the
    same result."""
    from accelerate.utils import set_seed

    set_seed(seed)
    model = task.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = common.make_loader(task.train_set, batch_size, seed)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    handle = common.attach_gc(accelerator, optimizer, model, gc_config)
    if not handle.enabled:
        raise SystemExit("error: --verify needs GC enabled (the DeepSpeed JSON's gradient_centralization block is absent or disabled)")
    clip = common.engine_clip(accelerator, max_grad_norm)

    names = {n for n, _ in task.build_model().named_parameters()}
    before = full_params(accelerator, model, names)
    batch = next(iter(loader))
    model.train()
    loss, _, _ = task.forward(model, batch)
    accelerator.backward(loss)  # under DeepSpeed this also runs engine.step (clip, GC, update)
    if clip is not None and not common.is_deepspeed(accelerator):
        accelerator.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad()
    after = full_params(accelerator, model, names)
    global_batch = {k: v.cpu() for k, v in accelerator.gather(batch).items()}  # every rank's micro-batch, in rank order

    update = {n: before[n].double() - after[n].double() for n in before}
    oracle_model, grads, clip_note = oracle_gradients(task, before, global_batch, clip)
    expected = centralized(oracle_model, grads, gc_config)
    sharded = (common.zero_stage(accelerator) or 0) > 0
    result = VerifyResult(
        error=max_diff(update, expected),
        gc_effect=max_diff(grads, expected),
        naive_error=max_diff(naive(grads, sharded), expected),
        naive_label="no-op on ZeRO's 1-D flat shards" if sharded else "dim 0 of every >= 2-D tensor",
        clip_note=clip_note,
    )
    handle.remove()
    accelerator.free_memory(model, optimizer, loader)  # the training run prepares its own
    return result
