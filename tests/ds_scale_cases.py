"""Worker-side code of tests/test_deepspeed_scale.py: DeepSpeed's large-model parallelisms.

One spawn per world size runs every configuration (engine start-up and the imports
dominate): MoE (``deepspeed.moe.layer.MoE``, ep_size 1/2/W, ZeRO-1/2, fp32/bf16),
pipeline parallelism (``PipelineModule`` with a ``TiedLayerSpec`` embedding used again as
the output projection, 2 stages x W/2 data-parallel ranks, ZeRO-0/1), ZeRO++ hpZ
(``zero_hpz_partition_size``), AutoTP training (``tensor_parallel.autotp_size``) and
Ulysses sequence parallelism. Per case each rank builds the engine with the
``gradient_centralization`` block, takes one training step (SGD lr=1, so the update is
the centralized gradient), reads its fp32 masters back through DeepSpeed's own buffers
(``tests.ds_cases.master_weights``: independent of dist_gc's layouts), and rank 0 stitches
every rank's pieces into GLOBAL tensors (experts by global index, TP pieces on their
split dim, stages joined; replicas compared) and measures the error against a
single-process oracle of the same model on the same global batch.

Also per case: GC's payload bytes counted at the ``torch.distributed`` API while GC's
engine runs (compared with ``stats.bytes_communicated`` by the parent), and with
``full_stats`` the model-wide gradient norms (experts summed over the expert-parallel
group, stages over the pipe group, the tied weight once, TP pieces over the TP group).
Negative controls: GC unaware of the layout (the "naive" hook on what the optimizer
holds) and, for AutoTP, dist_gc with the TP splits withheld (each TP rank centralizing its
own piece); the parent asserts that they fail.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tests.ds_cases import _naive_hook, inner_optimizer, master_weights, settle, setup_worker
from tests.harness import progress
from tests.oracle import oracle_centralize

SGD_CFG = {"zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False, "gradient_clipping": 0.0,
           "steps_per_print": 10**9}


def _value(name: str, shape, scale: float = 1.2, shift: float = 0.0) -> torch.Tensor:
    """Deterministic initial value of a parameter, by its GLOBAL name."""
    g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(name)) % (2**31))
    return (torch.rand(shape, generator=g) - 0.5) * scale + shift


def _dtype(case: dict) -> torch.dtype:
    return torch.bfloat16 if case.get("dtype", "fp32").startswith("bf16") else torch.float32


def _config(case: dict, micro: int, gas: int = 1, **extra: Any) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
           "zero_optimization": {"stage": case["stage"], **case.get("zero", {})}, **SGD_CFG, **extra}
    if case.get("dtype", "fp32").startswith("bf16"):
        cfg["bf16"] = {"enabled": True}
    if case.get("dtype") == "bf16acc32":  # ZeRO-1 + bf16 + fp32 accumulation -> BF16_Optimizer
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if case.get("control") != "naive":
        cfg["gradient_centralization"] = {"enabled": True, "mode": case.get("mode", "channel"),
                                          "full_stats": bool(case.get("full_stats"))}
    return cfg


def _initialize(**kwargs: Any):
    import dist_gc.deepspeed

    return dist_gc.deepspeed.initialize(**kwargs)[0]


# --------------------------------------------------------------------------- MoE
MOE_H, MOE_FF, MOE_IN, MOE_OUT, MOE_E = 6, 5, 4, 3, 4
MOE_B, MOE_T = 12, 2  # global batch: 12 sequences x 2 tokens
EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts"
_LOCAL_EXPERT = re.compile(r"^moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.*)$")


def _expert_module() -> nn.Module:
    return nn.Sequential(nn.Linear(MOE_H, MOE_FF), nn.ReLU(), nn.Linear(MOE_FF, MOE_H))


class MoENet(nn.Module):
    """Linear -> MoE (top-1, deterministic routing: no noise, no random token priorities,
    no dropped tokens) -> Linear."""

    def __init__(self, ep_size: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.inp = nn.Linear(MOE_IN, MOE_H)
        self.moe = MoE(hidden_size=MOE_H, expert=_expert_module(), num_experts=MOE_E, ep_size=ep_size, k=1,
                       capacity_factor=float(MOE_E), min_capacity=0, drop_tokens=False, use_rts=False,
                       noisy_gate_policy=None, top2_2nd_expert_sampling=False)
        self.head = nn.Linear(MOE_H, MOE_OUT)

    def forward(self, x, y):
        out, l_aux, _ = self.moe(self.inp(x))
        return F.mse_loss(self.head(out).float(), y.float()) + 0.1 * l_aux


def _moe_shapes() -> dict[str, tuple]:
    shapes = {"inp.weight": (MOE_H, MOE_IN), "inp.bias": (MOE_H,), "moe.deepspeed_moe.gate.wg.weight": (MOE_E, MOE_H),
              "head.weight": (MOE_OUT, MOE_H), "head.bias": (MOE_OUT,)}
    for e in range(MOE_E):
        for n, p in _expert_module().named_parameters():
            shapes[f"{EXPERTS}.{e}.{n}"] = tuple(p.shape)
    return shapes


def _moe_batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(MOE_B, MOE_T, MOE_IN, generator=g) + 0.7, torch.randn(MOE_B, MOE_T, MOE_OUT, generator=g) + 0.5


def _moe_global(local: str, ep_rank: int, nle: int) -> str:
    """The test's own statement of DeepSpeed's expert numbering: local expert l of
    expert-parallel rank e is global expert e * num_local_experts + l."""
    m = _LOCAL_EXPERT.match(local)
    return local if m is None else f"{EXPERTS}.{ep_rank * nle + int(m.group(1))}.{m.group(2)}"


def moe_build(case: dict, rank: int, world: int):
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    ep = case["ep"]
    model = MoENet(ep)
    ep_rank, nle = rank % ep, MOE_E // ep  # expert-parallel groups are blocks of ep consecutive ranks
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(_value(_moe_global(n, ep_rank, nle), p.shape))
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "dense"})
    engine = _initialize(model=model, optimizer=torch.optim.SGD(groups, lr=1.0), config=_config(case, MOE_B // world))
    return engine, {"rename": lambda n: _moe_global(n, ep_rank, nle)}


def moe_train(engine, case: dict, rank: int, world: int) -> None:
    x, y = _moe_batch()
    per = MOE_B // world
    dt = _dtype(case)
    engine.backward(engine(x[rank * per:(rank + 1) * per].to(dt), y[rank * per:(rank + 1) * per].to(dt)))
    engine.step()


def moe_oracle(case: dict, world: int) -> tuple[dict, dict]:
    """Pure torch, one process, all experts, the MoE forward written out: loss = mean over
    ranks r of rank r's loss on its slice (the aux loss and the capacity use each rank's
    own tokens; DeepSpeed averages every gradient, experts included, by the dense
    data-parallel size W). Returns (initial values, gradients)."""
    dt = _dtype(case)
    P = {n: _value(n, s).to(dt).requires_grad_(True) for n, s in _moe_shapes().items()}
    x, y = _moe_batch()
    x, y = x.to(dt), y.to(dt)
    per = MOE_B // world
    total = 0.0
    for r in range(world):
        xr, yr = x[r * per:(r + 1) * per], y[r * per:(r + 1) * per]
        h = F.linear(xr, P["inp.weight"], P["inp.bias"]).reshape(-1, MOE_H)
        gates = F.softmax(F.linear(h.float(), P["moe.deepspeed_moe.gate.wg.weight"].float()), dim=1)
        idx = gates.argmax(dim=1)
        weight = gates.gather(1, idx[:, None])[:, 0]
        l_aux = torch.sum(gates.mean(0) * F.one_hot(idx, MOE_E).float().mean(0)) * MOE_E
        out = torch.zeros(h.shape, dtype=torch.float32)
        for e in range(MOE_E):
            sel = idx == e
            if sel.any():
                z = F.linear(h[sel], P[f"{EXPERTS}.{e}.0.weight"], P[f"{EXPERTS}.{e}.0.bias"])
                z = F.linear(F.relu(z), P[f"{EXPERTS}.{e}.2.weight"], P[f"{EXPERTS}.{e}.2.bias"])
                out = out.index_put((sel.nonzero()[:, 0],), z.float() * weight[sel, None], accumulate=True)
        pred = F.linear(out.to(h.dtype).reshape(per, MOE_T, MOE_H), P["head.weight"], P["head.bias"])
        total = total + (F.mse_loss(pred.float(), yr.float()) + 0.1 * l_aux) / world
    total.backward()
    return {n: p.detach().double() for n, p in P.items()}, {n: p.grad.double() for n, p in P.items()}


# --------------------------------------------------------------------------- pipeline
PP_V, PP_H, PP_T, PP_B, PP_MB = 11, 5, 3, 8, 2  # vocab, hidden, seq len, global batch, micro batch


def _pp_output(module, x):
    return F.linear(x, module.weight)  # the tied embedding as the output projection


def _pp_loss(logits, labels):
    return F.cross_entropy(logits.float().reshape(-1, PP_V), labels.reshape(-1))


def _pp_specs():
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    return [TiedLayerSpec("emb", nn.Embedding, PP_V, PP_H), LayerSpec(nn.Linear, PP_H, PP_H), LayerSpec(nn.Tanh),
            LayerSpec(nn.Linear, PP_H, PP_H), LayerSpec(nn.Tanh),
            TiedLayerSpec("emb", nn.Embedding, PP_V, PP_H, forward_fn=_pp_output)]


def _pp_data():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, PP_V, (PP_B, PP_T), generator=g), torch.randint(0, PP_V, (PP_B, PP_T), generator=g)


def pipe_build(case: dict, rank: int, world: int):
    from deepspeed.pipe import PipelineModule

    model = PipelineModule(layers=_pp_specs(), num_stages=2, loss_fn=_pp_loss, partition_method="uniform")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(_value(n, p.shape, shift=0.3))
    gas = PP_B // (PP_MB * (world // 2))
    engine = _initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=_config(case, PP_MB, gas))
    return engine, {}


def pipe_train(engine, case: dict, rank: int, world: int) -> None:
    x, y = _pp_data()
    gas, d = engine.gradient_accumulation_steps(), engine.grid.get_data_parallel_id()
    micro = [(x[(d * gas + k) * PP_MB:(d * gas + k + 1) * PP_MB], y[(d * gas + k) * PP_MB:(d * gas + k + 1) * PP_MB])
             for k in range(gas)]
    engine.train_batch(data_iter=iter(micro))


def pipe_oracle(case: dict, world: int) -> tuple[dict, dict]:
    """The sequential model on the global batch; one tensor for the embedding and the
    output projection; loss = mean over all micro-batches of their mean loss."""
    dt = _dtype(case)
    shapes = {"tied_modules.emb.weight": (PP_V, PP_H), "1.weight": (PP_H, PP_H), "1.bias": (PP_H,),
              "3.weight": (PP_H, PP_H), "3.bias": (PP_H,)}
    P = {n: _value(n, s, shift=0.3).to(dt).requires_grad_(True) for n, s in shapes.items()}
    x, y = _pp_data()
    n_micro = PP_B // PP_MB
    total = 0.0
    for k in range(n_micro):
        h = F.embedding(x[k * PP_MB:(k + 1) * PP_MB], P["tied_modules.emb.weight"])
        h = torch.tanh(F.linear(torch.tanh(F.linear(h, P["1.weight"], P["1.bias"])), P["3.weight"], P["3.bias"]))
        total = total + _pp_loss(F.linear(h, P["tied_modules.emb.weight"]), y[k * PP_MB:(k + 1) * PP_MB]) / n_micro
    total.backward()
    return {n: p.detach().double() for n, p in P.items()}, {n: p.grad.double() for n, p in P.items()}


# --------------------------------------------------------------------------- hpZ (ZeRO-3)
HPZ_B = 12


class HpzNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 7), nn.Linear(7, 9), nn.Linear(9, 3)

    def forward(self, x, y):
        return F.mse_loss(self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))).float(), y.float())


def _hpz_data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(HPZ_B, 5, generator=g) + 0.5, torch.randn(HPZ_B, 3, generator=g) + 0.5


def _hpz_model() -> HpzNet:
    m = HpzNet()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(_value(n, p.shape))
    return m


def hpz_build(case: dict, rank: int, world: int):
    model = _hpz_model()
    return _initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=_config(case, HPZ_B // world)), {}


def hpz_train(engine, case: dict, rank: int, world: int) -> None:
    x, y = _hpz_data()
    per, dt = HPZ_B // world, _dtype(case)
    engine.backward(engine(x[rank * per:(rank + 1) * per].to(dt), y[rank * per:(rank + 1) * per].to(dt)))
    engine.step()


def hpz_oracle(case: dict, world: int) -> tuple[dict, dict]:
    m = _hpz_model().to(_dtype(case))
    x, y = _hpz_data()
    m(x.to(_dtype(case)), y.to(_dtype(case))).backward()
    return {n: p.detach().double() for n, p in m.named_parameters()}, {n: p.grad.double() for n, p in m.named_parameters()}


# --------------------------------------------------------------------------- Llama (AutoTP, Ulysses SP)
LLAMA_V, TP_B, TP_T, SP_T = 32, 4, 6, 8


def _llama(attn: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=LLAMA_V, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=4, max_position_embeddings=32, tie_word_embeddings=False,
                      attn_implementation=attn)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():  # large weights and non-trivial norms: GC's effect far above the tolerances
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.linspace(-0.3, 0.3, p.numel()))
            else:
                p.mul_(10.0)
    return m.to(dtype)


def _tp_ids():
    return torch.randint(0, LLAMA_V, (TP_B, TP_T), generator=torch.Generator().manual_seed(11))


def autotp_build(case: dict, rank: int, world: int):
    model = _llama("eager", _dtype(case))
    dp = world // case["tp"]
    cfg = _config(case, TP_B // dp, tensor_parallel={"autotp_size": case["tp"]})
    return _initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=cfg), {"tp": True}


def autotp_train(engine, case: dict, rank: int, world: int) -> None:
    dp = world // case["tp"]
    d = rank // case["tp"]  # TP groups are blocks of consecutive ranks; a TP group sees one batch
    x = _tp_ids()[d * (TP_B // dp):(d + 1) * (TP_B // dp)]
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()


def autotp_oracle(case: dict, world: int) -> tuple[dict, dict]:
    m = _llama("eager", _dtype(case))
    dp = world // case["tp"]
    ids, per = _tp_ids(), TP_B // dp
    total = sum(m(input_ids=ids[d * per:(d + 1) * per], labels=ids[d * per:(d + 1) * per]).loss / dp for d in range(dp))
    total.backward()
    return {n: p.detach().double() for n, p in m.named_parameters()}, {n: p.grad.double() for n, p in m.named_parameters()}


_SP_MPU: list = []


def _sp_shift(ids: torch.Tensor) -> torch.Tensor:
    return F.pad(ids, (0, 1), value=-100)[..., 1:]


def _sp_ids(dp: int) -> torch.Tensor:
    return torch.randint(0, LLAMA_V, (dp, 1, SP_T), generator=torch.Generator().manual_seed(13))


def sp_build(case: dict, rank: int, world: int):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    model = _llama("sdpa", _dtype(case))
    if not _SP_MPU:  # process-wide (it replaces transformers' "sdpa" attention): once
        _SP_MPU.append(UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=case["sp"],
            micro_batch_size=1, seq_length=SP_T, seq_length_is_variable=True))
    cfg = _config(case, 1, sequence_parallel_size=case["sp"])
    return _initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=cfg, mpu=_SP_MPU[0]), {}


def sp_train(engine, case: dict, rank: int, world: int) -> None:
    """Each rank feeds its sequence shard with global position ids (what
    UlyssesSPDataLoaderAdapter hands out); loss = the shard's summed token losses over
    the whole sequence's token count, so the SP ranks' gradients add up to the
    sequence's."""
    mpu, sp = _SP_MPU[0], case["sp"]
    ids = _sp_ids(world // sp)[rank // sp]
    labels = _sp_shift(ids)
    chunk = SP_T // sp
    part = slice(mpu.get_sequence_parallel_rank() * chunk, (mpu.get_sequence_parallel_rank() + 1) * chunk)
    logits = engine(input_ids=ids[:, part], position_ids=torch.arange(SP_T).unsqueeze(0)[:, part]).logits.float()
    loss = F.cross_entropy(logits.reshape(-1, LLAMA_V), labels[:, part].reshape(-1), ignore_index=-100, reduction="sum")
    engine.backward(loss / int((labels != -100).sum()))
    engine.step()


def sp_oracle(case: dict, world: int) -> tuple[dict, dict]:
    """Eager attention (the Ulysses registration replaced transformers' "sdpa" in this
    process), full sequences, mean over data-parallel replicas of the token-mean loss."""
    m = _llama("eager", _dtype(case))
    dp = world // case["sp"]
    ids = _sp_ids(dp)
    total = 0.0
    for d in range(dp):
        logits = m(input_ids=ids[d]).logits.float()
        total = total + F.cross_entropy(logits.reshape(-1, LLAMA_V), _sp_shift(ids[d]).reshape(-1), ignore_index=-100) / dp
    total.backward()
    return {n: p.detach().double() for n, p in m.named_parameters()}, {n: p.grad.double() for n, p in m.named_parameters()}


FAMILIES: dict[str, tuple[Callable, Callable, Callable]] = {
    "moe": (moe_build, moe_train, moe_oracle),
    "pipe": (pipe_build, pipe_train, pipe_oracle),
    "hpz": (hpz_build, hpz_train, hpz_oracle),
    "autotp": (autotp_build, autotp_train, autotp_oracle),
    "sp": (sp_build, sp_train, sp_oracle),
}


# --------------------------------------------------------------------------- counting
class _Counter:
    """Bytes GC puts on the wire, counted at the ``torch.distributed`` API: every
    collective called while dist_gc's engine runs (``GCEngine.step``) is recorded."""

    FNS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "all_to_all_single",
           "reduce", "all_gather_object")

    def __init__(self) -> None:
        from dist_gc.engine.engine import GCEngine

        self.active, self.bytes, self.calls = False, 0, {}
        for fn in self.FNS:
            orig = getattr(dist, fn)

            def wrapped(*args, _orig=orig, _fn=fn, **kwargs):
                if self.active:
                    self.calls[_fn] = self.calls.get(_fn, 0) + 1
                    t = args[0] if args else kwargs.get("tensor")
                    if _fn == "all_reduce" and isinstance(t, torch.Tensor):
                        self.bytes += t.numel() * t.element_size()
                return _orig(*args, **kwargs)

            setattr(dist, fn, wrapped)
        step = GCEngine.step

        def counted_step(engine, *args, **kwargs):
            self.active = True
            try:
                return step(engine, *args, **kwargs)
            finally:
                self.active = False

        GCEngine.step = counted_step

    def reset(self) -> None:
        self.bytes, self.calls = 0, {}


# --------------------------------------------------------------------------- readout
def _local_masters(engine, case: dict, extra: dict) -> dict[str, tuple]:
    """``{global name: (fp64 tensor, TP split or None)}`` of this rank's fp32 masters."""
    out = {}
    rename = extra.get("rename", lambda n: n)
    named = {n.removeprefix("module."): p for n, p in engine.module.named_parameters()}
    for n, t in master_weights(engine).items():
        tp = None
        if extra.get("tp"):
            meta = getattr(named[n], "ds_autotp_universal_checkpoint_meta", None)
            if meta is not None and not meta.get("replicated") and meta.get("partition_dim") is not None:
                from deepspeed.utils import groups

                tp = (int(meta["partition_dim"]), groups.get_tensor_model_parallel_rank(), len(meta["partition_sizes"]))
        out[rename(n)] = (t, tp)
    return out


def _assemble(per_rank: list[dict]) -> tuple[dict, float, list[str]]:
    """Global tensors from every rank's pieces; (tensors, max replica difference, problems)."""
    copies: dict[str, dict[int, list[torch.Tensor]]] = {}
    splits: dict[str, tuple] = {}
    for local in per_rank:
        for n, (t, tp) in local.items():
            copies.setdefault(n, {}).setdefault(tp[1] if tp else 0, []).append(t)
            if tp:
                splits[n] = tp
    out, rep, problems = {}, 0.0, []
    for n, by_piece in copies.items():
        for ts in by_piece.values():
            rep = max(rep, *(float((t - ts[0]).abs().max()) for t in ts))
        if n in splits:
            dim, _, size = splits[n]
            if sorted(by_piece) != list(range(size)):
                problems.append(f"{n}: TP pieces {sorted(by_piece)} of {size}")
                continue
            out[n] = torch.cat([by_piece[i][0] for i in range(size)], dim=dim)
        else:
            out[n] = by_piece[0][0]
    return out, rep, problems


def _expected(w0: dict, grads: dict, mode: str | None) -> dict:
    """SGD(lr=1) from ``w0`` with the gradient centralized by the formula (``None``: no GC);
    every weight here (Linear, Embedding, TP layers) has its output channel in dim 0."""
    return {n: w0[n] - (oracle_centralize(g, mode, 0) if mode and g.dim() >= 2 else g) for n, g in grads.items()}


def _targets_norm(grads: dict, mode: str | None) -> float:
    return math.sqrt(sum(float(oracle_centralize(g, mode, 0).pow(2).sum() if mode else g.pow(2).sum())
                         for g in grads.values() if g.dim() >= 2))


# --------------------------------------------------------------------------- cases
def _withhold_tp_splits() -> Callable[[], None]:
    """The AutoTP negative control: dist_gc as it would be without the Split placement —
    every TP rank centralizes its local piece as if it were the whole tensor."""
    from dist_gc.adapters import zero_parallel

    orig = zero_parallel._autotp

    def no_splits(engine, topo):
        orig(engine, topo)
        topo.splits.clear()

    zero_parallel._autotp = no_splits
    return lambda: setattr(zero_parallel, "_autotp", orig)


def reset_deepspeed_groups() -> None:
    """Forget DeepSpeed's process-global parallel state between families (the mpu a
    pipeline or AutoTP engine installs, the AutoTP mesh, MoE / sequence-parallel / hpZ
    groups), so each family starts as in a fresh process. Test-only: engines of the
    previous family are destroyed already."""
    from deepspeed.utils import groups

    groups._release_process_group_references(None)


def run_scale_cases(rank: int, world: int, cases: list[dict]) -> list[dict]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_worker()
    counter = _Counter()
    results, family = [], None
    for case in cases:
        t0 = time.perf_counter()
        if case["family"] != family:
            if family is not None:
                reset_deepspeed_groups()
            family = case["family"]
        build, train, oracle = FAMILIES[case["family"]]
        restore = _withhold_tp_splits() if case.get("control") == "tp_unaware" else None
        try:
            engine, extra = build(case, rank, world)
        finally:
            if restore is not None:
                restore()
        handle = engine.dist_gc
        res: dict[str, Any] = {"id": case["id"]}
        if case.get("control") == "naive":
            assert handle is None
            inner_optimizer(engine).register_step_pre_hook(_naive_hook)
        else:
            res["label"], res["phases"] = handle.label, len(handle.engines)
        counter.reset()
        train(engine, case, rank, world)
        if handle is not None:
            st = handle.stats
            res.update(gc_steps=handle.steps, gc_bytes=st.bytes_communicated, gc_collectives=st.collectives,
                       api_bytes=counter.bytes, api_calls=dict(counter.calls), centralized=len(st.centralized),
                       norms=(st.grad_norm_before, st.grad_norm_after, st.max_abs_mean_after))
        local = _local_masters(engine, case, extra)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, local)
        if handle is not None:
            handle.remove()
        engine.destroy()
        if rank == 0:
            got, res["replica_diff"], res["problems"] = _assemble(gathered)
            w0, grads = oracle(case, world)
            mode = case.get("mode", "channel")
            want, off = _expected(w0, grads, mode), _expected(w0, grads, None)
            res["missing"] = sorted(set(want) ^ set(got))
            res["err"] = {n: float((got[n] - want[n]).abs().max()) for n in want if n in got}
            res["gc_effect"] = max(float((want[n] - off[n]).abs().max()) for n in want)
            res["max_update"] = max(float(g.abs().max()) for g in grads.values())
            res["norms_oracle"] = (_targets_norm(grads, None), _targets_norm(grads, mode))
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        progress(f"{case['id']} ({res['seconds']:.0f} s)")
        settle()
    return results
