"""Issue 11's pieces in one process (fast): lazy import, the post-import hooks, the
wrapper's argument handling and exec, the one-attach-per-optimizer rule across user and
automatic attaches, the config conventions, the accelerate stats helper, the HF Trainer
callback's logs, the configs helper and the missing-extra messages.

The launches that prove the whole thing end to end are in test_wrapper.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dist_gc
from dist_gc import GCConfig
from dist_gc import _posthook
from dist_gc.attach import attach_auto, handle_for
from dist_gc.run import parse
from tests.jobs import ROOT, job_env

HEAVY = ("torch", "deepspeed", "accelerate", "transformers", "lightning", "wrapt", "asyncio")


def _py(code: str, env: dict | None = None, cwd: Path | str = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env or job_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=check)


# --------------------------------------------------------------------------- lazy import, bootstrap
def test_import_dist_gc_and_the_bootstrap_import_nothing_heavy():
    code = ("import sys, dist_gc, dist_gc.run, dist_gc.configs, dist_gc._autopatch; dist_gc.GCConfig; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    assert _py(code).stdout.strip() == "[]"
    # a process started by the wrapper: the bootstrap ran, hooks registered, still nothing heavy
    env = job_env(DIST_GC_RUN="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "dist_gc" / "_bootstrap"), env["PYTHONPATH"]])
    code = f"import sys; print('dist_gc._autopatch' in sys.modules, [m for m in {HEAVY!r} if m in sys.modules])"
    assert _py(code, env).stdout.strip() == "True []"
    # and the public names load on use
    assert _py("import dist_gc, sys; dist_gc.attach; print('torch' in sys.modules, sorted(dist_gc.__all__))").stdout.strip() == \
        "True ['GCConfig', 'GCHandle', 'GCStats', 'attach', 'centralize_', 'clip_grad_norm_', 'hooks']"
    assert callable(dist_gc.attach) and dist_gc.attach.__module__ == "dist_gc.attach"


def test_post_import_hook_runs_after_the_module_body_once(tmp_path, monkeypatch, capsys):
    (tmp_path / "dgc_hookpkg").mkdir()
    (tmp_path / "dgc_hookpkg" / "__init__.py").write_text("")
    (tmp_path / "dgc_hookpkg" / "mod.py").write_text("FIRST = 1\nLAST = 2\n")
    (tmp_path / "dgc_hookpkg" / "bad.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    _posthook.when_imported("dgc_hookpkg.mod", lambda m: seen.append((m.__name__, hasattr(m, "LAST"))))
    _posthook.when_imported("dgc_hookpkg.bad", lambda m: 1 / 0)
    assert "dgc_hookpkg.mod" not in sys.modules and not seen  # registering imports nothing
    import dgc_hookpkg.mod

    assert seen == [("dgc_hookpkg.mod", True)]
    assert type(dgc_hookpkg.mod.__loader__).__name__ != "_HookedLoader"  # the real loader stays
    _posthook.when_imported("dgc_hookpkg.mod", lambda m: seen.append("again"))  # already imported: at once
    assert seen[-1] == "again"
    import dgc_hookpkg.bad  # a failing hook never breaks the import, and says so

    assert dgc_hookpkg.bad.X == 1 and "could not patch dgc_hookpkg.bad" in capsys.readouterr().err
    for name in ("dgc_hookpkg.mod", "dgc_hookpkg.bad", "dgc_hookpkg"):
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------- the wrapper's command line
def test_wrapper_argument_handling(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("")
    opts, kind, target, args = parse(["--local_rank=3", str(script), "--lr", "3", "--local_rank=9"])
    assert (kind, target, args) == ("script", str(script), ["--local_rank=3", "--lr", "3", "--local_rank=9"])
    opts, kind, target, args = parse(["--gc-config", "gc/tensor.yaml", "-m", "pkg.train", "-x"])
    assert (opts.gc_config, kind, target, args) == ("gc/tensor.yaml", "module", "pkg.train", ["-x"])
    opts, kind, target, args = parse(["--gc-config=x.yaml", sys.executable, "-u", "t.py"])  # prefix form
    assert (opts.gc_config, kind, target, args) == ("x.yaml", "command", sys.executable, ["-u", "t.py"])
    for bad, text in ((["--nope", str(script)], "unknown option"), ([], "nothing to run"), (["missing.py"], "no such"),
                      (["--local_rank=0", sys.executable], "before a command"), (["-m"], "needs a MODULE")):
        with pytest.raises(SystemExit):
            parse(bad)
        assert text in capsys.readouterr().err, bad


def test_wrapper_runs_the_program_as_python_would(tmp_path):
    """SCRIPT and -m MODULE: the same argv, sys.path[0], __main__ and interpreter flags as
    a plain run; deepspeed's --local_rank=N moved behind the script; a bad --gc-config
    fails before anything starts."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "show.py").write_text(textwrap.dedent("""
        import json, sys
        m = sys.modules["__main__"]
        print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "file": m.__file__, "spec": getattr(m.__spec__, "name", None),
                          "unbuffered": not sys.stdout.line_buffering and sys.stdout.write_through,
                          "boot": "dist_gc._autopatch" in sys.modules, "cfg": __import__("os").environ.get("DIST_GC_CONFIG")}))
    """))
    env = job_env()

    def run(*argv: str) -> dict:
        out = subprocess.run([sys.executable, *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    plain, wrapped = run("-u", "pkg/show.py", "a", "--b"), run("-u", "-m", "dist_gc.run", "pkg/show.py", "a", "--b")
    assert {k: wrapped[k] for k in ("argv", "path0", "file", "spec", "unbuffered")} == \
        {k: plain[k] for k in ("argv", "path0", "file", "spec", "unbuffered")} and wrapped["boot"] and not plain["boot"]
    plain, wrapped = run("-m", "pkg.show", "x"), run("-m", "dist_gc.run", "--gc-config", "gc/tensor.yaml", "-m", "pkg.show", "x")
    assert {k: wrapped[k] for k in ("argv", "path0", "file", "spec")} == {k: plain[k] for k in ("argv", "path0", "file", "spec")}
    assert wrapped["cfg"].endswith(os.path.join("configs", "gc", "tensor.yaml")) and os.path.isabs(wrapped["cfg"])
    assert run("-m", "dist_gc.run", "--local_rank=1", "pkg/show.py", "a")["argv"] == ["pkg/show.py", "--local_rank=1", "a"]
    (tmp_path / "bad.yaml").write_text("mode: rows\n")
    out = subprocess.run([sys.executable, "-m", "dist_gc.run", "--gc-config", "bad.yaml", "pkg/show.py"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "mode='rows'" in out.stderr and not out.stdout, out


# --------------------------------------------------------------------------- one attach per optimizer
def _model_opt():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    return model, torch.optim.SGD(model.parameters(), lr=1.0)


def test_user_and_automatic_attach_make_exactly_one_handle():
    model, opt = _model_opt()
    auto = attach_auto(opt, model=model, config=GCConfig(mode="tensor"), source="DIST_GC_CONFIG=x.yaml (--gc-config)")
    assert auto.origin == "auto" and handle_for(opt) is auto
    assert dist_gc.attach(opt, model=model, config={"mode": "tensor"}) is auto  # equal settings: the same handle
    with pytest.raises(ValueError) as exc:
        dist_gc.attach(opt, model=model, config={"mode": "channel"})
    assert "dist-gc-run" in str(exc.value) and "'mode': 'tensor'" in str(exc.value) and "x.yaml" in str(exc.value), exc.value
    assert len(opt._optimizer_step_pre_hooks) == 1
    auto.remove()
    model, opt = _model_opt()
    mine = dist_gc.attach(opt, model=model)
    assert attach_auto(opt, model=model, config=GCConfig(mode="tensor"), source="x") is mine  # the script's wins
    assert len(opt._optimizer_step_pre_hooks) == 1 and mine.origin == "user"
    mine.remove()


def test_first_step_hook_attaches_to_the_recorded_model(monkeypatch, tmp_path):
    """The wrapper's lazy attach, in process: the model comes from the recorders, the
    settings from DIST_GC_CONFIG; the handle's hook runs in the same step; a closure is
    wrapped (GC after its backward)."""
    from dist_gc import _autopatch

    cfg = tmp_path / "gc.yaml"
    cfg.write_text("mode: channel\n")
    monkeypatch.setenv("DIST_GC_CONFIG", str(cfg))
    model, opt = _model_opt()
    _autopatch._models.add(model)
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(_autopatch._first_step)
    try:
        x = torch.randn(5, 3)

        def closure():
            opt.zero_grad()
            loss = model(x).pow(2).sum()
            loss.backward()
            return loss

        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure)
        handle = handle_for(opt)
        assert handle is not None and handle.origin == "auto" and handle.steps == 1
        w0, w1 = before[0], model[0].weight.detach()
        assert (w0 - w1).mean(dim=1).abs().max() < 1e-6, "the first step's update must be centralized"
        handle.remove()
    finally:
        hook.remove()
        _autopatch._models.discard(model)


# --------------------------------------------------------------------------- config conventions
def test_block_conventions():
    assert GCConfig.from_deepspeed_config({"gradient_centralization": {}}) == GCConfig()  # {} is on
    assert GCConfig.from_deepspeed_config({"train_batch_size": 8}).enabled is False  # absent is off
    assert GCConfig.from_dict({"mode": "auto", "min_ndim": "auto", "output_dim": "auto", "batch_dims": "auto",
                               "skip_degenerate": "auto", "full_stats": "auto"}) == GCConfig()
    with pytest.raises(ValueError, match="enabled='auto'"):
        GCConfig.from_dict({"enabled": "auto"})
    for key in ("gradient_centralisation", "gradient-centralization", "Gradient_Centralization", "gc", "GC"):
        with pytest.warns(UserWarning, match=f"'{key}' is not read by dist_gc; did you mean 'gradient_centralization'"):
            assert GCConfig.from_deepspeed_config({key: {"mode": "tensor"}}).enabled is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DeepSpeed's own keys are not near misses
        GCConfig.from_deepspeed_config({"gradient_clipping": 1.0, "gradient_accumulation_steps": 2, "zero_optimization": {}})


# --------------------------------------------------------------------------- accelerate stats
def test_accelerate_log_stats_one_call_gc_prefixed(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    import dist_gc.accelerate

    try:
        accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
        accelerator.init_trackers("run")
        model, opt = _model_opt()
        model, opt = accelerator.prepare(model, opt)
        gc = dist_gc.accelerate.attach(accelerator, opt, model, config={"full_stats": True})
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        calls = []
        real_log = accelerator.log
        accelerator.log = lambda values, step=None, **kw: (calls.append((values, step)), real_log(values, step=step, **kw))
        logged = dist_gc.accelerate.log_stats(accelerator, gc, step=1)
        assert len(calls) == 1 and calls[0][1] == 1 and calls[0][0] is logged
        assert logged and all(k.startswith("gc/") and type(v) in (int, float) for k, v in logged.items()), logged
        assert logged["gc/centralized"] == 2 and logged["gc/max_abs_mean_after"] < 1e-6
        accelerator.end_training()
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (events,) = list(Path(tmp_path).rglob("events.out.tfevents*"))
        acc = EventAccumulator(str(events))
        acc.Reload()
        assert {"gc/centralized", "gc/max_abs_mean_before", "gc/grad_norm_after"} <= set(acc.Tags()["scalars"])
        gc.remove()
    finally:
        AcceleratorState._reset_state(True)


# --------------------------------------------------------------------------- HF Trainer callback
def test_trainer_callback_without_arguments_logs_everywhere(tmp_path, capsys):
    """Trainer(callbacks=[DistGCCallback()]), single process: the callback finds its
    Trainer, goes first, and gc/* land in log_history (training-step entries only),
    TensorBoard and the console; the update equals the oracle."""
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    from dist_gc.integrations.transformers import DistGCCallback

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 6))

        def forward(self, x, labels=None):
            return {"loss": nn.functional.cross_entropy(self.net(x), labels)}

    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(8, 4, generator=g), torch.randint(0, 6, (8,), generator=g)
    data = [{"x": xs[i], "labels": ys[i]} for i in range(8)]
    model = Net()
    ref = Net()
    ref.load_state_dict(model.state_dict())
    nn.functional.cross_entropy(ref.net(xs), ys).backward()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, logging_steps=1, per_device_train_batch_size=8,
                             optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                             report_to=["tensorboard"], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    callback = DistGCCallback()
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        assert trainer.callback_handler.callbacks[0] is callback and callback.trainer is trainer
        trainer.train()
    finally:
        AcceleratorState._reset_state(True)
    step_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert step_logs and step_logs[0]["gc/centralized"] == 2 and "gc/max_abs_mean_before" in step_logs[0], trainer.state.log_history
    assert not any(k.startswith("gc/") for h in trainer.state.log_history if "loss" not in h for k in h)
    assert "'gc/max_abs_mean_before'" in capsys.readouterr().out  # the console printer
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in Path(tmp_path).rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/gc/max_abs_mean_before", "train/gc/centralized"} <= tags, sorted(tags)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        grad = q.grad.double()
        if grad.dim() >= 2:
            grad = grad - grad.mean(dim=1, keepdim=True)
        torch.testing.assert_close(p.detach().double(), q.detach().double() - grad, rtol=0, atol=1e-6, msg=name)
    assert not callback.handle.enabled  # the callback removed the hook it attached when training ended


# --------------------------------------------------------------------------- configs, extras
def test_shipped_configs_helper(tmp_path):
    from dist_gc import configs

    names = configs.names()
    assert {"gc/channel.yaml", "deepspeed/zero2.json", "accelerate/deepspeed_zero2.yaml"} <= set(names) and len(names) == 16
    assert GCConfig.from_file(configs.path("gc/tensor.yaml")).mode == "tensor"
    with pytest.raises(FileNotFoundError, match="shipped"):
        configs.path("gc/nope.yaml")
    configs.export(tmp_path)
    text = (tmp_path / "accelerate" / "deepspeed_zero2.yaml").read_text()
    assert f"deepspeed_config_file: {tmp_path.resolve().as_posix()}/deepspeed/accelerate_zero2.json" in text
    assert (ROOT / "configs").resolve() == configs.ROOT.resolve(), "the checkout's configs/ links to the package's"
    out = _py("from dist_gc.configs.__main__ import main; main(['path', 'gc/channel.yaml'])").stdout.strip()
    assert out == configs.path("gc/channel.yaml")


def test_missing_optional_dependency_is_one_line_naming_the_extra():
    code = "import sys; sys.modules['sklearn'] = None; from dist_gc.cli.train import main; main(['--verify-only'])"
    out = _py(code, check=False)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["error: dist-gc-train --task cnn needs scikit-learn, which is not installed: "
                                               "pip install 'dist_gc[demo]'"], out.stderr
    out = _py("import sys; sys.modules['lightning'] = None\ntry:\n import dist_gc.integrations.lightning\n"
              "except ImportError as e: print(type(e).__name__, e)", check=False)
    assert out.stdout.strip() == ("MissingExtra dist_gc.integrations.lightning needs lightning, which is not installed: "
                                  "pip install 'dist_gc[lightning]'"), out
