"""Peak extra memory of one GC step, measured as the growth of the process's peak
resident set in a fresh subprocess, against the gradient bytes.

Linux resets the peak (``VmHWM``) when "5" is written to ``/proc/self/clear_refs``:
reset right before the step, so set-up transients (random init) cannot hide GC's own
temporaries; extra = ``VmHWM`` after the step - ``VmRSS`` before it."""

from __future__ import annotations

import json
import math
import os

import subprocess
import sys

import torch


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _child(numel: int, dtype_name: str, layout: str) -> dict:
    from dist_gc.core.centralize import geometry_of
    from dist_gc.engine.engine import GCEngine
    from dist_gc.engine.layout import plan_flat_shard, plan_whole

    dtype = getattr(torch, dtype_name)
    rows = 4096
    shape = (rows, numel // rows)
    # Allocate the gradient directly in its dtype (no fp32 staging copy, which would
    # raise the peak before GC runs and hide GC's own temporaries).
    if layout == "full":
        g = torch.empty(shape, dtype=dtype).normal_()
        plans = [plan_whole("w", geometry_of(shape, "channel", 0), shape, 0, source=0)]
        src = g
    else:  # a 1-D shard holding rows [1/3, 2/3) of the tensor, cut mid-row
        n = math.prod(shape)
        lo, hi = n // 3 + 7, 2 * n // 3 + 7
        ranges = [(0, lo), (lo, hi), (hi, n)]
        src = torch.empty(hi - lo, dtype=dtype).normal_()
        plan = plan_flat_shard("w", geometry_of(shape, "channel", 0), ranges=ranges, rank=1, group=None, source=0, offset=0)
        from dataclasses import replace

        plans = [replace(plan, reductions=(), shard_groups=())]
    engine = GCEngine(plans, [lambda: src])
    small = torch.zeros(1024)
    small.add_(1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS counter
    base = _status_kib("VmRSS") * 1024
    engine.step()
    peak = _status_kib("VmHWM") * 1024
    grad_bytes = src.numel() * src.element_size()
    return {"layout": layout, "dtype": dtype_name, "grad_MB": grad_bytes / 2**20, "extra_MB": (peak - base) / 2**20,
            "bound_MB": max(64.0, grad_bytes / 100 / 2**20)}


def bench_memory(numel: int = 64 * 2**20, cases=(("float32", "full"), ("bfloat16", "full"), ("bfloat16", "shard"))) -> list[dict]:
    """Run each case in a fresh interpreter so earlier allocations don't hide the peak."""
    out = []
    for dtype_name, layout in cases:
        here = os.path.dirname(os.path.abspath(__file__))
        code = (f"import json, sys; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; from memory import _child; "
                f"print(json.dumps(_child({numel}, {dtype_name!r}, {layout!r})))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


if __name__ == "__main__":
    print(json.dumps(bench_memory(), indent=1))

