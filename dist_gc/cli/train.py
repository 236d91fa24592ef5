"""The main job: train with gradient centralization on and off, under any launcher.

Run it under ``accelerate launch`` (or ``torchrun``; a single process also works)::

    accelerate launch --config_file dist_gc/configs/accelerate/multi_cpu.yaml --num_processes 2 \\
        -m dist_gc.cli.train --ab --verify

One script for CPU and GPU, DDP / DeepSpeed ZeRO / FSDP: the engine comes from the
accelerate config. GC settings come from ``--gc-config`` (JSON/YAML), or under DeepSpeed
from the DeepSpeed JSON's ``"gradient_centralization"`` block.

Outputs (``<output-dir>/<task>/``): ``tensorboard/`` (accelerate's tracker),
``metrics.jsonl`` (one JSON object per logged step), ``ab_curves.png`` (``--ab``),
``checkpoints/gc_<on|off>/step_<N>/`` (``--save-every``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .common import attach_gc, engine_clip, gc_accelerate, is_deepspeed, make_loader, resolve_gc_config, zero_stage
from .tasks import TASKS, Task, build_task

__all__ = ["main", "parse_args"]


# --------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dist-gc-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="cnn", help="cnn: digits CNN; gpt2/llama: tiny byte-level LMs")
    arm = p.add_mutually_exclusive_group()
    arm.add_argument("--ab", action="store_true", help="run GC on and GC off (same seed, same data order)")
    arm.add_argument("--gc", choices=("on", "off"), default="on", help="single run with GC on or off")
    p.add_argument("--gc-config", default=None, metavar="PATH",
                   help="GC settings file (JSON/YAML, e.g. dist_gc/configs/gc/channel.yaml); default: channel mode with "
                        "full stats. Under DeepSpeed the JSON's gradient_centralization block is used (giving both is an "
                        "error); a DeepSpeed config written in the accelerate YAML alone takes this file")
    p.add_argument("--steps", type=_positive, default=None, help="optimizer steps per arm (task default if unset)")
    p.add_argument("--batch-size", type=_positive, default=None, help="micro-batch per process (task default if unset)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (task default if unset)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="sgd (momentum 0.9) or adamw (task default if unset)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps, then cosine decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="gradient clipping (<= 0: off); under DeepSpeed the JSON's gradient_clipping applies")
    p.add_argument("--eval-every", type=_positive, default=25, help="evaluate on the test set every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs", help="outputs go to <output-dir>/<task>/")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint (accelerator.save_state) every N steps; 0: never")
    p.add_argument("--resume-from", default=None, metavar="PATH|latest",
                   help="checkpoint directory to resume from, or 'latest' (newest under checkpoints/gc_<arm>/)")
    p.add_argument("--stop-at", type=_positive, default=None, metavar="STEP",
                   help="stop after STEP steps (e.g. a time-limited job); the schedule still spans --steps, "
                        "so --resume-from continues as if never stopped")
    p.add_argument("--verify", action="store_true", help="check one step against the single-process oracle first")
    p.add_argument("--verify-only", action="store_true", help="like --verify, then exit without training")
    args = p.parse_args(argv)
    if args.verify_only:
        args.verify = True
    if args.resume_from not in (None, "latest") and args.ab:
        p.error("--resume-from PATH resumes one arm; use --gc on|off with it (or --resume-from latest with --ab)")
    if args.save_every < 0:
        p.error("--save-every must be >= 0")
    if args.gc_config is not None and not os.path.isfile(args.gc_config):
        p.error(f"--gc-config {args.gc_config!r}: no such file")
    return args


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# --------------------------------------------------------------------------- setup
def make_accelerator(run_dir: Path) -> Any:
    """An Accelerator for whatever launched us (accelerate launch with any config,
    torchrun, the deepspeed launcher, or one process), on GPUs or CPU only.

    Why ``dist_gc.accelerate.accelerator_kwargs()``: without a GPU, accelerate only goes
    multi-process when told ``cpu=True`` (plain torchrun does not say so), and then it
    never uses DeepSpeed; under DeepSpeed on CPU it needs the gloo backend instead."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir))
    return Accelerator(log_with="tensorboard", project_config=project, **gc_accelerate.accelerator_kwargs())


def fill_task_defaults(args: argparse.Namespace, task: Task) -> None:
    for key in ("steps", "batch_size", "lr", "optimizer"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(task, key))


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, num_processes: int) -> Any:
    """Linear warm-up, then cosine decay to 10%.

    Why ``* num_processes``: accelerate's prepared scheduler steps the wrapped one
    ``num_processes`` times per optimizer step (it assumes the schedule was written for
    one process seeing the global batch), so the horizon is counted in those steps."""
    warm, total = args.warmup * num_processes, max(1, args.steps * num_processes)

    def factor(k: int) -> float:
        if k < warm:
            return (k + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (k - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- checkpoints
def checkpoint_root(run_dir: Path, arm: str) -> Path:
    return run_dir / "checkpoints" / f"gc_{arm}"


def find_resume_dir(args: argparse.Namespace, run_dir: Path, arm: str) -> Path | None:
    """The checkpoint to resume this arm from (``None``: start fresh)."""
    if args.resume_from is None:
        return None
    if args.resume_from != "latest":
        path = Path(args.resume_from)
        if not (path / "dist_gc_step.json").is_file():
            raise SystemExit(f"error: --resume-from {path}: not a checkpoint written by this script (no dist_gc_step.json)")
        return path
    found = sorted(checkpoint_root(run_dir, arm).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    found = [p for p in found if (p / "dist_gc_step.json").is_file()]
    return found[-1] if found else None


def save_checkpoint(accelerator: Any, run_dir: Path, arm: str, step: int) -> Path:
    """``accelerator.save_state`` (model, optimizer, scheduler, every rank's RNG states)
    plus the step counter. Collective: every rank calls it."""
    path = checkpoint_root(run_dir, arm) / f"step_{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / "dist_gc_step.json").write_text(json.dumps({"step": step, "arm": arm}))
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator: Any, path: Path) -> int:
    accelerator.load_state(str(path))
    return int(json.loads((path / "dist_gc_step.json").read_text())["step"])


# --------------------------------------------------------------------------- training
def evaluate(accelerator: Any, model: Any, task: Task, batch_size: int) -> float:
    """Accuracy on the whole test set. Every rank runs every test batch (the test sets
    are small): under ZeRO-3 a forward pass is a collective, so all ranks must run it."""
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for batch in make_loader(task.test_set, batch_size * 4, 0, shuffle=False):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            _, h, n = task.forward(model, batch)
            hits, total = hits + int(h), total + int(n)
    model.train()
    return hits / max(1, total)


def epoch_batches(loader: Any, start_step: int, steps_per_epoch: int):
    """Yield ``(step, batch)`` from ``start_step`` on, epoch after epoch. On resume the
    batches already consumed in the current epoch are skipped with accelerate's
    ``skip_first_batches``, so the data order equals the uninterrupted run's."""
    from accelerate import skip_first_batches

    step = start_step
    while True:
        epoch, skip = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        for batch in skip_first_batches(loader, skip) if skip else loader:
            yield step, batch
            step += 1


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl`` and forwards the scalars
    to accelerate's trackers (main process only writes)."""

    def __init__(self, accelerator: Any, path: Path) -> None:
        self.accelerator, self.path = accelerator, path
        self.records: list[dict] = []

    def log(self, arm: str, step: int, values: dict) -> None:
        record = {"arm": f"gc_{arm}", "step": step, **values}
        self.records.append(record)
        self.accelerator.log({f"gc_{arm}/{k}": v for k, v in values.items()}, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def train_arm(accelerator: Any, task: Task, args: argparse.Namespace, arm: str, gc_config: Any, run_dir: Path, metrics: MetricsLog) -> None:
    """Train one arm (GC on or off) from scratch or from a checkpoint."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    set_seed(args.seed)  # same initial weights in both arms
    model = task.build_model()
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    scheduler = make_scheduler(optimizer, args, accelerator.num_processes)
    loader = make_loader(task.train_set, args.batch_size, args.seed)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    # GC off: simply not attached (under DeepSpeed the JSON block alone does nothing).
    handle = attach_gc(accelerator, optimizer, model, gc_config) if arm == "on" else None
    clip = engine_clip(accelerator, args.max_grad_norm)

    start = 0
    resume_dir = find_resume_dir(args, run_dir, arm)
    if resume_dir is not None:
        start = load_checkpoint(accelerator, resume_dir)
        accelerator.print(f"[gc {arm}] resumed from {resume_dir} at step {start}")
    bar = tqdm(total=args.steps, initial=start, desc=f"{task.name} gc {arm}", disable=not accelerator.is_main_process, dynamic_ncols=True)
    model.train()
    for step, batch in epoch_batches(loader, start, len(loader)):
        if step >= min(args.steps, args.stop_at or args.steps):
            break
        loss, hits, count = task.forward(model, batch)
        accelerator.backward(loss)  # DeepSpeed: also engine.step (clip, GC, update)
        if clip is not None and not is_deepspeed(accelerator):
            accelerator.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()  # GC runs in the stepping optimizer's pre-hook
        scheduler.step()
        optimizer.zero_grad()
        last_loss = log_step(accelerator, metrics, arm, step + 1, loss, hits, count, scheduler, handle)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            metrics.log(arm, step + 1, {"eval_accuracy": evaluate(accelerator, model, task, args.batch_size)})
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(accelerator, run_dir, arm, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
    bar.close()
    if handle is not None:
        handle.remove()
    accelerator.free_memory(model, optimizer, loader, scheduler)


def log_step(accelerator: Any, metrics: MetricsLog, arm: str, step: int, loss: torch.Tensor, hits: torch.Tensor, count: torch.Tensor, scheduler: Any, handle: Any) -> float:
    """Log the global (all-rank) loss and accuracy, the lr and GC's statistics; returns the loss."""
    totals = accelerator.reduce(torch.stack([loss.detach().float(), hits.float(), count.float()]).to(accelerator.device), "sum")
    values = {
        "loss": float(totals[0]) / accelerator.num_processes,
        "accuracy": float(totals[1] / totals[2]),
        "lr": float(scheduler.get_last_lr()[0]),
    }
    if handle is not None and handle.enabled:
        values.update({f"gc/{k}": v for k, v in handle.stats.as_dict().items()})
    metrics.log(arm, step, values)
    return values["loss"]


# --------------------------------------------------------------------------- plot
def plot_ab(records: list[dict], path: Path, task: str) -> None:
    """Loss, train accuracy and eval accuracy vs step, GC on vs off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm, style in (("gc_on", "-"), ("gc_off", "--")):
        for ax, key in zip(axes, ("loss", "accuracy", "eval_accuracy")):
            pts = [(r["step"], r[key]) for r in records if r["arm"] == arm and key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=arm.replace("_", " "), marker="o" if key == "eval_accuracy" else None)
            ax.set_title(key.replace("_", " ")), ax.set_xlabel("step"), ax.legend()
    fig.suptitle(f"{task}: gradient centralization on vs off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def run_verify(accelerator: Any, task: Task, args: argparse.Namespace, gc_config: Any) -> None:
    from .verify import verify_step

    result = verify_step(accelerator, task, batch_size=args.batch_size, seed=args.seed, gc_config=gc_config,
                         max_grad_norm=args.max_grad_norm)
    accelerator.print(result.message())
    if not result.ok:
        accelerator.end_training()
        sys.exit(1)


def describe(accelerator: Any, task: Task, args: argparse.Namespace, gc_config: Any) -> str:
    stage = zero_stage(accelerator)
    engine = f"{accelerator.distributed_type}" + (f" ZeRO-{stage}" if stage is not None else "")
    params = sum(p.numel() for p in task.build_model().parameters())
    return (f"task={task.name} ({params} params) engine={engine} processes={accelerator.num_processes} "
            f"device={accelerator.device} steps={args.steps} micro_batch={args.batch_size} optimizer={args.optimizer} "
            f"lr={args.lr} gc={gc_config.to_dict() if gc_config is not None else None}")


def require_demo_dependencies(args: argparse.Namespace) -> None:
    """Exit with one line naming the extra when an optional dependency is missing."""
    from .._extras import MissingExtra, require

    needs = [("accelerate", "accelerate", None), ("tensorboard", "demo", None), ("tqdm", "demo", None)]
    needs.append(("sklearn", "demo", "scikit-learn") if args.task == "cnn" else ("transformers", "demo", None))
    if args.ab:
        needs.append(("matplotlib", "demo", None))
    try:
        for module, extra, package in needs:
            require(module, extra, f"dist-gc-train --task {args.task}", package)
    except MissingExtra as exc:
        raise SystemExit(f"error: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_demo_dependencies(args)
    task = build_task(args.task, args.seed)
    fill_task_defaults(args, task)
    run_dir = Path(args.output_dir) / args.task
    accelerator = make_accelerator(run_dir)
    gc_config = resolve_gc_config(accelerator, args.gc_config)
    accelerator.print(describe(accelerator, task, args, gc_config))
    t0 = time.perf_counter()
    if args.verify:
        run_verify(accelerator, task, args, gc_config)
        if args.verify_only:
            accelerator.end_training()
            return
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if args.resume_from is None:  # a fresh run starts a fresh log; a resumed one appends
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    accelerator.init_trackers("tensorboard", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    metrics = MetricsLog(accelerator, run_dir / "metrics.jsonl")
    for arm in ("on", "off") if args.ab else (args.gc,):
        train_arm(accelerator, task, args, arm, gc_config, run_dir, metrics)
    if args.ab and accelerator.is_main_process:
        # From the file, not memory: a resumed run's curves start at step 1 too.
        records = [json.loads(line) for line in metrics.path.read_text().splitlines()]
        plot_ab(records, run_dir / "ab_curves.png", task.name)
    accelerator.end_training()
    accelerator.print(f"done in {time.perf_counter() - t0:.1f}s; outputs in {run_dir}/ "
                      f"(metrics.jsonl, tensorboard/{', ab_curves.png' if args.ab else ''}{', checkpoints/' if args.save_every else ''})")
    for arm in ("on", "off") if args.ab else (args.gc,):
        last = [r for r in metrics.records if r["arm"] == f"gc_{arm}" and "eval_accuracy" in r]
        if last:
            accelerator.print(f"gc {arm}: final eval accuracy {last[-1]['eval_accuracy']:.4f}")


if __name__ == "__main__":
    main()
