"""Models, the oracle and the traffic counter of the large-model tests
(``tests/test_large_models.py``): a torchtitan-style MoE (stacked experts, top-1
routing, all-to-all token dispatch), a 4-layer MLP cut into 2 pipeline stages, a
one-layer attention whose sequence is split over context-parallel ranks (K/V gathered
with autograd), and a block model for per-block ``torch.compile``. Independent of
dist_gc. Inputs are offset and losses are MSE so that GC changes every centralized
update by far more than the fp32 tolerance (softmax/LayerNorm would make it a no-op)."""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests.models import Conv1D

# --------------------------------------------------------------------------- oracle
GCSpec = dict[str, tuple[int, int]]
"""``{name: (output dim, batch dims)}`` of the tensors the oracle centralizes."""


def oracle_gc(g: torch.Tensor, mode: str, output_dim: int, batch_dims: int = 0) -> torch.Tensor:
    """GC in fp64 by the formula: the mean over every dim that is neither a leading batch
    dim (one independent weight per index: stacked experts) nor, in channel mode, the
    output dim."""
    x = g.double()
    keep = set(range(batch_dims)) | ({output_dim % g.dim()} if mode == "channel" else set())
    dims = tuple(d for d in range(g.dim()) if d not in keep)
    return x - x.mean(dims, keepdim=True) if dims else x


def oracle_update(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], spec: GCSpec | None, mode: str = "channel",
                  clip: float | None = None) -> dict[str, torch.Tensor]:
    """The update ``W - W_new`` of one SGD(lr=1) step of the single-process fp64 model on
    the global batch: gradient, clipped by the global norm (torch's rule
    ``max_norm / (total + 1e-6)``), then GC of ``spec`` (``None``: no GC)."""
    m = copy.deepcopy(model).double()
    m.zero_grad(set_to_none=True)
    loss_fn(m).backward()
    grads = {n: p.grad.double() for n, p in m.named_parameters()}
    if clip is not None:
        total = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        scale = min(1.0, clip / (total + 1e-6))
        grads = {n: g * scale for n, g in grads.items()}
    for n, (od, bd) in (spec or {}).items():
        grads[n] = oracle_gc(grads[n], mode, od, bd)
    return grads


def grad_norm(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> float:
    g = oracle_update(model, loss_fn, None)
    return math.sqrt(sum(float((x * x).sum()) for x in g.values()))


# --------------------------------------------------------------------------- traffic
class StepTraffic:
    """Counts the collectives issued through ``torch.distributed``'s Python API while an
    optimizer ``step`` runs (global step pre/post hooks), with the bytes of their tensors.
    ``torch.optim.SGD`` issues none, so what is counted inside ``step`` is GC's traffic,
    measured independently of dist_gc's own ``stats``. One instance per process."""

    NAMES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "broadcast", "reduce", "all_to_all_single")

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.active = False
        self.current = [0, 0, 0]  # all_reduce calls, all_reduce bytes, other collectives
        self.steps: list[tuple[int, int, int]] = []
        for name in self.NAMES:
            fn = getattr(dist, name)

            def counted(*args, _fn=fn, _name=name, **kwargs):
                if self.active:
                    t = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("tensor")
                    if _name == "all_reduce":
                        self.current[0] += 1
                        self.current[1] += 0 if t is None else t.numel() * t.element_size()
                    else:
                        self.current[2] += 1
                return _fn(*args, **kwargs)

            setattr(dist, name, counted)
        register_optimizer_step_pre_hook(self._start)
        register_optimizer_step_post_hook(self._stop)

    def _start(self, *args) -> None:
        self.active, self.current = True, [0, 0, 0]

    def _stop(self, *args) -> None:
        self.active = False
        self.steps.append(tuple(self.current))

    @property
    def last(self) -> tuple[int, int, int]:
        """``(all_reduce calls, their bytes, other collectives)`` of the last step."""
        return self.steps[-1]


_TRAFFIC: list[StepTraffic] = []


def step_traffic() -> StepTraffic:
    """This process's counter (installed on first use)."""
    if not _TRAFFIC:
        _TRAFFIC.append(StepTraffic())
    return _TRAFFIC[0]


# --------------------------------------------------------------------------- MoE (EP)
E, D, H, C, N_TOKENS = 4, 6, 4, 3, 16


class GroupedExperts(nn.Module):
    """torchtitan's ``GroupedExperts`` layout (since 2025-08): ``w1 (E, H, D)``,
    ``w2 (E, D, H)``, ``w3 (E, H, D)``, expert ``e`` computes ``x @ w[e].T`` — output
    dim 1 of each stack. ``num_experts`` is what dist_gc detects the batch dim from."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = E
        self.w1 = nn.Parameter(torch.randn(E, H, D) * 0.5)
        self.w2 = nn.Parameter(torch.randn(E, D, H) * 0.5)
        self.w3 = nn.Parameter(torch.randn(E, H, D) * 0.5)
        self.ep_group = None  # set when the experts are expert-parallel

    @staticmethod
    def _ffn(x, w1, w2, w3):
        return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x``: tokens sorted by global expert id; ``counts``: tokens per global expert.
        Expert-parallel: torchtitan's ``_token_dispatch`` — counts and tokens exchanged
        with all-to-all (autograd through the functional version), computed per local
        expert, sent back."""
        ws = [w.to_local() if hasattr(w, "to_local") else w for w in (self.w1, self.w2, self.w3)]
        if self.ep_group is None:
            return torch.cat([self._ffn(xe, *(w[e] for w in ws)) for e, xe in enumerate(torch.split(x, counts.tolist()))])
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        g, ep = self.ep_group, dist.get_world_size(self.ep_group)
        el = E // ep
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=g)  # [source rank][local expert]
        ins, outs = counts.view(ep, el).sum(1).tolist(), recv.view(ep, el).sum(1).tolist()
        chunks = list(torch.split(all_to_all_single_autograd(x, outs, ins, g), recv.tolist()))
        ys = [None] * len(chunks)
        for e in range(el):
            idx = [s * el + e for s in range(ep)]
            ye = self._ffn(torch.cat([chunks[i] for i in idx]), *(w[e] for w in ws))
            for i, part in zip(idx, torch.split(ye, [chunks[i].shape[0] for i in idx])):
                ys[i] = part
        return all_to_all_single_autograd(torch.cat(ys), ins, outs, g)


class MoENet(nn.Module):
    """Linear -> top-1 router (argmax; output scaled by the sigmoid score, torchtitan's
    default: a softmax score would make tensor-mode GC a no-op on the router) ->
    GroupedExperts -> head."""

    SPEC: GCSpec = {"inp.weight": (0, 0), "router.weight": (0, 0), "head.weight": (0, 0),
                    "experts.w1": (1, 1), "experts.w2": (1, 1), "experts.w3": (1, 1)}

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, D)
        self.router = nn.Linear(D, E, bias=False)
        self.experts = GroupedExperts()
        self.head = nn.Linear(D, C)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.inp(x))
        return h, self.router(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, logits = self.route(x)
        eid = logits.argmax(-1)
        score = torch.sigmoid(logits.gather(1, eid[:, None]))
        order = torch.argsort(eid, stable=True)
        ys = self.experts(h[order], torch.bincount(eid, minlength=E))
        return self.head(h + ys[torch.argsort(order)] * score)


def make_moe():
    torch.manual_seed(3)
    m = MoENet()
    g = torch.Generator().manual_seed(4)
    return m, torch.rand(N_TOKENS, 5, generator=g) * 2 - 0.5, torch.rand(N_TOKENS, C, generator=g)


def moe_loss(m: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(m(x), t) * 10


# --------------------------------------------------------------------------- PP
PP_SIZES = [(5, 8), (8, 7), (7, 6), (6, 3)]
PP_STAGES = [["0", "1"], ["2", "3"]]
PP_BATCH = 16


class PipeNet(nn.Module):
    SPEC: GCSpec = {f"layers.{i}.weight": (0, 0) for i in range(len(PP_SIZES))}

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): nn.Linear(a, b) for i, (a, b) in enumerate(PP_SIZES)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = str(len(PP_SIZES) - 1)
        for k, layer in self.layers.items():
            x = layer(x)
            x = x if k == last else torch.tanh(x)
        return x


def make_pipe():
    torch.manual_seed(5)
    m = PipeNet()
    g = torch.Generator().manual_seed(6)
    return m, torch.rand(PP_BATCH, 5, generator=g) + 0.3, torch.rand(PP_BATCH, 3, generator=g)


def pipe_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target) * 40  # (x 40: tensor-mode GC moves layers.1 by > 100x the tolerance)


# --------------------------------------------------------------------------- CP
CP_B, CP_S, CP_D, CP_HEADS, CP_C = 2, 8, 8, 2, 3


class Attn(nn.Module):
    """One attention layer. With ``kv_gather = (group, rank)`` the input is this rank's
    chunk of the sequence: K/V are all-gathered over the CP group with autograd (the
    "allgather" rotate method of torch's context parallelism) and the causal mask is
    offset by the chunk's position — the same function of the full sequence."""

    SPEC: GCSpec = {f"{n}.weight": (0, 0) for n in "qkvo"}

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(CP_D, CP_D), nn.Linear(CP_D, CP_D), nn.Linear(CP_D, CP_D)
        self.o = nn.Linear(CP_D, CP_C)
        self.causal = causal
        self.kv_gather = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        heads = lambda t: t.view(b, t.shape[1], CP_HEADS, CP_D // CP_HEADS).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.kv_gather is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            from torch.distributed._functional_collectives import all_gather_tensor_autograd

            group, rank = self.kv_gather
            k = all_gather_tensor_autograd(k.contiguous(), gather_dim=2, group=group)
            v = all_gather_tensor_autograd(v.contiguous(), gather_dim=2, group=group)
            mask = None
            if self.causal:  # query i of chunk r is global position r * s + i
                mask = torch.arange(k.shape[2])[None, :] <= (torch.arange(s)[:, None] + rank * s)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(torch.tanh(y.transpose(1, 2).reshape(b, s, CP_D)))


def make_attn(causal: bool):
    torch.manual_seed(7)
    m = Attn(causal)
    g = torch.Generator().manual_seed(8)
    # Token magnitudes grow along the sequence: with tokens of similar size the key
    # gradients sum to ~0 (softmax), and tensor-mode GC would barely move k.weight.
    x = torch.rand(CP_B, CP_S, CP_D, generator=g) * torch.linspace(0.2, 3.0, CP_S)[None, :, None]
    return m, x, torch.rand(CP_B, CP_S, CP_C, generator=g)


def attn_loss(m: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(m(x), t) * 10


# --------------------------------------------------------------------------- compile
BLK_D, BLK_BATCH = 6, 8


class Block(nn.Module):
    """A residual block with a Linear (output dim 0) and a Hugging Face style Conv1D
    (output dim -1: FSDP2's Shard(0) cuts its averaged dim, so channel GC communicates)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(BLK_D, 8)
        self.w2 = Conv1D(BLK_D, 8)  # weight (8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(torch.tanh(self.w1(x)))


class BlockNet(nn.Module):
    SPEC: GCSpec = {"inp.weight": (0, 0), "out.weight": (0, 0),
                    **{f"layers.{i}.{w}.weight": (0 if w == "w1" else -1, 0) for i in "01" for w in ("w1", "w2")}}

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, BLK_D)
        self.layers = nn.ModuleDict({"0": Block(), "1": Block()})
        self.out = nn.Linear(BLK_D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.layers.values():
            h = block(h)
        return self.out(h)


def make_blocknet():
    torch.manual_seed(13)
    m = BlockNet()
    g = torch.Generator().manual_seed(12)
    x = torch.rand(BLK_BATCH, 4, generator=g) * torch.linspace(0.2, 3.0, BLK_BATCH)[:, None]  # samples of varied size
    return m, x, torch.rand(BLK_BATCH, 3, generator=g)


def blocknet_loss(m: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(m(x), t) * 10
