"""The launcher wrapper: run a program unchanged, with GC switched on from its config.

    python -m dist_gc.run [--gc-config PATH] SCRIPT [ARGS...]      # or: -m MODULE [ARGS...]
    dist-gc-run [--gc-config PATH] SCRIPT|COMMAND [ARGS...]

It composes with every launcher::

    accelerate launch [...] -m dist_gc.run train.py [ARGS...]
    torchrun --nproc_per_node N -m dist_gc.run train.py [ARGS...]
    deepspeed [...] --module dist_gc.run train.py [ARGS...]
    dist-gc-run [--gc-config PATH] accelerate launch [...] train.py [ARGS...]   # prefix form

Settings: under DeepSpeed (raw ``deepspeed.initialize``, accelerate's DeepSpeed plugin,
the HF Trainer's ``deepspeed=``) the ``"gradient_centralization"`` block of the DeepSpeed
JSON; otherwise (DDP, FSDP1/FSDP2, accelerate's YAML-only DeepSpeed configs)
``--gc-config PATH`` / ``DIST_GC_CONFIG`` — a GC YAML/JSON file, a DeepSpeed JSON with
the block, or the name of a shipped config (``gc/channel.yaml``). With neither, rank 0
prints one line saying GC is off. GC runs where :func:`dist_gc.attach` puts it: in the
update's optimizer step, after reduction, unscaling and clipping, right before the
update.

How (the ``coverage run`` / ``ddtrace-run`` pattern): the wrapper puts
``dist_gc/_bootstrap`` (a ``sitecustomize``) first on ``PYTHONPATH`` with
``DIST_GC_RUN=1`` and replaces itself (``os.execve``, same pid, same interpreter flags)
with ``python SCRIPT ARGS`` / ``python -m MODULE ARGS`` — so Python builds ``__main__``,
``sys.argv`` and ``sys.path[0]`` exactly as without the wrapper — or with the COMMAND
(prefix form). Every Python process started from there inherits the environment and
installs lazy post-import hooks (:mod:`dist_gc._autopatch`); nothing is imported early
and nothing is patched in a process the wrapper did not start.

``deepspeed --module dist_gc.run train.py`` makes DeepSpeed's launcher insert
``--local_rank=N`` *before* ``train.py``; the wrapper moves it to the front of the
script's arguments, exactly where ``deepspeed train.py`` puts it. Under ``-I``, ``-E``
or ``-S`` (the environment or ``site`` ignored) and on Windows (no ``exec``), the
program runs in this process instead (``runpy``; ``--inprocess`` forces that).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys

__all__ = ["main", "parse", "child_env", "BOOTSTRAP"]

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
BOOTSTRAP = os.path.join(PACKAGE_DIR, "_bootstrap")
_ROOT = os.path.dirname(PACKAGE_DIR)
_LOCAL_RANK = re.compile(r"^--local[_-]rank=\d+$")
_PROG = "dist-gc-run"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_PROG, allow_abbrev=False,
        usage=f"{_PROG} [--gc-config PATH] [--inprocess] (SCRIPT | -m MODULE | COMMAND) [ARGS...]",
        description="Run a program unchanged with gradient centralization switched on from its config "
                    "(the DeepSpeed JSON's 'gradient_centralization' block, or --gc-config).",
        epilog="Examples: accelerate launch -m dist_gc.run train.py | torchrun -m dist_gc.run train.py | "
               "deepspeed --module dist_gc.run train.py | dist-gc-run --gc-config gc/channel.yaml accelerate launch train.py",
    )
    p.add_argument("--gc-config", metavar="PATH",
                   help="GC settings for engines without a DeepSpeed block (DDP, FSDP, YAML-only DeepSpeed): a GC "
                        "YAML/JSON, a DeepSpeed JSON with the block, or a shipped config name (gc/channel.yaml); "
                        "exported to child processes as DIST_GC_CONFIG")
    p.add_argument("--inprocess", action="store_true", help="run SCRIPT / MODULE in this process (runpy) instead of exec")
    from . import __version__

    p.add_argument("--version", action="version", version=f"dist_gc {__version__}")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, str, str, list[str]]:
    """``(options, kind, target, args)``; kind is ``"script"``, ``"module"`` or
    ``"command"``. The wrapper's own options are those before the target; everything
    after it belongs to the program."""
    own, moved, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if _LOCAL_RANK.match(a):  # inserted by `deepspeed --module dist_gc.run`
            moved.append(a)
        elif a == "--gc-config":
            own += argv[i:i + 2]
            i += 1
        elif a.startswith("--gc-config=") or a in ("--inprocess", "-h", "--help", "--version"):
            own.append(a)
        else:
            break
        i += 1
    parser = _parser()
    options = parser.parse_args(own)
    rest = argv[i:]
    if not rest:
        parser.error("nothing to run: give a SCRIPT, -m MODULE or a COMMAND")
    first = rest[0]
    if first == "-m":
        if len(rest) < 2:
            parser.error("-m needs a MODULE")
        return options, "module", rest[1], moved + rest[2:]
    if first.startswith("-"):
        parser.error(f"unknown option {first!r} (the wrapper's options come before the program)")
    is_python = first.endswith((".py", ".pyw", ".pyz"))
    if os.path.isdir(first) or (os.path.isfile(first) and (is_python or not os.access(first, os.X_OK))):
        return options, "script", first, moved + rest[1:]
    if not is_python and shutil.which(first):
        if moved:
            parser.error(f"{moved[0]} given before a command: only a SCRIPT or -m MODULE can take it")
        return options, "command", first, rest[1:]
    parser.error(f"{first!r}: no such Python script or command")
    raise AssertionError  # unreachable


def _resolve_config(path: str) -> str:
    """An existing file, or the name of a shipped config; validated here, once, before
    anything starts (a bad file fails with the key, the value and what is allowed)."""
    if not os.path.isfile(path):
        from . import configs

        try:
            path = configs.path(path)
        except FileNotFoundError:
            raise SystemExit(f"{_PROG}: --gc-config {path!r}: no such file (nor a shipped config: "
                             f"{', '.join(n for n in configs.names() if n.startswith('gc/'))}, ...)") from None
    path = os.path.abspath(path)
    from .core.config import GCConfig

    try:
        GCConfig.from_file(path)
    except ValueError as exc:
        raise SystemExit(f"{_PROG}: --gc-config: {exc}") from None
    return path


def child_env(options: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of everything the wrapper starts: the bootstrap first on
    ``PYTHONPATH``, ``DIST_GC_RUN=1``, ``DIST_GC_CONFIG`` from ``--gc-config``."""
    env = dict(os.environ if environ is None else environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != BOOTSTRAP]
    env["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP, *parts])
    env["DIST_GC_RUN"] = "1"
    env["DIST_GC_ROOT"] = _ROOT  # the bootstrap appends it to sys.path when dist_gc is not importable otherwise
    if options.gc_config:
        env["DIST_GC_CONFIG"] = _resolve_config(options.gc_config)
    elif env.get("DIST_GC_CONFIG"):
        env["DIST_GC_CONFIG"] = _resolve_config(env["DIST_GC_CONFIG"])
    return env


def _interpreter() -> list[str]:
    """``[sys.executable, *flags]``: the interpreter flags this process was started
    with (``-u`` from torchrun/deepspeed, ``-X ...``, ``-W ...``), i.e. everything in
    ``sys.orig_argv`` before ``-m dist_gc.run``; none for the console script."""
    orig = list(getattr(sys, "orig_argv", None) or [])
    for k in range(1, len(orig) - 1):
        if orig[k] == "-m" and orig[k + 1] == __spec__.name:  # type: ignore[name-defined]
            return [sys.executable, *orig[1:k]]
        if orig[k].startswith("-m") and orig[k][2:] == __spec__.name:  # type: ignore[name-defined]  # -mdist_gc.run
            return [sys.executable, *orig[1:k]]
    return [sys.executable]


def main(argv: list[str] | None = None) -> None:
    options, kind, target, args = parse(sys.argv[1:] if argv is None else argv)
    env = child_env(options)
    if kind == "command":
        sys.stdout.flush(); sys.stderr.flush()
        os.execvpe(target, [target, *args], env)
    if options.inprocess or sys.flags.ignore_environment or sys.flags.no_site or os.name == "nt":
        _run_in_process(kind, target, args, env)
        return
    cmd = [*_interpreter(), *(["-m", target] if kind == "module" else [target]), *args]
    sys.stdout.flush(); sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


def _run_in_process(kind: str, target: str, args: list[str], env: dict[str, str]) -> None:
    """The fallback: run the program here with runpy. Child processes still get the
    bootstrap through the environment."""
    import runpy

    os.environ.update(env)
    from . import _autopatch

    _autopatch.install()
    safe = getattr(sys.flags, "safe_path", False)
    if kind == "module":
        if not safe:
            sys.path[0] = os.getcwd()  # what `python -m` puts there
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        if not safe:
            sys.path[0] = os.path.dirname(os.path.abspath(target))  # what `python script.py` puts there
        sys.argv = [target, *args]
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
