"""Run a test body in W real processes joined by a gloo group on this machine.

* The rendezvous is a FileStore in a fresh temp dir, so parallel pytest-xdist workers
  never clash on ports; MASTER_ADDR=127.0.0.1 and a free MASTER_PORT are also exported
  for engines that read them (DeepSpeed, accelerate).
* A run that exceeds ``timeout`` kills every rank and FAILS the test: never a hang.
* An exception on any rank kills the others (they may be blocked in a collective)
  and is re-raised in the test naming the rank, with its traceback.
* One spawn runs many cases: process start-up dominates the cost. A worker calls
  :func:`progress` after each case, so a bundle that times out says which cases
  finished on which rank.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = float(os.environ.get("DIST_GC_TEST_TIMEOUT", "600"))

_OUT: Any = None
_RANK = 0


def progress(label: str) -> None:
    """Report, from a worker, that ``label`` finished (shown if the run times out)."""
    if _OUT is not None:
        _OUT.put((_RANK, "progress", label))


class RankError(AssertionError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, store_dir: str, port: int, fn: Callable, args: tuple, kwargs: dict, out: Any,
            backend: str = "gloo") -> None:
    global _OUT, _RANK
    _OUT, _RANK = out, rank
    try:
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )
        torch.set_num_threads(1)
        store = dist.FileStore(os.path.join(store_dir, "store"), world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args, **kwargs)
        # Serialize by value: a tensor sent through the queue by shared memory would
        # be unreachable once this process exits before the parent reads it.
        buf = io.BytesIO()
        torch.save(result, buf)
        out.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT,
                    may_die: tuple[int, ...] = (), pg_backend: str = "gloo", **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks and
    return the per-rank results (rank order). ``fn`` must be a module-level function.
    Ranks in ``may_die`` may exit without a result (fault injection): theirs is ``None``.
    ``pg_backend``: the default group's backend (``"nccl"`` for a one-GPU W=1 run)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    results: dict[int, Any] = {}
    done: dict[int, list[str]] = {r: [] for r in range(world_size)}
    with tempfile.TemporaryDirectory(prefix="dist_gc_test_") as store_dir:
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, store_dir, port, fn, args, kwargs, out, pg_backend), daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while len(results) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"distributed test {fn.__name__} (world_size={world_size}) timed out after {timeout:.0f}s; "
                        f"ranks finished: {sorted(results)}; cases finished per rank: {done}"
                    )
                try:
                    rank, status, payload = out.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                    for r in [r for r in dead if r in may_die]:
                        results[r] = None
                    dead = [r for r in dead if r not in may_die]
                    if dead:
                        raise RankError(f"rank(s) {dead} of {fn.__name__} died (exit codes {[procs[r].exitcode for r in dead]}); "
                                        f"cases finished per rank: {done}")
                    continue
                if status == "progress":
                    done[rank].append(payload)
                    continue
                if status == "error":
                    raise RankError(f"rank {rank} of {fn.__name__} (world_size={world_size}) failed (cases finished per rank: "
                                    f"{done}):\n{payload}")
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        finally:
            for p in procs:
                p.join(timeout=5 if len(results) == world_size else 0.1)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
    return [results[r] for r in range(world_size)]
