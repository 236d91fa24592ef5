"""A wheel and an sdist built from the repository (``python -m build``) install into a
fresh virtual environment, and work from there: ``import dist_gc`` (from the venv, not
this checkout), the shipped configs, the ``dist-gc-run`` console script and
``python -m dist_gc.run`` (a probe script sees the argv and ``sys.path[0]`` Python
would give it, with the bootstrap active), ``python -m dist_gc.configs``; the wheel
carries LICENSE, ``py.typed``, the bootstrap and every config, and declares the licence
and the extras.

Fast path (~10-20 s on 2 cores instead of minutes): the build runs without isolation
(this environment's setuptools; no index needed), and the fresh venv borrows torch and
the other dependencies from this environment through a one-line ``.pth`` file instead
of reinstalling them. A plain path line in a ``.pth`` does not run this environment's
own ``.pth`` files, so an editable install of dist_gc here is not visible there;
``--no-deps --ignore-installed`` installs exactly the wheel and never touches this
environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.jobs import ROOT

TIMEOUT = 300
IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".whl")

pytest.importorskip("build")


def _run(cmd: list, cwd: Path, env: dict | None = None) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, f"{cmd}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.timeout(3 * TIMEOUT)
def test_wheel_and_sdist_install_and_work_in_a_fresh_venv(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=IGNORE)  # build a copy: the checkout stays untouched
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src], src)
    (wheel,) = dist.glob("dist_gc-*.whl")
    (sdist,) = dist.glob("dist_gc-*.tar.gz")

    names = zipfile.ZipFile(wheel).namelist()
    configs = [n for n in names if n.startswith("dist_gc/configs/") and n.endswith((".yaml", ".json"))]
    assert len(configs) == 16, configs
    for needed in ("dist_gc/py.typed", "dist_gc/_bootstrap/sitecustomize.py", "dist_gc/run.py", "dist_gc/configs/__init__.py",
                   "dist_gc/kernels/gc_cpu.cpp", "dist_gc/kernels/_triton_kernels.py"):
        assert needed in names, needed
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    assert all(f"Provides-Extra: {e}" in meta for e in ("deepspeed", "accelerate", "transformers", "lightning", "demo", "gpu", "test"))
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "dist-gc-run = dist_gc.run:main" in entry
    members = tarfile.open(sdist).getnames()
    assert any(m.endswith("/LICENSE") for m in members) and sum("dist_gc/configs/" in m and m.endswith(".json") for m in members) == 8
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (site / "_borrow_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-index", "--no-deps", "--ignore-installed", wheel], tmp_path)

    work = tmp_path / "work"  # not the checkout: nothing to import dist_gc from but the venv
    work.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    facts = json.loads(_run([py, "-c", (
        "import json, sys, dist_gc; from dist_gc import configs, GCConfig; "
        "print(json.dumps({'file': dist_gc.__file__, 'torch': 'torch' in sys.modules, "
        "'mode': GCConfig.from_file(configs.path('gc/tensor.yaml')).mode, 'n': len(configs.names()), "
        "'ds': GCConfig.from_deepspeed_config(configs.path('deepspeed/zero3.json')).enabled}))")], work, env))
    assert facts["file"].startswith(str(venv)) and not facts["torch"], facts
    assert facts["mode"] == "tensor" and facts["n"] == 16 and facts["ds"], facts
    assert "gc/channel.yaml" in _run([py, "-m", "dist_gc.configs", "list"], work, env).split()
    # the installed package builds its C++ kernel from the shipped source (a fresh cache)
    kernel = _run([py, "-c", (
        "import torch; from dist_gc.kernels import cpu; from dist_gc.engine.engine import GCEngine; "
        "from dist_gc.engine.layout import plan_whole; from dist_gc.core.centralize import geometry_of; "
        "g = torch.randn(8, 5) + 1; e = GCEngine([plan_whole('w', geometry_of(g.shape), g.shape, 0, source=0)], [lambda: g]); e.step(); "
        "print(cpu._SOURCE, e.backend, float(g.mean(1).abs().max()) < 1e-6)")], work,
        {**env, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}).split()
    assert kernel[0].startswith(str(venv)) and kernel[1:] == ["cpu", "True"], kernel

    (work / "sub").mkdir()
    (work / "sub" / "probe.py").write_text(
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv, 'path0': sys.path[0], 'boot': 'dist_gc._autopatch' in sys.modules,\n"
        "                  'cfg': os.environ.get('DIST_GC_CONFIG'), 'pkg': sys.modules['dist_gc'].__file__ if 'dist_gc' in sys.modules else None}))\n")
    for cmd in ([venv / "bin" / "dist-gc-run", "--gc-config", "gc/channel.yaml", "sub/probe.py", "a", "--b"],
                [py, "-m", "dist_gc.run", "--gc-config", "gc/channel.yaml", "sub/probe.py", "a", "--b"]):
        got = json.loads(_run(cmd, work, env).strip().splitlines()[-1])
        assert got["argv"] == ["sub/probe.py", "a", "--b"] and got["path0"] == str(work / "sub"), got
        assert got["boot"] and got["pkg"].startswith(str(venv)), got
        assert got["cfg"].startswith(str(venv)) and got["cfg"].endswith("gc/channel.yaml"), got
