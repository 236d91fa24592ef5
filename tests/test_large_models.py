"""PyTorch-native large-model compositions (the torchtitan recipe) on CPU/gloo: exact GC
against the single-process oracle, each with a negative control that must fail and GC
traffic counted at the ``torch.distributed`` API (inside ``optimizer.step``; SGD itself
communicates nothing) equal to ``stats``.

One W=4 spawn runs: FSDP2 + expert parallelism (ep=2 x dp=2; stacked experts
``(E, out, in)`` with FSDP2's default ``(_StridedShard(0), Shard(0))``, ``Shard(1)`` and
``Shard(2)``), ``torch.distributed.pipelining`` (GPipe, 1F1B; 2 stages) x FSDP2 on a 2x2
mesh, ``dist_gc.clip_grad_norm_`` then GC under FSDP2 + TP (2x2), per-block
``torch.compile`` (aot_eager) on FSDP2, FSDP1 ``_HYBRID_SHARD_ZERO2`` (2x2) and the FSDP1
+ TP refusal. One W=2 spawn runs: context parallelism (the exact emulation: parameters
replicated over cp, FSDP2 ``Shard(0)`` on the flattened dp x cp mesh, K/V all-gathered
with autograd), FSDP2 ``CPUOffloadPolicy(pin_memory=False)`` (and the engine's
comm-device branch, forced), FSDP1 with the ``grad=None`` pieces CPU offload leaves.
The real ``context_parallel`` API and CPU offload with NCCL need GPUs: guarded tests.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

import dist_gc
from dist_gc.core.select import clean_name
from tests import large_models as lm
from tests import models
from tests import test_fsdp1 as f1
from tests import test_fsdp2 as f2
from tests.fsdp_common import oracle_grads, oracle_norm
from tests.harness import run_distributed

TOL = 1e-5  # fp32 bar: max |update - oracle| after one SGD(lr=1) step
FAR = 100 * TOL  # a negative control must miss by more than this
CLIP_FRACTION = 0.75  # clipping active, and GC still moves every tensor by > 100x the tolerance

# (bytes, all-reduces) per rank per step, derived from the layouts (see each builder).
EP_TRAFFIC = {
    # dense inp/router/head Shard(0) on the 4-rank dp_shard_cp mesh: channel 0, tensor one
    # fp32 scalar each (12 B). Experts (E=4, local 2 per EP rank): Shard(0)/_StridedShard(0)
    # cut only the batch dim (kept): 0. Shard(1) cuts `out` (kept in channel mode; tensor
    # mode: 2 local experts x 3 tensors = 6 scalars over dp_shard_mod_ep, 24 B). Shard(2)
    # cuts `in` (averaged): channel 2 x (4 + 6 + 4) rows = 28 sums (112 B), tensor 24 B.
    ("shard0", "channel"): (0, 0), ("shard0", "tensor"): (12, 1),
    ("shard1", "channel"): (0, 0), ("shard1", "tensor"): (36, 2),
    ("shard2", "channel"): (112, 1), ("shard2", "tensor"): (36, 2),
}
PP_TRAFFIC = {"channel": (0, 0), "tensor": (8, 1)}  # 2 Linear weights per stage, Shard(0) on dp
CP_TRAFFIC = {"channel": (0, 0), "tensor": (16, 1)}  # q, k, v, o Shard(0) on dp_cp
OFFLOAD_TRAFFIC = f2.EXPECTED_SHARD0_TRAFFIC  # GCTestNet under Shard(0), any W
COMPILE_TRAFFIC = {"channel": (48, 1), "tensor": (24, 1)}  # 2 Conv1D (8, 6) cut on dim 0: 12 sums; 6 weights


@dataclass(frozen=True)
class Case:
    kind: str  # ep | pp | clip | compile | cp | offload | fsdp1-none
    mode: str
    layout: str = ""  # ep: shard0|shard1|shard2; pp: gpipe|1f1b; compile: inplace|wrap; cp: causal|full
    variant: str = "gc"  # gc | explicit | nobatch | local | gc-then-clip | forced-device | forced
    clip: float | None = None

    @property
    def id(self) -> str:
        parts = [self.kind, self.layout, self.mode] + ([f"clip={self.clip:.3g}"] if self.clip else [])
        return "/".join([p for p in parts if p] + [self.variant])

    @property
    def negative(self) -> bool:
        return self.variant in ("nobatch", "local", "gc-then-clip", "forced")


# ----------------------------------------------------------------------------- oracle
def _problem(kind: str, layout: str = ""):
    """``(model, loss on the full model, GC spec, oracle kind)`` of a case kind."""
    if kind == "ep":
        m, x, t = lm.make_moe()
        return m, lambda mm: lm.moe_loss(mm, x.double(), t.double()), lm.MoENet.SPEC, "fp64"
    if kind == "pp":
        m, x, y = lm.make_pipe()
        return m, lambda mm: lm.pipe_mse(mm(x.double()), y.double()), lm.PipeNet.SPEC, "fp64"
    if kind == "cp":
        m, x, t = lm.make_attn(layout == "causal")
        return m, lambda mm: lm.attn_loss(mm, x.double(), t.double()), lm.Attn.SPEC, "fp64"
    if kind == "compile":
        m, x, t = lm.make_blocknet()
        return m, lambda mm: lm.blocknet_loss(mm, x.double(), t.double()), lm.BlockNet.SPEC, "fp64"
    if kind == "clip":
        m, batch = models.make_tpnet(), models.make_tp_batch()
        return m, lambda mm: models.tp_loss_on(mm, batch), {n: (d, 0) for n, d in models.TPNet.OUTPUT_DIMS.items()}, "fp32"
    m, batch = models.make_model(), models.make_batch()  # offload, fsdp1-none: GCTestNet
    return m, lambda mm: models.loss_on(mm, batch), {n: (d, 0) for n, d in models.GCTestNet.OUTPUT_DIMS.items()}, "fp32"


_ORACLE: dict = {}


def oracle(kind: str, layout: str, mode: str | None, clip: float | None = None) -> dict[str, torch.Tensor]:
    """The oracle's update: fp64 model for the new models; for the existing test models
    the same fp32-model oracle as tests/test_fsdp1.py and test_fsdp2.py (GC in fp64)."""
    key = (kind, layout if kind == "cp" else "", mode, clip)
    if key not in _ORACLE:
        model, fn, spec, how = _problem(kind, layout)
        if how == "fp64":
            _ORACLE[key] = lm.oracle_update(model, fn, spec if mode else None, mode or "channel", clip)
        else:
            _ORACLE[key] = oracle_grads(model, fn, {n: d for n, (d, _) in spec.items()}, mode, clip)
    return _ORACLE[key]


def clip_for(kind: str) -> float:
    """Half the oracle's global gradient norm: clipping is active."""
    model, fn, _, how = _problem(kind)
    return CLIP_FRACTION * (lm.grad_norm(model, fn) if how == "fp64" else oracle_norm(model, fn))


# ----------------------------------------------------------------------------- workers
_MESHES: dict = {}


def _mesh(key: str, shape: tuple[int, ...], names: tuple[str, ...] | None = None):
    # ONE mesh object per layout per process: an equal second init_device_mesh can make
    # DTensors land on the first, equal mesh object (FSDP2 checks mesh identity).
    from torch.distributed.device_mesh import init_device_mesh

    if key not in _MESHES:
        _MESHES[key] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _MESHES[key]


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value (fp64), under the user's own name. Collective."""
    return {clean_name(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().clone()
            for n, p in model.named_parameters()}


def _local_hook(named: list[tuple[str, torch.Tensor]], spec: lm.GCSpec, mode: str):
    """Negative control: dist_gc's formula applied to each rank's LOCAL block of every
    DTensor gradient, with no communication (what GC without a layout does)."""

    @torch.no_grad()
    def hook(optimizer, args, kwargs):
        for name, p in named:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            if name in spec and g.numel():
                g.copy_(lm.oracle_gc(g, mode, *spec[name]))

    return hook


def _train(case: Case, model: nn.Module, backward, spec: lm.GCSpec, *, config: dict | None = None, clip_fn=None,
           before_backward=None) -> dict:
    """One SGD(lr=1) step with GC (or the negative control) attached: ``backward(model)``
    computes this rank's gradients, ``clip_fn(model)`` clips them. Returns the update,
    GC's stats and the traffic counted inside ``step``."""
    traffic = lm.step_traffic()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = _full(model)
    handle = None
    if case.variant == "local":
        opt.register_step_pre_hook(_local_hook([(clean_name(n), p) for n, p in model.named_parameters()], spec, case.mode))
    else:
        cfg = {"mode": case.mode, **(config or {})}
        handle = dist_gc.attach(opt, model=model, config=cfg)
    if before_backward is not None:
        before_backward(handle)
    backward(model)
    norm = None
    if case.variant == "gc-then-clip":
        handle.step()  # GC first (the wrong order) ...
    if clip_fn is not None:
        norm = float(clip_fn(model))
    opt.step()  # ... GC (again: a projection, idempotent) in the step pre-hook
    after = _full(model)
    out = {"upd": {n: before[n] - after[n] for n in before}, "counted": traffic.last, "norm": norm}
    if handle is not None:
        out["stats"] = (handle.stats.bytes_communicated, handle.stats.collectives)
        out["label"] = handle.label
    return out


def _ep(rank: int, world: int, case: Case) -> dict:
    """torchtitan's EP + FSDP2 layout (ParallelDims._build_mesh_with_ep): mesh
    (dp_shard_mod_ep=2, dp_shard_in_ep=2); experts ``distribute_tensor(Shard(0))`` on the
    EP axis (ExpertParallel._partition_fn), then ``fully_shard`` on dp_shard_mod_ep;
    dense parameters ``fully_shard`` on the flattened 4-rank dp_shard_cp mesh."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _mesh("ep", (2, 2), ("dp_shard_mod_ep", "dp_shard_in_ep"))
    if "ep-dp" not in _MESHES:
        _MESHES["ep-dp"] = mesh["dp_shard_mod_ep", "dp_shard_in_ep"]._flatten("dp_shard_cp")
    dp, ep_mesh = _MESHES["ep-dp"], mesh["dp_shard_in_ep"]
    m, x, t = lm.make_moe()
    ex = m.experts
    for n, p in list(ex.named_parameters(recurse=False)):
        ex.register_parameter(n, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)])))
    ex.ep_group = ep_mesh.get_group()
    place = {"shard0": None, "shard1": Shard(1), "shard2": Shard(2)}[case.layout]
    fully_shard(ex, mesh=mesh["dp_shard_mod_ep"], shard_placement_fn=(lambda p: place) if place else None)
    # Experts see the tokens of all 4 data ranks but are reduced over 2: divide by 4 as
    # torchtitan does; gloo has no PREMUL_SUM, so FSDP must SUM and then divide.
    ex.set_gradient_divide_factor(world)
    ex.set_force_sum_reduction_for_comms(True)
    fully_shard(m, mesh=dp)
    r, n = dp.get_local_rank(), lm.N_TOKENS // world
    config = {"nobatch": {"batch_dims": {"experts.*": 0}, "output_dim": {"experts.*": 0}},
              "explicit": {"batch_dims": {"experts.*": 1}, "output_dim": {"experts.*": 1}}}.get(case.variant)
    out = _train(case, m, lambda mm: lm.moe_loss(mm, x[r * n : (r + 1) * n], t[r * n : (r + 1) * n]).backward(), lm.MoENet.SPEC,
                 config=config)
    w1 = ex.w1
    out["placements"] = [(type(pl).__name__, getattr(pl, "dim", None)) for pl in w1.placements]
    out["mesh"] = tuple(w1.device_mesh.mesh_dim_names)
    return out


def _pp(rank: int, world: int, case: Case) -> dict:
    """torchtitan's PP x FSDP2 build: each stage deep-copies the model and deletes the
    layers of the other stage, ``fully_shard`` per layer and on the stage root over the
    stage's dp axis; one optimizer per stage, GC attached per stage."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    mesh = _mesh("pp", (2, 2), ("pp", "dp"))
    pp, dp = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    full, x, y = lm.make_pipe()
    stage_mod = copy.deepcopy(full)
    for k in list(stage_mod.layers.keys()):
        if k not in lm.PP_STAGES[pp]:
            del stage_mod.layers[k]
    for layer in stage_mod.layers.values():
        fully_shard(layer, mesh=mesh["dp"], reshard_after_forward=False)
    fully_shard(stage_mod, mesh=mesh["dp"], reshard_after_forward=False)
    stage = PipelineStage(stage_mod, pp, 2, torch.device("cpu"), group=mesh["pp"].get_group())
    sched = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[case.layout](stage, n_microbatches=2, loss_fn=lm.pipe_mse)
    chunks: list[int] = []
    at_gc: list[int] = []
    real_backward = stage.backward_one_chunk

    def counted_backward(*a, **k):
        out = real_backward(*a, **k)
        chunks.append(1)
        return out

    stage.backward_one_chunk = counted_backward

    def record_gc_time(handle):
        if handle is None:
            return
        engine = handle.engines[0]
        real_step = engine.step

        def step(stats=None):  # when GC runs: how many micro-batch backwards were done
            at_gc.append(len(chunks))
            return real_step(stats)

        engine.step = step

    n = lm.PP_BATCH // 2
    sl = slice(dp * n, (dp + 1) * n)

    def run(model):  # forward and backward of both micro-batches; FSDP reduces after the last
        if pp == 0:
            sched.step(x[sl])
        else:
            sched.step(target=y[sl], losses=[])

    clip_fn = None
    if case.clip:
        clip_fn = lambda m: dist_gc.clip_grad_norm_(m.parameters(), case.clip, pp_group=mesh["pp"].get_group())  # noqa: E731
    out = _train(case, stage_mod, run, lm.PipeNet.SPEC, clip_fn=clip_fn, before_backward=record_gc_time)
    out["gc_after_backwards"] = at_gc
    out["microbatch_backwards"] = len(chunks)
    if dp != 0:
        out.pop("upd")  # stage updates are read from dp rank 0 of each stage (ranks 0 and 2)
    return out


def _tp(rank: int, world: int, mode: str):
    return f2._build(f2.Case("tp", mode), rank, world)


def _clip(rank: int, world: int, case: Case) -> dict:
    """FSDP2 + TP (tests/test_fsdp2.py's TPNet: up Colwise, down Rowwise on the tp axis,
    everything FSDP2 on dp): gradients on a 2-D and a 1-D mesh."""
    model, batch, loss_on = _tp(rank, world, case.mode)
    spec = {n: (d, 0) for n, d in models.TPNet.OUTPUT_DIMS.items()}
    return _train(case, model, lambda m: loss_on(m, batch).backward(), spec, clip_fn=lambda m: dist_gc.clip_grad_norm_(m.parameters(), case.clip))


def _clip_facts(rank: int, world: int) -> dict:
    """torch's clip_grad_norm_ fails on two meshes; dist_gc's is torch's on one mesh
    (same scaled gradients, same return value); orders that do not combine are refused."""
    out = {}
    model, batch, loss_on = _tp(rank, world, "channel")
    loss_on(model, batch).backward()
    try:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        out["torch_two_meshes"] = ""
    except RuntimeError as exc:
        out["torch_two_meshes"] = str(exc)
    try:
        dist_gc.clip_grad_norm_(model.parameters(), 0.1, norm_type=0)
        out["norm_type_0"] = ""
    except ValueError as exc:
        out["norm_type_0"] = str(exc)
    model, batch, loss_on = f2._build(f2.Case("shard0", "channel"), rank, world)
    loss_on(model, batch).backward()
    raw = [p.grad.to_local().clone() for p in model.parameters()]
    results = []
    for fn in (torch.nn.utils.clip_grad_norm_, dist_gc.clip_grad_norm_):
        for p, g in zip(model.parameters(), raw):
            p.grad.to_local().copy_(g)
        total = fn(model.parameters(), 0.3)
        results.append((type(total).__name__, float(total.full_tensor()), [p.grad.to_local().clone() for p in model.parameters()]))
    out["same_type"] = results[0][0] == results[1][0] == "DTensor"
    out["same_norm"] = results[0][1] == results[1][1]
    out["same_grads"] = all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))
    out["clipped"] = results[0][1] > 0.3
    return out


def _compile(rank: int, world: int, case: Case) -> dict:
    """torchtitan's per-block compile before fully_shard: ``block.compile()`` in place
    ("inplace", torchtitan today) or ``torch.compile(block)`` registered in its place
    ("wrap": parameter names gain ``_orig_mod``); backend aot_eager (inductor takes
    minutes on 2 CPU cores; the parameters and gradients FSDP2 hands the optimizer are
    the same DTensors either way)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch.distributed.fsdp import fully_shard

    torch._dynamo.reset()
    counters.clear()
    mesh = _mesh("flat", (world,))
    m, x, t = lm.make_blocknet()
    for k in list(m.layers.keys()):
        if case.layout == "inplace":
            m.layers[k].compile(backend="aot_eager", fullgraph=True)
        else:
            m.layers[k] = torch.compile(m.layers[k], backend="aot_eager", fullgraph=True)
    for block in m.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(m, mesh=mesh)
    n = lm.BLK_BATCH // world
    out = _train(case, m, lambda mm: lm.blocknet_loss(mm, x[rank * n : (rank + 1) * n], t[rank * n : (rank + 1) * n]).backward(),
                 lm.BlockNet.SPEC)
    out["graphs"] = int(counters["stats"]["unique_graphs"])
    out["names"] = [n for n, _ in m.named_parameters()]
    return out


def _fsdp1_tp_refusal(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    out = {}
    for orig in (False, True):
        mesh = f2._mesh(world, "2d")
        m = models.make_tpnet()
        parallelize_module(m, mesh["inner"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fm = FSDP(m, device_mesh=mesh["outer"], use_orig_params=orig, device_id=torch.device("cpu"))
        try:
            dist_gc.attach(torch.optim.SGD(fm.parameters(), lr=1.0), model=fm)
            out[orig] = ""
        except ValueError as exc:
            out[orig] = str(exc)
    return out


def hsdp_zero2_cases() -> list:
    """FSDP1 ``_HYBRID_SHARD_ZERO2`` on a 2x2 (replicate, shard) mesh through
    tests/test_fsdp1.py's own case runner and checks."""
    clip = f1._clip_for("net")
    out = []
    for orig in (False, True):
        for mode in ("channel", "tensor"):
            base = f1.Case("_HYBRID_SHARD_ZERO2", orig, mode, nested=True)
            out += [base, replace(base, variant="forced")]
        out += [f1.Case("_HYBRID_SHARD_ZERO2", orig, "channel", nested=orig, clip=clip),
                f1.Case("_HYBRID_SHARD_ZERO2", orig, "channel", nested=orig, clip=clip, variant="naive")]
    return out


def w4_cases() -> list[Case]:
    out: list[Case] = []
    for layout in ("shard0", "shard1", "shard2"):
        out += [Case("ep", "channel", layout), Case("ep", "tensor", layout)]
    out += [Case("ep", "channel", "shard0", "explicit"), Case("ep", "channel", "shard2", "nobatch"),
            Case("ep", "channel", "shard2", "local"), Case("ep", "tensor", "shard0", "local")]
    pp_clip = clip_for("pp")
    out += [Case("pp", "channel", "gpipe"), Case("pp", "tensor", "gpipe"), Case("pp", "tensor", "gpipe", "local"),
            Case("pp", "channel", "1f1b"), Case("pp", "tensor", "1f1b"), Case("pp", "channel", "gpipe", clip=pp_clip)]
    tp_clip = clip_for("clip")
    for mode in ("channel", "tensor"):
        out += [Case("clip", mode, clip=tp_clip), Case("clip", mode, variant="gc-then-clip", clip=tp_clip)]
    out += [Case("compile", "channel", "inplace"), Case("compile", "tensor", "inplace"), Case("compile", "channel", "wrap"),
            Case("compile", "tensor", "wrap"), Case("compile", "tensor", "wrap", "local")]
    return out


def w2_cases() -> list[Case]:
    out: list[Case] = []
    for layout in ("causal", "full"):
        out += [Case("cp", "channel", layout), Case("cp", "tensor", layout)]
    out += [Case("cp", "tensor", "causal", "local")]
    out += [Case("offload", "channel"), Case("offload", "tensor"), Case("offload", "tensor", variant="local"),
            Case("offload", "tensor", variant="forced-device")]
    out += [Case("fsdp1-none", "channel"), Case("fsdp1-none", "tensor"), Case("fsdp1-none", "channel", variant="forced")]
    return out


def _cp(rank: int, world: int, case: Case) -> dict:
    """Context parallelism as torchtitan lays it out at dp=1, cp=2: parameters FSDP2
    ``Shard(0)`` on the flattened dp x cp mesh (replicated over cp in the math, gradients
    reduced over it by FSDP's reduce-scatter); each rank computes its chunk of the
    sequence, K/V all-gathered over cp with autograd."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh("cp", (1, world), ("dp", "cp"))
    if "dp_cp" not in _MESHES:
        _MESHES["dp_cp"] = mesh["dp", "cp"]._flatten("dp_cp")
    m, x, t = lm.make_attn(case.layout == "causal")
    fully_shard(m, mesh=_MESHES["dp_cp"])
    cp_rank = mesh["cp"].get_local_rank()
    m.kv_gather = (mesh["cp"].get_group(), cp_rank)
    s = lm.CP_S // world
    sl = slice(cp_rank * s, (cp_rank + 1) * s)
    out = _train(case, m, lambda mm: lm.attn_loss(mm, x[:, sl].contiguous(), t[:, sl].contiguous()).backward(), lm.Attn.SPEC)
    out["placements"] = [repr(pl) for pl in m.q.weight.placements]
    return out


def _offload(rank: int, world: int, case: Case) -> dict:
    """FSDP2 ``CPUOffloadPolicy(pin_memory=False)`` (pinning needs an accelerator) on
    GCTestNet, nested as tests/test_fsdp2.py. ``forced-device``: the engine is told the
    group communicates on another device object (``cpu:0``), so its all-reduce runs on a
    copy of the message that is copied back — the branch offloaded gradients with an NCCL
    group take on GPUs."""
    import dist_gc.engine.engine as engine_mod
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = _mesh("flat", (world,))
    model = models.make_model()
    policy = CPUOffloadPolicy(pin_memory=False)
    for sub in (model.conv, model.fc1):
        fully_shard(sub, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    batch = models.local_slice(models.make_batch(), rank, world)
    spec = {n: (d, 0) for n, d in models.GCTestNet.OUTPUT_DIMS.items()}
    asked: list = []
    real = engine_mod.comm_device
    if case.variant == "forced-device":
        def forced(group=None, prefer=None):
            asked.append(str(prefer))
            return torch.device("cpu", 0)

        engine_mod.comm_device = forced
    try:
        out = _train(case, model, lambda m: models.loss_on(m, batch).backward(), spec)
    finally:
        engine_mod.comm_device = real
    out["asked"] = asked
    out["policy"] = type(model._get_fsdp_state()._fsdp_param_group.offload_policy).__name__
    return out


def _fsdp1_none(rank: int, world: int, case: Case) -> dict:
    """FSDP1 FULL_SHARD, use_orig_params=True: parameters with no elements on a rank have
    ``.grad = None`` when the optimizer steps — what the probe found under
    ``CPUOffload(offload_params=True)`` (which cannot run without an accelerator); torch
    2.13 does the same without offload. A step pre-hook registered before GC's makes
    sure of it (a size-0 gradient becomes None) and counts them."""
    traffic = lm.step_traffic()
    fm = f1._wrap(f1.Case("FULL_SHARD", True, case.mode), models.make_model(), world)
    opt = torch.optim.SGD(fm.parameters(), lr=1.0)
    nulled: list[int] = []

    def null_empty(optimizer, args, kwargs):
        for p in optimizer.param_groups[0]["params"]:
            if p.numel() == 0:
                p.grad = None
                nulled.append(1)

    opt.register_step_pre_hook(null_empty)
    before = f1._full(fm)
    handle = None
    if case.variant == "forced":
        opt.register_step_pre_hook(f1.naive_hook("forced"))
    else:
        handle = dist_gc.attach(opt, model=fm, config={"mode": case.mode})
    models.loss_on(fm, models.local_slice(models.make_batch(), rank, world)).backward()
    opt.step()
    after = f1._full(fm)
    out = {"upd": {n: before[n] - after[n] for n in before}, "counted": traffic.last, "nulled": len(nulled)}
    if handle is not None:
        out["stats"] = (handle.stats.bytes_communicated, handle.stats.collectives)
    return out


_RUNNERS = {"ep": _ep, "pp": _pp, "clip": _clip, "compile": _compile, "cp": _cp, "offload": _offload, "fsdp1-none": _fsdp1_none}


def large_worker(rank: int, world: int, cases: list[Case], fsdp1_cases: list) -> dict:
    import logging

    warnings.filterwarnings("ignore")
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    traffic = lm.step_traffic()
    results = []
    for case in cases:
        try:
            r = _RUNNERS[case.kind](rank, world, case)
        except Exception as exc:
            raise RuntimeError(f"case {case.id} failed on rank {rank}") from exc
        if rank != 0 and case.kind != "pp":
            r.pop("upd", None)
        results.append(r)
    f1_results = []
    for case in fsdp1_cases:
        try:
            r = f1._run_case(rank, world, case)
        except Exception as exc:
            raise RuntimeError(f"case {case.id} failed on rank {rank}") from exc
        r["counted"] = traffic.last
        if rank != 0:
            r.pop("params"), r.pop("grads", None)
        f1_results.append(r)
    extra = {}
    if world == 4:
        extra = {"clip": _clip_facts(rank, world), "fsdp1_tp": _fsdp1_tp_refusal(rank, world)}
    return {"results": results, "fsdp1": f1_results, **extra}


# ----------------------------------------------------------------------------- checks
def _err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want), f"parameter names differ: {sorted(set(got) ^ set(want))}"
    return max(float((got[n].double() - want[n].double()).abs().max()) for n in want)


def _expected_traffic(case: Case) -> tuple[int, int] | None:
    if case.kind == "ep":
        return EP_TRAFFIC[(case.layout, case.mode)]
    return {"pp": PP_TRAFFIC, "cp": CP_TRAFFIC, "offload": OFFLOAD_TRAFFIC, "compile": COMPILE_TRAFFIC}.get(case.kind, {}).get(case.mode)


def _check(cases: list[Case], per_rank: list[dict]) -> list[str]:
    lines = []
    for i, case in enumerate(cases):
        results = [r["results"][i] for r in per_rank]
        if case.kind == "pp":  # dp rank 0 of each stage: ranks 0 (layers 0, 1) and 2 (layers 2, 3)
            upd = {**results[0]["upd"], **results[2]["upd"]}
        else:
            upd = results[0]["upd"]
        want = oracle(case.kind, case.layout, case.mode, case.clip)
        err = _err(upd, want)
        lines.append(f"{case.id}: {err:.1e}")
        if case.negative:
            assert err > FAR, f"{case.id}: negative control matched the oracle (max err {err:.2e}); the test cannot fail"
            continue
        assert err <= TOL, f"{case.id}: max |update - oracle| = {err:.2e} > {TOL}"
        for rank, r in enumerate(results):
            calls, nbytes, others = r["counted"]
            assert others == 0, f"{case.id}: rank {rank}: {others} collectives other than all_reduce inside step"
            assert (nbytes, calls) == r["stats"], f"{case.id}: rank {rank}: counted {(nbytes, calls)} at torch.distributed, stats say {r['stats']}"
        expected = _expected_traffic(case)
        if expected is not None:
            got = {r["stats"] for r in results}
            assert got == {expected}, f"{case.id}: expected (bytes, all-reduces) {expected} on every rank, got {got}"
        if case.kind == "clip":
            assert results[0]["norm"] > case.clip, f"{case.id}: clipping was not active"
            assert {r["stats"][1] for r in results} == {2}, f"{case.id}: expected one all-reduce per mesh axis"
        _check_kind(case, results)
    return lines


def _check_kind(case: Case, results: list[dict]) -> None:
    r0 = results[0]
    if case.kind == "ep":
        want = {"shard0": [("_StridedShard", 0), ("Shard", 0)], "shard1": [("Shard", 1), ("Shard", 0)],
                "shard2": [("Shard", 2), ("Shard", 0)]}[case.layout]
        assert r0["placements"] == want and r0["mesh"] == ("dp_shard_mod_ep", "dp_shard_in_ep"), \
            f"{case.id}: expert placements {r0['placements']} on {r0['mesh']}, expected {want}"
    elif case.kind == "pp":
        for rank, r in enumerate(results):
            assert r["gc_after_backwards"] == [2] and r["microbatch_backwards"] == 2, \
                f"{case.id}: rank {rank}: GC ran after {r['gc_after_backwards']} of {r['microbatch_backwards']} micro-batch backwards; expected once, after both"
        if case.clip:
            assert r0["norm"] > case.clip, f"{case.id}: clipping was not active"
    elif case.kind == "compile":
        assert r0["graphs"] >= 1, f"{case.id}: no compiled graph; the blocks did not run compiled"  # (both blocks share one graph)
        if case.layout == "wrap":
            assert any("_orig_mod" in n for n in r0["names"]), f"{case.id}: expected _orig_mod names, got {r0['names']}"
    elif case.kind == "cp":
        assert r0["placements"] == ["Shard(dim=0)"], f"{case.id}: placements {r0['placements']}"
    elif case.kind == "offload":
        assert r0["policy"] == "CPUOffloadPolicy", f"{case.id}: offload policy {r0['policy']}"
        if case.variant == "forced-device":
            # once, for the step's message (the attach-time check goes through the store)
            assert all(r["asked"] == ["cpu"] for r in results), \
                f"{case.id}: the engine did not consult the comm device for its message: {[r['asked'] for r in results]}"
    elif case.kind == "fsdp1-none":
        assert all(r["nulled"] > 0 for r in results), f"{case.id}: a rank had no parameter without elements"
        assert len({r["stats"] for r in results}) == 1 and r0["stats"][1] == 1, f"{case.id}: {[r['stats'] for r in results]}"


def _check_gc_matters(cases: list[Case]) -> None:
    """GC must change every centralized update by far more than the tolerance."""
    seen = set()
    for case in cases:
        key = (case.kind, case.layout if case.kind == "cp" else "", case.mode, case.clip)
        if key in seen:
            continue
        seen.add(key)
        _, _, spec, _ = _problem(case.kind, case.layout)
        with_gc, without = oracle(case.kind, case.layout, case.mode, case.clip), oracle(case.kind, case.layout, None, case.clip)
        for n in spec:
            diff = float((with_gc[n] - without[n]).abs().max())
            assert diff > FAR, f"{case.id}: GC changes {n} by only {diff:.2e}; the test could not tell GC from a no-op"


def _check_routing() -> None:
    """Routing must not hinge on fp32 noise: every expert gets tokens and each token's
    top-1 logit beats its second by far more than the sharded run's rounding."""
    m, x, _ = lm.make_moe()
    with torch.no_grad():
        _, logits = m.double().route(x.double())
    top = logits.topk(2, dim=-1).values
    assert int(torch.bincount(logits.argmax(-1), minlength=lm.E).min()) >= 1, "an expert gets no token"
    assert float((top[:, 0] - top[:, 1]).min()) > 1e-4, "a routing decision is within 1e-4 of a tie"


def _check_fsdp1(cases: list, per_rank: list[dict]) -> None:
    f1._check(4, cases, [{"results": r["fsdp1"], "refusals": {}} for r in per_rank])
    for i, case in enumerate(cases):
        if case.variant == "gc":
            for r in per_rank:
                res = r["fsdp1"][i]
                calls, nbytes, others = res["counted"]
                assert (nbytes, calls, others) == (res["bytes"], res["collectives"], 0), f"{case.id}: counted {res['counted']}, stats {res['bytes'], res['collectives']}"
            assert "_HYBRID_SHARD_ZERO2" in per_rank[0]["fsdp1"][i]["engine"]


def _check_facts(per_rank: list[dict]) -> None:
    for r in per_rank:
        c = r["clip"]
        assert "same mesh" in c["torch_two_meshes"], f"torch's clip_grad_norm_ did not fail on two meshes: {c['torch_two_meshes']!r}"
        assert "norm_type" in c["norm_type_0"], f"norm_type=0 on two meshes was not refused: {c['norm_type_0']!r}"
        assert c["clipped"] and c["same_type"] and c["same_norm"] and c["same_grads"], f"dist_gc.clip_grad_norm_ differs from torch's on one mesh: {c}"
        for orig, msg in r["fsdp1_tp"].items():
            assert "tensor-parallel" in msg and "FSDP2" in msg and "up.weight" in msg, f"FSDP1 + TP (use_orig_params={orig}) not refused clearly: {msg!r}"


# ----------------------------------------------------------------------------- tests
def test_large_model_layouts_w4():
    """EP + FSDP2, PP x FSDP2, TP-aware clip then GC, per-block compile, FSDP1
    _HYBRID_SHARD_ZERO2 and the FSDP1 + TP refusal, at W=4."""
    _check_routing()
    cases, fsdp1_cases = w4_cases(), hsdp_zero2_cases()
    _check_gc_matters(cases)
    per_rank = run_distributed(large_worker, 4, cases, fsdp1_cases)
    lines = _check(cases, per_rank)
    _check_fsdp1(fsdp1_cases, per_rank)
    _check_facts(per_rank)
    print("\n".join(lines))


def test_large_model_layouts_w2():
    """Context parallelism (exact emulation), FSDP2 CPU offload (and the forced
    comm-device branch), FSDP1 with offload's grad=None pieces, at W=2."""
    cases = w2_cases()
    _check_gc_matters(cases)
    per_rank = run_distributed(large_worker, 2, cases, [])
    print("\n".join(_check(cases, per_rank)))


# ----------------------------------------------------------------------------- single process
class _Stacked(nn.Module):
    """A module that declares its experts: a 3-D stack, a stack of biases, and a
    parameter whose dim 0 is not the expert count."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 3
        self.w = nn.Parameter(torch.zeros(3, 4, 5))
        self.b = nn.Parameter(torch.zeros(3, 4))
        self.gate = nn.Parameter(torch.zeros(5, 3))


def _stacked_step(config: dict | None, grads: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dist_gc.GCHandle]:
    m = _Stacked()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    handle = dist_gc.attach(opt, model=m, config=config)
    for n, p in m.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    return {n: -p.detach().double() for n, p in m.named_parameters()}, handle


def test_stacked_expert_weights_detected_and_exact(capsys):
    """A parameter whose dim 0 is its module's ``num_experts`` gets batch dim 0 (one set
    of means per expert) and, for a 3-D stack, output dim 1 — assumed, and said so in
    the attach line; ``min_ndim`` counts the dims of ONE weight, so the stacked biases
    ``(E, out)`` are left alone; ``output_dim`` says ``(E, in, out)``."""
    from dist_gc.core.select import resolve_roles

    roles = resolve_roles(_Stacked())
    assert (roles["w"].batch_dims, roles["w"].output_dim, roles["w"].known) == (1, 1, False)
    assert (roles["b"].batch_dims, roles["b"].output_dim) == (1, 1)
    assert roles["gate"].batch_dims == 0
    torch.manual_seed(0)
    grads = {"w": torch.randn(3, 4, 5) + torch.arange(3.0).view(3, 1, 1), "b": torch.randn(3, 4) + 1, "gate": torch.randn(5, 3) + 1}
    upd, handle = _stacked_step(None, grads)
    assert "ndim 1 (+1 batch dim) < min_ndim 2" in handle.plan.skipped["b"]
    assert "output dim 1 as torchtitan's (E, out, in) assumed" in capsys.readouterr().err
    torch.testing.assert_close(upd["w"], lm.oracle_gc(grads["w"], "channel", 1, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(upd["gate"], lm.oracle_gc(grads["gate"], "channel", 0), rtol=0, atol=1e-6)
    torch.testing.assert_close(upd["b"], grads["b"].double(), rtol=0, atol=0)
    # Negative control: without the batch dim (a plain 3-D tensor, output dim 1) the
    # means pool the experts.
    assert float((lm.oracle_gc(grads["w"], "channel", 1, 0) - upd["w"]).abs().max()) > FAR
    upd, _ = _stacked_step({"mode": "tensor", "min_ndim": 1}, grads)  # one mean per expert, biases included
    torch.testing.assert_close(upd["w"], lm.oracle_gc(grads["w"], "tensor", 0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(upd["b"], lm.oracle_gc(grads["b"], "tensor", 0, 1), rtol=0, atol=1e-6)
    capsys.readouterr()
    upd, _ = _stacked_step({"output_dim": {"w": 2}}, grads)  # (E, in, out): older torchtitan, HF gpt-oss
    torch.testing.assert_close(upd["w"], lm.oracle_gc(grads["w"], "channel", 2, 1), rtol=0, atol=1e-6)
    assert "(E, out, in) assumed" not in capsys.readouterr().err  # the user said it: no assumption left to name
    upd, _ = _stacked_step({"batch_dims": {"w": 0}, "output_dim": {"w": 0}}, grads)  # detection overridden
    torch.testing.assert_close(upd["w"], lm.oracle_gc(grads["w"], "channel", 0, 0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["channel", "tensor"])
def test_plan_block_with_batch_dims_against_brute_force(mode):
    """plan_block with kept batch dims (stacked experts) on simulated N-D blocks:
    random meshes of up to 3 axes, each cutting a random dim (the product structure of
    Shard and _StridedShard, with random non-contiguous splits) — among them two axes
    both cutting the batch dim 0, as FSDP2's ``(_StridedShard(0), Shard(0))`` over EP
    does, with or without a third cutting an averaged dim. Local sums indexed by LOCAL
    channel, summed over each reducing group, reproduce the oracle on every rank."""
    import random

    from dist_gc.core.centralize import add_sums_, geometry_of, subtract_means_
    from dist_gc.engine.layout import ShardAxis, plan_block

    rng = random.Random(1)
    fixed = [((4, 4, 6), (2, 2), [0, 0]), ((4, 4, 6), (2, 2, 2), [0, 0, 2]), ((4, 6, 4), (2, 2), [2, 0])]
    trials = fixed + [None] * 150
    for trial, spec in enumerate(trials):
        if spec is None:
            ndim = rng.randint(2, 4)
            shape = tuple(rng.randint(1, 5) for _ in range(ndim))
            mesh_shape = tuple(rng.randint(1, 3) for _ in range(rng.randint(1, 3)))
            cuts = [rng.choice([None, *range(ndim)]) for _ in mesh_shape]
        else:
            shape, mesh_shape, cuts = spec
            ndim = len(shape)
        # torchtitan's experts (batch dim 0, output dim 1) on the fixed layouts
        batch = 1 if spec is not None else rng.randint(1, ndim - 1)
        k = 1 if spec is not None else rng.randrange(batch, ndim)
        geo = geometry_of(shape, mode, k, batch_dims=batch)
        if geo.count == 1:
            continue  # nothing averaged: resolve_targets skips such tensors as degenerate
        g = torch.randn(shape, dtype=torch.float64) + torch.arange(shape[0], dtype=torch.float64).view(-1, *[1] * (ndim - 1))
        kept = tuple(range(batch)) + ((k,) if mode == "channel" else ())
        blocks = f2._simulate_blocks(shape, mesh_shape, cuts, rng)
        state = {}
        for coord, idx in blocks.items():
            local = g
            for d, ix in enumerate(idx):
                local = local.index_select(d, torch.tensor(ix, dtype=torch.long))
            axes = [ShardAxis((a, coord[:a] + coord[a + 1 :]), d) for a, d in enumerate(cuts) if d is not None]
            plan = plan_block("t", geo, shape=shape, local_shape=local.shape, kept_dims=kept, shard_axes=axes, source=0)
            sums = torch.zeros(plan.num_sums, dtype=torch.float64)
            for r in plan.regions:
                add_sums_(local, sums[r.sum_start : r.sum_stop].view(r.sum_shape))
            state[coord] = (local, idx, plan, sums)
        for a in range(len(mesh_shape)):  # the engine's all-reduces, one per mesh axis
            totals: dict = {}
            for _, _, plan, sums in state.values():
                for red in plan.reductions:
                    if red.group[0] == a:
                        totals[red.group] = totals.get(red.group, 0) + sums[red.sum_start : red.sum_stop]
            for _, _, plan, sums in state.values():
                for red in plan.reductions:
                    if red.group[0] == a:
                        sums[red.sum_start : red.sum_stop] = totals[red.group]
        want = lm.oracle_gc(g, mode, k, batch)
        for coord, (local, idx, plan, sums) in state.items():
            for r in plan.regions:
                subtract_means_(local, (sums / geo.count)[r.sum_start : r.sum_stop].view(r.sum_shape))
            expect = want
            for d, ix in enumerate(idx):
                expect = expect.index_select(d, torch.tensor(ix, dtype=torch.long))
            torch.testing.assert_close(local, expect, rtol=0, atol=1e-9,
                                       msg=lambda m: f"trial {trial}: {shape} batch {batch} dim {k} mesh {mesh_shape} cuts {cuts} at {coord}: {m}")


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, float("inf")])
@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_norm_is_torchs_on_plain_tensors(norm_type, foreach):
    """Where torch's clip_grad_norm_ works, dist_gc's is that call: same return value,
    same scaled gradients (bit for bit), same errors."""
    torch.manual_seed(0)

    def params():
        torch.manual_seed(1)
        ps = [nn.Parameter(torch.randn(3, 4)) for _ in range(3)] + [nn.Parameter(torch.randn(5))]
        for p in ps[:-1]:
            p.grad = torch.randn_like(p) * 3
        return ps  # the last one has no gradient

    a, b = params(), params()
    ta = torch.nn.utils.clip_grad_norm_(a, 0.5, norm_type, foreach=foreach)
    tb = dist_gc.clip_grad_norm_(iter(b), 0.5, norm_type, foreach=foreach)
    assert torch.equal(ta, tb) and float(ta) > 0.5
    assert all((p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad) for p, q in zip(a, b))
    bad = params()
    bad[0].grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        dist_gc.clip_grad_norm_(bad, 0.5, norm_type, error_if_nonfinite=True)
    assert torch.equal(dist_gc.clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0))
    assert "clip_grad_norm_" in dist_gc.__all__


def test_comm_device_follows_the_groups_backends(monkeypatch):
    """A group with one backend per device type communicates where the data already
    is when it can; a gloo group on the CPU."""
    import torch.distributed as dist

    from dist_gc.engine.collectives import comm_device

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert comm_device(None, prefer=torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert comm_device(None, prefer=torch.device("cpu")) == torch.device("cpu")


# ----------------------------------------------------------------------------- GPUs
_TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


def _gather_shard0(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a ``Shard(0)`` DTensor whose local pieces cannot travel on its
    own group (CPU tensors on an NCCL mesh): all-gathered as objects over the default
    (gloo) group and concatenated in rank order (torch.chunk's layout)."""
    import torch.distributed as dist

    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, t.to_local().detach().cpu())
    return torch.cat(pieces, 0).double()


def _cp_api_worker(rank: int, world: int) -> dict:
    """torch's ``context_parallel`` (ring attention through the CUDA SDPA kernels) with
    FSDP2 on the cp mesh: the gradient G the engine produced, and the GC update."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.experimental import context_parallel

    warnings.filterwarnings("ignore")
    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = False
    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",), backend_override={0: "nccl"})
    out = {}
    for causal in (True, False):
        for mode in ("channel", "tensor"):
            m, x, t = lm.make_attn(causal)
            m, x, t = m.cuda(), x.cuda(), t.cuda()
            fully_shard(m, mesh=mesh)
            opt = torch.optim.SGD(m.parameters(), lr=1.0)
            handle = dist_gc.attach(opt, model=m, config={"mode": mode})
            before = _full(m)
            with context_parallel(mesh, buffers=[x, t], buffer_seq_dims=[1, 1]):
                lm.attn_loss(m, x, t).backward()
            grads = {clean_name(n): p.grad.full_tensor().double().cpu() for n, p in m.named_parameters()}
            opt.step()
            after = _full(m)
            out[(causal, mode)] = {"upd": {n: (before[n] - after[n]).cpu() for n in before}, "grads": grads,
                                   "stats": (handle.stats.bytes_communicated, handle.stats.collectives)}
    return out


@pytest.mark.skipif(not _TWO_GPUS, reason="torch's context_parallel runs ring attention only through the CUDA SDPA kernels "
                    "(flash/efficient/cudnn); on CPU SDPA lowers to _scaled_dot_product_flash_attention_for_cpu, which has no "
                    "sharding strategy (torch 2.13), and NCCL needs one GPU per rank: needs >= 2 GPUs")
def test_context_parallel_api_on_gpus():
    """The real context-parallel API at W=2: GC of the engine's own gradient G equals
    the oracle's formula applied to G (fp32 bar), and G is the fp64 oracle gradient up to
    GPU kernel rounding."""
    per_rank = run_distributed(_cp_api_worker, 2)
    for (causal, mode), r in per_rank[0].items():
        spec = lm.Attn.SPEC
        want = {n: lm.oracle_gc(g, mode, *spec[n]) if n in spec else g for n, g in r["grads"].items()}
        assert _err(r["upd"], want) <= TOL, f"cp api causal={causal} {mode}: GC of the engine's gradient is off"
        assert max(float((want[n] - r["grads"][n]).abs().max()) for n in spec) > FAR, "GC would be a no-op here"
        # fp32 attention kernels (no TF32) vs the fp64 oracle: a few fp32 roundings of O(1) values.
        assert _err(r["grads"], oracle("cp", "causal" if causal else "full", None)) <= 1e-4
        assert r["stats"] == CP_TRAFFIC[mode], f"cp api {mode}: traffic {r['stats']}"


def _offload_nccl_worker(rank: int, world: int) -> dict:
    """CPU offload with an NCCL-only group: the gradients GC sees are CPU tensors, its
    message is all-reduced on the GPU and copied back (the engine's comm-device branch).
    FSDP2 ``CPUOffloadPolicy()`` (pinned) and FSDP1 ``CPUOffload(offload_params=True)``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffload, CPUOffloadPolicy, FullyShardedDataParallel as FSDP, fully_shard

    warnings.filterwarnings("ignore")
    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    mesh = init_device_mesh("cuda", (world,), backend_override={0: "nccl"})
    group = mesh.get_group()
    assert dist.get_backend(group) == "nccl"
    batch = tuple(t.cuda() for t in models.local_slice(models.make_batch(), rank, world))
    out = {}
    for mode in ("channel", "tensor"):
        model = models.make_model().cuda()
        for sub in (model.conv, model.fc1):
            fully_shard(sub, mesh=mesh, offload_policy=CPUOffloadPolicy())
        fully_shard(model, mesh=mesh, offload_policy=CPUOffloadPolicy())
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        handle = dist_gc.attach(opt, model=model, config={"mode": mode})
        before = {n: _gather_shard0(p) for n, p in model.named_parameters()}
        models.loss_on(model, batch).backward()
        devices = {p.grad.to_local().device.type for p in model.parameters()}
        opt.step()
        out[("fsdp2", mode)] = {"upd": {n: before[n] - _gather_shard0(p) for n, p in model.named_parameters()}, "devices": devices,
                                "stats": (handle.stats.bytes_communicated, handle.stats.collectives)}
        for orig in (False, True):
            fm = FSDP(models.make_model(), process_group=group, device_id=torch.device("cuda", rank),
                      cpu_offload=CPUOffload(offload_params=True), use_orig_params=orig)
            opt = torch.optim.SGD(fm.parameters(), lr=1.0)
            handle = dist_gc.attach(opt, model=fm, config={"mode": mode})

            def full() -> dict[str, torch.Tensor]:
                with FSDP.summon_full_params(fm):
                    return {clean_name(n): p.detach().double().cpu().clone() for n, p in fm.named_parameters()}

            before = full()
            models.loss_on(fm, batch).backward()
            devices = {p.grad.device.type for p in fm.parameters() if p.grad is not None}
            opt.step()
            after = full()
            out[(f"fsdp1 orig={orig}", mode)] = {"upd": {n: before[n] - after[n] for n in before}, "devices": devices,
                                                 "stats": (handle.stats.bytes_communicated, handle.stats.collectives)}
    return out


@pytest.mark.skipif(not _TWO_GPUS, reason="CPU offload with an NCCL group needs >= 2 GPUs (one per rank); FSDP1 "
                    "CPUOffload(offload_params=True) pins memory and synchronizes a CUDA stream unconditionally, so it "
                    "cannot run without an accelerator (torch 2.13 fsdp/_flat_param.py, _runtime_utils.py)")
def test_cpu_offload_with_nccl_on_gpus():
    """FSDP2 and FSDP1 CPU offload with an NCCL-only group at W=2: GC on the offloaded
    (CPU) gradients is exact, and the statistics travel on the GPU."""
    per_rank = run_distributed(_offload_nccl_worker, 2)
    for (kind, mode), r in per_rank[0].items():
        assert r["devices"] == {"cpu"}, f"{kind} {mode}: gradients on {r['devices']}, not offloaded"
        assert _err(r["upd"], oracle("offload", "", mode)) <= TOL, f"{kind} {mode}: GC on offloaded gradients is off"
        assert r["stats"][1] == 1 and len({pr[(kind, mode)]["stats"] for pr in per_rank}) == 1, f"{kind} {mode}: {r['stats']}"
