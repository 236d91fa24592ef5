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

The layout is checked once at attach time against values: the fp32 master partition
equals the (16-bit) parameters it was copied from, piece by piece. A mismatch raises on
every rank. Configurations that are not supported raise ``ValueError`` naming them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ..core.config import GCConfig
from ..core.select import clean_name, detect_output_dims, resolve_targets
from ..engine.engine import GCEngine
from ..engine.layout import TensorPlan, flat_regions, plan_flat_shard, plan_full_tensor
from . import Binding, warn_if_untested

__all__ = ["bind", "TESTED_VERSIONS", "equal_partition_ranges"]

#: DeepSpeed ``major.minor`` versions whose internals this adapter was tested against.
TESTED_VERSIONS = ("0.19",)

# Optimizers that communicate inside their own ``step`` (1-bit compression): their
# step pre-hook runs before the gradient reduction, where GC would not be exact.
_SELF_COMMUNICATING = ("OnebitAdam", "OnebitLamb", "ZeroOneAdam")


# --------------------------------------------------------------------------- layout math
def equal_partition_ranges(offset: int, numel: int, partition_size: int, world: int) -> list[tuple[int, int]]:
    """Element ranges (of a tensor's own flattening) that each of ``world`` equal
    partitions of a flat buffer holds, for a tensor stored at ``[offset, offset+numel)``
    of that buffer. Empty ranges are ``(0, 0)``."""
    out = []
    for r in range(world):
        lo, hi = max(offset, r * partition_size), min(offset + numel, (r + 1) * partition_size)
        out.append((lo - offset, hi - offset) if hi > lo else (0, 0))
    return out


@dataclass(frozen=True, slots=True)
class _Piece:
    """Elements ``[start, end)`` of parameter ``name`` held by this rank at
    ``sources[source][offset : offset + end - start]``."""

    name: str
    param: torch.nn.Parameter
    source: int
    start: int
    end: int
    offset: int


@dataclass(slots=True)
class _Layout:
    """Every (trainable) parameter's place in the optimizer's local buffers."""

    shapes: dict[str, tuple[int, ...]]
    # name -> (ranges per rank, rank, group, source, offset); group None = held whole.
    shards: dict[str, tuple[list[tuple[int, int]], int, Any, int, int]]
    phase_of_name: dict[str, int]
    pieces: list[_Piece]
    flat_offsets: dict[str, tuple[int, int]] = field(default_factory=dict)
    """name -> (group, offset in the group's flat 16-bit buffer), where DeepSpeed keeps one."""
    params: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- checks
def _require(obj: Any, what: str, attrs: Sequence[str]) -> None:
    missing = [a for a in attrs if not hasattr(obj, a)]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"dist_gc: unrecognised DeepSpeed {deepspeed.__version__} internals: {what} "
            f"({type(obj).__name__}) lacks {', '.join(missing)}; dist_gc was tested with DeepSpeed "
            f"{', '.join(v + '.x' for v in TESTED_VERSIONS)}. Pin a tested version or report this."
        )


def _check_version() -> None:
    import deepspeed

    warn_if_untested("DeepSpeed", deepspeed.__version__, TESTED_VERSIONS, "the partition layout is still verified against parameter values at attach time")


def _refuse(engine: Any, stage: int) -> None:
    """Configurations whose gradients do not sit where this adapter expects them."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    zc = engine._config.zero_config
    problems = []
    if isinstance(engine, PipelineEngine):
        problems.append("pipeline parallelism (PipelineEngine)")
    if getattr(zc, "mics_shard_size", -1) and getattr(zc, "mics_shard_size", -1) > 0:
        problems.append(f"MiCS (mics_shard_size={zc.mics_shard_size})")
    if engine.zero_hpz_partition_size() > 1:
        problems.append(f"ZeRO++ hierarchical partitioning (zero_hpz_partition_size={engine.zero_hpz_partition_size()})")
    if engine.zero_quantized_weights() or engine.zero_quantized_gradients():
        problems.append("ZeRO++ quantized weights/gradients (zero_quantized_weights / zero_quantized_gradients)")
    if engine.has_moe_layers:
        problems.append("mixture-of-experts layers (expert-parallel partition groups)")
    if engine.mpu is not None:
        problems.append("model/tensor parallelism (mpu or autotp): tensors are also split across model-parallel ranks")
    from deepspeed.utils import groups

    if groups._get_sequence_parallel_world_size() > 1:
        problems.append("sequence parallelism")
    opt = engine.optimizer
    if getattr(opt, "zenflow", False):
        problems.append("ZenFlow")
    if getattr(opt, "use_muon", False) or getattr(opt, "_uses_muon", False):
        problems.append("the Muon optimizer (its update is not a gradient)")
    if getattr(opt, "swap_optimizer", False) or getattr(opt, "params_in_nvme_and_cpu", False):
        problems.append("NVMe offload")
    if getattr(opt, "fused_adam_legacy", False) or getattr(opt, "fused_lamb_legacy", False):
        problems.append("legacy fused Adam/LAMB fp16 step (gradients are passed to step as arguments)")
    if stage == 3 and getattr(opt, "offload_optimizer", False):
        devices = set(getattr(opt, "subgroup_to_device", {}).values())
        if devices - {"cpu"}:
            problems.append("partial optimizer offload (offload_optimizer.ratio < 1 steps a second optimizer)")
    inner = _inner_optimizer(engine, stage)
    if type(inner).__name__ in _SELF_COMMUNICATING:
        problems.append(f"{type(inner).__name__} (it reduces gradients inside its own step)")
    if problems:
        raise ValueError(
            f"dist_gc: gradient centralization does not support this DeepSpeed configuration: {'; '.join(problems)}"
        )


def _inner_optimizer(engine: Any, stage: int) -> Any:
    """The torch optimizer whose ``step`` applies the update."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if opt is None:
        raise ValueError("dist_gc: this DeepSpeed engine has no optimizer (pass one, or an \"optimizer\" block)")
    if stage > 0 or isinstance(opt, (BF16_Optimizer, FP16_Optimizer, FP16_UnfusedOptimizer)):
        _require(opt, "the ZeRO/precision optimizer wrapper", ["optimizer"])
        return opt.optimizer
    return opt


# --------------------------------------------------------------------------- layouts
def _names(engine: Any) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, p in engine.module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), clean_name(name))
    return names


def _name(names: dict[int, str], p: Any, where: str) -> str:
    return names.get(id(p), where)


def _flat_groups_layout(
    groups: list[list[Any]],
    offsets: list[list[int]],
    partition_sizes: list[int],
    process_groups: list[Any],
    names: dict[int, str],
    first_source: int = 0,
) -> _Layout:
    """ZeRO-1/2 and BF16_Optimizer: group ``i``'s params at ``offsets[i]`` of a flat
    buffer cut into equal partitions of ``partition_sizes[i]``; source ``first_source+i``
    is this rank's partition."""
    layout = _Layout({}, {}, {}, [])
    for i, (params, offs, psize, pg) in enumerate(zip(groups, offsets, partition_sizes, process_groups)):
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        for j, (p, off) in enumerate(zip(params, offs)):
            name = _name(names, p, f"param_groups[{i}][{j}]")
            ranges = equal_partition_ranges(off, p.numel(), psize, world)
            local = max(off, rank * psize) - rank * psize
            layout.shapes[name] = tuple(p.shape)
            layout.shards[name] = (ranges, rank, pg, first_source + i, local)
            layout.flat_offsets[name], layout.params[name] = (i, off), p
            layout.phase_of_name[name] = i
            s, e = ranges[rank]
            if e > s:
                layout.pieces.append(_Piece(name, p, first_source + i, s, e, local))
    return layout


def _zero12_layout(opt: Any, names: dict[int, str]) -> _Layout:
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
    return _flat_groups_layout(
        [list(g) for g in opt.round_robin_bit16_groups],
        [list(o) for o in opt.round_robin_bit16_offsets],
        list(opt.partition_size),
        list(opt.real_dp_process_group),
        names,
    )


def _bf16_layout(opt: Any, names: dict[int, str]) -> _Layout:
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
    return _flat_groups_layout(opt.bf16_groups, offsets, sizes, list(opt.real_dp_process_group), names)


def _zero3_layout(opt: Any, names: dict[int, str]) -> _Layout:
    _require(
        opt,
        "DeepSpeedZeroOptimizer_Stage3",
        ["fp16_groups", "fp32_partitioned_groups_flat", "sub_group_process_groups", "fp16_partitioned_groups_flat_numel"],
    )
    layout = _Layout({}, {}, {}, [])
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
            ranges = [(min(r * pn, numel), min((r + 1) * pn, numel)) for r in range(world)]
            layout.shapes[name] = tuple(p.ds_shape)
            layout.shards[name] = (ranges, rank, pg, sg, local)
            layout.phase_of_name[name], layout.params[name] = sg, p
            s, e = ranges[rank]
            if e > s:
                layout.pieces.append(_Piece(name, p, sg, s, e, local))
            local += pn
        if local != opt.fp16_partitioned_groups_flat_numel[sg]:
            raise RuntimeError(
                f"dist_gc: ZeRO-3 sub-group {sg}: partitions add up to {local} elements, DeepSpeed's flat buffer has "
                f"{opt.fp16_partitioned_groups_flat_numel[sg]}; unrecognised partitioning"
            )
    return layout


def _fused_fp16_layout(opt: Any, names: dict[int, str]) -> _Layout:
    _require(opt, "FP16_Optimizer", ["fp16_groups", "fp32_groups_flat"])
    layout = _Layout({}, {}, {}, [])
    for i, params in enumerate(opt.fp16_groups):
        off = 0
        for j, p in enumerate(params):
            name = _name(names, p, f"param_groups[{i}][{j}]")
            layout.shapes[name] = tuple(p.shape)
            layout.shards[name] = ([(0, p.numel())], 0, None, i, off)
            layout.flat_offsets[name], layout.params[name] = (i, off), p
            layout.phase_of_name[name] = 0
            layout.pieces.append(_Piece(name, p, i, 0, p.numel(), off))
            off += p.numel()
    return layout


# --------------------------------------------------------------------------- verification
def _verify_pieces(pieces: list[_Piece], sources: list[Callable[[], torch.Tensor]], full_value: Callable[[_Piece], torch.Tensor]) -> list[str]:
    """Compare every planned piece of the fp32 master buffers with the parameter it
    came from (DeepSpeed copies 16-bit params from the fp32 masters after every step,
    and built the masters from the params: ``fp32.to(param.dtype) == param`` exactly)."""
    errors = []
    for pc in pieces:
        master = sources[pc.source]().view(-1)[pc.offset : pc.offset + pc.end - pc.start]
        value = full_value(pc).reshape(-1)[pc.start : pc.end]
        if not torch.equal(master.to(value.dtype).cpu(), value.detach().cpu()):
            errors.append(f"{pc.name} elements [{pc.start}, {pc.end}) at offset {pc.offset} of master buffer {pc.source}")
    return errors


def _verify_storage(layout: _Layout, flats: list[torch.Tensor] | None) -> list[str]:
    """ZeRO-1/2 and the bf16/fp16 wrappers make every 16-bit param a view of their flat
    buffer: its storage offset must be the flat offset the layout assumed."""
    if flats is None:
        return []
    errors = []
    for name, (i, off) in layout.flat_offsets.items():
        p, flat = layout.params[name], flats[i]
        got = (p.data.data_ptr() - flat.data_ptr()) // flat.element_size()
        if got != off:
            errors.append(f"{name} lives at element {got} of flat group {i}, layout says {off}")
    return errors


def _verify_zero3_storage(opt: Any, layout: _Layout) -> list[str]:
    """ZeRO-3 keeps each 16-bit partition (``ds_tensor``) as a view of its sub-group's
    flat buffer (unless parameters are offloaded): its offset there must be the local
    offset the layout assumed for the fp32 sub-group buffer."""
    errors = []
    flats = getattr(opt, "fp16_partitioned_groups_flat", None) or []
    for name, (ranges, rank, group, sg, offset) in layout.shards.items():
        flat = flats[sg] if sg < len(flats) else None
        p = layout.params[name]
        if flat is None or p.ds_tensor is None or p.ds_tensor.numel() == 0:
            continue
        got = (p.ds_tensor.data_ptr() - flat.data_ptr()) // flat.element_size()
        if 0 <= got < flat.numel() and got != offset:
            errors.append(f"{name}'s partition lives at element {got} of sub-group {sg}, layout says {offset}")
    return errors


def _raise_everywhere(errors: list[str], group: Any, what: str) -> None:
    """Raise on every rank when any rank found a layout error (never a hang: all ranks
    reach this collective, then all raise or none does)."""
    flag = torch.tensor([1 if errors else 0], dtype=torch.int64, device=GCEngine._comm_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item():
        detail = "; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else "") if errors else "on another rank"
        raise RuntimeError(
            f"dist_gc: the {what} layout dist_gc derived from DeepSpeed's partition metadata does not match the "
            f"fp32 master values ({detail}); refusing to run GC on a wrong layout"
        )


# --------------------------------------------------------------------------- bind
def _plans(layout: _Layout, targets: dict, n_phases: int) -> tuple[list[TensorPlan], list[list[int]]]:
    plans: list[TensorPlan] = []
    phases: list[list[int]] = [[] for _ in range(n_phases)]
    for name, (ranges, rank, group, source, offset) in layout.shards.items():
        t = targets[name]
        if t.geometry is None:
            continue
        if group is None:  # held whole by every rank (fused fp16 flat master)
            regions = tuple(flat_regions(t.geometry, 0, ranges[0][1], source, offset))
            plan = TensorPlan(name, t.geometry, t.geometry.channels, regions)
        else:
            plan = plan_flat_shard(name, t.geometry, ranges=ranges, rank=rank, group=group, source=source, offset=offset)
        phases[layout.phase_of_name[name]].append(len(plans))
        plans.append(plan)
    return plans, phases


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


def bind(target: Any, model: Any, config: GCConfig) -> Binding | None:
    ds = sys.modules.get("deepspeed")
    if ds is None:
        return None
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not isinstance(target, DeepSpeedEngine):
        _refuse_wrapped(target, model)
        return None
    engine = target
    _check_version()
    stage = int(engine.zero_optimization_stage())
    _refuse(engine, stage)
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrapper = engine.optimizer
    inner = _inner_optimizer(engine, stage)
    if not isinstance(inner, torch.optim.Optimizer):
        raise ValueError(f"dist_gc: DeepSpeed steps a {type(inner).__name__}, not a torch.optim.Optimizer; cannot hook it")
    names = _names(engine)
    dims = detect_output_dims(engine.module)
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    offload = bool(engine.zero_cpu_offload()) if stage > 0 else False
    offload_param = stage == 3 and str(getattr(engine.zero_offload_param(), "device", "none")).endswith("cpu")
    label = (
        f"DeepSpeed ZeRO-{stage} ({precision}, {type(wrapper).__name__}, {type(inner).__name__}"
        + (", offload_optimizer=cpu" if offload else "")
        + (", offload_param=cpu" if offload_param else "")
        + ")"
    )
    on_remove = [_guard(engine, stage, wrapper, inner)]

    if stage == 0 and not isinstance(wrapper, (BF16_Optimizer, FP16_Optimizer, FP16_UnfusedOptimizer)):
        # Plain optimizer on whole tensors, gradients already all-reduced: the plain
        # adapter's layout is exact.
        from .plain import bind as bind_plain

        binding = bind_plain(inner, engine.module, config)
        binding.engine, binding.on_remove = label, binding.on_remove + on_remove
        return binding

    if isinstance(wrapper, FP16_UnfusedOptimizer):
        # Whole-tensor fp32 copies of each (all-reduced) 16-bit parameter.
        _require(wrapper, "FP16_UnfusedOptimizer", ["fp16_groups", "fp32_groups"])
        pairs = [(_name(names, lp, f"param_groups[{i}][{j}]"), lp, hp)
                 for i, (lps, hps) in enumerate(zip(wrapper.fp16_groups, wrapper.fp32_groups))
                 for j, (lp, hp) in enumerate(zip(lps, hps))]
        targets = resolve_targets([(n, tuple(lp.shape)) for n, lp, _ in pairs], config, dims)
        plans, sources = [], []
        for name, lp, hp in pairs:
            t = targets[name]
            if t.geometry is not None:
                plans.append(plan_full_tensor(name, t.geometry, len(sources), t.shape, t.output_dim))
                sources.append(lambda hp=hp: hp.grad)
        pieces = [_Piece(n, lp, k, 0, lp.numel(), 0) for k, (n, lp, hp) in enumerate(pairs)]
        all_sources = [lambda hp=hp: hp for _, _, hp in pairs]

        def verify() -> None:
            errors = _verify_pieces(pieces, all_sources, lambda pc: pc.param.data)
            _raise_everywhere(errors, None, "fp16/bf16 master copy")

        return Binding(inner, plans, sources, targets, engine=label, on_remove=on_remove, verify=verify)

    if isinstance(wrapper, FP16_Optimizer):
        layout = _fused_fp16_layout(wrapper, names)
        masters = wrapper.fp32_groups_flat
        n_phases, phase = 1, None
    elif isinstance(wrapper, BF16_Optimizer):
        layout = _bf16_layout(wrapper, names)
        masters = wrapper.fp32_groups_flat_partition
        # BF16_Optimizer steps every group in one call.
        layout.phase_of_name = dict.fromkeys(layout.phase_of_name, 0)
        n_phases, phase = 1, None
    elif stage in (1, 2):
        layout = _zero12_layout(wrapper, names)
        masters = wrapper.single_partition_of_fp32_groups
        n_phases = len(masters)
        phase = _phase_finder({id(m): i for i, m in enumerate(masters)}, f"ZeRO-{stage}")
    elif stage == 3:
        layout = _zero3_layout(wrapper, names)
        masters = wrapper.fp32_partitioned_groups_flat
        n_phases = len(masters)
        phase = _phase_finder({id(m): i for i, m in enumerate(masters)}, "ZeRO-3")
    else:
        raise ValueError(f"dist_gc: unsupported DeepSpeed configuration: ZeRO stage {stage} with {type(wrapper).__name__}")

    # Targets from original names and GLOBAL shapes of every parameter the optimizer
    # updates (pattern validation raises here, before any collective).
    flats = getattr(wrapper, "bit16_groups_flat", None) or getattr(wrapper, "bf16_groups_flat", None) or getattr(wrapper, "fp16_groups_flat", None)
    targets = resolve_targets(list(layout.shapes.items()), config, dims)
    plans, phases = _plans(layout, targets, n_phases)
    sources = [lambda m=m: m.grad for m in masters]
    values = [lambda m=m: m for m in masters]

    def verify() -> None:
        if stage == 3:
            import deepspeed

            errors = _verify_zero3_storage(wrapper, layout)
            # Gather one sub-group at a time (collective, same order on every rank).
            for sg, params in enumerate(wrapper.fp16_groups):
                mine = [pc for pc in layout.pieces if pc.source == sg]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    errors += _verify_pieces(mine, values, lambda pc: pc.param.data)
        else:
            # ZeRO-1/2, BF16_Optimizer, FP16_Optimizer keep every 16-bit param whole on
            # every rank (a view into their flat buffer).
            errors = _verify_pieces(layout.pieces, values, lambda pc: pc.param.data)
            errors += _verify_storage(layout, flats)
        _raise_everywhere(errors, None, f"ZeRO-{stage}")

    return Binding(
        inner, plans, sources, targets, engine=label, on_remove=on_remove, verify=verify,
        phases=phases if phase is not None else None, phase=phase,
    )


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
