"""``accelerate launch`` + ``dist_gc.accelerate.attach`` (and the transformers
``Trainer`` callback) against the single-process oracle.

Each test launches real processes with ``accelerate launch`` (MULTI_CPU with gloo, or
DeepSpeed with gloo) running ``tests/accelerate_case.py``: one SGD(lr=1) step on the
shared test model (output dims 0, 1 and -1), full parameters compared with
:func:`tests.oracle.oracle_step`. accelerate's FSDP configs need GPUs (on CPU accelerate
turns them into MULTI_CPU); FSDP1/FSDP2 themselves are tested in test_fsdp1/2.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import free_port

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parent.parent
FP32_ATOL = 1e-5
LAUNCH_TIMEOUT = 600  # seconds; a hung launch fails the test (>= 4x a quiet run: margin for a slow machine)


def write_configs(tmp: Path, world: int, ds: dict | None) -> Path:
    """An accelerate YAML (and DeepSpeed JSON). On a CPU-only machine the MULTI_GPU
    launcher (torchrun) is what starts several processes; the script's
    ``dist_gc.accelerate.accelerator_kwargs()`` then selects gloo."""
    lines = ["compute_environment: LOCAL_MACHINE", f"num_processes: {world}", "num_machines: 1", "machine_rank: 0",
             "main_process_ip: 127.0.0.1", f"main_process_port: {free_port()}", "use_cpu: false"]
    if ds is None:  # (with a DeepSpeed JSON, precision comes from the JSON alone)
        lines += ["distributed_type: MULTI_GPU", "mixed_precision: 'no'"]
    else:
        (tmp / "ds.json").write_text(json.dumps(ds))
        lines += ["distributed_type: DEEPSPEED", "deepspeed_config:", f"  deepspeed_config_file: {tmp / 'ds.json'}",
                  "  zero3_init_flag: false"]
    (tmp / "accelerate.yaml").write_text("\n".join(lines) + "\n")
    return tmp / "accelerate.yaml"


def ds_config(stage: int, gc: dict, clip: float = 0.0, **zero) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": clip,  # DeepSpeed clips at 1.0 unless told; 0 = off
        "zero_optimization": {"stage": stage, **zero}, "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9, "gradient_centralization": gc,
    }


def launch(tmp: Path, world: int, case: dict, ds: dict | None = None) -> subprocess.CompletedProcess:
    config = write_configs(tmp, world, ds)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           str(ROOT / "tests" / "accelerate_case.py"), str(tmp / "out.json"), json.dumps(case)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"accelerate launch hung for {LAUNCH_TIMEOUT}s: {exc.stdout}\n{exc.stderr}")


def run_case(tmp: Path, world: int, case: dict, ds: dict | None = None) -> dict:
    proc = launch(tmp, world, case, ds)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = json.loads((tmp / "out.json").read_text())
    assert res["world"] == world, res  # really `world` data-parallel ranks
    err = max(res["err"].values())
    assert err <= FP32_ATOL, f"max |update - oracle| = {err:.3g} > {FP32_ATOL}: {res['err']}"
    # The oracle's GC moves some weight by >> tolerance, so a no-op could not pass ...
    assert max(res["err_no_gc"].values()) > 20 * FP32_ATOL, res["err_no_gc"]
    # ... and neither could naive GC (dim 0 only: wrong on ConvTranspose and Conv1D).
    assert max(res["err_naive"].values()) > 20 * FP32_ATOL, res["err_naive"]
    assert res["stats"]["centralized"] == 6, res["stats"]
    return res


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
@pytest.mark.parametrize("world,mode,clip,accum", [(2, "channel", 0.5, 2), (3, "tensor", None, 1)])
def test_multi_cpu_ddp(tmp_path, world, mode, clip, accum):
    res = run_case(tmp_path, world, {"mode": mode, "clip": clip, "accum": accum, "check_errors": world == 2})
    assert res["engine"] == "accelerate/DDP" and res["distributed_type"].endswith("MULTI_CPU")
    assert res["stats"]["bytes_communicated"] == 0  # whole gradients: no GC traffic


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_deepspeed_zero2_settings_from_json(tmp_path):
    ds = ds_config(2, {"mode": "tensor"}, clip=0.5, overlap_comm=True, round_robin_gradients=True, contiguous_gradients=True)
    res = run_case(tmp_path, 2, {"mode": "tensor", "clip": 0.5, "accum": 2, "check_errors": True}, ds)
    assert res["engine"].startswith("accelerate/DeepSpeed ZeRO-2"), res["engine"]
    assert res["stats"]["collectives"] == 1


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_deepspeed_zero3(tmp_path):
    ds = ds_config(3, {"mode": "channel"}, stage3_param_persistence_threshold=0)
    res = run_case(tmp_path, 3, {"mode": "channel"}, ds)
    assert res["engine"].startswith("accelerate/DeepSpeed ZeRO-3"), res["engine"]


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_transformers_trainer_callback_with_deepspeed_json(tmp_path):
    pytest.importorskip("transformers")
    ds = ds_config(2, {"mode": "channel"})
    res = run_case(tmp_path, 2, {"mode": "channel", "trainer": True, "ds_config": str(tmp_path / "ds.json")}, ds)
    assert res["engine"].startswith("accelerate/DeepSpeed ZeRO-2"), res["engine"]


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_bad_block_fails_on_every_rank_without_hang(tmp_path):
    ds = ds_config(2, {"mode": "row"})
    proc = launch(tmp_path, 2, {"mode": "channel"}, ds)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    for rank in (0, 1):  # each rank names the key, the value and what is allowed
        assert any(f"[rank{rank}]" in line and "mode" in line and "'row'" in line for line in out.splitlines()), out[-4000:]
