"""An unmodified raw-DeepSpeed user script (ZeRO-2, its JSON holds the GC block).

    deepspeed --num_gpus 2 ds_zero2.py          # or torchrun / accelerate launch
"""

import argparse
import os

import deepspeed
import torch
from torch import nn

import _check

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", "--local-rank", type=int, default=-1)  # the deepspeed launcher passes it
parser.add_argument("--deepspeed_config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_zero2.json"))
args = parser.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
model = _check.make_model()
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=args.deepspeed_config)
x, y = _check.local_batch(rank, world)
engine.backward(nn.functional.cross_entropy(engine(x), y))
engine.step()
_check.report("ds_zero2", rank, engine.module.named_parameters())
print(f"[ds_zero2] rank={rank} world={world} local_rank_arg={args.local_rank}", flush=True)
