"""An unmodified Hugging Face Trainer script: ZeRO-3 through TrainingArguments(deepspeed=...),
TensorBoard logging; it saves trainer.state.log_history as JSON next to its outputs.

    torchrun --nproc_per_node 2 hf_trainer_zero3.py --output-dir out
"""

import argparse
import json
import os

import deepspeed
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

import _check

parser = argparse.ArgumentParser()
parser.add_argument("--output-dir", required=True)
parser.add_argument("--local_rank", "--local-rank", type=int, default=-1)
args = parser.parse_args()
here = os.path.dirname(os.path.abspath(__file__))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _check.make_model()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _check.global_batch()

    def __len__(self):
        return _check.GLOBAL_BATCH

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


world = int(os.environ.get("WORLD_SIZE", "1"))
training_args = TrainingArguments(
    output_dir=args.output_dir, max_steps=1, logging_steps=1, per_device_train_batch_size=_check.GLOBAL_BATCH // world,
    optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
    deepspeed=os.path.join(here, "hf_zero3.json"), report_to=["tensorboard"], save_strategy="no",
    disable_tqdm=True, seed=0, use_cpu=True,
)
trainer = Trainer(model=Net(), args=training_args, train_dataset=Data())
trainer.train()
# One step over the whole dataset: whatever order the sampler chose, the ranks' slices
# cover the global batch once, so the averaged gradient is the global batch's.
engine = trainer.model_wrapped
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
    _check.report("hf_trainer_zero3", trainer.args.process_index,
                  [(n.removeprefix("net."), p) for n, p in engine.module.named_parameters()])
if trainer.is_world_process_zero():
    with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
        json.dump(trainer.state.log_history, f)
