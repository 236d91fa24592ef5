"""Which parameters GC touches, and along which dims. Imports only torch.

Two steps, both on the ORIGINAL (unsharded, unflattened) names and shapes, so the same
rules hold on every engine:

* :func:`resolve_roles` — what each parameter is to the module that owns it, which
  decides its output channel: a ``Linear``/``Conv``/``Embedding`` weight (dim 0), a
  ``ConvTranspose`` weight (dim 1, blocked by ``groups``), a Hugging Face ``Conv1D``
  weight (the last dim), a weight-norm direction or a spectral-norm / parametrization
  original (the role of the weight it stands for), a weight-norm magnitude or a LoRA
  ``B`` factor (left alone by default). Modules are recognised through engine wrappers
  and generated subclasses (FSDP2's ``FSDPLinear``, ``torch.compile``'s ``_orig_mod``,
  DDP/FSDP1/DeepSpeed/accelerate's ``module.``, PEFT's ``base_model.model.``).
* :func:`resolve_targets` — composition, as in optax: ``include``/``exclude`` fnmatch
  patterns on the user's own names, ``min_ndim`` (dims of one weight: batch dims are not
  counted), per-pattern ``output_dim`` and ``batch_dims`` overrides, degenerate tensors.

Stacked expert weights (MoE): a parameter whose dim 0 is its module's ``num_experts``
gets batch dim 0 by detection; its output dim (1 for torchtitan's ``(E, out, in)``) is
assumed and logged, because shapes cannot tell ``(E, out, in)`` from ``(E, in, out)``.
``batch_dims: {pattern: 1}`` with ``output_dim: {pattern: d}`` say it explicitly, for
any stacked weight.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .centralize import Geometry, geometry_of, normalize_dim
from .config import GCConfig

__all__ = ["Role", "Target", "clean_name", "resolve_roles", "detect_output_dims", "resolve_targets", "warn_optimizer_risks"]

# Module wrappers that insert a path component the user never wrote.
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "base_layer"})
# PEFT LoRA containers; the adapter segment after them ("default") is dropped from names.
_LORA_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})
_LORA_B_PARTS = frozenset({"lora_B", "lora_embedding_B"})


def clean_name(name: str) -> str:
    """The user's own parameter name: drops DDP/DeepSpeed/accelerate's leading
    ``module.``, PEFT's ``base_model.model.``, the FSDP / activation-checkpoint /
    ``torch.compile`` / PEFT ``base_layer`` wrapper parts, and PEFT's ``default``
    adapter segment (``q_proj.lora_A.default.weight`` -> ``q_proj.lora_A.weight``)."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    if len(parts) > 2 and parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    out: list[str] = []
    for p in parts:
        if p in _WRAPPER_PARTS or (p == "default" and out and out[-1] in _LORA_PARTS):
            continue
        out.append(p)
    return ".".join(out)


# --------------------------------------------------------------------------- roles
@dataclass(frozen=True, slots=True)
class Role:
    """What a parameter is to its module: the dims its output channels live on."""

    kind: str
    """For messages, e.g. ``"ConvTranspose2d.weight"``, ``"weight-norm direction of Linear.weight"``."""
    output_dim: int = 0
    groups: int = 1
    """``ConvTranspose`` with ``groups > 1``: dim 0 is ``(groups, in / groups)`` and output
    channel ``g * out_g + j`` is the block ``weight[g*in_g:(g+1)*in_g, j]`` (no single dim
    is the channel)."""
    batch_dims: int = 0
    """Leading dims that index independent stacked weights (MoE experts)."""
    skip: str = ""
    """Non-empty: left alone by default, for this reason (an explicit ``include``
    pattern other than ``"*"`` selects it anyway)."""
    sparse: bool = False
    """The module produces sparse gradients (``Embedding(sparse=True)``)."""
    known: bool = True
    """False: the module type is not recognised and dim 0 is assumed."""


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Recognised by duck type, through generated subclasses (FSDP2's FSDPConv1D), so that
    # transformers need not be importable: transformers.pytorch_utils.Conv1D stores
    # weight as (in, out) and has `nf`.
    return any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nf")


def _layer_role(module: nn.Module) -> Role | None:
    """The role of ``module.weight`` for the layer types dist_gc knows."""
    kind = f"{_base_type_name(module)}.weight"
    if _is_hf_conv1d(module):
        return Role(kind, -1)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # weight is (in, out/groups, *kernel)
        return Role(kind + (f" (groups={module.groups})" if module.groups > 1 else ""), 1, groups=int(module.groups))
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return Role(kind, 0, sparse=bool(module.sparse))
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear)):
        return Role(kind, 0)
    return None


def _base_type_name(module: nn.Module) -> str:
    """The class name a user wrote: FSDP2 swaps a module's class for a generated
    ``FSDP<Name>`` subclass."""
    cls = type(module)
    if cls.__name__.startswith("FSDP") and len(cls.__mro__) > 2:
        cls = cls.__mro__[1]
    return cls.__name__


def _hook_roles(module: nn.Module, base: Role | None) -> dict[str, Role]:
    """Roles of the parameters that ``torch.nn.utils.weight_norm`` / ``spectral_norm``
    (the hook-based versions) register in place of ``weight``."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    out: dict[str, Role] = {}
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == "weight" and base is not None:
            out["weight_v"] = Role(f"weight-norm direction of {base.kind}", base.output_dim, base.groups, base.batch_dims)
            out["weight_g"] = Role(f"weight-norm magnitude of {base.kind}", base.output_dim,
                                   skip="weight-norm magnitude (a per-channel scale, like a norm weight)")
        elif isinstance(hook, SpectralNorm) and hook.name == "weight" and base is not None:
            out["weight_orig"] = Role(f"spectral-norm original of {base.kind}", base.output_dim, base.groups, base.batch_dims)
    return out


def _parametrization_roles(module: nn.Module, base: Role | None) -> dict[str, Role]:
    """Roles of ``parametrizations.weight.original`` (any parametrization of ``weight``)
    and of ``original0``/``original1`` of ``parametrizations.weight_norm``."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import _WeightNorm

    out: dict[str, Role] = {}
    if base is None or not parametrize.is_parametrized(module, "weight"):
        return out
    plist = module.parametrizations["weight"]
    prefix = "parametrizations.weight."
    if hasattr(plist, "original"):
        out[prefix + "original"] = Role(f"parametrization original of {base.kind}", base.output_dim, base.groups, base.batch_dims)
    elif len(plist) == 1 and isinstance(plist[0], _WeightNorm):
        out[prefix + "original0"] = Role(f"weight-norm magnitude of {base.kind}", base.output_dim,
                                         skip="weight-norm magnitude (a per-channel scale, like a norm weight)")
        out[prefix + "original1"] = Role(f"weight-norm direction of {base.kind}", base.output_dim, base.groups, base.batch_dims)
    return out


def _expert_role(module: nn.Module, pname: str, param: torch.Tensor) -> Role | None:
    """The role of a parameter stacked over a module's experts, or ``None``.

    A module that declares ``num_experts`` (torchtitan's ``GroupedExperts``, Hugging
    Face's ``*Experts``) and owns a parameter whose dim 0 has exactly that size holds one
    weight per expert: dim 0 is a batch dim (never averaged; one set of means per
    expert). That much the module states, so it is detected. WHICH of the remaining dims
    is the output dim it does not state, and shapes cannot tell: torchtitan stores
    ``(E, out, in)`` since 2025-08 (``x @ w[e].T``, output dim 1), earlier torchtitan and
    Hugging Face's gpt-oss ``(E, in, out)`` (``bmm(x, w)``, output dim 2) — identical
    shapes whenever ``in == out``. So a 3-D stack gets output dim 1 marked as assumed
    (``known=False``: the attach line names it), and ``output_dim: {pattern: 2}``
    says the other layout. A 2-D stack ``(E, out)`` is a stacked bias: one non-batch dim,
    left alone by the default ``min_ndim=2`` (see :func:`resolve_targets`)."""
    experts = getattr(module, "num_experts", None)
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        return None
    if param.dim() < 2 or int(param.shape[0]) != experts:
        return None
    kind = f"{_base_type_name(module)}.{pname} (stacked over {experts} experts"
    if param.dim() == 2:
        return Role(kind + ")", 1, batch_dims=1)
    return Role(kind + "; output dim 1 as torchtitan's (E, out, in) assumed)", 1, batch_dims=1, known=False)


def _param_role(path: str, module: nn.Module, pname: str, base: Role | None) -> Role | None:
    parts = path.split(".")
    if _LORA_B_PARTS & set(parts):
        # LoRA's B (out, r) starts at zero; GC over its r dim pins B @ 1_r = 0 and removes
        # one rank from every adapter update, so it is left alone by default.
        return Role("LoRA B factor", 0, skip="LoRA B factor: GC over its rank dim would remove a rank from the adapter update")
    if "lora_embedding_A" in parts or "lora_A" in parts:
        return Role("LoRA A factor", 0) if base is None else Role(f"LoRA A factor ({base.kind})", base.output_dim)
    if pname == "weight" and base is not None:
        return base
    if isinstance(module, nn.MultiheadAttention) and pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
        return Role(f"MultiheadAttention.{pname}", 0)
    if isinstance(module, nn.RNNBase) and pname.startswith("weight_"):
        return Role(f"{type(module).__name__}.{pname}", 0)
    return None


def _parametrized(module: nn.Module) -> bool:
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    hooked = any(isinstance(h, (WeightNorm, SpectralNorm)) for h in module._forward_pre_hooks.values())
    return hooked or parametrize.is_parametrized(module, "weight")


def resolve_roles(model: nn.Module) -> dict[str, Role]:
    """``{clean name: Role}`` for every parameter of ``model``; parameters of modules
    dist_gc does not recognise get ``Role(known=False)`` (output dim 0 assumed)."""
    roles: dict[str, Role] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        base = _layer_role(module)
        special = {**_hook_roles(module, base), **_parametrization_roles(module, base)}
        # FSDP1 (use_orig_params=False) and DeepSpeed ZeRO-3 un-register the original
        # parameters (they live in flat buffers), but the layer's `weight` attribute stays.
        if base is not None and isinstance(getattr(module, "weight", None), torch.Tensor) and not _parametrized(module):
            special.setdefault("weight", _param_role(prefix + "weight", module, "weight", base))
        for pname, role in special.items():
            roles.setdefault(clean_name(prefix + pname), role)
        for pname, param in module.named_parameters(recurse=False):
            name = clean_name(prefix + pname)
            if name in roles:
                continue  # tied, or claimed by the parent (parametrizations)
            role = _param_role(prefix + pname, module, pname, base)
            if role is None:
                role = _expert_role(module, pname, param)
            roles[name] = role if role is not None else Role(f"{_base_type_name(module)}.{pname}", 0, known=False)
    return roles


def detect_output_dims(model: nn.Module) -> dict[str, int]:
    """``{clean name: output dim}`` of every parameter whose module type is recognised."""
    return {n: r.output_dim for n, r in resolve_roles(model).items() if r.known}


# --------------------------------------------------------------------------- targets
@dataclass(frozen=True, slots=True)
class Target:
    """The GC decision for one original parameter."""

    name: str
    shape: tuple[int, ...]
    output_dim: int | None
    """Normalized output dim in ``mode="channel"``; ``None`` in ``mode="tensor"`` or when skipped."""
    geometry: Geometry | None
    """``None`` when the parameter is skipped; ``reason`` says why."""
    reason: str = ""
    batch_dims: int = 0
    groups: int = 1
    role: Role | None = None

    @property
    def kept_dims(self) -> tuple[int, ...]:
        """Tensor dims that identify a channel (the others are averaged); the group
        factor of a grouped ConvTranspose is not a dim (see :class:`Role`)."""
        out = tuple(range(self.batch_dims))
        return out + ((self.output_dim,) if self.output_dim is not None else ())


def _first_match(name: str, patterns: Iterable[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def _as_role(role: Role | int | None) -> Role | None:
    return Role("output_dim", role) if isinstance(role, int) else role


def resolve_targets(
    named_shapes: Sequence[tuple[str, Sequence[int]]],
    config: GCConfig,
    roles: Mapping[str, Role | int] | None = None,
) -> dict[str, Target]:
    """Apply ``config`` to ``(clean name, global shape)`` pairs; ``roles`` from
    :func:`resolve_roles` (or plain output dims) — a name without one gets output dim 0.

    Raises ``ValueError`` naming the key, the parameter and the value when a pattern
    matches no parameter, an ``output_dim``/``batch_dims`` override does not fit a
    parameter it matches, a selected parameter gets sparse gradients, or — with
    ``skip_degenerate=False`` — a selected tensor has single-element means. Warns once,
    naming them, about degenerate tensors and LoRA ``B`` factors that are skipped."""
    roles = roles or {}
    names = [n for n, _ in named_shapes]
    errors = [
        f"{key}: pattern {pat!r} matches no parameter (parameters: {_preview(names)})"
        for key, pats in (("include", config.include), ("exclude", config.exclude), ("output_dim", config.output_dim),
                          ("batch_dims", config.batch_dims))
        for pat in pats
        if not any(fnmatch.fnmatchcase(n, pat) for n in names)
    ]
    targets: dict[str, Target] = {}
    degenerate: list[str] = []
    role_skipped: list[str] = []
    for name, shape in named_shapes:
        shape = tuple(int(s) for s in shape)
        role = _as_role(roles.get(name))
        od_pat, bd_pat = _first_match(name, config.output_dim), _first_match(name, config.batch_dims)
        # Overrides must fit every parameter they match, selected or not, in either mode.
        if od_pat is not None and not -len(shape) <= config.output_dim[od_pat] < len(shape):
            errors.append(f"output_dim: {name!r} of shape {shape}: output_dim={config.output_dim[od_pat]} is out of range "
                          f"(pattern {od_pat!r}; allowed: {-len(shape)}..{len(shape) - 1})")
            continue
        if bd_pat is not None and not 0 <= config.batch_dims[bd_pat] < max(len(shape), 1):
            errors.append(f"batch_dims: pattern {bd_pat!r} gives batch_dims={config.batch_dims[bd_pat]}, which does not fit "
                          f"{name!r} of shape {shape} (allowed: 0..{len(shape) - 1})")
            continue
        detected = role.output_dim if role is not None else 0
        dim = config.output_dim[od_pat] if od_pat is not None else detected
        batch = config.batch_dims[bd_pat] if bd_pat is not None else (role.batch_dims if role is not None else 0)
        # A ConvTranspose's group blocking belongs to its detected output dim.
        groups = role.groups if role is not None and od_pat is None else 1

        def skip(reason: str) -> None:
            targets[name] = Target(name, shape, None, None, reason, role=role)

        # min_ndim counts the dims of ONE weight: a stack of expert biases (E, out) is a
        # stack of 1-D tensors and is skipped like a bias.
        if len(shape) - batch < config.min_ndim:
            stacked = f" (+{batch} batch dim{'s' if batch > 1 else ''})" if batch else ""
            skip(f"ndim {len(shape) - batch}{stacked} < min_ndim {config.min_ndim}")
            continue
        inc = _first_match(name, config.include)
        if inc is None:
            skip("matches no include pattern")
            continue
        if (pat := _first_match(name, config.exclude)) is not None:
            skip(f"excluded by {pat!r}")
            continue
        if role is not None and role.skip and inc == "*":
            skip(role.skip)
            role_skipped.append(name)
            continue
        if role is not None and role.sparse:
            errors.append(f"{name!r} ({role.kind}) gets sparse gradients; dist_gc centralizes dense gradients only "
                          f"(allowed: exclude it, e.g. exclude: [{name!r}], or use sparse=False)")
            continue
        try:
            geo = geometry_of(shape, config.mode, dim, batch_dims=batch, groups=groups, name=name)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if math.prod(shape) == 0:
            skip("empty tensor")
        elif geo.count == 1:
            degenerate.append(name)
            skip("degenerate: each mean covers one element")
        else:
            out_dim = normalize_dim(dim, len(shape), name=name) if config.mode == "channel" else None
            targets[name] = Target(name, shape, out_dim, geo, batch_dims=batch, groups=groups if config.mode == "channel" else 1, role=role)
    if degenerate and not config.skip_degenerate:
        errors.append(
            f"skip_degenerate=False but {', '.join(degenerate)} have single-element means: "
            "GC would zero their gradient (allowed: exclude them, or skip_degenerate=true)"
        )
    if errors:
        raise ValueError("gradient centralization config does not fit this model: " + "; ".join(errors))
    if degenerate:
        warnings.warn(
            f"dist_gc: skipping {', '.join(degenerate)}: each mean covers one element (fan-in 1), "
            "so GC would zero the gradient and the parameter would never learn",
            stacklevel=3,
        )
    if role_skipped:
        warnings.warn(
            f"dist_gc: leaving {_preview(role_skipped, 4)} alone: "
            + "; ".join(sorted({targets[n].reason for n in role_skipped}))
            + ". Select them explicitly with an include pattern (not '*') to centralize them anyway",
            stacklevel=3,
        )
    return targets


def warn_optimizer_risks(optimizer: Any) -> None:
    """Warn about trust-ratio optimizers (LAMB, LARS), whose per-layer adaptation
    divides by the gradient norm that GC changes."""
    name = type(optimizer).__name__.lower()
    if "lamb" in name or "lars" in name:
        warnings.warn(
            f"dist_gc: {type(optimizer).__name__} is a trust-ratio optimizer; GC changes the gradient norm it "
            "adapts to and may disturb its layer-wise learning rates. Validate convergence or exclude layers.",
            stacklevel=3,
        )


def _preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"
