"""The example configs shipped with dist_gc: accelerate YAMLs (``accelerate/``),
DeepSpeed JSONs with the ``"gradient_centralization"`` block (``deepspeed/``) and GC
settings files (``gc/``). They are package data, so they are there after
``pip install dist_gc``; in a checkout ``configs/`` at the repository root is a link to
this directory.

    from dist_gc import configs
    configs.path("deepspeed/zero2.json")      # absolute path of a shipped config
    configs.names()                           # every shipped config, relative names

From a shell::

    python -m dist_gc.configs list
    python -m dist_gc.configs path gc/channel.yaml
    python -m dist_gc.configs export DIR      # copies; accelerate YAMLs point at DIR's JSONs

The accelerate DeepSpeed YAMLs name their JSON relative to a checkout's root
(``deepspeed_config_file: dist_gc/configs/deepspeed/...``), as accelerate resolves it
against the working directory; ``export`` rewrites those paths to the copies.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["ROOT", "path", "names", "export"]

ROOT = Path(str(files(__name__)))
"""The directory holding the shipped configs."""

_SUFFIXES = (".yaml", ".yml", ".json")
_CHECKOUT_PREFIX = "dist_gc/configs/"


def names() -> list[str]:
    """Every shipped config, relative to :data:`ROOT` (``"gc/channel.yaml"``, ...)."""
    return sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.suffix in _SUFFIXES)


def path(name: str) -> str:
    """Absolute path of the shipped config ``name`` (a name from :func:`names`)."""
    p = ROOT / name
    if p.suffix not in _SUFFIXES or not p.is_file():
        raise FileNotFoundError(f"dist_gc.configs: no shipped config {name!r}; shipped: {', '.join(names())}")
    return str(p)


def export(directory: str | Path) -> list[str]:
    """Copy every shipped config under ``directory`` (same relative names), with the
    accelerate YAMLs' ``deepspeed_config_file`` pointing at the copied JSONs; returns
    the written paths."""
    out_root = Path(directory).resolve()
    written = []
    for name in names():
        text = (ROOT / name).read_text(encoding="utf-8")
        text = text.replace(_CHECKOUT_PREFIX, f"{out_root.as_posix()}/")
        target = out_root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        written.append(str(target))
    return written
