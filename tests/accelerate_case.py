"""One training step under ``accelerate launch``, compared with the single-process oracle.

Run by ``tests/test_accelerate.py`` as ``accelerate launch --config_file <yaml>
tests/accelerate_case.py <out.json> <case json>``; every rank builds the same model,
prepares it with accelerate, attaches GC with ``dist_gc.accelerate.attach`` (or the
transformers ``Trainer`` callback), takes one SGD(lr=1) step on its slice of the global
batch, and rank 0 writes the max error of the full updated parameters against
:func:`tests.oracle.oracle_step`, the naive-GC and no-GC errors (negative controls) and
the GC stats.

Case keys: ``mode`` (GC mode, for non-DeepSpeed runs; DeepSpeed reads its JSON block),
``clip`` (max norm; DeepSpeed reads ``gradient_clipping`` from its JSON), ``accum``
(gradient accumulation steps), ``trainer`` (use ``transformers.Trainer`` + the callback).
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dist_gc  # noqa: E402
import dist_gc.accelerate  # noqa: E402
from tests.models import GLOBAL_BATCH, GCTestNet, local_slice, loss_on, make_batch, make_model  # noqa: E402
from tests.oracle import naive_centralize, oracle_step  # noqa: E402


def full_params(accelerator, model) -> dict[str, torch.Tensor]:
    """Every parameter, whole, as fp64 (ZeRO-3 partitions gathered by DeepSpeed)."""
    module = accelerator.unwrap_model(model)
    if dist_gc.accelerate.uses_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {n: p.detach().double().clone() for n, p in module.named_parameters()}
    return {n: p.detach().double().clone() for n, p in module.named_parameters()}


def train_one_step(accelerator, model, optimizer, case: dict) -> None:
    """One optimizer step on this rank's slice of the global batch, in ``accum``
    micro-batches (accelerate divides each loss by the accumulation steps)."""
    accum = case.get("accum", 1)
    images, tokens, labels = local_slice(make_batch(), accelerator.process_index, accelerator.num_processes)
    n = images.shape[0] // accum
    for k in range(accum):
        micro = tuple(t[k * n : (k + 1) * n] for t in (images, tokens, labels))
        with accelerator.accumulate(model):
            loss = loss_on(model, micro)
            accelerator.backward(loss)
            if accelerator.sync_gradients and case.get("clip") and not dist_gc.accelerate.uses_deepspeed(accelerator):
                accelerator.clip_grad_norm_(model.parameters(), case["clip"])
            optimizer.step()  # GC runs here (DeepSpeed: inside backward's engine.step; this is a no-op)
            optimizer.zero_grad()


def run_plain(case: dict):
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=case.get("accum", 1), **dist_gc.accelerate.accelerator_kwargs())
    gc_config = None if dist_gc.accelerate.uses_deepspeed(accelerator) else {"mode": case["mode"]}
    dist_gc.accelerate.read_config(accelerator, gc_config)  # fail fast, before prepare
    if dist_gc.accelerate.uses_deepspeed(accelerator):  # no dataloader to infer it from
        micro = GLOBAL_BATCH // accelerator.num_processes // case.get("accum", 1)
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
    model = make_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = full_params(accelerator, model)
    if case.get("check_errors"):
        check_errors(accelerator, optimizer)
    handle = dist_gc.accelerate.attach(accelerator, optimizer, model, config=gc_config)
    train_one_step(accelerator, model, optimizer, case)
    return accelerator, model, handle, before


def check_errors(accelerator, optimizer) -> None:
    """Misuse fails loudly, on every rank, before any collective."""
    import pytest

    if dist_gc.accelerate.uses_deepspeed(accelerator):
        with pytest.raises(ValueError, match="gradient_centralization"):
            dist_gc.accelerate.attach(accelerator, optimizer, config={"mode": "tensor"})  # two sources of truth
        with pytest.raises(ValueError, match="model="):
            dist_gc.attach(optimizer)  # the wrapper alone does not say which engine steps
    with pytest.raises(ValueError, match="unknown gradient centralization key"):
        dist_gc.attach(optimizer, config={"mdoe": "tensor"})


def run_trainer(case: dict, out_dir: str):
    """A ``transformers.Trainer`` user: DeepSpeed JSON with the block + one callback."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from dist_gc.integrations.transformers import DistGCCallback

    class Batch(Dataset):
        def __init__(self) -> None:
            self.images, self.tokens, self.labels = make_batch()

        def __len__(self) -> int:
            return GLOBAL_BATCH

        def __getitem__(self, i: int) -> dict:
            return {"images": self.images[i], "tokens": self.tokens[i], "labels": self.labels[i]}

    class Wrapped(GCTestNet):
        def forward(self, images, tokens, labels):  # Trainer reads outputs["loss"]
            forward = lambda i, t: GCTestNet.forward(self, i, t)  # noqa: E731
            return {"loss": loss_on(forward, (images, tokens, labels))}

    torch.manual_seed(0)
    model = Wrapped()
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=GLOBAL_BATCH // int(os.environ["WORLD_SIZE"]), max_steps=1,
        learning_rate=1.0, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
        deepspeed=case["ds_config"], report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        dataloader_drop_last=False, seed=0, data_seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Batch())
    callback = DistGCCallback(trainer)
    trainer.add_callback(callback)
    # The Trainer shuffles; feed the global batch in order so rank r gets slice r as the
    # oracle assumes (sequential sampler, each rank a contiguous slice).
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    trainer.train()
    return trainer.accelerator, trainer.model_wrapped, callback.handle, before


def main() -> None:
    out, case = sys.argv[1], json.loads(sys.argv[2])
    if case.get("trainer"):
        accelerator, model, handle, before = run_trainer(case, os.path.dirname(out))
    else:
        accelerator, model, handle, before = run_plain(case)
    after = full_params(accelerator, model)
    # (the Trainer callback has removed its hook when training ended: binding stays)
    attached = handle is not None and handle.description is not None
    stats = handle.stats.as_dict() if attached else None
    engine = handle.label if attached else None
    if accelerator.is_main_process:
        ref = make_model(0)
        for n, p in ref.named_parameters():
            torch.testing.assert_close(p.detach().double(), before[n], rtol=0, atol=0)  # same start everywhere
        batch = make_batch()
        fn = lambda m: loss_on(m, batch)  # noqa: E731
        mode = case["mode"]
        expect = oracle_step(ref, fn, GCTestNet.OUTPUT_DIMS, mode, clip=case.get("clip"))
        no_gc = oracle_step(ref, fn, {}, mode, clip=case.get("clip"))
        err = {n: float((after[n] - expect[n]).abs().max()) for n in expect}
        err_no_gc = {n: float((after[n] - no_gc[n]).abs().max()) for n in GCTestNet.OUTPUT_DIMS}
        # Naive GC (dim 0 on whatever the optimizer holds) applied to the oracle's raw update.
        naive = {n: float((after[n] - (before[n] - naive_centralize(before[n] - no_gc[n]))).abs().max()) for n in GCTestNet.OUTPUT_DIMS}
        with open(out, "w") as f:
            json.dump({"err": err, "err_no_gc": err_no_gc, "err_naive": naive, "stats": stats, "engine": engine,
                       "world": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type)}, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
