"""Fused multi-tensor GC kernels: one call per step for every tensor of the step.

Each backend takes the step's :class:`~dist_gc.kernels.table.KernelItem` s with one
contiguous 1-D view per item (``source.view(-1)[start : start + numel]``) and offers:

``accumulate(items, views, sums, fuse)``
    adds each item's partial channel sums into the fp32 ``sums`` buffer
    (``sums[sum_start + i0*k2 + i2]``, zeroed by the caller). With ``fuse``, for
    ``final`` items it instead writes the means (sums / ``count``) into those slots and
    subtracts them from the view in place, in fp32, rounded once to the view's dtype.
``subtract(items, views, means)``
    ``view -= means[sum_start + i0*k2 + i2]`` in fp32, rounded once.

Backends: ``cpu`` (a C++/OpenMP extension JIT-built once and cached, :mod:`.cpu`),
``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``, :mod:`.triton`). The engine
falls back to its torch ops (``kernel="torch"``) for anything a backend does not take.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from ..core.device import on_accelerator
from .table import KernelItem

__all__ = ["KERNELS", "KERNEL_ENV", "resolve_kernel", "select_backend", "Bound"]

#: ``GCEngine(kernel=...)`` / ``DIST_GC_KERNEL``: ``auto`` (the fused kernel of the
#: gradients' device when it is available, else torch ops), ``torch`` (torch ops only),
#: ``cpu`` or ``triton`` (that backend, or an error when it cannot run here).
KERNELS = ("auto", "torch", "cpu", "triton")
KERNEL_ENV = "DIST_GC_KERNEL"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_kernel(kernel: str | None) -> str:
    """``kernel``, else ``$DIST_GC_KERNEL``, else ``"auto"``; raises ``ValueError`` naming
    the value and the allowed ones."""
    raw = kernel if kernel is not None else (os.environ.get(KERNEL_ENV) or "auto")  # (an empty variable is unset)
    value = raw.strip().lower() if isinstance(raw, str) else raw
    if value not in KERNELS:
        src = "kernel=" if kernel is not None else f"{KERNEL_ENV}="
        raise ValueError(f"dist_gc: {src}{raw!r} is not a kernel backend (allowed: {', '.join(KERNELS)})")
    return value


def _triton_runs_on(device: torch.device) -> bool:
    from . import triton as triton_backend  # (imports triton itself only when asked: False without it)

    return triton_backend.available(device)


def select_backend(kernel: str, device: torch.device, dtypes: Sequence[torch.dtype]) -> str | None:
    """The backend for one step's gradients (all on ``device``), or ``None`` for torch ops.

    ``auto``: ``cpu`` for CPU tensors when its library builds, ``triton`` for CUDA
    tensors (and for CPU tensors under the test switch with ``TRITON_INTERPRET=1``)
    when triton is importable; torch ops for fp64 gradients. An explicit ``cpu`` or
    ``triton`` that cannot run raises ``RuntimeError`` saying why."""
    if kernel == "torch":
        return None
    if any(d not in KERNEL_DTYPES for d in dtypes):
        if kernel == "auto":
            return None
        raise RuntimeError(f"dist_gc: kernel={kernel!r} takes fp32/bf16/fp16 gradients, not {sorted({str(d) for d in dtypes})}; use kernel='auto'")
    want = kernel
    if kernel == "auto":
        want = "triton" if on_accelerator(device) else "cpu"
    if want == "cpu":
        from . import cpu

        if device.type == "cpu" and cpu.available():
            return "cpu"
        why = f"the gradients are on {device}" if device.type != "cpu" else f"its library did not build ({cpu.error()})"
    else:
        if _triton_runs_on(device):
            return "triton"
        why = f"triton cannot run on {device} here (not installed, no CUDA, or CPU tensors without TRITON_INTERPRET=1)"
    if kernel == "auto":
        return None
    raise RuntimeError(f"dist_gc: kernel={kernel!r} cannot run: {why}; use kernel='auto' or 'torch'")


class Bound:
    """A backend bound to one step's items and dtypes (static columns built once):
    ``accumulate`` runs over every item (fused: final ones are centralized there),
    ``subtract`` over the others."""

    def __init__(self, backend: str, items: Sequence[KernelItem], dtypes: Sequence[torch.dtype]) -> None:
        self.backend, self.items = backend, tuple(items)
        self._later = [k for k, it in enumerate(self.items) if not it.final]
        later = [self.items[k] for k in self._later]
        if backend == "cpu":
            from . import cpu

            self._mod = cpu
            self._all, self._sub = cpu.Table(self.items, dtypes), cpu.Table(later, [dtypes[k] for k in self._later])
        else:
            from . import triton as triton_backend

            self._mod, self._all, self._sub = triton_backend, self.items, tuple(later)

    def accumulate(self, views: Sequence[torch.Tensor], sums: torch.Tensor) -> None:
        """Partial sums into ``sums`` (zeroed), final items centralized."""
        self._mod.accumulate(self._all, views, sums, True)

    def subtract(self, views: Sequence[torch.Tensor], means: torch.Tensor) -> None:
        """The non-final items (``views`` as given to :meth:`accumulate`)."""
        if self._later:
            self._mod.subtract(self._sub, [views[k] for k in self._later], means)
