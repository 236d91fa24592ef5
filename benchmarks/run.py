"""One entry point for every dist_gc benchmark: prints progress and tables, writes JSON,
a PNG and one section of ``benchmarks/RESULTS.md`` (the file the README quotes).

    python benchmarks/run.py                       # CPU: engine, memory, overhead/comm
    python benchmarks/run.py --device cuda --preset gpu,many --sections engine,overhead \\
        --kernel auto,torch,triton                 # on a GPU (benchmarks/gpu_check.sh)

Every figure is a ratio measured side by side in one run (medians of alternating
repetitions). Absolute times are printed for context; only GPU ones are meaningful
to quote. Progress goes to stderr (a tqdm bar when tqdm is installed, else one line
per measurement); the tables go to stdout at the end.

Outputs (``--out``, default ``benchmarks/results``): ``cpu.json`` / ``gpu.json`` (rewritten
after every section, so an interrupted run keeps what it measured) and
``engine_cpu.png`` / ``engine_gpu.png`` (one subplot per gradient set). RESULTS.md keeps
one section per device kind ("## CPU — ...", "## GPU — <device name>"); a run
replaces only its own.
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

from engine import bench_engine, bench_launches, check_kernels, kernel_supported  # noqa: E402
from memory import bench_memory  # noqa: E402


class Progress:
    """Progress on stderr: a tqdm bar when tqdm is installed, else one line per step.
    ``start(label)`` says what is being measured now, ``done(summary)`` reports it."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.i = total, desc, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
            print(f"{desc}: {total} steps", file=sys.stderr, flush=True)
        else:
            self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label[:90], refresh=True)
        else:
            print(f"[{self.desc} {self.i + 1}/{self.total}] {label} ...", file=sys.stderr, flush=True)

    def done(self, summary: str) -> None:
        self.i += 1
        if self.bar is not None:
            self.bar.write(f"  {summary}", file=sys.stderr)
            self.bar.update(1)
        else:
            print(f"  {summary}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def callbacks(self):
        return self.start, self.done


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if v is None:
            return ""
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def bench_overhead(engines: list[str], tokens: int, reps: int, device: str, world: int, model: str, progress: Progress) -> list[dict]:
    from overhead import overhead_worker
    from tests.harness import run_distributed

    # One GPU hosts one NCCL rank; W > 1 on a GPU shares it over gloo.
    backend = "nccl" if device.startswith("cuda") and world == 1 else "gloo"
    rows = []
    for name in engines:
        progress.start(f"overhead {name}: W={world} {backend} on {device}, model {model}, {reps} GC-on/off step pairs + warm-up")
        try:
            rows.append(run_distributed(overhead_worker, world, name, tokens, reps, device, model, timeout=900, pg_backend=backend)[0])
            r = rows[-1]
            progress.done(f"overhead {name}: step {r['step_off_ms']:.4g} ms off / {r['step_on_ms']:.4g} ms on "
                          f"({r['overhead_pct']:+.2f}%), GC {r['gc_pct_of_step']:.3g}% of the step, "
                          f"{r['gc_bytes_per_step']} B in {r['gc_collectives_per_step']} collectives")
        except Exception as exc:  # noqa: BLE001 - reported in the table, not hidden
            rows.append({"engine": name, "world": world, "error": str(exc).splitlines()[0][:200]})
            progress.done(f"overhead {name}: FAILED: {rows[-1]['error']}")
    return rows


def _plot(engine_rows: list[dict], path: str, title: str) -> None:
    """One subplot per gradient set; per (layout, mode, dtype, kernel) three bars:
    dist_gc / copy, loop / copy (time over a copy of the same bytes) and dist_gc / loop
    (below 1: dist_gc faster). Log scale: the ratios span 0.3x to 30x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in engine_rows))
    kernels = list(dict.fromkeys(r.get("kernel", "auto") for r in engine_rows))
    width = max(len([r for r in engine_rows if r["set"] == s]) for s in sets)
    fig, axes = plt.subplots(len(sets), 1, figsize=(max(8, width * 0.7) + 2.5, 4.0 * len(sets)), squeeze=False)
    for ax, name in zip(axes[:, 0], sets):
        rows = [r for r in engine_rows if r["set"] == name]
        x = range(len(rows))
        series = [("dist_gc / copy", [r["dist_gc_vs_copy"] for r in rows], "tab:blue"),
                  ("loop / copy", [r["loop_ms"] / r["copy_ms"] for r in rows], "tab:orange"),
                  ("dist_gc / loop (< 1: dist_gc faster)", [r["dist_gc_ms"] / r["loop_ms"] for r in rows], "tab:green")]
        for j, (label, ys, color) in enumerate(series):
            ax.bar([i + (j - 1) * 0.27 for i in x], ys, 0.27, label=label, color=color)
        ax.axhline(1.0, color="0.4", lw=0.8, label="1x")
        ax.axhline(1.5, color="k", ls="--", lw=1, label="bandwidth floor (1.5x copy)")
        ax.axhline(2.0, color="r", ls=":", lw=1, label="target (2x copy)")
        ax.set_yscale("log")
        labels = []
        for r in rows:
            layout = "shard" if r["layout"].startswith("1-D") else "full"
            labels.append(f"{layout}\n{r['mode']}\n{r['dtype'].replace('bfloat16', 'bf16').replace('float32', 'fp32').replace('float16', 'fp16')}"
                          + (f"\n{r.get('kernel', 'auto')}" if len(kernels) > 1 else ""))
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("ratio (log)")
        full_mb = max(r["MB"] for r in rows if r["layout"] == "full tensors") if any(r["layout"] == "full tensors" for r in rows) else rows[0]["MB"]
        ax.set_title(f"set '{name}': {rows[0]['tensors']} tensors, {full_mb:.4g} MB of gradients (largest dtype)"
                     + ("" if len(kernels) > 1 else f", kernel {kernels[0]}"), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, help="comma list of gradient sets: cpu (~97M params), gpu (~1.2B), many (1,051 small tensors), tiny")
    ap.add_argument("--sections", default="engine,memory,overhead", help="comma list of engine,memory,overhead (on CUDA, engine includes the kernel-launch counts)")
    ap.add_argument("--kernel", default="auto", help="comma list of engine kernel backends (auto, torch, cpu, triton), measured side by side; "
                    "anything but 'auto' needs a GCEngine with the kernel= option")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma list of gradient dtypes of the engine section")
    ap.add_argument("--engines", default="DDP,FSDP2,ZeRO-2,ZeRO-3")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step in the overhead benchmark")
    ap.add_argument("--overhead-world", type=int, default=None, help="ranks of the overhead benchmark (default 2 on CPU (gloo), 1 on CUDA (NCCL))")
    ap.add_argument("--overhead-model", default=None, choices=["ref", "gpu"], help="overhead model: ref (~4.3M params, CPU default), gpu (~166M, CUDA default)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--results-md", default=os.path.join(HERE, "RESULTS.md"), help="the RESULTS.md whose section for this device kind is replaced")
    ap.add_argument("--no-results-md", action="store_true", help="don't rewrite RESULTS.md")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    kind = "gpu" if cuda else "cpu"
    kernels = args.kernel.split(",")
    try:
        check_kernels(kernels)
    except ValueError as exc:
        ap.error(str(exc))
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available to torch here")
    preset = args.preset or ("gpu,many" if cuda else "cpu,many")
    sections = args.sections.split(",")
    world = args.overhead_world or (1 if cuda else 2)
    omodel = args.overhead_model or ("gpu" if cuda else "ref")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"{kind}.json")
    device_name = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    report: dict = {"device": device_name, "kind": kind, "torch": torch.__version__, "preset": preset, "kernels": kernels,
                    "engine_kernel_option": kernel_supported(), "date": datetime.date.today().isoformat(),
                    "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    md = [f"## {kind.upper()} — {device_name}", "", f"`{report['command']}` (torch {torch.__version__}, {report['date']})", ""]

    def save() -> None:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)

    print(f"dist_gc benchmarks on {device_name} (torch {torch.__version__}): sections {','.join(sections)}; "
          f"writing {json_path}", file=sys.stderr, flush=True)
    if "engine" in sections:
        names = preset.split(",")
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
        steps = len(names) * len(dtypes) * 4 + (8 if cuda else 0)  # (set, dtype) x (mode, layout) [+ launch counts]
        prog = Progress(steps, f"engine ({','.join(kernels)})")
        rows = []
        try:
            for name in names:
                for dtype in dtypes:
                    rows += bench_engine(name, args.reps, args.device, dtype, kernels=kernels, progress=prog.callbacks)
            report["engine"] = rows
            save()
            report["launches"] = bench_launches(args.device, kernels, progress=prog.callbacks)
            save()
        finally:
            prog.close()
        cols = ["set", "layout", "mode", "dtype", "kernel", "tensors", "MB", "dist_gc_ms", "copy_ms", "loop_ms", "dist_gc_vs_copy", "pct_of_limit",
                "speedup_vs_loop"]
        md += ["### Engine throughput (Llama-style gradient set, preset " + preset + ")", "",
               "1-D shard rows: rank 1 of 4 of all tensors concatenated; their loop is the per-tensor loop on each region view of "
               "the shard. speedup_vs_loop = loop time / dist_gc time.", "", _table(rows, cols), ""]
        launches = report["launches"]
        md += ["### Kernel launches per engine step (torch profiler, one step after a warm-up)", ""]
        if launches["rows"] is None:
            md += [f"Not measured: {launches['reason']}", ""]
        else:
            sets = launches["sets"]
            lcols = ["kernel", "layout", "mode", "dtype"] + [f"{s}_{c}" for c in ("tensors", "kernels", "launch_calls") for s in sets] + ["constant"]
            md += [f"kernels: kernel events on the CUDA activity; launch_calls: cudaLaunchKernel/cuLaunchKernel API calls. "
                   f"A constant-launch path has equal counts for {' and '.join(sets)}; 'loop' is the per-tensor loop.", "",
                   _table(launches["rows"], lcols), ""]
        png = os.path.join(args.out, f"engine_{kind}.png")
        _plot(rows, png, f"dist_gc engine on {device_name} (torch {torch.__version__})")
        print(f"wrote {png}", file=sys.stderr, flush=True)
    if "memory" in sections:
        if cuda:
            print("memory: skipped on CUDA (it measures the CPU process's peak RSS)", file=sys.stderr, flush=True)
        else:
            prog = Progress(1, "memory")
            prog.start("memory: peak RSS growth of one GC step, 3 cases, each in a fresh interpreter")
            rows = bench_memory()
            prog.done("memory: " + "; ".join(f"{r['layout']} {r['dtype']} +{r['extra_MB']:.3g} MB" for r in rows))
            prog.close()
            report["memory"] = rows
            save()
            md += ["### Peak extra memory of one GC step (peak RSS growth, fresh process)", "", _table(rows, ["layout", "dtype", "grad_MB", "extra_MB", "bound_MB"]), ""]
    if "overhead" in sections:
        engines = args.engines.split(",")
        prog = Progress(len(engines), "overhead")
        try:
            rows = bench_overhead(engines, args.tokens, args.reps, args.device, world, omodel, prog)
        finally:
            prog.close()
        report["overhead"] = rows
        save()
        cols = ["engine", "world", "params", "tokens_per_rank", "step_off_ms", "step_on_ms", "overhead_pct", "gc_pct_of_step",
                "gc_bytes_per_step", "gc_collectives_per_step", "counted_extra_collectives", "counted_extra_bytes", "engine_grad_bytes_per_step", "gc_bytes_fraction", "error"]
        backend = "NCCL" if cuda and world == 1 else "gloo"
        md += [f"### Step overhead and extra communication (W={world}, {backend}, model '{omodel}')", "", _table(rows, cols), ""]
    text = "\n".join(md)
    print(text)
    save()
    if not args.no_results_md:
        write_results_md(args.results_md, kind, text)
        print(f"wrote the {kind.upper()} section of {args.results_md}", file=sys.stderr, flush=True)
    return 0


def write_results_md(path: str, kind: str, section: str) -> None:
    """Replace the ``kind`` ("cpu" / "gpu") section of RESULTS.md, keeping the others."""
    head = "# Benchmark results\n\nWritten by `benchmarks/run.py`; do not edit by hand.\n"
    parts: dict[str, str] = {}
    if os.path.exists(path):
        with open(path) as f:
            for chunk in f.read().split("\n## ")[1:]:
                parts[chunk.split(" ", 1)[0].lower()] = "## " + chunk.rstrip() + "\n"
    parts[kind] = section.rstrip() + "\n"
    with open(path, "w") as f:
        f.write(head + "\n" + "\n".join(parts[k] for k in sorted(parts)))


if __name__ == "__main__":
    raise SystemExit(main())
