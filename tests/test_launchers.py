"""The launch scripts under launchers/, run for real on 127.0.0.1.

* every script parses (bash -n);
* simulated 2 nodes x 2 processes: two launcher processes (node ranks 0 and 1) with
  torchrun (launchers/torchrun_multinode.sh) and with accelerate
  (launchers/accelerate_multinode.sh); both exit 0 and --verify matches the oracle at
  world size 4;
  (torchrun with static node ranks and with the c10d rendezvous);
* launchers/torchrun.sh and launchers/accelerate.sh run the main job with tiny settings;
* launchers/deepspeed.sh (the deepspeed launcher, accelerate's DeepSpeed plugin inside)
  runs --verify on ZeRO-2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.harness import free_port
from tests.jobs import ROOT, assert_verified, finish, job_env, run, start

LAUNCHERS = ROOT / "launchers"
SCRIPTS = sorted(p for p in LAUNCHERS.iterdir() if p.suffix in (".sh", ".sbatch"))
TIMEOUT = 600  # seconds per launch (>= 4x a quiet run)

pytest.importorskip("accelerate")


@pytest.mark.timeout(60)
def test_every_launcher_parses():
    assert {p.name for p in SCRIPTS} >= {
        "accelerate.sh", "torchrun.sh", "deepspeed.sh", "torchrun_multinode.sh",
        "accelerate_multinode.sh", "slurm.sbatch", "deepspeed_hostfile.sh",
    }
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
        assert "set -euo pipefail" in script.read_text(), script.name


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("script, rank_var, port_var, extra", [
    ("torchrun_multinode.sh", "NODE_RANK", "MASTER_PORT", {}),
    ("torchrun_multinode.sh", "NODE_RANK", "MASTER_PORT", {"RDZV": "c10d"}),
    ("accelerate_multinode.sh", "MACHINE_RANK", "MAIN_PROCESS_PORT", {}),
], ids=["torchrun-static", "torchrun-c10d", "accelerate"])
def test_two_nodes_by_two_processes(tmp_path, script, rank_var, port_var, extra):
    """Node ranks 0 and 1 on 127.0.0.1, two processes each: one world of 4."""
    port = str(free_port())
    procs = [
        start(["bash", str(LAUNCHERS / script), "--verify-only", "--output-dir", str(tmp_path / f"node{rank}")],
              job_env(PYTHON=sys.executable, **{rank_var: str(rank), port_var: port}, **extra))
        for rank in (0, 1)
    ]
    try:
        results = [finish(p, TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (rc, out) in enumerate(results):
        assert_verified(rc, out)
        assert "processes=4" in out, f"node {rank} did not join a world of 4:\n{out[-3000:]}"


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("script, port_var", [("torchrun.sh", "MASTER_PORT"), ("accelerate.sh", "MAIN_PROCESS_PORT")])
def test_single_node_launcher_runs_the_main_job(tmp_path, script, port_var):
    rc, out = run(["bash", str(LAUNCHERS / script), "--steps", "2", "--eval-every", "2", "--output-dir", str(tmp_path)],
                  TIMEOUT, job_env(PYTHON=sys.executable, **{port_var: str(free_port())}))
    assert rc == 0, out[-4000:]
    assert "processes=2" in out, out[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "cnn/metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2]


@pytest.mark.timeout(1200)
def test_deepspeed_launcher_verifies(tmp_path):
    pytest.importorskip("deepspeed")
    deepspeed_exe = shutil.which("deepspeed", path=job_env()["PATH"])
    if deepspeed_exe is None:
        pytest.skip("the deepspeed launcher executable is not installed")
    rc, out = run(["bash", str(LAUNCHERS / "deepspeed.sh"), "--verify-only", "--output-dir", str(tmp_path)], TIMEOUT,
                  job_env(DEEPSPEED=deepspeed_exe, MASTER_PORT=str(free_port())))
    assert_verified(rc, out)
    assert "ZeRO-2" in out and "processes=2" in out, out[-3000:]
