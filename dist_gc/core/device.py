"""Device-dependent choices in one place, with a test-only switch that makes the CPU
take the accelerator's branches.

Some choices depend on where tensors live: chunk sizes and mixed-dtype kernels
(:mod:`dist_gc.core.centralize`), batching fp32 tensors and the fused kernel backend
(:mod:`dist_gc.engine.engine`), and the device a process group communicates on
(:func:`dist_gc.engine.collectives.comm_device`). So that no branch ships unexecuted on
a machine without a GPU, ``DIST_GC_TEST_PRETEND_ACCELERATOR=1`` (tests only; read at
each call, inherited by spawned ranks) makes CPU tensors take the CUDA branches, with
the CPU standing in for the CUDA device and, for collectives, for NCCL's device. The
results must not change: tests run adapters under it against the oracle.
"""

from __future__ import annotations

import os

import torch

__all__ = ["pretend_accelerator", "on_accelerator", "accelerator_device"]

PRETEND_ENV = "DIST_GC_TEST_PRETEND_ACCELERATOR"


def pretend_accelerator() -> bool:
    """Whether the test-only switch is on."""
    return os.environ.get(PRETEND_ENV) == "1"


def on_accelerator(device: torch.device | None) -> bool:
    """Whether tensors on ``device`` take the accelerator's branches (``None``: the CPU)."""
    if device is not None and device.type != "cpu":
        return True
    return pretend_accelerator()


def accelerator_device() -> torch.device:
    """The current CUDA device (the CPU standing in for it under the test switch)."""
    if pretend_accelerator() and not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
