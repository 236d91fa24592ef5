"""DeepSpeed ZeRO-0/1/2/3: GC on the partitioned fp32 master gradients is exact.

Real DeepSpeed engines on real gloo ranks (CPU), one training step each, compared with
the single-process oracle (tests/oracle.py: global batch, full tensors, clip -> GC ->
SGD lr=1, or Adam applied to the centralized gradient). The worker code is in
tests/ds_cases.py; every spawn runs many engines, the parent asserts per case.

Proven here, at W = 2 and 3 (ZeRO-3 also 4), both modes, clipping off and on:
* ZeRO-0 (plain optimizer; fp16/bf16 FP16_UnfusedOptimizer; FP16_Optimizer with
  FusedAdam), ZeRO-1 (incl. BF16_Optimizer), ZeRO-2 (overlap_comm, small buckets,
  contiguous_gradients off, round_robin_gradients, gradient accumulation), ZeRO-3
  (several sub-groups, persistence threshold 0, zero.Init), fp32/bf16/fp16,
  several param groups, frozen params, client torch optimizers and DeepSpeed's
  "optimizer" block, optimizer offload to CPU (DeepSpeedCPUAdam);
* the negative controls (naive and forced GC on what the optimizer holds) fail;
* fp16 dynamic loss scaling: overflow steps skipped with masters unchanged and GC not
  run, the loss scale lowered, the first good step exact;
* the JSON flag: bad blocks fail on every rank with a clear message (no hang); misuse
  and unsupported combinations raise; torchrun-style env initialisation works.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.ds_cases import DTYPES, FROZEN, initial_masters, oracle, oracle_norms, run_cases, run_config_checks, run_overflow  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.models import GCTestNet, make_shifted_model  # noqa: E402

FP32_ATOL = 1e-5
EPS32 = torch.finfo(torch.float32).eps
CLIP = 0.5  # the oracle's global grad norm is ~1.54, so clipping is active


# --------------------------------------------------------------------------- ops
def _load_op(name: str) -> str | None:
    """Build (once, cached under ~/.cache/torch_extensions) or load a DeepSpeed C++ op in
    this process, so spawned ranks never race to build it. Returns why it is unavailable."""
    try:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().create_op_builder(name).load()
        return None
    except Exception as exc:  # noqa: BLE001 - reported as the skip reason
        return f"DeepSpeed {name} op unavailable here: {type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def ops() -> dict[str, str | None]:
    # DeepSpeed's torch backend loads its shared-memory comm op on init (JIT, ~1 min
    # the first time on a machine); build it here before any rank starts.
    return {n: _load_op(n) for n in ("ShareMemCommBuilder", "CPUAdamBuilder", "FusedAdamBuilder")}


# --------------------------------------------------------------------------- cases
def _with_clip(cases: list[dict]) -> list[dict]:
    """Every case with clipping off and on (GC runs after clipping: not commutative);
    the negative controls run on the unclipped variant."""
    return [
        dict(c, clip=v, id=f"{c['id']}{'-clip' if v else ''}", controls=c.get("controls", False) and v is None)
        for c in cases
        for v in (None, CLIP)
    ]


BF16_OPT = {"data_types": {"grad_accum_dtype": "fp32"}}  # ZeRO-1 + bf16 + fp32 accumulation -> BF16_Optimizer

STAGE012 = _with_clip([
    {"id": "z0-fp32", "stage": 0, "controls": True},
    {"id": "z0-bf16", "stage": 0, "dtype": "bf16", "controls": True},
    {"id": "z0-fp16-static", "stage": 0, "dtype": "fp16", "static_scale": 1.0},
    # DeepSpeed 0.19.8 stage-0 fp16 with a dynamic scale divides the gradient by the
    # loss scale without having scaled the loss (engine.backward only scales for ZeRO
    # optimizers; DeepSpeed PR #8393, open): its update is not the oracle's, so only the
    # projected check (GC-on == GC of DeepSpeed's own GC-off update) applies.
    {"id": "z0-fp16-dynamic", "stage": 0, "dtype": "fp16", "oracle": False},
    {"id": "z0-fp16-fusedadam", "stage": 0, "dtype": "fp16", "static_scale": 1.0, "opt": "fused_adam", "linear_adam": True, "needs": "FusedAdamBuilder"},
    {"id": "z0-bf16-fusedadam", "stage": 0, "dtype": "bf16", "opt": "fused_adam", "linear_adam": True, "needs": "FusedAdamBuilder"},
    {"id": "z0-adam", "stage": 0, "opt": "adam"},
    {"id": "z1-fp32", "stage": 1, "controls": True},
    {"id": "z1-groups-frozen", "stage": 1, "groups": True, "frozen": True, "controls": True},
    {"id": "z1-bf16", "stage": 1, "dtype": "bf16", "controls": True},
    {"id": "z1-bf16-BF16_Optimizer", "stage": 1, "dtype": "bf16", "extra": BF16_OPT, "groups": True, "controls": True, "full_stats": True},
    {"id": "z1-fp16", "stage": 1, "dtype": "fp16"},
    {"id": "z1-dsadam", "stage": 1, "opt": "ds_adam"},
    {"id": "z1-offload-cpuadam", "stage": 1, "opt": "cpuadam", "offload": True, "needs": "CPUAdamBuilder"},
    {"id": "z2-fp32", "stage": 2, "controls": True},
    {"id": "z2-overlap-smallbuckets", "stage": 2, "zero": {"overlap_comm": True, "reduce_bucket_size": 200, "allgather_bucket_size": 200}, "controls": True},
    {"id": "z2-noncontiguous", "stage": 2, "zero": {"contiguous_gradients": False}, "controls": True},
    {"id": "z2-roundrobin", "stage": 2, "zero": {"round_robin_gradients": True}, "controls": True},
    {"id": "z2-roundrobin-groups-frozen", "stage": 2, "zero": {"round_robin_gradients": True, "overlap_comm": True}, "groups": True, "frozen": True, "controls": True, "full_stats": True},
    {"id": "z2-gas2", "stage": 2, "gas": 2, "zero": {"overlap_comm": True}, "controls": True},
    {"id": "z2-bf16", "stage": 2, "dtype": "bf16", "controls": True},
    {"id": "z2-fp16", "stage": 2, "dtype": "fp16", "zero": {"round_robin_gradients": True}},
    {"id": "z2-adam", "stage": 2, "opt": "adam", "groups": True},
    {"id": "z2-offload-cpuadam", "stage": 2, "opt": "cpuadam", "offload": True, "needs": "CPUAdamBuilder"},
    {"id": "z2-offload-cpuadam-gas2", "stage": 2, "opt": "cpuadam", "offload": True, "gas": 2, "groups": True, "needs": "CPUAdamBuilder"},
])

SG = {"sub_group_size": 300}  # several sub-groups: DeepSpeed steps (and GC runs) once per sub-group
STAGE3 = _with_clip([
    {"id": "z3-fp32", "stage": 3, "controls": True},
    {"id": "z3-subgroups-nopersist", "stage": 3, "zero": {**SG, "stage3_param_persistence_threshold": 0}, "controls": True, "full_stats": True},
    {"id": "z3-zeroinit", "stage": 3, "zero_init": True, "zero": SG},
    {"id": "z3-groups-frozen", "stage": 3, "zero": SG, "groups": True, "frozen": True, "controls": True},
    {"id": "z3-gas2-noncontiguous", "stage": 3, "gas": 2, "zero": {**SG, "contiguous_gradients": False, "overlap_comm": False, "reduce_bucket_size": 200}},
    {"id": "z3-bf16", "stage": 3, "dtype": "bf16", "zero": SG, "controls": True},
    {"id": "z3-fp16", "stage": 3, "dtype": "fp16", "zero": SG},
    {"id": "z3-dsadam", "stage": 3, "opt": "ds_adam", "zero": SG},
    {"id": "z3-offload-cpuadam", "stage": 3, "opt": "cpuadam", "offload": True, "zero": SG, "needs": "CPUAdamBuilder"},
    {"id": "z3-offload-params-too", "stage": 3, "opt": "cpuadam", "offload": True, "zero": {**SG, "offload_param": {"device": "cpu"}}, "needs": "CPUAdamBuilder"},
])


def _available(cases: list[dict], ops: dict[str, str | None], world: int) -> list[dict]:
    """Cases whose ops are available; gradient accumulation adapted so that the local
    batch (12 / W samples) splits into equal micro-batches (W=4: 3 micro-steps)."""
    out = []
    for c in cases:
        if c.get("needs") is not None and ops[c["needs"]] is not None:
            continue
        if (12 // world) % c.get("gas", 1):
            c = dict(c, gas=12 // world)
        out.append(c)
    return out


# --------------------------------------------------------------------------- tolerances
def _oracle_scale(case: dict) -> tuple[float, float]:
    """(max |update| of the oracle step, max |master weight| before or after it)."""
    w0, new = initial_masters(case), oracle(case, None)
    upd = max(float((new[n] - w0[n]).abs().max()) for n in w0)
    return upd, max(float(w0[n].abs().max()) for n in w0) + upd


def _tolerances(case: dict) -> tuple[float, float]:
    """(atol vs the oracle, atol vs the projected GC-off update)."""
    upd, mag = _oracle_scale(case)
    # Projected check: both runs' masters are fp32 values of magnitude <= mag, each
    # update rounded once (<= eps32/2 * mag); the projection at most doubles an
    # elementwise error (|P e| <= |e| + |mean e|): <= 3 eps32 * mag, take 8x.
    proj = 8 * EPS32 * mag
    if case.get("dtype", "fp32") == "fp32":
        return FP32_ATOL, proj
    # 16-bit: the oracle and DeepSpeed each compute the gradient in the 16-bit model
    # (different batch splits and summation orders), each element off by at most ~eps
    # of the largest gradient; GC's mean subtraction at most doubles that: 2 * 2 *
    # eps(dtype) * max|update| (an SGD lr=1 update is the gradient; Adam's is ~lr).
    return 4 * torch.finfo(DTYPES[case["dtype"]]).eps * upd, proj


def _check(results: list[dict], cases: list[dict], world: int) -> None:
    by_id = {c["id"]: c for c in cases}
    assert [r["id"] for r in results] == [c["id"] for c in cases]
    for res in results:
        case = by_id[res["id"]]
        tol, tol_proj = _tolerances(case)
        where = f"[W={world} {case['id']}]"
        for mode in case.get("modes", ("channel", "tensor")):
            facts = res["facts"][mode]
            assert facts["gc_steps"] == 1 and facts["skipped_steps"] == 0, f"{where} {mode}: GC ran {facts}"
            if "sub_group_size" in case.get("zero", {}) or (case.get("groups") and case["stage"] in (1, 2) and "extra" not in case):
                # DeepSpeed stepped its optimizer once per group / sub-group: GC too.
                assert facts["phases"] >= 2, f"{where} expected several optimizer phases: {facts}"
            if case.get("full_stats"):
                # Statistics merged over the optimizer phases and reduced over the
                # partition groups: global norms before/after GC, means ~0 after.
                before, after, _, mean_after = facts["stats"]
                want_before, want_after = oracle_norms(case, mode)
                rtol = 1e-5 if case.get("dtype", "fp32") == "fp32" else 8 * torch.finfo(DTYPES[case["dtype"]]).eps
                assert math.isclose(before, want_before, rel_tol=rtol), f"{where} {mode}: grad_norm_before {before} != {want_before}"
                assert math.isclose(after, want_after, rel_tol=rtol), f"{where} {mode}: grad_norm_after {after} != {want_after}"
                assert mean_after <= 1e-6 * max(1.0, before), f"{where} {mode}: max |mean| after GC {mean_after}"
            if case.get("oracle", True):
                err = res["err"][mode]
                worst = max(err, key=err.get)
                assert err[worst] <= tol, f"{where} {mode}: {worst} off the oracle by {err[worst]:.3g} > {tol:.3g} ({facts['binding']})"
            if mode in res["projected"]:
                err = res["projected"][mode]
                worst = max(err, key=err.get)
                assert err[worst] <= tol_proj, f"{where} {mode}: {worst} off the projected GC-off update by {err[worst]:.3g} > {tol_proj:.3g}"
        if case.get("controls"):
            # Negative controls must fail by far: naive GC (dim 0 on what the optimizer
            # holds; a no-op on 1-D partitions) and "forced" GC (one mean per partition).
            for variant in ("naive", "forced"):
                if case.get("dtype", "fp32") == "fp32":
                    err, bound = res["err"][variant], 100 * tol
                else:
                    err, bound = res["projected"][variant], 100 * tol_proj
                assert max(err.values()) > bound, f"{where} negative control {variant!r} passed: {max(err.values()):.3g} <= {bound:.3g}"


def _run(cases: list[dict], world: int, ops: dict[str, str | None], timeout: float) -> None:
    if ops["ShareMemCommBuilder"] is not None:
        pytest.skip(ops["ShareMemCommBuilder"])
    kept = _available(cases, ops, world)
    dropped = {c["needs"] for c in cases if c.get("needs") and ops[c["needs"]] is not None}
    if dropped:  # say loudly which coverage is missing on this machine, and why
        warnings.warn(f"DeepSpeed cases needing {sorted(dropped)} not run: " + "; ".join(ops[d] for d in sorted(dropped)))
    cases = kept
    _check(run_distributed(run_cases, world, cases, timeout=timeout)[0], cases, world)


# --------------------------------------------------------------------------- tests
def test_gc_changes_every_weight_update():
    """The oracle's GC changes every >= 2-D weight's update far beyond the fp32
    tolerance (so a no-op cannot pass). Tensor mode has one structural zero: fc1
    feeds a LayerNorm (its backward makes the output gradient sum to zero over
    features), so fc1's whole-tensor mean is 0 and tensor-mode GC leaves it alone
    (channel mode still changes it)."""
    case = {"stage": 0}
    off = oracle(case, None)
    for mode in ("channel", "tensor"):
        on = oracle(case, mode)
        for name in GCTestNet.OUTPUT_DIMS:
            change = float((on[name] - off[name]).abs().max())
            if mode == "tensor" and name == "fc1.weight":
                assert change < 1e-8, (mode, name, change)
            else:
                assert change > 20 * FP32_ATOL, f"GC changes {name} ({mode}) by only {change:.3g}"
    assert set(FROZEN) <= {n for n, _ in make_shifted_model().named_parameters()}


@pytest.mark.parametrize("world", [2, 3])
def test_zero_stages_0_1_2_exact(world, ops):
    _run(STAGE012, world, ops, timeout=1200)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_zero3_exact(world, ops):
    _run(STAGE3, world, ops, timeout=1200)


def test_fp16_overflow_skips_step_then_exact(ops):
    if ops["ShareMemCommBuilder"] is not None:
        pytest.skip(ops["ShareMemCommBuilder"])
    cases = [
        {"id": "z1", "stage": 1, "dtype": "fp16", "scale_power": 24, "clip": CLIP},
        {"id": "z2", "stage": 2, "dtype": "fp16", "scale_power": 24, "mode": "tensor"},
        {"id": "z3", "stage": 3, "dtype": "fp16", "scale_power": 24, "zero": SG, "clip": CLIP},
    ]
    results = run_distributed(run_overflow, 2, cases, timeout=900)
    for rank_results in results:
        for case, res in zip(cases, rank_results):
            log, where = res["log"], f"[{case['id']}]"
            assert len(log) >= 2 and log[-1]["overflow"] is False, f"{where} never overflowed or never recovered: {log}"
            for entry in log[:-1]:
                assert entry["overflow"], f"{where} {log}"
                assert entry["changed"] == 0.0, f"{where} an overflow step changed the masters: {entry}"
                assert entry["gc_steps"] == 0, f"{where} GC ran on a skipped step: {entry}"
                assert entry["scale_after"] < entry["scale_before"], f"{where} loss scale not lowered: {entry}"
            assert log[-1]["gc_steps"] == 1 and log[-1]["changed"] > 0
            tol, _ = _tolerances(case)
            worst = max(res["err"], key=res["err"].get)
            assert res["err"][worst] <= tol, f"{where} first good step: {worst} off the oracle by {res['err'][worst]:.3g} > {tol:.3g}"


def test_config_flag_entry_points_and_refusals(ops):
    if ops["ShareMemCommBuilder"] is not None:
        pytest.skip(ops["ShareMemCommBuilder"])
    with tempfile.TemporaryDirectory() as tmp:
        results = run_distributed(
            run_config_checks, 2, tmp, ops["CPUAdamBuilder"] is None, ops["FusedAdamBuilder"] is None, timeout=900
        )
    for rank, res in enumerate(results):
        where = f"[rank {rank}]"
        assert res["env_init"] == (True, 2, rank), where
        assert res["env_init_err"] <= FP32_ATOL, f"{where} ZeRO-2 after env init: {res['env_init_err']}"
        expected = {
            "unknown_key": "unknown gradient centralization key(s) 'mdoe'",
            "bad_mode": "mode='rows'",
            "bad_min_ndim": "min_ndim=0",
            "bad_enabled": "enabled='yes'",
            "not_a_mapping": "expected a mapping",
            "include_matches_nothing": "include: pattern 'nosuch.*' matches no parameter",
            "exclude_matches_nothing": "exclude: pattern '*.nosuch' matches no parameter",
            "output_dim_out_of_range": "output_dim=5 is out of range",
        }
        for key, text in expected.items():
            msg = res[f"bad:{key}"]
            assert msg.startswith("ValueError") and text in msg, f"{where} {key}: {msg}"
        assert res["disabled"] and res["absent"], where
        mode, skipped = res["args_path"]
        assert mode == "tensor" and "head.weight" in skipped, f"{where} args.deepspeed_config: {res['args_path']}"
        for fname, got in res["examples"].items():
            if isinstance(got, str):
                assert got.startswith("skipped"), (fname, got)
                continue
            binding, steps, centralized = got
            assert steps == 1 and centralized == len(GCTestNet.OUTPUT_DIMS), f"{where} {fname}: {got}"
            stage = re.search(r"zero(\d)", fname).group(1)
            assert f"ZeRO-{stage}" in binding, (fname, binding)
        # zero{1,2,3}{,_offload}.json (DeepSpeed launcher) + accelerate_zero{2,3}.json
        assert len(res["examples"]) == 8, res["examples"]
        for key in ("attach_wrapper", "attach_inner_partitions", "attach_model_engine", "attach_inner_z3"):
            assert res[key].startswith("ValueError") and "DeepSpeedEngine" in res[key], f"{where} {key}: {res[key]}"
        assert res["swapped_optimizer"].startswith("RuntimeError") and "replaced" in res["swapped_optimizer"], res["swapped_optimizer"]
        for key in ("corrupt_zero2", "corrupt_zero3"):
            assert res[key].startswith("RuntimeError") and "does not match" in res[key], f"{where} {key}: {res[key]}"
        assert res["qgz"].startswith("ValueError") and "zero_quantized_gradients" in res["qgz"] and "CPU" in res["qgz"], res["qgz"]
        binding, err = res["hpz"]  # hpZ: refused before issue 12, supported since
        assert "ZeRO-3" in binding and "hpZ" in binding and err <= FP32_ATOL, f"{where} hpZ: {res['hpz']}"
        check_engine_block(res["engine_block"], where)


def check_engine_block(res: dict, where: str) -> None:
    """dist_gc.attach(engine) reads the engine's own "gradient_centralization" block."""
    assert res["disabled"] == (False, True), f"{where} enabled: false must leave the optimizer untouched: {res['disabled']}"
    msg = res["disagree"]
    assert msg.startswith("ValueError") and "'mode': 'channel'" in msg and "'mode': 'tensor'" in msg, f"{where} {msg}"
    enabled, mode, min_ndim, source = res["from_block"]
    assert enabled and mode == "tensor" and min_ndim == 2 and "gradient_centralization" in source, f"{where} {res['from_block']}"
    assert res["from_block_err"] <= FP32_ATOL, f"{where} tensor mode from the engine's block: {res['from_block_err']}"
    assert res["empty_block"] == (True, "channel"), f"{where} {{}} means on: {res['empty_block']}"
    mode, warned = res["near_miss"]
    assert mode == "channel" and warned and "did you mean 'gradient_centralization'" in warned[0], f"{where} {res['near_miss']}"
    origin, mode, source = res["wrapper_env"]
    assert origin == "auto" and mode == "tensor" and "DIST_GC_CONFIG" in source, f"{where} {res['wrapper_env']}"
    assert res["wrapper_user_again"], f"{where} a user attach with equal settings must return the wrapper's handle"
    msg = res["wrapper_disagree"]
    assert msg.startswith("ValueError") and "disagree" in msg and "'mode': 'channel'" in msg and "'mode': 'tensor'" in msg, msg


def test_dist_gc_deepspeed_is_lazy():
    """``import dist_gc`` / ``dist_gc.deepspeed`` must not import DeepSpeed."""
    import subprocess
    import sys

    code = "import sys, dist_gc, dist_gc.deepspeed; assert 'deepspeed' not in sys.modules, 'imported deepspeed'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_layout_ranges_cover_each_tensor_once():
    from dist_gc.adapters._common import equal_partition_ranges

    for world in (1, 2, 3, 4):
        for psize in (1, 5, 7, 64):
            flat = psize * world
            for off in range(0, flat, 3):
                for numel in range(1, flat - off + 1, 4):
                    ranges = equal_partition_ranges(off, numel, psize, world)
                    covered = [i for s, e in ranges for i in range(s, e)]
                    assert covered == list(range(numel)), (world, psize, off, numel, ranges)
