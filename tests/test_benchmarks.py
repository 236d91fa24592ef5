"""The benchmark code itself, on the CPU in seconds (tiny gradient set, one repetition):
rows and per-region loop references, the --kernel option and its guard, launch counts
recorded as null off CUDA, RESULTS.md sections replaced one at a time, the PNG, and
benchmarks/gpu_check.sh parsing."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.jobs import ROOT

BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/engine.py and run.py, imported the way run.py imports its siblings."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("engine"), importlib.import_module("run")


def test_gpu_check_script_parses_and_fails_loudly():
    script = BENCH / "gpu_check.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK), "gpu_check.sh is not executable"
    for needed in ("tests/test_gpu.py", "--device cuda", "torch.cuda.is_available()", "--kernel"):
        assert needed in text, needed


def test_engine_rows_fill_the_loop_reference_for_shards(bench):
    engine, _ = bench
    rows = engine.bench_engine("tiny", reps=1)
    assert len(rows) == 4  # (channel, tensor) x (full, shard), one dtype, one kernel
    assert {r["layout"].split(" (")[0] for r in rows} == {"full tensors", "1-D shard"}
    for r in rows:
        assert r["kernel"] == "auto" and r["tensors"] == 15
        for key in ("dist_gc_ms", "copy_ms", "loop_ms", "speedup_vs_loop", "loop_vs_copy", "dist_gc_vs_copy"):
            assert isinstance(r[key], float) and r[key] > 0, (r["layout"], key, r.get(key))
        assert math.isclose(r["speedup_vs_loop"], r["loop_ms"] / r["dist_gc_ms"], rel_tol=1e-9)


@pytest.mark.parametrize("mode", ["channel", "tensor"])
def test_region_loop_is_the_per_view_loop(bench, mode):
    """Whole tensors: the region loop is exactly the per-tensor loop. Shards: it touches
    every element of the shard once, and each view's own means are 0 afterwards."""
    engine, _ = bench
    gs = engine.GradSet("tiny", "cpu", torch.float32)
    base = [g.clone() for g in gs.grads]
    _, loop, _ = gs.full(mode, ["auto"])
    loop()
    want = [g.clone() for g in gs.grads]
    for g, b in zip(gs.grads, base):
        g.copy_(b)
    from dist_gc.core.centralize import geometry_of
    from dist_gc.engine.layout import plan_whole

    plans = [plan_whole(n, geometry_of(s, mode, 0), s, 0 if mode == "channel" else None, source=0) for _, n, s in gs.targets]
    for (i, _, _), plan in zip(gs.targets, plans):
        engine.region_loop([plan], gs.grads[i])()
        assert torch.equal(gs.grads[i], want[i])
    _, sloop, shard, _ = gs.shard(mode, ["auto"])
    before = shard.clone() + 1.0  # offset: every element must move
    shard.copy_(before)
    assert sloop.regions > 0
    sloop()
    assert bool((shard != before).all()), "the region loop left shard elements untouched"


def test_kernel_option_side_by_side_and_its_guard(bench, monkeypatch):
    engine, _ = bench
    real = engine.GCEngine
    seen = []

    class WithKernel(real):
        def __init__(self, plans, sources, *, kernel=None, **kw):
            seen.append(kernel)
            super().__init__(plans, sources, **kw)

    class WithoutKernel(real):
        def __init__(self, plans, sources, *, temp_limit_bytes=None, full_stats=False):
            super().__init__(plans, sources, temp_limit_bytes=temp_limit_bytes, full_stats=full_stats)

    monkeypatch.setattr(engine, "GCEngine", WithoutKernel)
    assert not engine.kernel_supported()
    engine.check_kernels(["auto"])  # the default needs no option
    with pytest.raises(ValueError, match="does not accept kernel="):
        engine.check_kernels(["auto", "torch"])
    with pytest.raises(ValueError, match="unknown backend"):
        engine.check_kernels(["cuda"])
    monkeypatch.setattr(engine, "GCEngine", WithKernel)
    assert engine.kernel_supported()
    rows = engine.bench_engine("tiny", reps=1, kernels=["auto", "torch"])
    # One engine per kernel per (mode, layout); kernel= passed only when not the default.
    assert seen == [None, "torch"] * 4
    assert [r["kernel"] for r in rows] == ["auto", "torch"] * 4
    for a, b in zip(rows[::2], rows[1::2]):  # same repetitions: shared loop and copy times
        assert a["loop_ms"] == b["loop_ms"] and a["copy_ms"] == b["copy_ms"]


def test_launch_counts_are_null_with_a_reason_off_cuda(bench):
    engine, _ = bench
    got = engine.bench_launches("cpu", ["auto"])
    assert got["rows"] is None and "CUDA" in got["reason"]


def test_results_md_replaces_only_its_own_section(bench, tmp_path):
    _, run = bench
    path = tmp_path / "RESULTS.md"
    path.write_text((BENCH / "RESULTS.md").read_text())
    cpu_before = path.read_text().split("\n## ")[1]
    run.write_results_md(str(path), "gpu", "## GPU — Fake H200\n\nfirst\n")
    run.write_results_md(str(path), "gpu", "## GPU — Fake H200\n\nsecond\n")
    text = path.read_text()
    chunks = text.split("\n## ")[1:]
    assert [c.split(" ", 1)[0] for c in chunks] == ["CPU", "GPU"], [c[:20] for c in chunks]
    assert chunks[0].rstrip() == cpu_before.rstrip(), "the CPU section changed"
    assert "second" in chunks[1] and "first" not in text
    run.write_results_md(str(path), "cpu", "## CPU — other\n\nnew cpu\n")
    text = path.read_text()
    assert "new cpu" in text and "second" in text and text.startswith("# Benchmark results")


def test_run_main_writes_json_png_and_section(bench, tmp_path, capsys):
    _, run = bench
    md = tmp_path / "R.md"
    assert run.main(["--preset", "tiny", "--reps", "1", "--sections", "engine", "--dtypes", "float32,bfloat16", "--out", str(tmp_path), "--results-md", str(md)]) == 0
    report = json.loads((tmp_path / "cpu.json").read_text())
    assert report["kind"] == "cpu" and report["kernels"] == ["auto"] and len(report["engine"]) == 8
    assert report["launches"]["rows"] is None and report["launches"]["reason"]
    assert (tmp_path / "engine_cpu.png").stat().st_size > 10_000
    text = md.read_text()
    assert "## CPU — " in text and "speedup_vs_loop" in text and "Not measured" in text
    err = capsys.readouterr().err
    assert "tiny float32 channel full tensors" in err, "no progress line for a measurement"
    with pytest.raises(SystemExit):  # a clear command-line error, before any work
        run.main(["--device", "cuda", "--out", str(tmp_path), "--no-results-md"] if not torch.cuda.is_available()
                 else ["--kernel", "nosuch", "--out", str(tmp_path), "--no-results-md"])


def test_launch_rows_on_a_simulated_cuda(bench, monkeypatch):
    """The launch table's assembly (CUDA itself is not needed for that): gradient sets
    built on the CPU, and a stand-in counter that counts one launch per tensor for the
    loop and a constant for the engine."""
    engine, run = bench
    real = engine.GradSet
    monkeypatch.setattr(engine, "GradSet", lambda preset, device, dtype: real(preset, "cpu", dtype))

    def fake_count(fn):
        return {"kernels": getattr(fn, "regions", 7), "launch_calls": 7}

    monkeypatch.setattr(engine, "count_launches", fake_count)
    got = engine.bench_launches("cuda", ["auto"], sets=("tiny", "many"))
    rows = got["rows"]
    assert got["reason"] is None and len(rows) == 2 * 2 * 2 * 2  # dtype x mode x layout x (auto, loop)
    assert {(r["tiny_tensors"], r["many_tensors"]) for r in rows} == {(15, 1051)}
    assert all(r["constant"] for r in rows if r["kernel"] == "auto")
    # the shard loop runs one mean per region view: more views in 'many', not constant
    assert not any(r["constant"] for r in rows if r["kernel"] == "loop" and r["layout"] == "shard")
    cols = ["kernel", "layout", "mode", "dtype", "tiny_tensors", "many_tensors", "tiny_kernels", "many_kernels", "constant"]
    assert run._table(rows, cols).count("\n") == len(rows) + 1
