"""Shared pieces of the FSDP1/FSDP2 tests: oracle gradients, negative-control hooks,
and the parent-side checks. Everything here is independent of dist_gc's layouts."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from tests.oracle import naive_centralize, oracle_step

#: fp32 bar: absolute error of every parameter after one SGD(lr=1) step.
FP32_TOL = dict(rtol=0.0, atol=1e-5)
#: A negative control must miss the oracle by far more than the tolerance.
FAR = 100 * FP32_TOL["atol"]
#: GC must change each >= 2-D tensor's update by at least this.
MATTERS = FAR


def oracle_grads(model: torch.nn.Module, loss_fn: Callable, dims: dict[str, int], mode: str | None, clip: float | None = None) -> dict[str, torch.Tensor]:
    """The update ``W - W_new`` of the single-process oracle (fp64): the global-batch
    gradient, clipped, then centralized (``mode=None``: no GC)."""
    new = oracle_step(model, loss_fn, dims if mode else {}, mode or "channel", clip)
    return {n: p.detach().double() - new[n] for n, p in model.named_parameters()}


def oracle_params(model: torch.nn.Module, loss_fn: Callable, dims: dict[str, int], mode: str, clip: float | None = None, gc_before_clip: bool = False) -> dict[str, torch.Tensor]:
    return oracle_step(model, loss_fn, dims, mode, clip, gc_before_clip=gc_before_clip)


def oracle_norm(model: torch.nn.Module, loss_fn: Callable) -> float:
    g = oracle_grads(model, loss_fn, {}, None)
    return math.sqrt(sum(float(x.pow(2).sum()) for x in g.values()))


def centralize_like_oracle(grads: dict[str, torch.Tensor], dims: dict[str, int], mode: str) -> dict[str, torch.Tensor]:
    """The oracle's GC formula applied to given full gradients (fp64)."""
    from tests.oracle import oracle_centralize

    return {n: oracle_centralize(g, mode, dims[n]) if n in dims else g.double() for n, g in grads.items()}


def naive_hook(kind: str) -> Callable:
    """A step pre-hook doing what peer implementations do to the gradients the optimizer
    is handed: ``"naive"`` — dim-0 GC when ``grad.dim() > 1`` (a no-op on FSDP1's 1-D
    shards); ``"forced"`` — GC forced onto every gradient as if it were one tensor
    (``g -= g.mean()``); ``"local"`` — naive GC on a DTensor's local shard."""

    @torch.no_grad()
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if kind == "local":
                    g = g.to_local() if hasattr(g, "to_local") else g
                if g.numel() == 0:
                    continue
                if kind == "forced":
                    g.sub_(g.float().mean().to(g.dtype))
                else:
                    g.copy_(naive_centralize(g))

    return hook


def snapshot_hook(store: dict[int, torch.Tensor]) -> Callable:
    """A step pre-hook (registered after GC's) that copies the gradients the update will
    use, so a test can read them out exactly (no update rounding)."""

    @torch.no_grad()
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    store[id(p)] = p.grad.detach().clone()

    return hook


def max_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max(float((got[n].double() - want[n].double()).abs().max()) if want[n].numel() else 0.0 for n in want)


def assert_matches(case: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], **tol: float) -> None:
    assert set(got) == set(want), f"{case}: parameter names differ: {sorted(set(got) ^ set(want))}"
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], **tol, msg=lambda m, n=n: f"{case}: {n}: {m}")


def assert_fails(case: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    err = max_err(got, want)
    assert err > FAR, f"{case}: negative control matched the oracle (max err {err:.2e} <= {FAR:.0e}); the test cannot fail"
    return err


def assert_gc_matters(model_name: str, with_gc: dict[str, torch.Tensor], without: dict[str, torch.Tensor], dims: dict[str, int]) -> None:
    """GC must change every >= 2-D tensor's update by far more than the tolerance, so
    that a no-op cannot pass. (Why the test models use MSE and RMSNorm: a softmax or
    LayerNorm makes the gradient w.r.t. their input sum to zero over features, which
    makes GC an exact no-op on the layer before them.)"""
    for n in dims:
        diff = float((with_gc[n] - without[n]).abs().max())
        assert diff > MATTERS, f"{model_name}: GC changes {n} by only {diff:.2e}; the test could not tell GC from a no-op"



def check_mixed_precision(case_id: str, gc: dict, none: dict, dims: dict[str, int], mode: str, fp32_grads: dict) -> None:
    """GC exactness isolated from bf16 compute: the run without GC gives the engine's
    own reduced gradient G (same bf16 computation); the GC run must equal the oracle
    formula applied to G. Separately, G must be the fp32 oracle gradient up to bf16
    compute error."""
    want = centralize_like_oracle(none["grads"], dims, mode)
    if gc["grad_dtype"] == "torch.float32":
        # GC itself runs on fp32 gradients (FSDP1 casts them back to the fp32 master
        # dtype; FSDP2 keeps them in the sharded parameter's dtype): fp32 statistics,
        # fp32 result -> the fp32 bar.
        tols = {n: FP32_TOL["atol"] for n in want}
    else:
        # bf16 gradients: means accumulated in fp32 (error ~1e-7 relative), the result
        # rounded once to bf16: |err| <= u * |G - mean| with unit roundoff
        # u = eps_bf16 / 2 = 2**-8. Bound it by eps_bf16 * max|G| (2x margin).
        eps = torch.finfo(torch.bfloat16).eps
        tols = {n: eps * float(none["grads"][n].abs().max()) for n in want}
    for n in want:
        torch.testing.assert_close(gc["grads"][n], want[n], rtol=0, atol=tols[n], msg=lambda m, n=n: f"{case_id}: {n}: {m}")
    # Negative control on the same computation: naive GC is a no-op on 1-D shards
    # (FSDP1) — the run without GC; it must miss by far more than the tolerance.
    miss = max(float((none["grads"][n] - want[n]).abs().max()) / tols[n] for n in want)
    assert miss > 10, f"{case_id}: no GC is within {miss:.1f}x the tolerance; the test cannot fail"
    # bf16 compute (params, activations and their gradients rounded to bf16, unit
    # roundoff u = 2**-8) through 6 layers forward and backward: relative gradient error
    # up to ~12 roundings ~ 12 u of the largest gradient; the bf16 reduction adds one
    # more rounding per rank. Bound: 16 u * max|G| per tensor.
    u = torch.finfo(torch.bfloat16).eps / 2
    for n, g in fp32_grads.items():
        tol = 16 * u * float(g.abs().max()) + 1e-6
        torch.testing.assert_close(none["grads"][n], g, rtol=0, atol=tol, msg=lambda m, n=n: f"{case_id} (no GC vs fp32 oracle): {n}: {m}")
