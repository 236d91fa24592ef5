"""An unmodified Lightning script: DDP on 2 CPU processes (Lightning starts rank 1 itself).

Fits three times in one process group (each fit a fresh model and one SGD(lr=1)
step), each reported against the oracle: DDP with ``automatic`` optimization
(Lightning steps ``optimizer.step(closure)``), DDP with ``manual`` optimization
(``self.optimizers().step()`` in ``training_step``), and ``ModelParallelStrategy``
(FSDP2: ``fully_shard`` in ``configure_model``, data-parallel size 2) with automatic
optimization. ``--callback`` adds dist_gc's callback explicitly to the
manual fit (the automatic one then gets it from the launcher wrapper, if any).

``--strategy deepspeed|fsdp --accelerator gpu --devices N`` instead runs one fit
(automatic optimization) with Lightning's DeepSpeed (ZeRO-2) or FSDP strategy, which
Lightning runs on CUDA only.
"""

import argparse
import os

import lightning.pytorch as pl
import torch
from torch import nn

import _check

parser = argparse.ArgumentParser()
parser.add_argument("--output-dir", required=True)
parser.add_argument("--callback", action="store_true")
parser.add_argument("--strategy", choices=("default", "deepspeed", "fsdp"), default="default")
parser.add_argument("--accelerator", default="cpu")
parser.add_argument("--devices", type=int, default=2)
args = parser.parse_args()


class Module(pl.LightningModule):
    def __init__(self, automatic: bool, fsdp2: bool = False):
        super().__init__()
        self.net = _check.make_model()
        self.automatic_optimization = automatic
        self.fsdp2 = fsdp2

    def configure_model(self):
        if self.fsdp2:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def fit(automatic: bool, callbacks: list, fsdp2: bool = False, strategy: str = "ddp") -> None:
    x, y = _check.global_batch()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=_check.GLOBAL_BATCH // args.devices)
    name = f"lightning_{strategy}" if strategy != "ddp" else "lightning_fsdp2" if fsdp2 else "lightning_automatic" if automatic else "lightning_manual"
    if fsdp2:
        strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy, max_steps=1, callbacks=callbacks,
                         logger=pl.loggers.CSVLogger(args.output_dir, name=name),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    module = Module(automatic, fsdp2)
    trainer.fit(module, loader)  # Lightning's DistributedSampler: the 2 ranks cover the global batch once
    if args.strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):
            full = [(n.replace("_fsdp_wrapped_module.", "").removeprefix("net."), p.detach().clone())
                    for n, p in module.named_parameters()]
    else:
        full = [(n.removeprefix("net."), p.full_tensor() if hasattr(p, "full_tensor") else p) for n, p in module.named_parameters()]
    _check.report(name, trainer.global_rank, full)
    if trainer.global_rank == 0:
        keys = sorted(k for k in trainer.logged_metrics if k.startswith("gc/"))
        print(f"[{name}] callbacks={[type(c).__name__ for c in trainer.callbacks]} logged={keys}", flush=True)


if args.strategy != "default":
    fit(True, [], strategy=args.strategy)
else:
    fit(True, [])
    extra = []
    if args.callback:
        from dist_gc.integrations.lightning import DistGCCallback

        extra = [DistGCCallback(config={"mode": "channel", "full_stats": True})]
    fit(False, extra)
    fit(True, [], fsdp2=True)
