"""DeepSpeed engines (ZeRO stages 0-3): GC on the fp32 master-gradient partition.

Where GC runs: in a step pre-hook of the torch optimizer DeepSpeed actually steps
(``engine.optimizer.optimizer``, or ``engine.optimizer`` at stage 0 without a precision
wrapper). DeepSpeed calls it after reducing / reduce-scattering the gradients, after
unscaling the loss scale and after gradient clipping, on the fp32 master gradient, and
before the update rule (so before Adam's moments and decoupled weight decay). An
overflow step (fp16 dynamic loss scaling) never calls it, so GC skips that step too.

What the optimizer holds, per engine configuration (layouts come from DeepSpeed's
partition metadata, never from its ``_hp_mapping`` fragment map, which is wrong with
``round_robin_gradients``):

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and ZeRO-1 + bf16 with fp32 gradient
  accumulation (``BF16_Optimizer``): per param group, the parameters are flattened (in
  round-robin order when that option is on, plus alignment padding) and the flat buffer
  is cut into equal partitions; rank ``r`` of the group's data-parallel group holds
  partition ``r`` as one flat fp32 tensor. ZeRO-1/2 step the optimizer once per param
  group, so GC runs once per group (one engine "phase" each).
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is partitioned on its own
  (``ceil(numel / W)`` elements per rank, zero padding at the end); the fp32 flat buffer
  of a sub-group concatenates this rank's partitions. DeepSpeed steps one sub-group at
  a time (``sub_group_size``), so GC runs once per sub-group.
* Stage 0: the plain optimizer (whole tensors, gradients already all-reduced), or the
  fp16/bf16 wrappers' fp32 master copies (``FP16_UnfusedOptimizer``: whole tensors;
  ``FP16_Optimizer``: one flat fp32 tensor per group, whole on every rank).

DeepSpeed's large-model parallelisms (MoE, pipeline stages, AutoTP, Ulysses sequence
parallelism, ZeRO++ hpZ) keep these masters as they are; :mod:`.zero_parallel` reads
what they change — global expert names, tensor-parallel splits (the layout becomes a
``Split`` whose local piece is the ZeRO partition), statistics groups, replicas and the
peer groups that must share the setup — and :func:`describe` applies it.

The layout is checked once at attach time against values: the fp32 master partition
equals the (16-bit) parameters it was copied from, piece by piece. A mismatch raises on
every rank. Configurations that are not supported raise ``ValueError`` naming them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..core.select import resolve_roles
from ..engine.collectives import raise_on_every_rank
from ..engine.layout import FlatShard, Split, TensorLayout, Whole, split_local_shape
from . import Description
from ._common import equal_partition_ranges, named_optimizer_params, param_names, require_attrs, warn_if_untested
from .zero_parallel import Topology, apply_topology, topology

__all__ = ["describe", "TESTED_VERSIONS"]

#: DeepSpeed ``major.minor`` versions whose internals this adapter was tested against.
TESTED_VERSIONS = ("0.19",)


# --------------------------------------------------------------------------- checks
def _require(obj: Any, what: str, attrs: list[str]) -> None:
    import deepspeed

    require_attrs(obj, attrs, what, package="DeepSpeed", version=deepspeed.__version__, tested=TESTED_VERSIONS)


def _check_version() -> None:
    import deepspeed

    warn_if_untested("DeepSpeed", deepspeed.__version__, TESTED_VERSIONS, "the partition layout is still verified against parameter values at attach time")


def _refuse(engine: Any, stage: int) -> None:
    """Configurations whose gradients do not sit where this adapter expects them, or that
    dist_gc could not verify here (model-parallel ones: :func:`zero_parallel.topology`)."""
    problems = []
    if engine.zero_quantized_weights() or engine.zero_quantized_gradients() or getattr(engine, "zero_quantized_nontrainable_weights", lambda: False)():
        # qwZ quantizes only the all-gathered weights and qgZ replaces ZeRO-3's gradient
        # reduce-scatter by a quantized all-to-all whose output is the same partition
        # (runtime/comm/coalesced_collectives.py:34-52, runtime/zero/stage3.py:1928): the
        # fp32 layout would be ZeRO-3's. But DeepSpeed's quantizer has no CPU kernel ("This
        # op had not been implemented on CPU backend", ops/op_builder/cpu/no_impl.py:21), so
        # no test here can run it, and the attach-time value check compares gathered
        # (quantized) weights with the fp32 masters, which quantization breaks.
        problems.append("ZeRO++ quantized weights/gradients (zero_quantized_weights / zero_quantized_gradients / "
                        "zero_quantized_nontrainable_weights): DeepSpeed's quantizer has no CPU kernel, so dist_gc could "
                        "not verify GC with it, and its layout check cannot compare quantized gathered weights")
    opt = engine.optimizer
    if getattr(opt, "zenflow", False):
        problems.append("ZenFlow (it updates important columns in the step and the rest asynchronously later)")
    if getattr(opt, "use_muon", False) or getattr(opt, "_uses_muon", False):
        problems.append("the Muon optimizer (its update is not a gradient)")
    if getattr(opt, "swap_optimizer", False) or getattr(opt, "params_in_nvme_and_cpu", False):
        problems.append("NVMe offload (offload_optimizer/offload_param device nvme): it needs DeepSpeed's async_io op, "
                        "whose cold JIT build takes ~20 min on this project's 2-core CI (its whole suite has 20 min), so "
                        "dist_gc cannot test it there; swapped-out sub-groups also empty the fp32 buffers dist_gc's "
                        "layout check reads")
    if getattr(opt, "fused_adam_legacy", False) or getattr(opt, "fused_lamb_legacy", False):
        problems.append("legacy fused Adam/LAMB fp16 step (gradients are passed to step as arguments)")
    if stage == 3 and getattr(opt, "offload_optimizer", False):
        devices = set(getattr(opt, "subgroup_to_device", {}).values())
        if devices - {"cpu"}:
            problems.append("partial optimizer offload (offload_optimizer.ratio < 1 steps a second optimizer)")
    if problems:
        raise ValueError(
            f"dist_gc: gradient centralization does not support this DeepSpeed configuration: {'; '.join(problems)}"
        )


def _wrapper_kinds() -> dict[type, "Callable[[Any, dict[int, str]], _Masters]"]:
    """How each DeepSpeed optimizer wrapper keeps its fp32 masters (see the module
    docstring): wrapper class -> function describing them."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return {
        DeepSpeedZeroOptimizer: _zero12_masters,
        DeepSpeedZeroOptimizer_Stage3: _zero3_masters,
        BF16_Optimizer: _bf16_masters,
        FP16_Optimizer: _fused_fp16_masters,
        FP16_UnfusedOptimizer: _unfused_fp16_masters,
    }


def _kind_of(wrapper: Any) -> "Callable[[Any, dict[int, str]], _Masters] | None":
    kinds = _wrapper_kinds()
    return next((kinds[c] for c in type(wrapper).__mro__ if c in kinds), None)


def _inner_optimizer(engine: Any, stage: int) -> Any:
    """The torch optimizer whose ``step`` applies the update."""
    opt = engine.optimizer
    if opt is None:
        raise ValueError("dist_gc: this DeepSpeed engine has no optimizer (pass one, or an \"optimizer\" block)")
    if stage > 0 or _kind_of(opt) is not None:
        _require(opt, "the ZeRO/precision optimizer wrapper", ["optimizer"])
        return opt.optimizer
    return opt


# --------------------------------------------------------------------------- masters
@dataclass(slots=True)
class _Masters:
    """Where one wrapper keeps the fp32 master of every trainable parameter."""

    layouts: list[TensorLayout]
    masters: list[torch.Tensor]
    """The fp32 master tensors the inner optimizer steps; ``layouts`` index them."""
    params: dict[str, Any]
    """``{name: 16-bit parameter}``: the value each master was copied from."""
    phased: bool = False
    """The wrapper steps the inner optimizer once per master tensor (ZeRO-1/2: per
    param group; ZeRO-3: per sub-group)."""
    flats: list[torch.Tensor] | None = None
    """The wrapper's flat 16-bit buffers, which every 16-bit param is a view of..."""
    flat_offsets: dict[str, tuple[int, int]] = field(default_factory=dict)
    """... at ``{name: (buffer index, element offset)}``."""


def _name(names: dict[int, str], p: Any, where: str) -> str:
    return names.get(id(p), where)


def _flat_group_masters(groups: list[list[Any]], offsets: list[list[int]], partition_sizes: list[int],
                        process_groups: list[Any], names: dict[int, str], masters: list[torch.Tensor],
                        flats: list[torch.Tensor], phased: bool) -> _Masters:
    """ZeRO-1/2 and BF16_Optimizer: group ``i``'s params at ``offsets[i]`` of a flat
    buffer cut into equal partitions of ``partition_sizes[i]``; ``masters[i]`` is this
    rank's partition."""
    out = _Masters([], masters, {}, phased, flats)
    for i, (params, offs, psize, pg) in enumerate(zip(groups, offsets, partition_sizes, process_groups)):
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        for j, (p, off) in enumerate(zip(params, offs)):
            name = _name(names, p, f"param_groups[{i}][{j}]")
            ranges = equal_partition_ranges(off, p.numel(), psize, world)
            local = max(off, rank * psize) - rank * psize
            out.layouts.append(TensorLayout(name, tuple(p.shape), FlatShard(i, local, ranges, rank, pg), phase=i if phased else 0))
            out.params[name], out.flat_offsets[name] = p, (i, off)
    return out


def _zero12_masters(opt: Any, names: dict[int, str]) -> _Masters:
    _require(
        opt,
        "DeepSpeedZeroOptimizer (ZeRO-1/2)",
        ["round_robin_bit16_groups", "round_robin_bit16_offsets", "bit16_groups_flat", "partition_size",
         "real_dp_process_group", "single_partition_of_fp32_groups", "bit16_groups"],
    )
    for i, flat in enumerate(opt.bit16_groups_flat):
        world = dist.get_world_size(opt.real_dp_process_group[i])
        if opt.partition_size[i] * world != flat.numel():
            raise RuntimeError(
                f"dist_gc: DeepSpeed ZeRO param group {i}: partition_size {opt.partition_size[i]} x {world} ranks "
                f"!= flat buffer size {flat.numel()}; unrecognised partitioning"
            )
    # Layouts come from the round-robin order DeepSpeed flattened in, never from its
    # _hp_mapping fragment map (wrong with round_robin_gradients in 0.19.x).
    return _flat_group_masters(
        [list(g) for g in opt.round_robin_bit16_groups],
        [list(o) for o in opt.round_robin_bit16_offsets],
        list(opt.partition_size),
        list(opt.real_dp_process_group),
        names,
        list(opt.single_partition_of_fp32_groups),
        list(opt.bit16_groups_flat),
        phased=True,
    )


def _bf16_masters(opt: Any, names: dict[int, str]) -> _Masters:
    _require(opt, "BF16_Optimizer", ["bf16_groups", "bf16_groups_flat", "fp32_groups_flat_partition", "real_dp_process_group"])
    offsets, sizes = [], []
    for i, params in enumerate(opt.bf16_groups):
        # BF16_Optimizer flattens each group contiguously (no per-parameter padding) and
        # pads the end to a multiple of 2 * W; partitions are flat.numel() // W each.
        offs, acc = [], 0
        for p in params:
            offs.append(acc)
            acc += p.numel()
        offsets.append(offs)
        sizes.append(opt.bf16_groups_flat[i].numel() // dist.get_world_size(opt.real_dp_process_group[i]))
    # BF16_Optimizer steps every group in one call: one phase.
    return _flat_group_masters(opt.bf16_groups, offsets, sizes, list(opt.real_dp_process_group), names,
                               list(opt.fp32_groups_flat_partition), list(opt.bf16_groups_flat), phased=False)


def _zero3_masters(opt: Any, names: dict[int, str]) -> _Masters:
    _require(
        opt,
        "DeepSpeedZeroOptimizer_Stage3",
        ["fp16_groups", "fp32_partitioned_groups_flat", "sub_group_process_groups", "fp16_partitioned_groups_flat_numel"],
    )
    out = _Masters([], list(opt.fp32_partitioned_groups_flat), {}, phased=True)
    for sg, params in enumerate(opt.fp16_groups):
        pg = opt.sub_group_process_groups[sg]
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        local = 0
        for j, p in enumerate(params):
            _require(p, "a ZeRO-3 parameter", ["ds_numel", "ds_shape", "ds_tensor", "partition_numel"])
            name = _name(names, p, f"sub_group[{sg}][{j}]")
            pn, numel = int(p.partition_numel()), int(p.ds_numel)
            if pn * world < numel:
                raise RuntimeError(f"dist_gc: ZeRO-3 parameter {name!r}: partition {pn} x {world} ranks < numel {numel}")
            # Rank r holds elements [r*pn, (r+1)*pn) of the flattened parameter, the part
            # past numel being padding (last ranks only).
            ranges = tuple((min(r * pn, numel), min((r + 1) * pn, numel)) for r in range(world))
            out.layouts.append(TensorLayout(name, tuple(p.ds_shape), FlatShard(sg, local, ranges, rank, pg), phase=sg))
            out.params[name] = p
            local += pn
        if local != opt.fp16_partitioned_groups_flat_numel[sg]:
            raise RuntimeError(
                f"dist_gc: ZeRO-3 sub-group {sg}: partitions add up to {local} elements, DeepSpeed's flat buffer has "
                f"{opt.fp16_partitioned_groups_flat_numel[sg]}; unrecognised partitioning"
            )
    return out


def _fused_fp16_masters(opt: Any, names: dict[int, str]) -> _Masters:
    """``FP16_Optimizer``: one flat fp32 master per group, whole on every rank."""
    _require(opt, "FP16_Optimizer", ["fp16_groups", "fp32_groups_flat", "fp16_groups_flat"])
    out = _Masters([], list(opt.fp32_groups_flat), {}, phased=False, flats=list(opt.fp16_groups_flat))
    for i, params in enumerate(opt.fp16_groups):
        off = 0
        for j, p in enumerate(params):
            name = _name(names, p, f"param_groups[{i}][{j}]")
            out.layouts.append(TensorLayout(name, tuple(p.shape), Whole(i, off)))
            out.params[name], out.flat_offsets[name] = p, (i, off)
            off += p.numel()
    return out


def _unfused_fp16_masters(opt: Any, names: dict[int, str]) -> _Masters:
    """``FP16_UnfusedOptimizer``: a whole-tensor fp32 copy of each (all-reduced) param."""
    _require(opt, "FP16_UnfusedOptimizer", ["fp16_groups", "fp32_groups"])
    out = _Masters([], [], {})
    for i, (lps, hps) in enumerate(zip(opt.fp16_groups, opt.fp32_groups)):
        for j, (lp, hp) in enumerate(zip(lps, hps)):
            name = _name(names, lp, f"param_groups[{i}][{j}]")
            out.layouts.append(TensorLayout(name, tuple(lp.shape), Whole(len(out.masters))))
            out.masters.append(hp)
            out.params[name] = lp
    return out


# --------------------------------------------------------------------------- value checks
def _held(layout: TensorLayout) -> tuple[int, int, int]:
    """``(start, end, offset)``: the elements of the flattening of the tensor this rank
    steps (an AutoTP ``Split``: of its local piece) and where they start in their master."""
    where = layout.where
    shape = layout.shape
    if isinstance(where, Split):
        shape, where = split_local_shape(shape, where), where.inner
    if isinstance(where, FlatShard):
        start, end = where.ranges[where.rank]
        return start, end, where.offset
    return 0, math.prod(shape), where.offset or 0


def _source(layout: TensorLayout) -> int:
    where = layout.where
    return where.inner.source if isinstance(where, Split) else where.source


def _check_values(layouts: list[TensorLayout], masters: list[torch.Tensor], params: dict[str, Any]) -> list[str]:
    """Compare every planned piece of the fp32 masters with the parameter it came from
    (DeepSpeed built the masters from the params and copies the 16-bit params from the
    masters after every step: ``fp32.to(param.dtype) == param`` exactly)."""
    errors = []
    for layout in layouts:
        start, end, offset = _held(layout)
        if end <= start:
            continue
        master = masters[_source(layout)].view(-1)[offset : offset + end - start]
        value = params[layout.name].data.reshape(-1)[start:end]
        if not torch.equal(master.to(value.dtype).cpu(), value.detach().cpu()):
            errors.append(f"{layout.name} elements [{start}, {end}) at offset {offset} of master buffer {_source(layout)}")
    return errors


def _check_storage(m: _Masters) -> list[str]:
    """ZeRO-1/2 and the bf16/fp16 wrappers make every 16-bit param a view of their flat
    buffer: its storage offset must be the flat offset the layout assumed."""
    errors = []
    for name, (i, off) in m.flat_offsets.items():
        p, flat = m.params[name], m.flats[i]
        got = (p.data.data_ptr() - flat.data_ptr()) // flat.element_size()
        if got != off:
            errors.append(f"{name} lives at element {got} of flat group {i}, layout says {off}")
    return errors


def _check_zero3_storage(opt: Any, m: _Masters) -> list[str]:
    """ZeRO-3 keeps each 16-bit partition (``ds_tensor``) as a view of its sub-group's
    flat buffer (unless parameters are offloaded): its offset there must be the local
    offset the layout assumed for the fp32 sub-group buffer."""
    errors = []
    flats = getattr(opt, "fp16_partitioned_groups_flat", None) or []
    for layout in m.layouts:
        sg, (_, _, offset) = _source(layout), _held(layout)
        flat = flats[sg] if sg < len(flats) else None
        p = m.params[layout.name]
        if flat is None or p.ds_tensor is None or p.ds_tensor.numel() == 0:
            continue
        got = (p.ds_tensor.data_ptr() - flat.data_ptr()) // flat.element_size()
        if 0 <= got < flat.numel() and got != offset:
            errors.append(f"{layout.name}'s partition lives at element {got} of sub-group {sg}, layout says {offset}")
    return errors


def _value_check(stage: int, wrapper: Any, m: _Masters) -> Callable[[], None]:
    def check() -> None:
        if stage == 3:
            import deepspeed

            errors = _check_zero3_storage(wrapper, m)
            # Gather one sub-group at a time (collective, same order on every rank).
            for sg, params in enumerate(wrapper.fp16_groups):
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    errors += _check_values([l for l in m.layouts if _source(l) == sg], m.masters, m.params)
        else:
            # ZeRO-1/2, BF16_Optimizer, FP16_Optimizer and FP16_UnfusedOptimizer keep
            # every 16-bit param whole on every rank (a view into their flat buffer).
            errors = _check_values(m.layouts, m.masters, m.params)
            if m.flats is not None:
                errors += _check_storage(m)
        raise_on_every_rank(
            errors, None,
            f"dist_gc: the ZeRO-{stage} layout dist_gc derived from DeepSpeed's partition metadata does not match the "
            "fp32 master values; refusing to run GC on a wrong layout",
        )

    return check


# --------------------------------------------------------------------------- describe
def _phase_finder(stepping: dict[int, int], what: str) -> Callable[[torch.optim.Optimizer], int]:
    """ZeRO-1/2/3 step their optimizer with only one master tensor in ``param_groups``
    (the group / sub-group being updated); that tensor tells which phase runs."""

    def phase(optimizer: torch.optim.Optimizer) -> int:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if len(params) != 1 or id(params[0]) not in stepping:
            raise RuntimeError(
                f"dist_gc: DeepSpeed {what} stepped its optimizer on {len(params)} tensor(s) dist_gc has no layout for; "
                "the optimizer's parameters changed after dist_gc.attach (re-attach after changing them)"
            )
        return stepping[id(params[0])]

    return phase


def _guard(engine: Any, stage: int, wrapper: Any, inner: Any) -> Callable[[], None]:
    """Fail loudly (at the next forward) if the engine's optimizer was swapped after
    attach: the hook would silently stop firing."""

    def check(module: Any, args: Any) -> None:
        if engine.optimizer is not wrapper or _inner_optimizer(engine, stage) is not inner:
            raise RuntimeError(
                "dist_gc: the DeepSpeed engine's optimizer was replaced after dist_gc.attach, so GC would silently "
                "stop; call handle.remove() and dist_gc.attach(engine) again"
            )

    handle = engine.module.register_forward_pre_hook(check)
    return handle.remove


def _label(engine: Any, stage: int, wrapper: Any, inner: Any, topo: Topology) -> str:
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    offload = bool(engine.zero_cpu_offload()) if stage > 0 else False
    offload_param = stage == 3 and str(getattr(engine.zero_offload_param(), "device", "none")).endswith("cpu")
    return (
        f"DeepSpeed ZeRO-{stage} ({precision}, {type(wrapper).__name__}, {type(inner).__name__}"
        + (", offload_optimizer=cpu" if offload else "")
        + (", offload_param=cpu" if offload_param else "")
        + (f", ZeRO++ hpZ zero_hpz_partition_size={engine.zero_hpz_partition_size()}" if engine.zero_hpz_partition_size() > 1 else "")
        + "".join(f", {f}" for f in topo.features)
        + ")"
    )


def describe(target: Any, model: Any) -> Description | None:
    if sys.modules.get("deepspeed") is None:
        return None
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not isinstance(target, DeepSpeedEngine):
        _refuse_wrapped(target, model)
        return None
    engine = target
    _check_version()
    stage = int(engine.zero_optimization_stage())
    _refuse(engine, stage)
    topo = topology(engine)  # MoE, pipeline, AutoTP, sequence parallelism (or a refusal)
    wrapper = engine.optimizer
    inner = _inner_optimizer(engine, stage)
    if not isinstance(inner, torch.optim.Optimizer):
        raise ValueError(f"dist_gc: DeepSpeed steps a {type(inner).__name__}, not a torch.optim.Optimizer; cannot hook it")
    label = _label(engine, stage, wrapper, inner, topo)
    on_remove = [_guard(engine, stage, wrapper, inner)]
    names = {**param_names(engine.module), **topo.names}
    roles = _roles(engine, names, topo)
    peers = _dp_groups(engine) if topo.peer_groups is None else topo.peer_groups

    kind = _kind_of(wrapper)
    if kind is None:
        if stage != 0:
            raise ValueError(f"dist_gc: unsupported DeepSpeed configuration: ZeRO stage {stage} with {type(wrapper).__name__}")
        # Stage 0 without a precision wrapper: the plain optimizer on whole tensors,
        # gradients already all-reduced — the plain adapter's layout is exact.
        from .plain import _refuse_sharded, describe_params

        named = named_optimizer_params(inner, names)
        for name, p in named:
            _refuse_sharded(name, p)
        layouts, sources = describe_params(named)
        return Description(
            optimizer=inner,
            layouts=apply_topology(layouts, dict(named), topo),
            sources=sources,
            label=label,
            roles=roles,
            on_remove=on_remove,
            peer_groups=peers,
            step_count=lambda: int(engine.global_steps),
        )

    m = kind(wrapper, names)
    phased = m.phased and len(m.masters) > 0
    return Description(
        optimizer=inner,
        layouts=apply_topology(m.layouts, m.params, topo),
        sources=[lambda t=t: t.grad for t in m.masters],
        label=label,
        roles=roles,
        phases=len(m.masters) if phased else 1,
        phase_of=_phase_finder({id(t): i for i, t in enumerate(m.masters)}, f"ZeRO-{stage}") if phased else None,
        check=_value_check(stage, wrapper, m),
        on_remove=on_remove,
        peer_groups=peers,
        step_count=lambda: int(engine.global_steps),
    )


def _roles(engine: Any, names: dict[int, str], topo: Topology) -> dict:
    """What each parameter is to its module, under the names GC plans with (MoE experts
    renamed to their global index; AutoTP layers, which the generic rules do not know)."""
    from ..core.select import clean_name

    local = resolve_roles(engine.module)
    out = {}
    for name, p in engine.module.named_parameters(remove_duplicate=False):
        key = clean_name(name)
        role = topo.roles.get(id(p), local.get(key))
        if role is not None:
            out.setdefault(names.get(id(p), key), role)
    return out


def _dp_groups(engine: Any) -> tuple:
    """The engine's data-parallel group: its ranks hold replicas or partitions of the
    same parameters, so they must run the same GC setup."""
    group = getattr(engine, "seq_data_parallel_group", None) or getattr(engine, "data_parallel_group", None)
    return (group,) if group is not None else ()


def _refuse_wrapped(target: Any, model: Any) -> None:
    """Catch DeepSpeed objects handed to attach in place of the engine (the plain adapter
    would otherwise see 1-D flat partitions and silently centralize nothing)."""
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer
    from deepspeed.runtime.engine import DeepSpeedEngine

    hint = "pass the DeepSpeedEngine itself: dist_gc.attach(engine), or use dist_gc.deepspeed.initialize"
    if type(target).__module__.split(".")[0] == "accelerate":
        return  # accelerate's wrappers are the accelerate adapter's to resolve
    if isinstance(target, DeepSpeedOptimizer):
        raise ValueError(f"dist_gc.attach: got DeepSpeed's {type(target).__name__} wrapper; {hint}")
    if isinstance(model, DeepSpeedEngine):
        raise ValueError(f"dist_gc.attach: model= is a DeepSpeedEngine; {hint}")
    if isinstance(target, torch.optim.Optimizer):
        params = [p for group in target.param_groups for p in group["params"]]
        if any(hasattr(p, "ds_id") or hasattr(p, "ds_numel") for p in params):
            raise ValueError(f"dist_gc.attach: this optimizer holds DeepSpeed ZeRO-3 partitions; {hint}")
        if not params:
            # ZeRO-3 empties its inner optimizer's param groups between steps.
            raise ValueError(f"dist_gc.attach: this optimizer has no parameters (DeepSpeed ZeRO-3's inner optimizer looks "
                             f"like this between steps); {hint}")
        if all(type(p) is torch.Tensor and p.dim() == 1 for p in params):
            # ZeRO-1/2, BF16_Optimizer and FP16_Optimizer hand their optimizer flat 1-D
            # fp32 tensors (not nn.Parameter): each holds pieces of many parameters.
            raise ValueError(
                "dist_gc.attach: this optimizer holds only flat 1-D tensors that are not nn.Parameters, as DeepSpeed's "
                f"ZeRO-1/2 / bf16 / fp16 master partitions are; {hint} (wrap genuine 1-D tensors in nn.Parameter)"
            )
