"""The main job (dist_gc.cli.train) end to end, under real `accelerate launch`.

* --verify: one real distributed step (SGD lr=1) equals the single-process oracle
  (global batch, engine clipping, full-tensor GC) within 1e-5 — MULTI_CPU (DDP on gloo),
  DeepSpeed ZeRO-2 and ZeRO-3 through accelerate's DeepSpeed plugin; tensor mode
  (MULTI_CPU, ZeRO-2) and channel mode (ZeRO-3, the A/B run), clipping active; GPT-2
  (Conv1D, output dim -1) under DDP and ZeRO-3.
* negative control: naive GC on what the optimizer holds (ZeRO-2 flat shards) fails.
* checkpoint/resume: stopped at step 3 and resumed, parameters after 6 steps equal an
  uninterrupted run's exactly.
* --ab: ab_curves.png, metrics.jsonl with GC statistics, TensorBoard event files.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.jobs import ROOT, TOLERANCE, accelerate_cmd, assert_verified, run, verify_errors

pytest.importorskip("accelerate")

MULTI_CPU = ROOT / "dist_gc/configs/accelerate/multi_cpu.yaml"
TIMEOUT = 600  # seconds per launch; a hang fails the test (>= 4x a quiet run)
NAIVE_RE = re.compile(r"would be off by ([0-9.eE+-]+)")


def deepspeed_config(tmp_path: Path, stage: int, **gc: object) -> Path:
    """An accelerate YAML pointing at a copy of dist_gc/configs/deepspeed/accelerate_zero<stage>.json
    whose GC block / clipping are updated with ``gc`` (``gradient_clipping`` goes top level)."""
    ds = json.loads((ROOT / f"dist_gc/configs/deepspeed/accelerate_zero{stage}.json").read_text())
    if "gradient_clipping" in gc:
        ds["gradient_clipping"] = gc.pop("gradient_clipping")
    ds["gradient_centralization"].update(gc)
    ds_path = tmp_path / f"ds_zero{stage}.json"
    ds_path.write_text(json.dumps(ds))
    yaml_text = (ROOT / f"dist_gc/configs/accelerate/deepspeed_zero{stage}.yaml").read_text()
    yaml_text = yaml_text.replace(f"dist_gc/configs/deepspeed/accelerate_zero{stage}.json", str(ds_path))
    path = tmp_path / f"deepspeed_zero{stage}.yaml"
    path.write_text(yaml_text)
    return path


@pytest.mark.timeout(1200)
def test_verify_multi_cpu_tensor_mode_with_clipping(tmp_path):
    rc, out = run(accelerate_cmd(MULTI_CPU, "--verify-only", "--gc-config", "dist_gc/configs/gc/tensor.yaml",
                                 "--max-grad-norm", "0.05", "--output-dir", str(tmp_path)), TIMEOUT)
    assert_verified(rc, out)
    assert "engine=DistributedType.MULTI_CPU" in out and "processes=2" in out, out[-3000:]
    assert "'mode': 'tensor'" in out and "clipping active" in out, out[-3000:]


@pytest.mark.timeout(1200)
def test_verify_deepspeed_zero2_tensor_mode_with_clipping(tmp_path):
    """ZeRO-2, tensor mode and clipping active, both from the DeepSpeed JSON."""
    pytest.importorskip("deepspeed")
    config = deepspeed_config(tmp_path, 2, mode="tensor", gradient_clipping=0.05)
    rc, out = run(accelerate_cmd(config, "--verify-only", "--output-dir", str(tmp_path / "runs")), TIMEOUT)
    assert_verified(rc, out)
    assert "ZeRO-2" in out and "processes=2" in out and "'mode': 'tensor'" in out and "clipping active" in out, out[-3000:]


@pytest.mark.timeout(1200)
def test_verify_deepspeed_zero3_gpt2_then_train(tmp_path):
    """ZeRO-3 with the repository's JSON (channel mode) on GPT-2, whose Conv1D output dim
    is last (strided in ZeRO-3's per-tensor partitions); clipping is active (grad norm >
    1 at init). Then 2 training steps with eval (forward passes are collectives here)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    rc, out = run(accelerate_cmd(ROOT / "dist_gc/configs/accelerate/deepspeed_zero3.yaml", "--task", "gpt2", "--verify",
                                 "--steps", "2", "--eval-every", "2", "--output-dir", str(tmp_path)), TIMEOUT)
    assert_verified(rc, out)
    assert "ZeRO-3" in out and "'mode': 'channel'" in out and "clipping active" in out, out[-3000:]
    records = [json.loads(line) for line in (tmp_path / "gpt2/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert any("eval_accuracy" in r for r in records)
    assert all(r["gc/centralized"] > 0 for r in records if "loss" in r)


@pytest.mark.timeout(1200)
def test_negative_control_fails_verify(tmp_path):
    """Naive GC on the tensors DeepSpeed's optimizer holds (ZeRO-2 1-D flat partitions)
    must be caught: nonzero exit and an error far above the tolerance."""
    pytest.importorskip("deepspeed")
    cmd = accelerate_cmd(ROOT / "dist_gc/configs/accelerate/deepspeed_zero2.yaml", "--verify-only", "--output-dir", str(tmp_path))
    k = cmd.index("dist_gc.cli.train")
    cmd[k - 1 : k + 1] = [str(ROOT / "tests" / "negative_control_job.py")]  # the job, with a wrong GC
    rc, out = run(cmd, TIMEOUT)
    errors = verify_errors(out)
    assert errors, f"no verify line printed:\n{out[-4000:]}"
    assert rc != 0, f"verify passed a wrong GC (error {errors})"
    assert max(errors) > 1e-3, errors


@pytest.mark.timeout(1200)
def test_gpt2_verify_ddp_conv1d(tmp_path):
    """GPT-2's Conv1D keeps the output dim last: exact with dist_gc, while dim-0 GC (what
    peer implementations do) is far off."""
    pytest.importorskip("transformers")
    rc, out = run(accelerate_cmd(MULTI_CPU, "--task", "gpt2", "--verify-only", "--output-dir", str(tmp_path)), TIMEOUT)
    assert_verified(rc, out)
    naive = [float(x) for x in NAIVE_RE.findall(out)]
    assert naive and naive[0] > 100 * TOLERANCE, out[-3000:]


def load_params(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.timeout(1200)
def test_resume_is_exact(tmp_path):
    """6 steps uninterrupted vs. stopped after 3 (checkpoint) and resumed to 6: the same
    parameters bit for bit (fp32, CPU). Batch 256 x 2 ranks: 2 steps per epoch, so the
    resume point is mid-epoch and the run crosses epoch boundaries."""
    common = ["--steps", "6", "--batch-size", "256", "--eval-every", "100", "--warmup", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    rc, out = run(accelerate_cmd(MULTI_CPU, *common, "--save-every", "6", "--output-dir", str(a)), TIMEOUT)
    assert rc == 0, out[-4000:]
    rc, out = run(accelerate_cmd(MULTI_CPU, *common, "--save-every", "3", "--stop-at", "3", "--output-dir", str(b)), TIMEOUT)
    assert rc == 0, out[-4000:]
    rc, out = run(accelerate_cmd(MULTI_CPU, *common, "--save-every", "3", "--resume-from", "latest", "--output-dir", str(b)), TIMEOUT)
    assert rc == 0 and "resumed from" in out and "at step 3" in out, out[-4000:]

    full = load_params(a / "cnn/checkpoints/gc_on/step_6")
    resumed = load_params(b / "cnn/checkpoints/gc_on/step_6")
    halfway = load_params(b / "cnn/checkpoints/gc_on/step_3")
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=0, rtol=0, msg=f"{name} differs after resume")
    assert any(not torch.equal(halfway[n], full[n]) for n in full), "steps 4-6 changed nothing: test is vacuous"
    steps = [json.loads(line)["step"] for line in (b / "cnn/metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(1200)
def test_ab_run_writes_plot_metrics_and_tensorboard(tmp_path):
    rc, out = run(accelerate_cmd(MULTI_CPU, "--ab", "--verify", "--steps", "8", "--eval-every", "4",
                                 "--output-dir", str(tmp_path)), TIMEOUT)
    assert_verified(rc, out)
    run_dir = tmp_path / "cnn"
    png = run_dir / "ab_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    on = [r for r in records if r["arm"] == "gc_on" and "loss" in r]
    off = [r for r in records if r["arm"] == "gc_off" and "loss" in r]
    assert [r["step"] for r in on] == [r["step"] for r in off] == list(range(1, 9))
    for r in on:
        assert r["gc/centralized"] == 4 and r["gc/max_abs_mean_before"] > 0
        assert r["gc/max_abs_mean_after"] < 1e-6  # measured after GC: the means are gone
        assert r["gc/grad_norm_after"] <= r["gc/grad_norm_before"] + 1e-6  # a projection
    assert not any(k.startswith("gc/") for r in off for k in r)
    assert on[0]["loss"] == pytest.approx(off[0]["loss"], abs=1e-6)  # same init, same first batch
    assert on[-1]["loss"] != off[-1]["loss"]  # GC changed the trajectory
    assert {r["arm"] for r in records if "eval_accuracy" in r} == {"gc_on", "gc_off"}
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and max(e.stat().st_size for e in events) > 1000


@pytest.mark.timeout(600)
@pytest.mark.parametrize("args, message", [
    (["--task", "resnet"], "invalid choice: 'resnet'"),
    (["--gc", "maybe"], "invalid choice: 'maybe'"),
    (["--ab", "--gc", "off"], "not allowed with argument"),
    (["--gc-config", "no/such/file.yaml"], "no such file"),
    (["--steps", "0"], "must be a positive integer"),
])
def test_bad_cli_input_is_rejected(args, message):
    rc, out = run([sys.executable, "-m", "dist_gc.cli.train", *args], 60)
    assert rc == 2 and message in out, out[-2000:]
