"""Every device-dependent branch runs on CPU: the test-only switch
``DIST_GC_TEST_PRETEND_ACCELERATOR=1`` makes CPU tensors take the CUDA-side choices —
GPU chunk sizes and mixed-dtype kernels (core/centralize.py), fp32 batching and the
fused-kernel choice (engine/engine.py, kernels/__init__.py), the NCCL communication
device and the copy of the message to it and back (engine/collectives.py) — and each
is checked against the oracle here (over real gloo ranks: tests/test_engine_dist.py's
"pretend" cases)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from dist_gc.core import centralize as core
from dist_gc.core.centralize import geometry_of
from dist_gc.core.device import PRETEND_ENV, accelerator_device, on_accelerator
from dist_gc.engine import collectives
from dist_gc.engine.engine import GCEngine
from dist_gc.engine.layout import plan_flat_shard, plan_whole
from dist_gc.kernels import select_backend
from tests.oracle import oracle_centralize


@pytest.fixture
def pretend(monkeypatch):
    monkeypatch.setenv(PRETEND_ENV, "1")


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _grads(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) + torch.rand(s[0], 1, generator=g) * 3).to(dtype) for s in shapes]


def test_switch_off_by_default_and_on_when_set(monkeypatch):
    monkeypatch.delenv(PRETEND_ENV, raising=False)
    assert not on_accelerator(torch.device("cpu")) and on_accelerator(torch.device("meta"))
    monkeypatch.setenv(PRETEND_ENV, "1")
    assert on_accelerator(torch.device("cpu")) and on_accelerator(None)
    if not torch.cuda.is_available():
        assert accelerator_device() == torch.device("cpu")


def test_gpu_chunk_sizes_and_mixed_kernels(pretend):
    x = torch.zeros(40_000, dtype=torch.bfloat16)
    limit = 64 * 2**20
    assert core._chunk_elems(limit, x.device) == limit // 8  # the GPU budget, not CPU_CHUNK_ELEMS
    assert core.fits_mixed_kernels(x, limit)  # a 40K-element bf16 tensor is "small" on a GPU
    (g,) = _grads([(200, 200)], torch.bfloat16)
    want = oracle_centralize(g, "channel", 0)
    core.centralize_(g)
    # bf16: one rounding of the result: eps * max|x| bounds it
    assert float((g.double() - want).abs().max()) <= torch.finfo(torch.bfloat16).eps * float(want.abs().max() + 3)


def test_fp32_batching_runs_and_is_exact(pretend, monkeypatch):
    """On CUDA small fp32 tensors are batched (one mean, one subtraction, one multi-tensor
    copy); the CPU takes that branch under the switch."""
    shapes = [(8, 16)] * 5 + [(4, 16)] * 3
    grads = _grads(shapes, torch.float32)
    want = [oracle_centralize(g, "channel", 0) for g in grads]
    plans = [plan_whole(f"w{i}", geometry_of(s), s, 0, source=i) for i, s in enumerate(shapes)]
    engine = GCEngine(plans, [lambda g=g: g for g in grads], kernel="torch")
    assert engine.compiled.batches, "the plans batch"
    used = []
    real = GCEngine._centralize_batch
    monkeypatch.setattr(GCEngine, "_centralize_batch", lambda self, *a: used.append(real(self, *a)) or used[-1])
    engine.step()
    assert used and all(used), used
    for g, w in zip(grads, want):
        assert float((g.double() - w).abs().max()) <= 1e-5


def test_nccl_comm_device_and_the_message_copy(pretend, one_rank_group, monkeypatch):
    """The group is taken for NCCL's: its device is the accelerator's (the CPU here), and
    the message goes to it and back through the copy branch — exact all the same."""
    assert collectives.comm_device(one_rank_group) == accelerator_device()
    copies = []
    real_to = torch.Tensor.to

    def spy(self, *a, **k):
        if k.get("copy"):
            copies.append(self.numel())
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    s = (6, 10)
    (g,) = _grads([s], torch.float32)
    # rank 0 of a 2-way partition (elements [0, 25) of 60) on a 1-rank group: the
    # all-reduce is the identity, so the mean is this piece's sum over the 60 elements
    piece = g.reshape(-1)[:25].clone()
    plan = plan_flat_shard("w", geometry_of(s, "tensor"), ranges=[(0, 25), (25, 60)], rank=0, group=one_rank_group, source=0, offset=0)
    engine = GCEngine([plan], [lambda: piece], kernel="torch")
    stats = engine.step()
    assert stats.collectives == 1 and copies, (stats, copies)
    want = g.double().reshape(-1)[:25] - g.double().reshape(-1)[:25].sum() / 60
    assert float((piece.double() - want).abs().max()) <= 1e-5


_AUTO = textwrap.dedent("""
    import os, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from dist_gc.kernels import select_backend
    from dist_gc.engine.engine import GCEngine
    from dist_gc.engine.layout import plan_whole
    from dist_gc.core.centralize import geometry_of
    g = torch.randn(16, 9) + torch.arange(16.0)[:, None]
    want = g - g.mean(1, keepdim=True)
    e = GCEngine([plan_whole("w", geometry_of(g.shape), g.shape, 0, source=0)], [lambda: g])
    e.step()
    print(select_backend("auto", torch.device("cpu"), [torch.float32]), e.backend, float((g - want).abs().max()) <= 1e-5)
""")


def test_the_fused_kernel_choice_takes_the_cuda_side(monkeypatch):
    """``kernel="auto"`` picks the C++ kernel for CPU tensors, and under the switch the
    CUDA side's choice, Triton (run by its interpreter here), which is exact."""
    monkeypatch.delenv(PRETEND_ENV, raising=False)
    assert select_backend("auto", torch.device("cpu"), [torch.float32]) == "cpu"
    pytest.importorskip("triton")
    env = {**os.environ, PRETEND_ENV: "1"}
    env.pop("DIST_GC_KERNEL", None)
    out = subprocess.run([sys.executable, "-c", _AUTO], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["triton", "triton", "True"], out.stdout
