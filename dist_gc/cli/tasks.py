"""Models and data of the main job: every dataset ships inside an installed package, so
nothing is downloaded.

* ``cnn``: a small CNN (~38k parameters) on scikit-learn's bundled 8x8 digits.
* ``gpt2`` / ``llama``: tiny randomly initialised Hugging Face models (built from a
  ``transformers`` config) doing byte-level (vocab 256) language modelling on the
  CPython stdlib's ``pydoc_data.topics`` text (~465k characters of Python docs).

Every model is dropout-free so one step is a deterministic function of the parameters
and the batch: the ``--verify`` oracle recomputes it in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["Task", "TASKS", "build_task", "DictDataset", "EpochShuffleSampler"]


class DictDataset(Dataset):
    """Rows of equally long tensors, returned as ``{key: row}`` dicts (accelerate's
    ``gather`` and ``send_to_device`` handle dicts of tensors)."""

    def __init__(self, **columns: torch.Tensor) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns have different lengths: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that is a pure function of ``(seed, epoch)``.

    Why not ``shuffle=True``: a resumed run must see exactly the batches the
    uninterrupted run saw. With the order fixed by ``(seed, epoch)`` the resumed run
    only has to set the epoch and skip the batches already consumed; no sampler RNG
    state has to be checkpointed. Every rank builds the same permutation, and
    accelerate's batch sampler hands each rank its own slice of every global batch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())


@dataclass
class Task:
    """What the training loop needs to know about a task."""

    name: str
    build_model: Callable[[], nn.Module]
    train_set: Dataset
    test_set: Dataset
    forward: Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """``forward(model, batch) -> (mean loss, #correct, #predictions)``."""
    optimizer: str
    lr: float
    batch_size: int
    steps: int


# --------------------------------------------------------------------------- cnn
class DigitsCNN(nn.Module):
    """Two 3x3 conv layers and two linear layers on 1x8x8 images (~38k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def forward_classifier(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = model(batch["x"])
    hits = (logits.argmax(-1) == batch["y"]).sum()
    return F.cross_entropy(logits, batch["y"]), hits, torch.tensor(batch["y"].numel())


def load_digits_split(seed: int) -> tuple[DictDataset, DictDataset]:
    """scikit-learn's digits (1797 images, bundled with the package), 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=data.target)
    return DictDataset(x=x[tr], y=y[tr]), DictDataset(x=x[te], y=y[te])


# --------------------------------------------------------------------------- language models
SEQ_LEN = 64


def load_pydoc_bytes(seq_len: int = SEQ_LEN) -> tuple[DictDataset, DictDataset]:
    """The stdlib's pydoc topics as bytes, cut into non-overlapping sequences; the last
    5% of the text is the test set."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    ids = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    cut = int(len(ids) * 0.95)
    return DictDataset(input_ids=ids[:cut]), DictDataset(input_ids=ids[cut:])


def build_gpt2() -> nn.Module:
    """A 2-layer GPT-2 (its projections are HF ``Conv1D``: output dim is the last dim)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=256, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def build_llama() -> nn.Module:
    """A 2-layer Llama (RMSNorm, SwiGLU, rotary embeddings, grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
        attention_dropout=0.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def forward_lm(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean next-byte cross entropy and next-byte accuracy."""
    ids = batch["input_ids"]
    out = model(input_ids=ids, labels=ids)
    hits = (out.logits[:, :-1].argmax(-1) == ids[:, 1:]).sum()
    return out.loss, hits, torch.tensor(ids[:, 1:].numel())


# --------------------------------------------------------------------------- registry
TASKS = ("cnn", "gpt2", "llama")


def build_task(name: str, seed: int) -> Task:
    """The task's model builder, datasets and default hyper-parameters."""
    if name == "cnn":
        train, test = load_digits_split(seed)
        return Task("cnn", DigitsCNN, train, test, forward_classifier, optimizer="sgd", lr=0.05, batch_size=32, steps=400)
    if name in ("gpt2", "llama"):
        train, test = load_pydoc_bytes()
        builder = build_gpt2 if name == "gpt2" else build_llama
        return Task(name, builder, train, test, forward_lm, optimizer="adamw", lr=3e-3, batch_size=8, steps=150)
    raise ValueError(f"unknown task {name!r} (allowed: {', '.join(TASKS)})")
