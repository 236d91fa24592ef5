"""DeepSpeed's large-model parallelisms, as they change where a ZeRO master gradient lives.

:mod:`dist_gc.adapters.zero` describes the fp32 master partitions of one DeepSpeed engine
(ZeRO-0..3). The parallelisms below leave those partitions as they are and change four
things about the parameters they hold; this module reads them from DeepSpeed's own
metadata into one :class:`Topology` record, which ``zero.describe`` applies to its
layouts (nothing here plans or communicates):

* **names** — MoE experts are ``copy.deepcopy`` s of one module, numbered locally on
  every expert-parallel rank; their GLOBAL index (``ep_rank * num_local_experts + l``)
  gives the name a single-process model with all experts would have;
* **tensor-parallel splits** — AutoTP shards Linear weights over the TP group before
  ZeRO flattens them: the layout becomes a :class:`~dist_gc.engine.layout.Split` of the
  global tensor whose local piece is the ZeRO partition;
* **statistics** — ranks of the expert-parallel group hold different experts and pipeline
  stages different layers: model-wide statistics are summed over those groups too
  (``TensorLayout.stat_groups``), and a tied weight's copy on a later stage is counted
  once (``TensorLayout.replica``);
* **peer groups** — which ranks hold the same parameters and so must run the same GC
  setup (checked at attach): the expert-data-parallel groups under MoE, each stage's
  data-parallel group under pipelining, the data- and tensor-parallel groups under AutoTP.

Configurations this module cannot describe exactly raise ``ValueError`` naming the
option and the reason. Sources: DeepSpeed 0.19.8 (paths relative to the package).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch.distributed as dist

from ..core.select import Role, clean_name
from ..engine.layout import FlatShard, Split, TensorLayout, Whole, split_local_shape

__all__ = ["Topology", "topology", "apply_topology"]

#: ``checkpoint/constants.py:64``: AutoTP's per-parameter record of its split.
AUTOTP_META = "ds_autotp_universal_checkpoint_meta"
#: ``module_inject/layers.py:37``: set on every parameter AutoTP shards.
TP_PARAM_FLAG = "tensor_model_parallel"
#: AutoTP layer classes whose ``weight`` is ``(out, in)`` like ``nn.Linear``'s
#: (``module_inject/layers.py:878-1099``); the embedding's is ``(vocab, hidden)``.
_AUTOTP_LINEARS = ("LinearLayer", "LinearAllreduce", "LinearAllreduceWithReplicatedInput", "VocabParallelLinear",
                   "LmHeadLinearAllreduce")
_AUTOTP_EMBEDDINGS = ("VocabParallelEmbedding",)


@dataclass(frozen=True, slots=True)
class TPSplit:
    """One AutoTP-sharded parameter: global ``shape``, cut on ``dim`` into ``sizes`` over
    ``group``; this rank holds piece ``index``."""

    group: Any
    dim: int
    sizes: tuple[int, ...]
    index: int
    shape: tuple[int, ...]


@dataclass(slots=True)
class Topology:
    """What DeepSpeed's model-parallel features say about this rank's parameters."""

    features: list[str] = field(default_factory=list)
    """For the label, e.g. ``["MoE ep_size=2", "pipeline 2 stages"]`` (the same on every rank)."""
    names: dict[int, str] = field(default_factory=dict)
    """``{id(param): name}`` where the name is not the module path's (MoE experts)."""
    splits: dict[int, TPSplit] = field(default_factory=dict)
    stat_groups: dict[int, tuple] = field(default_factory=dict)
    replicas: set[int] = field(default_factory=set)
    peer_groups: tuple | None = None
    """``None``: the engine's data-parallel group (plain ZeRO); otherwise these groups."""
    roles: dict[int, Role] = field(default_factory=dict)
    """Roles of parameters whose module type the generic role rules do not know (AutoTP layers)."""


# --------------------------------------------------------------------------- MoE
def _moe(engine: Any, topo: Topology) -> None:
    """Native ``deepspeed.moe.layer.MoE`` (ZeRO-0/1/2; DeepSpeed itself refuses it with
    ZeRO-3, ``runtime/engine.py:2214-2216``).

    Every local expert parameter carries ``allreduce = False`` and ``group_name =
    "ep_size_<N>"`` (``moe/experts.py:25-26``). The expert-parallel group of a group name
    is a block of consecutive ranks, the expert-data-parallel (edp) group the strided set
    of ranks with the same position in their block (``utils/groups.py:370-466``). The
    first all-to-all sends chunk ``j`` of the ``(E, capacity, d)`` dispatch buffer to
    ep-rank ``j``, which splits it over its ``num_local_experts`` in order
    (``moe/sharded_moe.py:700-716``, ``moe/experts.py:29-38``): local expert ``l`` of
    ep-rank ``e`` is global expert ``e * num_local_experts + l``. ZeRO-1/2 partition an
    expert param group over its edp group (``real_dp_process_group[i]``,
    ``runtime/zero/stage_1_and_2.py:876-884``), which the ZeRO layouts already read."""
    from deepspeed.moe.experts import Experts
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    covered: set[int] = set()
    edp_groups: dict[str, Any] = {}
    for path, module in engine.module.named_modules():
        if not isinstance(module, Experts):
            continue
        params = list(module.parameters())
        if not params:
            continue
        group_name = params[0].group_name
        ep_rank = groups._get_expert_parallel_rank(group_name)
        ep_group = groups._get_expert_parallel_group(group_name)
        ep_size = dist.get_world_size(ep_group)
        edp_groups[group_name] = groups._get_expert_data_parallel_group(group_name)
        nle = int(module.num_local_experts)
        prefix = clean_name(f"{path}.deepspeed_experts") if path else "deepspeed_experts"
        for local, expert in enumerate(module.deepspeed_experts):
            for pname, p in expert.named_parameters():
                topo.names[id(p)] = f"{prefix}.{ep_rank * nle + local}.{pname}"
                if ep_size > 1:
                    # ep ranks hold different experts: model-wide statistics add them up.
                    topo.stat_groups[id(p)] = (ep_group,)
                covered.add(id(p))
        topo.features.append(f"MoE {group_name} ({nle * ep_size} experts)")
    stray = [clean_name(n) for n, p in engine.module.named_parameters() if is_moe_param(p) and id(p) not in covered]
    if stray:
        raise ValueError(
            f"dist_gc: DeepSpeed expert parameters outside a deepspeed.moe Experts module ({', '.join(stray[:4])}): their "
            "global expert index is unknown to dist_gc (AutoEP and custom expert layers are not supported; exclude them "
            "or use deepspeed.moe.layer.MoE)"
        )
    # Ranks of one edp group hold the same experts and the same dense parameters; ranks
    # of the dense data-parallel group hold different experts (compared only on what
    # they share, the dense tensors GC reduces over them).
    topo.peer_groups = tuple(g for g in edp_groups.values() if g is not None)


# --------------------------------------------------------------------------- pipeline
def _pipeline(engine: Any, topo: Topology) -> None:
    """``deepspeed.pipe.PipelineModule`` under ``PipelineEngine`` (ZeRO-0/1; ZeRO-2/3 are
    refused by DeepSpeed, ``runtime/pipe/engine.py:76-77``).

    Each stage's module holds only its layers, named by global layer index
    (``"3.weight"``), plus ``tied_modules.<key>`` on every stage that uses a
    ``TiedLayerSpec`` (``runtime/pipe/module.py:250-277``). ``train_batch`` ends with
    ``ReduceTiedGrads`` (a SUM all-reduce of each tied weight's gradient over the stages
    that hold it), ``ReduceGrads`` (the stage's data-parallel reduction) and then the
    optimizer step (``runtime/pipe/schedule.py:239-241``): the inner step pre-hook sees
    the fully reduced tied gradient, identical on every stage, so GC centralizes each
    copy identically with no cross-stage communication. Its collectives stay inside the
    stage's data-parallel group (stages hold different parameters). ``ds_pipe_replicated``
    marks every copy but the first stage's (``module.py:524-527``): counted once."""
    grid = engine.grid
    if grid.get_slice_parallel_world_size() > 1:
        raise ValueError(
            f"dist_gc: pipeline parallelism with model (slice) parallelism of {grid.get_slice_parallel_world_size()}: "
            "the model-parallel layers are the user's own (Megatron-style) and DeepSpeed records no split dist_gc can read"
        )
    stages = int(engine.num_stages)
    pipe = grid.get_pipe_parallel_group() if stages > 1 else None
    for _, p in engine.module.named_parameters():
        if pipe is not None:
            topo.stat_groups[id(p)] = (pipe,)  # stages hold different layers
        if getattr(p, "ds_pipe_replicated", False):
            topo.replicas.add(id(p))
    topo.features.append(f"pipeline {stages} stages")
    topo.peer_groups = (grid.get_data_parallel_group(),)


# --------------------------------------------------------------------------- AutoTP
def _autotp(engine: Any, topo: Topology) -> None:
    """AutoTP training (``"tensor_parallel": {"autotp_size": N}``).

    ``DeepSpeedEngine._configure_tensor_parallel`` sets ``engine.mpu`` to the
    ``deepspeed.utils.groups`` module and builds a ``(data_parallel, tensor_parallel)``
    mesh (``runtime/engine.py:950-958``, ``utils/groups.py:202-237``), then replaces
    Linear layers: a column-parallel ``LinearLayer`` keeps rows ``[sum(sizes[:t]), ...)``
    of its ``(out, in)`` weight and bias (``module_inject/layers.py:973-1081``), a
    row-parallel ``LinearAllreduce`` columns of its weight, its bias replicated
    (``layers.py:878-957``). Both record the split on the parameter (``AUTOTP_META``:
    ``partition_dim``, ``partition_sizes`` — possibly uneven, ``logical_shape``;
    ``layers.py:516-559``). ZeRO is built afterwards on the local pieces and partitions
    them over the mesh's data-parallel group. Unsplit parameters (embeddings, norms,
    row-parallel biases) get identical full gradients on every TP rank: the column
    layers' backward all-reduces the input gradient, the row layers' forward the output
    (``layers.py:204-226, 287-315``) — they are replicas over the TP group, never summed
    over it."""
    from deepspeed.utils import groups

    tp_group = groups.get_tensor_model_parallel_group()
    tp_rank, tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    for path, module in engine.module.named_modules():
        cls = type(module)
        w = getattr(module, "weight", None)
        if cls.__module__ == "deepspeed.module_inject.layers" and w is not None and cls.__name__ in (*_AUTOTP_LINEARS, *_AUTOTP_EMBEDDINGS):
            topo.roles[id(w)] = Role(f"{cls.__name__}.weight", 0)  # (out, in) / (vocab, hidden): dim 0
    problems = []
    for name, p in engine.module.named_parameters():
        name = clean_name(name)
        meta = getattr(p, AUTOTP_META, None)
        if meta is None or meta.get("replicated"):
            if getattr(p, TP_PARAM_FLAG, False) and meta is None:
                problems.append(f"{name}: tensor-parallel without a recorded split")
            continue
        conv = meta.get("conversion") or {}
        dim, sizes, shape = meta.get("partition_dim"), meta.get("partition_sizes"), meta.get("logical_shape")
        if meta.get("sub_param_sizes") or meta.get("sub_param_shard_widths") or conv.get("unsupported_reason"):
            problems.append(f"{name}: a fused layer whose TP shard concatenates pieces of several sub-parameters")
            continue
        if dim is None or not sizes or not shape or len(sizes) != tp_size or sum(sizes) != shape[dim]:
            problems.append(f"{name}: TP metadata partition_dim={dim} partition_sizes={sizes} logical_shape={shape}")
            continue
        split = TPSplit(tp_group, int(dim), tuple(int(s) for s in sizes), tp_rank, tuple(int(s) for s in shape))
        local = tuple(getattr(p, "ds_shape", None) or p.shape)
        want = split_local_shape(split.shape, Split(tp_group, split.dim, split.sizes, split.index, Whole(0)))
        if local != want:
            problems.append(f"{name}: local shape {local}, the recorded split gives {want}")
            continue
        topo.splits[id(p)] = split
    if problems:
        raise ValueError(
            "dist_gc: DeepSpeed AutoTP parameters whose tensor-parallel split dist_gc cannot describe exactly: "
            + "; ".join(problems[:5]) + ("" if len(problems) <= 5 else f" (+{len(problems) - 5} more)")
            + " (exclude them)"
        )
    topo.features.append(f"AutoTP tp={tp_size}")
    # Ranks of a data-parallel group hold the same TP pieces; ranks of a TP group the same
    # parameters (other pieces): both must run the same GC setup.
    topo.peer_groups = tuple(g for g in (groups.get_data_parallel_group(), tp_group) if g is not None)


# --------------------------------------------------------------------------- entry
def _recognised_mpu(engine: Any) -> str | None:
    """Which DeepSpeed feature set ``engine.mpu`` (None: no mpu, or one dist_gc does not know)."""
    mpu = engine.mpu
    if mpu is None:
        return None
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.utils import groups

    if isinstance(engine, PipelineEngine) and mpu is getattr(engine, "grid", None):
        return "pipeline"
    if mpu is groups and engine.autotp_size() > 1:
        return "autotp"
    if getattr(mpu, "__name__", "") == "deepspeed.runtime.sequence_parallel.parallel_state_sp":
        return "ulysses"
    return None


def topology(engine: Any) -> Topology:
    """The :class:`Topology` of ``engine``; raises ``ValueError`` for model parallelism
    dist_gc cannot describe (a user mpu, pipeline slice parallelism, fused AutoTP layers,
    expert layers outside ``deepspeed.moe``)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    topo = Topology()
    kind = _recognised_mpu(engine)
    if engine.mpu is not None and kind is None:
        raise ValueError(
            f"dist_gc: model parallelism through a user-supplied mpu ({type(engine.mpu).__name__}): its tensor-parallel "
            "layers are the user's own (Megatron-style) and DeepSpeed records no split dist_gc can read. Supported: "
            "AutoTP (tensor_parallel.autotp_size), PipelineModule, Ulysses sequence parallelism, MoE"
        )
    if engine.has_moe_layers or any(getattr(p, "allreduce", True) is False for p in engine.module.parameters()):
        _moe(engine, topo)
    if isinstance(engine, PipelineEngine):
        _pipeline(engine, topo)
    if kind == "autotp":
        _autotp(engine, topo)
    # (the engine's own record, runtime/engine.py:2172: the groups getter consults
    # process-global state a later engine may have changed)
    sp = int(getattr(engine, "sequence_parallel_size", 1) or 1)
    if sp > 1:
        if kind != "ulysses":
            raise ValueError(
                f"dist_gc: sequence parallelism (size {sp}) through an mpu other than DeepSpeed's Ulysses "
                "(deepspeed.runtime.sequence_parallel): its gradient reduction is not one dist_gc knows"
            )
        # Ulysses: parameters are replicated over the sequence-parallel group, whose ranks'
        # gradients (of their sequence shards) ZeRO sums over the sequence-data-parallel
        # group = sp x dp (utils/groups.py:911-917, runtime/engine.py:2164): plain ZeRO
        # layouts over that group, which the ZeRO adapter reads already.
        topo.features.append(f"Ulysses sequence parallel sp={sp}")
    return topo


def apply_topology(layouts: list[TensorLayout], params: dict[str, Any], topo: Topology) -> list[TensorLayout]:
    """``layouts`` (named through ``topo.names`` already; ``params``: name -> the
    parameter each describes) with the TP splits, statistics groups and replicas."""
    out = []
    for layout in layouts:
        p = params.get(layout.name)
        key = id(p)
        if key in topo.splits:
            s = topo.splits[key]
            if not isinstance(layout.where, (Whole, FlatShard)):
                raise ValueError(f"dist_gc: {layout.name!r}: an AutoTP piece held as {layout.where!r}")
            layout = replace(layout, shape=s.shape, where=Split(s.group, s.dim, s.sizes, s.index, layout.where))
        if key in topo.stat_groups or key in topo.replicas:
            layout = replace(layout, stat_groups=topo.stat_groups.get(key, ()), replica=key in topo.replicas)
        out.append(layout)
    return out

