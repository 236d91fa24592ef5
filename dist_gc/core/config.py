"""``GCConfig``: the one configuration object every entry point reads.

The same schema is accepted as keyword arguments, a dict, a JSON/YAML file, or the
``"gradient_centralization"`` block of a DeepSpeed JSON config. Validation happens in
``__post_init__`` (types and values) and again at attach time (patterns must match a
parameter of the model), always before any collective is issued, so a bad config
fails on every rank at setup instead of hanging or silently doing nothing.

The DeepSpeed block follows DeepSpeed's own convention for *absent* sections: no block,
no GC. A *present* block means GC on unless it says ``"enabled": false`` — so ``{}``
turns GC on with the defaults. That differs from DeepSpeed's ``fp16``/``bf16`` sections
(``{}`` is off there) on purpose: writing the block is the opt-in (it has no other
use), the block, a GC YAML file and ``GCConfig()`` then mean the same thing, and the
attach line says where the settings came from. A top-level key that looks like a
misspelling of the block's (``gradient_centralisation``, ``gradient-centralization``,
``gc``, case variants) warns, naming the key dist_gc reads. ``"auto"`` (as in the
DeepSpeed configs that ``transformers`` / accelerate fill in) means "dist_gc's default"
for the fields where a default can be chosen for the user: ``mode``, ``min_ndim``,
``output_dim`` and ``batch_dims`` (detected from the modules), ``skip_degenerate``
and ``full_stats``; not for ``enabled`` (a decision) nor the patterns.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["GCConfig", "DEEPSPEED_CONFIG_KEY", "MODES", "AUTO_FIELDS", "near_miss_keys"]

#: Top-level key of a DeepSpeed JSON config that holds the GC block.
DEEPSPEED_CONFIG_KEY = "gradient_centralization"
#: Allowed values of ``GCConfig.mode``.
MODES = ("channel", "tensor")
#: Fields that accept ``"auto"``: dist_gc's default for the field.
AUTO_FIELDS = ("mode", "min_ndim", "output_dim", "batch_dims", "skip_degenerate", "full_stats")
# Normalized spellings that certainly mean the block (besides near matches).
_BLOCK_ALIASES = frozenset({"gc", "dist_gc", "distgc", "grad_centralization", "gradient_centralize", "gradient_centralizer",
                            "gradient_centralizing", "centralization", "gradient_centering"})


def near_miss_keys(config: Mapping[str, Any]) -> list[str]:
    """Top-level keys of a DeepSpeed config that look like a misspelt
    ``"gradient_centralization"`` (British spelling, dashes, case, ``gc``, ...)."""
    out = []
    for key in config:
        if not isinstance(key, str) or key == DEEPSPEED_CONFIG_KEY:
            continue
        norm = re.sub(r"[\s\-.]+", "_", key.strip().lower()).replace("centralis", "centraliz").replace("centralz", "centraliz")
        # ratio 0.85: "gradient_centralize" (0.86) is in, DeepSpeed's "gradient_clipping" (0.70) is out.
        if norm == DEEPSPEED_CONFIG_KEY or norm in _BLOCK_ALIASES or difflib.SequenceMatcher(None, norm, DEEPSPEED_CONFIG_KEY).ratio() >= 0.85:
            out.append(key)
    return out


def _warn_near_misses(config: Mapping[str, Any], where: str) -> None:
    for key in near_miss_keys(config):
        consequence = ("its settings are not used" if DEEPSPEED_CONFIG_KEY not in config
                       else f"it is ignored; the {DEEPSPEED_CONFIG_KEY!r} block is used")
        warnings.warn(f"{where}: top-level key {key!r} is not read by dist_gc; did you mean {DEEPSPEED_CONFIG_KEY!r}? "
                      f"({consequence})", UserWarning, stacklevel=3)


@dataclass(kw_only=True, slots=True)
class GCConfig:
    """Gradient centralization settings (Yong et al., ECCV 2020, arXiv 2004.01461).

    Where GC runs, whatever the source of these settings: in a step pre-hook of the
    optimizer that updates the (master) parameters — after the engine's gradient
    reduction, loss-scale unscaling and gradient clipping, immediately before the update
    rule (before Adam's moments and decoupled weight decay). DeepSpeed JSON block: absent
    means off; present means on unless ``"enabled": false`` (``{}`` is on). ``"auto"``
    is accepted where noted and means dist_gc's default.

    Example::

        GCConfig(mode="channel", exclude=["lm_head.*"], output_dim={"proj.*": 1})
    """

    enabled: bool = True
    """Master switch. ``False`` makes ``attach`` a no-op that still validates the config.
    In a DeepSpeed JSON, a present ``"gradient_centralization"`` block without this key
    (even ``{}``) means on; an absent block means off (see the module docstring)."""

    mode: str = "channel"
    """``"channel"``: subtract the mean over every dim except the layer's output dim
    (one mean per output channel / filter, the paper's GC). ``"tensor"``: subtract one
    mean over all elements, ``G - mean(G)``. ``"auto"``: ``"channel"``."""

    min_ndim: int = 2
    """Tensors with fewer dims are left alone (biases, norm scales). 4 = conv weights
    only, the paper's GCC variant. Batch dims (see ``batch_dims``) are not counted: a
    stack of expert biases ``(E, out)`` has one dim per weight and is left alone. ``"auto"``: 2."""

    include: tuple[str, ...] = ("*",)
    """fnmatch patterns on the user's own parameter names (wrapper prefixes such as
    ``module.`` or ``_fsdp_wrapped_module.`` removed). A parameter is centralized when it
    matches one of them and none of ``exclude``. Every pattern must match a parameter."""

    exclude: tuple[str, ...] = ()
    """fnmatch patterns of parameters never to centralize. Every pattern must match."""

    output_dim: Mapping[str, int] = field(default_factory=dict)
    """``{pattern: dim}`` overrides of the detected output dim (negative dims count
    from the end). Detection: dim 0 for Linear/Conv/Embedding, dim 1 for ConvTranspose,
    the last dim for Hugging Face ``Conv1D``. First matching pattern wins. ``"auto"``:
    ``{}`` (detection only)."""

    batch_dims: Mapping[str, int] = field(default_factory=dict)
    """``{pattern: n}``: the first ``n`` dims of matching parameters index independent
    stacked weights — MoE experts stacked as ``(num_experts, out, in)`` take ``1`` with
    ``output_dim`` 1 — so each gets its own means: one per (expert, output row) in
    channel mode, one per expert in tensor mode. First matching pattern wins.

    Detected without a pattern: a parameter whose dim 0 equals its module's
    ``num_experts`` (torchtitan's ``GroupedExperts``) gets 1, and — for a 3-D stack —
    output dim 1 (torchtitan's ``(E, out, in)``), logged as an assumption at attach:
    shapes cannot tell it from ``(E, in, out)`` (older torchtitan, Hugging Face gpt-oss),
    which needs ``output_dim: {pattern: 2}``. An explicit pattern overrides detection
    (``{pattern: 0}``: no batch dim; set ``output_dim`` with it). ``"auto"``: ``{}``."""

    skip_degenerate: bool = True
    """Skip (and warn once about) tensors whose means each cover one element — fan-in 1,
    e.g. ``Linear(1, n)`` or rank-1 LoRA factors — whose gradient GC would zero. With
    ``False`` such a tensor raises ``ValueError`` at attach time instead. ``"auto"``: ``True``."""

    allow_empty: bool = False
    """Allow an enabled config that selects no parameter (otherwise a ``ValueError``
    names the keys that left every parameter out: GC would silently do nothing)."""

    full_stats: bool = False
    """Also measure, every step, the gradient norm before/after and the max |mean| after
    GC (which must be ~0). Costs one extra read of the gradients and one small
    all-reduce per step; off by default. ``"auto"``: ``False``."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        for key in AUTO_FIELDS:  # "auto": dist_gc's default for the field
            if isinstance(getattr(self, key), str) and getattr(self, key) == "auto":
                setattr(self, key, _default(key))

        def bad(key: str, value: Any, allowed: str) -> None:
            errors.append(f"{key}={value!r} (allowed: {allowed})")

        for key in ("enabled", "skip_degenerate", "full_stats", "allow_empty"):
            if not isinstance(getattr(self, key), bool):
                bad(key, getattr(self, key), "true or false" + (", or 'auto'" if key in AUTO_FIELDS else ""))
        if self.mode not in MODES:
            bad("mode", self.mode, " or ".join(repr(m) for m in MODES) + " or 'auto'")
        if isinstance(self.min_ndim, bool) or not isinstance(self.min_ndim, int) or self.min_ndim < 1:
            bad("min_ndim", self.min_ndim, "an integer >= 1 (2: all weights, 4: conv only), or 'auto'")
        for key in ("include", "exclude"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)) and all(isinstance(p, str) and p for p in value):
                setattr(self, key, tuple(value))
            else:
                bad(key, value, "a list of non-empty fnmatch pattern strings")
        if not self.include and isinstance(self.include, tuple):
            bad("include", self.include, "at least one pattern (use enabled=false to turn GC off)")
        for key, allowed in (("output_dim", "a mapping {pattern: integer dim}"), ("batch_dims", "a mapping {pattern: integer >= 0}")):
            value = getattr(self, key)
            if isinstance(value, Mapping) and all(
                isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool) and (key == "output_dim" or v >= 0)
                for k, v in value.items()
            ):
                setattr(self, key, dict(value))
            else:
                bad(key, value, allowed)
        if errors:
            raise ValueError("invalid gradient centralization config: " + "; ".join(errors))

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "config") -> "GCConfig":
        """Build from a mapping; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping of GC settings, got {type(data).__name__} {data!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            hint = ""
            if near_miss_keys({k: None for k in unknown if isinstance(k, str)}) or DEEPSPEED_CONFIG_KEY in unknown:
                hint = (f"; this looks like a whole DeepSpeed config: its GC settings are read from the top-level key "
                        f"{DEEPSPEED_CONFIG_KEY!r} (GCConfig.from_deepspeed_config)")
            raise ValueError(
                f"{where}: unknown gradient centralization key(s) {', '.join(map(repr, unknown))} "
                f"(allowed: {', '.join(known)}){hint}"
            )
        try:
            return cls(**dict(data))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "GCConfig":
        """Load a JSON or YAML (``.yaml``/``.yml``) file holding the GC settings, or a
        whole DeepSpeed config that contains a ``"gradient_centralization"`` block."""
        data = _load_file(path)
        if isinstance(data, Mapping) and DEEPSPEED_CONFIG_KEY in data:
            return cls.from_deepspeed_config(data, where=str(path))
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_deepspeed_config(cls, config: Mapping[str, Any] | str | os.PathLike, *, where: str | None = None) -> "GCConfig":
        """Read the top-level ``"gradient_centralization"`` block of a DeepSpeed config
        (dict or path). An absent block means GC is disabled; a present one means on
        unless it says ``"enabled": false``."""
        block = cls.block_of(config, where=where)
        return cls(enabled=False) if block is None else block

    @classmethod
    def block_of(cls, config: Mapping[str, Any] | str | os.PathLike, *, where: str | None = None) -> "GCConfig | None":
        """The settings of a DeepSpeed config's ``"gradient_centralization"`` block, or
        ``None`` when it has none. Warns about near-miss top-level keys."""
        if isinstance(config, (str, os.PathLike)):
            where = where or str(config)
            config = _load_file(config)
        where = where or "deepspeed config"
        if not isinstance(config, Mapping):
            raise ValueError(f"{where}: a DeepSpeed config must be a mapping, got {type(config).__name__}")
        _warn_near_misses(config, where)
        if DEEPSPEED_CONFIG_KEY not in config:
            return None
        return cls.from_dict(config[DEEPSPEED_CONFIG_KEY], where=f"{where}: {DEEPSPEED_CONFIG_KEY}")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        out["output_dim"], out["batch_dims"] = dict(self.output_dim), dict(self.batch_dims)
        return out


def unique_pairs(where: str):
    """An ``object_pairs_hook`` (json, hjson) that raises ``ValueError`` on a repeated key
    instead of silently keeping the last value."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"{where}: key {k!r} is given twice (values {out[k]!r} and {v!r}); keep one")
            out[k] = v
        return out

    return hook


def _yaml_loader(where: str):
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """PyYAML's safe loader, refusing repeated mapping keys (YAML 1.2 forbids them;
        PyYAML keeps the last one silently)."""

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(f"{where}: key {key!r} is given twice (line {key_node.start_mark.line + 1}); keep one")
            seen[key] = loader.construct_object(value_node, deep=deep)
        return seen

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def _default(name: str) -> Any:
    f = next(f for f in dataclasses.fields(GCConfig) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _load_file(path: str | os.PathLike) -> Any:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read GC config file {path!r}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc}); save the GC config as UTF-8 JSON or YAML") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:  # pragma: no cover - pyyaml is a declared dependency
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from None
        try:
            return yaml.load(text, Loader=_yaml_loader(path))  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
    try:
        return json.loads(text, object_pairs_hook=unique_pairs(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
