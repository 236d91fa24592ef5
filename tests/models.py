"""Test models whose layer shapes put row and tensor boundaries inside shards at
W = 2, 3, 4, with output dims 0 (Linear, Conv, Embedding), 1 (ConvTranspose) and -1
(a Hugging Face style Conv1D), and inputs offset so GC changes every >= 2-D gradient
by far more than the fp32 tolerance."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

GLOBAL_BATCH = 12  # divisible by 1, 2, 3, 4


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D, re-declared so transformers is not needed:
    weight is (in, out), so the output dim is the LAST dim."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


class GCTestNet(nn.Module):
    # Output dims of each >= 2-D weight, as the oracle must use them.
    OUTPUT_DIMS = {
        "emb.weight": 0,
        "conv.weight": 0,
        "deconv.weight": 1,
        "fc1.weight": 0,
        "proj.weight": -1,
        "head.weight": 0,
    }

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(3, 5, 3)            # (5, 3, 3, 3)
        self.deconv = nn.ConvTranspose2d(5, 4, 2)  # (5, 4, 2, 2): output dim 1
        self.fc1 = nn.Linear(4 * 5 * 5, 13)       # (13, 100)
        # RMSNorm, not LayerNorm: LayerNorm's output (and input gradient) has zero mean
        # over features, which would make GC a no-op on its neighbours.
        self.norm = nn.RMSNorm(13)
        self.proj = Conv1D(7, 13)                 # (13, 7): output dim -1
        self.head = nn.Linear(7 + 6, 5)           # (5, 13)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(images))
        h = F.relu(self.deconv(h))
        h = self.norm(self.fc1(h.flatten(1)))
        h = torch.tanh(self.proj(h))
        return self.head(torch.cat([h, self.emb(tokens)], dim=1))


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> GCTestNet:
    torch.manual_seed(seed)
    return GCTestNet().to(dtype)


def make_batch(seed: int = 1, dtype: torch.dtype = torch.float32, n: int = GLOBAL_BATCH):
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, 6, 6, generator=g) + 0.5).to(dtype)  # offset: non-zero channel means
    tokens = torch.randint(0, 11, (n,), generator=g)
    labels = torch.randint(0, 5, (n,), generator=g)
    return images, tokens, labels


LOSS_SCALE = 8.0  # makes GC change every >= 2-D update by >= 100x the fp32 tolerance


def loss_on(model: nn.Module, batch) -> torch.Tensor:
    # MSE to one-hot targets, not cross-entropy: softmax gradients sum to zero over
    # classes, which would make tensor-mode GC a no-op on the head.
    images, tokens, labels = batch
    logits = model(images, tokens).float()
    return F.mse_loss(logits, F.one_hot(labels, logits.shape[1]).float()) * LOSS_SCALE


def local_slice(batch, rank: int, world_size: int):
    n = batch[0].shape[0] // world_size
    return tuple(t[rank * n : (rank + 1) * n] for t in batch)


# --------------------------------------------------------------------------- FSDP / TP
class TiedNet(nn.Module):
    """Embedding tied to the output projection (one tensor under two names, as in
    language models): FSDP1 stores it once, under its first name ``emb.weight``."""

    OUTPUT_DIMS = {"emb.weight": 0, "mid.weight": 0, "back.weight": 0}

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 7)
        self.back = nn.Linear(7, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight  # tied: (11, 6), output dim 0 for both uses

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.back(torch.tanh(self.mid(self.emb(tokens))))))


def make_tied(seed: int = 0, dtype: torch.dtype = torch.float32) -> TiedNet:
    torch.manual_seed(seed)
    return TiedNet().to(dtype)


def make_tied_batch(seed: int = 1, n: int = GLOBAL_BATCH):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (n,), generator=g)
    return tokens, torch.randint(0, 11, (n,), generator=g)


def tied_loss_on(model: nn.Module, batch) -> torch.Tensor:
    tokens, labels = batch  # MSE to one-hot, as loss_on (softmax would zero tensor means)
    logits = model(tokens).float()
    return F.mse_loss(logits, F.one_hot(labels, logits.shape[1]).float()) * LOSS_SCALE


class TPNet(nn.Module):
    """An MLP for FSDP2 + tensor parallelism: ``up`` ColwiseParallel (weight Shard(0)
    on the TP axis), ``down`` RowwiseParallel (weight Shard(1): per-row means need the
    TP axis), then an HF-style Conv1D (output dim -1) and a head that are only
    FSDP-sharded. Shapes make dim-0 shards uneven on a 2-way FSDP axis."""

    OUTPUT_DIMS = {"up.weight": 0, "down.weight": 0, "proj.weight": -1, "head.weight": 0}

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(10, 12)   # (12, 10)
        self.down = nn.Linear(12, 9)  # (9, 12)
        self.proj = Conv1D(7, 9)      # (9, 7): output dim -1
        self.head = nn.Linear(7, 5)   # (5, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(torch.relu(self.up(x)))
        return self.head(torch.tanh(self.proj(torch.relu(h))))


def make_tpnet(seed: int = 0, dtype: torch.dtype = torch.float32) -> TPNet:
    torch.manual_seed(seed)
    return TPNet().to(dtype)


def make_tp_batch(seed: int = 1, n: int = GLOBAL_BATCH):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 10, generator=g) + 0.5  # offset: non-zero channel means
    return x, torch.randint(0, 5, (n,), generator=g)


def tp_loss_on(model: nn.Module, batch) -> torch.Tensor:
    x, labels = batch  # MSE to one-hot, as loss_on (softmax would zero tensor means)
    logits = model(x).float()
    return F.mse_loss(logits, F.one_hot(labels, logits.shape[1]).float()) * LOSS_SCALE


class ShiftedLayerNorm(nn.LayerNorm):
    """LayerNorm whose bias starts away from zero. With the default (weight 1, bias 0)
    the layer after it sees inputs with zero mean over features, so its channel-mode GC
    is a structural no-op; this keeps GC visible on every >= 2-D weight. The shift is
    set in ``reset_parameters`` so it also holds under ``deepspeed.zero.Init`` (which
    partitions each module right after its own ``__init__``)."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.elementwise_affine and self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(torch.linspace(-0.2, 0.6, self.bias.numel()))


class GCTestNetShifted(GCTestNet):
    """``GCTestNet`` with a :class:`ShiftedLayerNorm` (same parameter names, shapes and
    initial values otherwise; LayerNorm init draws no random numbers)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = ShiftedLayerNorm(13)


def make_shifted_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> GCTestNetShifted:
    torch.manual_seed(seed)
    return GCTestNetShifted().to(dtype)
