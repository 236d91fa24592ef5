"""The few collective helpers every layer shares: which device a group communicates on,
and "raise on every rank when any rank found a problem" (never a hang)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..core.device import accelerator_device, pretend_accelerator

__all__ = ["comm_device", "raise_on_every_rank"]


def comm_device(group: Any = None, prefer: torch.device | None = None) -> torch.device:
    """The device tensors must live on for collectives over ``group``: the current CUDA
    device for NCCL, the CPU for gloo (and any other backend).

    A group with one backend per device type (``"cpu:gloo,cuda:nccl"``, what
    ``init_process_group("cpu:gloo,cuda:nccl")`` or a device-less ``init_device_mesh``
    gives) communicates on either: ``prefer`` (where the data already is) is kept when
    the group has a backend for its type, else the CUDA device when it has one."""
    backend = str(dist.get_backend(group))
    if pretend_accelerator():
        backend = "nccl"  # test-only: take NCCL's branch, the CPU standing in for its device
    if ":" in backend:
        types = {part.split(":", 1)[0] for part in backend.split(",")}
        if prefer is not None and prefer.type in types:
            return prefer
        return accelerator_device() if "cuda" in types else torch.device("cpu")
    return accelerator_device() if backend == "nccl" else torch.device("cpu")


def raise_on_every_rank(errors: Sequence[str], group: Any, message: str, *, exc: type[Exception] = RuntimeError, limit: int = 5) -> None:
    """One MAX all-reduce of an error flag over ``group``; then every rank raises
    ``exc(message: details)`` if any rank had ``errors``, or none does.

    Every rank of ``group`` must call it (it is a collective), with or without errors.
    A rank without errors of its own says the problem is on another rank."""
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([1 if errors else 0], dtype=torch.int64, device=comm_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        failed = bool(flag.item())
    else:
        failed = bool(errors)
    if failed:
        if errors:
            detail = "; ".join(errors[:limit]) + (f" (+{len(errors) - limit} more)" if len(errors) > limit else "")
        else:
            detail = "on another rank"
        raise exc(f"{message} ({detail})")
