"""One entry point for every dist_gc benchmark: prints tables, writes JSON, a PNG and
``benchmarks/RESULTS.md`` (the file the README quotes).

    python benchmarks/run.py                       # CPU: engine, memory, overhead/comm
    python benchmarks/run.py --device cuda --preset gpu --sections engine   # on a GPU

Every figure is a ratio measured side by side in one run (medians of alternating
repetitions). Absolute times are printed for context; only GPU ones are meaningful
to quote.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import torch  # noqa: E402

from engine import bench_engine  # noqa: E402
from memory import bench_memory  # noqa: E402


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def bench_overhead(engines: list[str], tokens: int, reps: int) -> list[dict]:
    from overhead import overhead_worker
    from tests.harness import run_distributed

    rows = []
    for name in engines:
        try:
            rows.append(run_distributed(overhead_worker, 2, name, tokens, reps, timeout=900)[0])
        except Exception as exc:  # noqa: BLE001 - reported in the table, not hidden
            rows.append({"engine": name, "error": str(exc).splitlines()[0][:200]})
    return rows


def _plot(engine_rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['set']} {r['dtype']}\n{r['layout'].split(' (')[0]}\n{r['mode']}" for r in engine_rows]
    fig, ax = plt.subplots(figsize=(max(8, len(engine_rows) * 0.9), 4.5))
    x = range(len(engine_rows))
    ax.bar([i - 0.2 for i in x], [r["dist_gc_vs_copy"] for r in engine_rows], 0.4, label="dist_gc / copy")
    ax.bar([i + 0.2 for i in x], [r.get("loop_ms", float("nan")) / r["copy_ms"] for r in engine_rows], 0.4, label="per-tensor loop / copy")
    ax.axhline(1.5, color="k", ls="--", lw=1, label="bandwidth floor (1.5x copy)")
    ax.axhline(2.0, color="r", ls=":", lw=1, label="target (2x copy)")
    ax.set_xticks(list(x), labels, fontsize=6)
    ax.set_ylabel("time / copy of the same bytes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, help="comma list of gradient sets: cpu (~97M params), gpu (~1.2B), many (1,051 small tensors), tiny")
    ap.add_argument("--sections", default="engine,memory,overhead", help="comma list of engine,memory,overhead")
    ap.add_argument("--engines", default="DDP,FSDP2,ZeRO-2,ZeRO-3")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step in the overhead benchmark")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--no-results-md", action="store_true", help="don't rewrite benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    preset = args.preset or ("gpu,many" if args.device.startswith("cuda") else "cpu,many")
    sections = args.sections.split(",")
    os.makedirs(args.out, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    report: dict = {"device": device_name, "torch": torch.__version__, "preset": preset, "date": datetime.date.today().isoformat(),
                    "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    md = [f"## {args.device.upper()} — {device_name}", "", f"`{report['command']}` (torch {torch.__version__}, {report['date']})", ""]
    if "engine" in sections:
        rows = []
        for name in preset.split(","):
            for dtype in (torch.float32, torch.bfloat16):
                rows += bench_engine(name, args.reps, args.device, dtype)
        report["engine"] = rows
        cols = ["set", "layout", "mode", "dtype", "tensors", "MB", "dist_gc_ms", "copy_ms", "loop_ms", "dist_gc_vs_copy", "pct_of_limit", "speedup_vs_loop"]
        md += ["### Engine throughput (Llama-style gradient set, preset " + preset + ")", "", _table(rows, cols), ""]
        _plot(rows, os.path.join(args.out, f"engine_{args.device.split(':')[0]}.png"))
    if "memory" in sections and args.device == "cpu":
        rows = bench_memory()
        report["memory"] = rows
        md += ["### Peak extra memory of one GC step (peak RSS growth, fresh process)", "", _table(rows, ["layout", "dtype", "grad_MB", "extra_MB", "bound_MB"]), ""]
    if "overhead" in sections and args.device == "cpu":
        rows = bench_overhead(args.engines.split(","), args.tokens, args.reps)
        report["overhead"] = rows
        cols = ["engine", "world", "params", "tokens_per_rank", "step_off_ms", "step_on_ms", "overhead_pct", "gc_pct_of_step",
                "gc_bytes_per_step", "gc_collectives_per_step", "counted_extra_collectives", "counted_extra_bytes", "engine_grad_bytes_per_step", "gc_bytes_fraction", "error"]
        md += ["### Step overhead and extra communication (W=2, gloo)", "", _table(rows, cols), ""]
    text = "\n".join(md)
    print(text)
    with open(os.path.join(args.out, f"{args.device.split(':')[0]}.json"), "w") as f:
        json.dump(report, f, indent=1)
    if not args.no_results_md:
        _write_results_md(args.device.split(":")[0], text)
    return 0


def _write_results_md(device: str, section: str) -> None:
    """Replace this device's section of RESULTS.md, keeping the others."""
    path = os.path.join(HERE, "RESULTS.md")
    head = "# Benchmark results\n\nWritten by `benchmarks/run.py`; do not edit by hand.\n"
    parts: dict[str, str] = {}
    if os.path.exists(path):
        for chunk in open(path).read().split("\n## ")[1:]:
            parts[chunk.split(" ", 1)[0].lower()] = "## " + chunk.rstrip() + "\n"
    parts[device] = section.rstrip() + "\n"
    with open(path, "w") as f:
        f.write(head + "\n" + "\n".join(parts[k] for k in sorted(parts)))


if __name__ == "__main__":
    raise SystemExit(main())
