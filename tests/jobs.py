"""Helpers for the main-job and launcher tests: real subprocess launches with a free
port, a per-test output dir and a timeout that fails the test (never a hang)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[1]
VERIFY_RE = re.compile(r"verify: max \|update - oracle\| = ([0-9.eE+-]+)")
TOLERANCE = 1e-5


def job_env(**extra: str) -> dict[str, str]:
    """The test's python environment; this checkout's dist_gc first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` from the repository root in its own process group (so a timeout
    can kill the launcher and every rank it started)."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env or job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for ``proc``; on timeout kill its process group and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {proc.args}\n{out[-4000:]}") from None
    return proc.returncode, out


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    return finish(start(cmd, env), timeout)


def accelerate_cmd(config: str | Path, *train_args: str, num_processes: int = 2) -> list[str]:
    """``accelerate launch --config_file CONFIG --num_processes N -m dist_gc.cli.train ...``"""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(num_processes), "--main_process_port", str(free_port()),
            "-m", "dist_gc.cli.train", *train_args]


def verify_errors(out: str) -> list[float]:
    """Every ``verify: max |update - oracle| = X`` the job printed."""
    return [float(x) for x in VERIFY_RE.findall(out)]


def assert_verified(rc: int, out: str, expect_lines: int = 1) -> float:
    """Exit 0 and every printed verify error within tolerance; returns the max error."""
    errors = verify_errors(out)
    assert rc == 0, f"job failed (exit {rc}):\n{out[-6000:]}"
    assert len(errors) >= expect_lines, f"no verify line printed:\n{out[-6000:]}"
    assert max(errors) <= TOLERANCE, f"verify error {max(errors)} > {TOLERANCE}:\n{out[-3000:]}"
    return max(errors)
