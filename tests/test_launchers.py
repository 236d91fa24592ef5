"""The launch scripts under launchers/, run for real on 127.0.0.1.

* every script parses (bash -n);
* simulated 2 nodes x 2 processes: two launcher processes (node ranks 0 and 1) with
  torchrun (launchers/torchrun_multinode.sh) and with accelerate
  (launchers/accelerate_multinode.sh); both exit 0 and --verify matches the oracle at
  world size 4;
* launchers/torchrun.sh and launchers/accelerate.sh run the main job with tiny settings.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import free_port
from tests.jobs import ROOT, assert_verified, finish, job_env, run, start

LAUNCHERS = ROOT / "launchers"
SCRIPTS = sorted(p for p in LAUNCHERS.iterdir() if p.suffix in (".sh", ".sbatch"))
TIMEOUT = 240

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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script, rank_var, port_var", [
    ("torchrun_multinode.sh", "NODE_RANK", "MASTER_PORT"),
    ("accelerate_multinode.sh", "MACHINE_RANK", "MAIN_PROCESS_PORT"),
])
def test_two_nodes_by_two_processes(tmp_path, script, rank_var, port_var):
    """Node ranks 0 and 1 on 127.0.0.1, two processes each: one world of 4."""
    port = str(free_port())
    procs = [
        start(["bash", str(LAUNCHERS / script), "--verify-only", "--output-dir", str(tmp_path / f"node{rank}")],
              job_env(PYTHON=sys.executable, **{rank_var: str(rank), port_var: port}))
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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script, port_var", [("torchrun.sh", "MASTER_PORT"), ("accelerate.sh", "MAIN_PROCESS_PORT")])
def test_single_node_launcher_runs_the_main_job(tmp_path, script, port_var):
    rc, out = run(["bash", str(LAUNCHERS / script), "--steps", "2", "--eval-every", "2", "--output-dir", str(tmp_path)],
                  TIMEOUT, job_env(PYTHON=sys.executable, **{port_var: str(free_port())}))
    assert rc == 0, out[-4000:]
    assert "processes=2" in out, out[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "cnn/metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2]
