"""Ranks that disagree, statistics that hide faults, configs that select nothing.

Kind A — every per-rank difference in the GC setup ends in a clear dist_gc error on
every rank that attached, within the test timeout: never a hang, never exit 0 with
replicas drifting apart. Differences in settings are caught at attach (the ranks
compare their setups through the c10d store before any GC collective); GC attached on
one rank only is a timeout naming the missing rank; a one-rank ``remove()`` is caught
at the other rank's next step. Kind B — a NaN in one rank's shard reaches every global
statistic; GC's step count survives a checkpoint resume. Kind C — an enabled config
that selects nothing, and malformed input, raise ``ValueError`` naming the key.

The "mismatch" scenarios leave the process group healthy (no collective is issued
before the disagreement is found), so one spawn runs them all; each "one rank only"
scenario ends its spawn (the survivor's engine collective can only fail once the
dist_gc rank has exited)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import dist_gc
from tests import models
from tests.harness import progress, run_distributed

#: A short wait for the "one rank only" scenarios (the peer never arrives); the
#: agreeing scenarios keep the default, so a slow rank is never mistaken for a missing one.
ORPHAN_SYNC_TIMEOUT = "10"


def _error(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _ddp(config: dict | None):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = models.make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
    handle = dist_gc.attach(opt, model=ddp, config=config) if config is not None else None
    return ddp, opt, handle


def _zero(stage: int, world: int, config: dict | None):
    import deepspeed

    from tests.ds_cases import ds_config, make_case_model

    case = {"id": "c", "stage": stage}
    model = make_case_model(case)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=ds_config(case, world, None))
    handle = dist_gc.attach(engine, config=config) if config is not None else None
    return engine, handle


def _fsdp2(world: int, config: dict | None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = models.make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = dist_gc.attach(opt, model=model, config=config) if config is not None else None
    return model, opt, handle


def _train_zero(engine, rank, world, steps=1):
    from tests.ds_cases import train_step

    for _ in range(steps):
        train_step(engine, {}, rank, world)


def mismatch_worker(rank: int, world: int) -> dict:
    """Scenarios in which every rank attaches, with a per-rank difference."""
    warnings.filterwarnings("ignore")
    from tests.ds_cases import setup_worker

    setup_worker()
    out: dict[str, str] = {}
    mode = "channel" if rank == 0 else "tensor"
    out["ddp_mode"] = _error(lambda: _ddp({"mode": mode}))
    out["ddp_exclude"] = _error(lambda: _ddp({"exclude": ["fc1.weight"]} if rank == 1 else {}))
    for stage in (2, 3):
        out[f"zero{stage}_mode"] = _error(lambda stage=stage: _zero(stage, world, {"mode": mode}))
        out[f"zero{stage}_full_stats"] = _error(lambda stage=stage: _zero(stage, world, {"full_stats": rank == 1}))
    # Only rank 1 excludes the strided-output tensors: the ranks would issue a different
    # number of GC all-reduces (the attach-time check itself used to hang here).
    out["zero2_exclude"] = _error(lambda: _zero(2, world, {"exclude": ["deconv.weight", "proj.weight"]} if rank == 1 else {}))
    out["fsdp2_mode"] = _error(lambda: _fsdp2(world, {"mode": mode}))
    out["fsdp2_full_stats"] = _error(lambda: _fsdp2(world, {"full_stats": rank == 0}))
    progress("mismatches")

    # remove() on rank 1 only, after step 1: rank 0 must fail at step 2, not diverge.
    ddp, opt, handle = _ddp({})
    batch = models.local_slice(models.make_batch(), rank, world)

    def step():
        opt.zero_grad()
        models.loss_on(ddp, batch).backward()
        opt.step()

    step()
    if rank == 1:
        handle.remove()
    out["ddp_remove_one_rank"] = _error(step)
    progress("remove")

    # NaN in one element of rank 1's gradient shard (FSDP2, full_stats): every global
    # statistic must show it on every rank (a gloo MAX all-reduce drops NaN).
    model, opt, handle = _fsdp2(world, {"full_stats": True})
    models.loss_on(model, models.local_slice(models.make_batch(), rank, world)).backward()
    if rank == 1:
        model.fc1.weight.grad.to_local().view(-1)[0] = float("nan")
    opt.step()
    s = handle.stats
    out["nan_stats"] = (s.nonfinite, s.max_abs_mean_before, s.max_abs_mean_after, s.grad_norm_before, s.grad_norm_after)
    progress("nan")

    # GC's step count continues after a DeepSpeed checkpoint resume.
    import tempfile

    engine, handle = _zero(2, world, {})
    _train_zero(engine, rank, world, steps=3)
    ckpt = os.path.join(tempfile.gettempdir(), f"dist_gc_ckpt_{os.environ['MASTER_PORT']}")
    engine.save_checkpoint(ckpt, tag="t")
    handle.remove()
    engine.destroy()
    engine, handle = _zero(2, world, {})
    engine.load_checkpoint(ckpt, tag="t")
    _train_zero(engine, rank, world, steps=1)
    out["zero2_resume_step"] = str(handle.stats.step)
    handle.remove()
    engine.destroy()
    # An enabled DeepSpeed block that selects nothing fails on every rank.
    from tests.ds_cases import build_engine

    out["zero2_selects_nothing"] = _error(lambda: build_engine({"id": "e", "stage": 2}, world, {"enabled": True, "min_ndim": 99}))
    return out


def orphan_worker(rank: int, world: int, engine: str) -> str:
    """GC attached on rank 0 only; then one training step."""
    warnings.filterwarnings("ignore")
    os.environ["DIST_GC_SYNC_TIMEOUT"] = ORPHAN_SYNC_TIMEOUT
    config = {} if rank == 0 else None
    if engine == "ddp":
        def run():
            ddp, opt, _ = _ddp(config)  # (building DDP is collective; only rank 0 attaches)
            opt.zero_grad()
            models.loss_on(ddp, models.local_slice(models.make_batch(), rank, world)).backward()
            opt.step()
        return _error(run)
    from tests.ds_cases import setup_worker

    setup_worker()

    def run_zero():
        eng, _ = _zero(int(engine[-1]), world, config)
        _train_zero(eng, rank, world)
    return _error(run_zero)


def test_per_rank_differences_fail_on_every_rank():
    per_rank = run_distributed(mismatch_worker, 2)
    for rank, res in enumerate(per_rank):
        for key in ("ddp_mode", "ddp_exclude", "zero2_mode", "zero3_mode", "zero2_full_stats", "zero3_full_stats",
                    "zero2_exclude", "fsdp2_mode", "fsdp2_full_stats"):
            msg = res[key]
            assert msg.startswith("RuntimeError") and "disagree on the GC setup" in msg, f"rank {rank} {key}: {msg}"
        assert 'settings.mode: "channel" on rank(s) [0], "tensor" on rank(s) [1]' in res["ddp_mode"], res["ddp_mode"]
        assert "rank 1 lacks ['fc1.weight']" in res["ddp_exclude"], res["ddp_exclude"]
        assert "full_stats" in res["zero2_full_stats"], res["zero2_full_stats"]
        nonfinite, *values = res["nan_stats"]
        assert nonfinite > 0 and all(v != v for v in values), f"rank {rank}: a NaN must reach every statistic: {res['nan_stats']}"
        assert res["zero2_resume_step"] == "4", f"rank {rank}: GC step after resuming at step 3: {res['zero2_resume_step']}"
        assert res["zero2_selects_nothing"].startswith("ValueError") and "min_ndim=99" in res["zero2_selects_nothing"], res["zero2_selects_nothing"]
    assert per_rank[0]["ddp_remove_one_rank"].startswith("RuntimeError") and "removed GC" in per_rank[0]["ddp_remove_one_rank"], per_rank[0]
    assert "rank(s) [1]" in per_rank[0]["ddp_remove_one_rank"]


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_gc_on_one_rank_only_is_a_clear_error(engine):
    per_rank = run_distributed(orphan_worker, 2, engine, timeout=300)
    assert per_rank[0].startswith("RuntimeError") and "rank(s) [1]" in per_rank[0] and "did not reach dist_gc.attach" in per_rank[0], per_rank[0]
    assert per_rank[1] != "no error", "the rank without GC must fail too (its engine collective loses its peer)"


# --------------------------------------------------------------------------- single process
def test_enabled_config_that_selects_nothing_names_the_keys():
    model = models.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for cfg, key in (({"min_ndim": 10**9}, "min_ndim=1000000000"), ({"exclude": ["*"]}, "exclude=['*']"),
                     ({"include": ["*.bias"]}, "min_ndim=2")):
        with pytest.raises(ValueError, match="selects none of the") as err:
            dist_gc.attach(opt, model=model, config=cfg)
        assert key in str(err.value), (cfg, str(err.value))
    handle = dist_gc.attach(opt, model=model, config={"exclude": ["*"], "allow_empty": True})
    assert handle.enabled and not handle.stats.centralized


def test_step_count_survives_an_optimizer_checkpoint():
    model = models.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = dist_gc.attach(opt, model=model)
    batch = models.make_batch()
    for _ in range(20):
        opt.zero_grad()
        models.loss_on(model, batch).backward()
        opt.step()
    saved = opt.state_dict()
    assert saved["dist_gc"] == {"step": 20}
    handle.remove()
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    handle2 = dist_gc.attach(opt2, model=model)
    opt2.load_state_dict(saved)
    models.loss_on(model, batch).backward()
    opt2.step()
    assert handle2.stats.step == 21, handle2.stats.step
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    plain.load_state_dict(saved)  # a checkpoint saved with GC loads without it too


def test_attach_without_model_says_which_dims_it_assumed():
    model = models.make_model()
    with pytest.warns(UserWarning, match="without model=: output dim 0 assumed for all 6"):
        dist_gc.attach(torch.optim.SGD(model.parameters(), lr=1.0))


def test_malformed_inputs_name_the_file_key_or_argument(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("mode: channel\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.yaml: not a UTF-8 text file"):
        dist_gc.GCConfig.from_file(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("mode: channel\nmin_ndim: 2\nmode: tensor\n")
    with pytest.raises(ValueError, match="dup.yaml: key 'mode' is given twice"):
        dist_gc.GCConfig.from_file(dup)
    dup_json = tmp_path / "dup.json"
    dup_json.write_text('{"mode": "channel", "mode": "tensor"}')
    with pytest.raises(ValueError, match="key 'mode' is given twice"):
        dist_gc.GCConfig.from_file(dup_json)
    model = models.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="model= is a torch.optim.sgd.SGD; expected the"):
        dist_gc.attach(opt, model=opt)
    with pytest.raises(ValueError, match=r"'fc1\.weight'.*output_dim=5 is out of range.*pattern 'fc\*'"):
        dist_gc.attach(opt, model=model, config={"mode": "tensor", "output_dim": {"fc*": 5}})
    with pytest.raises(ValueError, match=r"'conv\.bias'.*output_dim=1 is out of range"):
        dist_gc.attach(opt, model=model, config={"output_dim": {"conv.*": 1}})  # a skipped 1-D bias
    assert not opt._optimizer_step_pre_hooks, "a rejected input leaves the optimizer untouched"
