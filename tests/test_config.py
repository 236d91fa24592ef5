"""Malformed configurations fail at setup with a message naming the key, the value and
what is allowed — from every entry point, and on every rank without a hang."""

from __future__ import annotations

import json

import pytest
import torch

import dist_gc
from dist_gc import GCConfig
from tests.harness import run_distributed
from tests.models import make_model

# (config dict, key the message must name, a fragment of the value or allowed set)
MALFORMED = [
    ({"mode": "row"}, "mode", "'row'"),
    ({"mode": 1}, "mode", "'channel'"),
    ({"enabled": "yes"}, "enabled", "'yes'"),
    ({"min_ndim": 0}, "min_ndim", ">= 1"),
    ({"min_ndim": 2.5}, "min_ndim", "2.5"),
    ({"min_ndim": True}, "min_ndim", "True"),
    ({"include": "*.weight"}, "include", "list"),
    ({"include": []}, "include", "at least one"),
    ({"exclude": [3]}, "exclude", "[3]"),
    ({"exclude": [""]}, "exclude", "non-empty"),
    ({"output_dim": {"fc.*": "last"}}, "output_dim", "integer"),
    ({"output_dim": [0]}, "output_dim", "mapping"),
    ({"skip_degenerate": 1}, "skip_degenerate", "true or false"),
    ({"full_stats": None}, "full_stats", "None"),
    ({"centre": True}, "centre", "allowed: enabled"),
    ({"Mode": "channel"}, "Mode", "allowed"),
]


@pytest.mark.parametrize("bad,key,fragment", MALFORMED, ids=[str(m[0]) for m in MALFORMED])
def test_malformed_config_rejected(bad, key, fragment):
    with pytest.raises(ValueError) as exc:
        GCConfig.from_dict(bad)
    assert key in str(exc.value) and fragment in str(exc.value), str(exc.value)


def test_every_offending_value_is_reported_at_once():
    with pytest.raises(ValueError) as exc:
        GCConfig(mode="x", min_ndim=-1, enabled="no")
    assert all(k in str(exc.value) for k in ("mode='x'", "min_ndim=-1", "enabled='no'"))


def test_patterns_that_match_nothing_are_rejected_at_attach():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for cfg, key in (({"include": ["encoder.*"]}, "include"), ({"exclude": ["fc9.*"]}, "exclude"), ({"output_dim": {"nope": 1}}, "output_dim")):
        with pytest.raises(ValueError, match=f"{key}: pattern"):
            dist_gc.attach(opt, model=model, config=cfg)
    with pytest.raises(ValueError, match="output_dim=5 is out of range"):
        dist_gc.attach(opt, model=model, config={"output_dim": {"fc1.weight": 5}})
    assert not opt._optimizer_step_pre_hooks, "a rejected config must leave the optimizer untouched"


def test_config_sources(tmp_path):
    p = tmp_path / "gc.json"
    p.write_text(json.dumps({"mode": "tensor", "exclude": ["head.*"]}))
    assert GCConfig.from_file(p).mode == "tensor"
    y = tmp_path / "gc.yaml"
    y.write_text("mode: channel\nmin_ndim: 4\n")
    assert GCConfig.from_file(y).min_ndim == 4
    ds = {"train_batch_size": 8, "gradient_centralization": {"enabled": True, "mode": "tensor"}}
    assert GCConfig.from_deepspeed_config(ds).mode == "tensor"
    assert GCConfig.from_deepspeed_config({"train_batch_size": 8}).enabled is False
    dsp = tmp_path / "ds.json"
    dsp.write_text(json.dumps({"gradient_centralization": {"mode": "rows"}}))
    with pytest.raises(ValueError, match=r"ds.json: gradient_centralization: .*mode='rows'"):
        GCConfig.from_deepspeed_config(dsp)
    with pytest.raises(ValueError, match="gradient_centralization.*mode='rows'"):
        GCConfig.from_file(dsp)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GCConfig.from_file(bad)
    with pytest.raises(ValueError, match="cannot read"):
        GCConfig.from_file(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="gradient_centralization.*mapping"):
        GCConfig.from_deepspeed_config({"gradient_centralization": True})
    assert GCConfig.from_dict(GCConfig(mode="tensor").to_dict()) == GCConfig(mode="tensor")


def bad_config_worker(rank, world, cfg):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(make_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    try:
        dist_gc.attach(opt, model=ddp, config=cfg)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("cfg", [{"mode": "rows"}, {"include": ["decoder.*"]}])
def test_bad_config_fails_on_every_rank_without_hang(cfg):
    msgs = run_distributed(bad_config_worker, 3, cfg, timeout=120)
    assert all(m is not None for m in msgs), msgs
    key = next(iter(cfg))
    assert all(key in m for m in msgs), msgs
