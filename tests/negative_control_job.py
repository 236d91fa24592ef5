"""The main job with a WRONG GC, for the negative control of ``--verify``.

Launched like ``dist_gc.cli.train`` (``accelerate launch ... tests/negative_control_job.py
--verify-only``), it swaps the job's GC for the naive one peers ship — GC of whatever
tensors the stepping optimizer holds: dim 0 of tensors with ``dim() > 1``, one mean
over each 1-D tensor (ZeRO's flat partitions, the biases) — so ``--verify`` must report
a large error and exit non-zero. Test-only code: it is not part of the package.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_gc.cli import common, train


class _WrongGC:
    enabled = True

    def __init__(self, hook_handle: Any) -> None:
        self._hook_handle = hook_handle

    def remove(self) -> None:
        self._hook_handle.remove()


def stepping_optimizer(accelerator: Any, optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that really updates parameters: DeepSpeed's inner optimizer
    on its fp32 master partitions, or the one inside accelerate's AcceleratedOptimizer."""
    if common.is_deepspeed(accelerator):
        opt = accelerator.deepspeed_engine_wrapped.engine.optimizer
        return getattr(opt, "optimizer", opt)
    return getattr(optimizer, "optimizer", optimizer)


def attach_wrong_gc(accelerator: Any, optimizer: Any, model: Any, config: Any) -> _WrongGC:
    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad
                    g.sub_(g.mean(tuple(range(1, g.dim())), keepdim=True) if g.dim() > 1 else g.mean())

    return _WrongGC(stepping_optimizer(accelerator, optimizer).register_step_pre_hook(hook))


if __name__ == "__main__":
    common.attach_gc = attach_wrong_gc  # verify_step looks it up on the module
    train.main()
