"""Cross-rank agreement on the GC setup, through the process group's key-value store.

Why the store and not a collective: a collective that only SOME ranks issue (GC attached
on one rank, a one-rank ``remove()``, a per-rank config that changes the number of GC
all-reduces) pairs with whatever collective the other ranks issue next — the engine's
own gradient all-reduce — and hangs or corrupts both. The c10d store
(``torch.distributed``'s rendezvous store: TCPStore under torchrun/accelerate/DeepSpeed,
a FileStore in tests) is a side channel that never pairs with a collective: each rank
publishes the facts of its setup under a key of its own and waits, with a timeout, for
every peer's. A missing peer is then a clear timeout error naming the rank, a differing
peer an error naming what differs on which ranks — raised on every rank that attached.

The facts are global (settings, centralized names and geometries, phases and bucket
sizes), so equal facts imply every later GC collective matches in number and size.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import torch.distributed as dist

__all__ = ["Agreement", "peer_sets", "sync_timeout"]

#: Seconds a rank waits for its peers to reach the same point (``DIST_GC_SYNC_TIMEOUT``).
DEFAULT_SYNC_TIMEOUT = 300.0

_EPOCHS: dict[tuple[int, ...], int] = {}


def sync_timeout() -> float:
    return float(os.environ.get("DIST_GC_SYNC_TIMEOUT", DEFAULT_SYNC_TIMEOUT))


def peer_sets(groups: Iterable[Any]) -> tuple[tuple[int, ...], ...]:
    """The global ranks of each group (sorted, duplicates and 1-rank groups dropped);
    ``()`` without a process group. Ranks of a 2-D mesh share no single group: they
    agree group by group, which is transitive (every rank's facts are global)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ()
    sets = set()
    for g in groups:
        ranks = tuple(range(dist.get_world_size())) if g is None else tuple(sorted(dist.get_process_group_ranks(g)))
        if len(ranks) > 1:
            sets.add(ranks)
    return tuple(sorted(sets))


def _store() -> Any:
    from torch.distributed import distributed_c10d

    get = getattr(distributed_c10d, "_get_default_store", None)
    if get is None:  # pragma: no cover - present in every torch dist_gc supports
        raise RuntimeError("dist_gc: this torch has no default c10d store; cannot check the GC setup across ranks")
    return get()


def _group_by_value(values: Mapping[int, str]) -> str:
    by: dict[str, list[int]] = {}
    for rank, v in sorted(values.items()):
        by.setdefault(v, []).append(rank)
    return ", ".join(f"{v if len(v) <= 80 else v[:77] + '...'} on rank(s) {r}" for v, r in by.items())


def _diff(prefix: str, values: Mapping[int, Any]) -> list[str]:
    """What differs between the ranks' ``values``: mappings key by key, lists of names
    as set differences, anything else grouped by value."""
    if len({json.dumps(v, sort_keys=True) for v in values.values()}) == 1:
        return []
    if all(isinstance(v, dict) for v in values.values()):
        keys = sorted(set().union(*(v.keys() for v in values.values())))
        return [d for k in keys for d in _diff(f"{prefix}{k}" if not prefix else f"{prefix}.{k}", {r: v.get(k) for r, v in values.items()})]
    if all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in values.values()):
        union = set().union(*(set(v) for v in values.values()))
        return [f"{prefix}: " + "; ".join(f"rank {r} lacks {sorted(union - set(v))[:4]}" for r, v in sorted(values.items()) if union - set(v))]
    return [f"{prefix}: " + _group_by_value({r: json.dumps(v, sort_keys=True) for r, v in values.items()})]


class Agreement:
    """The GC control channel of one handle: one key space per group of peers
    (``rank_sets``: global ranks, this one included in each). Every rank of every set
    must create it at the same point (``attach``)."""

    def __init__(self, rank_sets: Sequence[Sequence[int]], what: str) -> None:
        self.rank = dist.get_rank()
        self.channels: list[tuple[tuple[int, ...], str]] = []
        for ranks in rank_sets:
            ranks = tuple(ranks)
            epoch = _EPOCHS.get(ranks, 0)
            _EPOCHS[ranks] = epoch + 1
            self.channels.append((ranks, f"dist_gc/{'.'.join(map(str, ranks))}/{epoch}"))
        self.what = what
        self.store = _store()

    @property
    def ranks(self) -> list[int]:
        return sorted({r for ranks, _ in self.channels for r in ranks})

    def _wait(self, ranks: tuple[int, ...], keys: list[str], doing: str, timeout: float) -> None:
        try:
            self.store.wait(keys, datetime.timedelta(seconds=timeout))
        except Exception:  # noqa: BLE001 - a timeout: name the missing ranks
            missing = [r for r, k in zip(ranks, keys) if not self.store.check([k])]
            raise RuntimeError(
                f"dist_gc: rank(s) {missing or '?'} of {list(ranks)} did not reach {doing} within {timeout:g} s "
                f"({self.what}). GC must be attached (and removed) on every rank, at the same point of the program; "
                "DIST_GC_SYNC_TIMEOUT sets the wait"
            ) from None

    def compare(self, facts: Mapping[str, Any], per_set: Mapping[tuple[int, ...], Any] | None = None, *,
                timeout: float | None = None) -> None:
        """Publish ``facts`` (JSON-able; plus ``per_set[ranks]`` on that set's channel
        only — e.g. the sizes of the all-reduces over that group, which ranks of other
        groups need not share), wait for every peer's, and raise ``RuntimeError`` on every
        rank if any differ, naming each differing fact and the ranks on each side."""
        timeout = sync_timeout() if timeout is None else timeout
        per_set = per_set or {}

        def text(ranks: tuple[int, ...]) -> str:
            return json.dumps({**facts, "GC all-reduces over this group": per_set.get(ranks, [])}, sort_keys=True)

        for ranks, prefix in self.channels:  # publish everywhere first: waiting never blocks a peer
            self.store.set(f"{prefix}/facts/{self.rank}", text(ranks))
        diffs: list[str] = []
        for ranks, prefix in self.channels:
            keys = [f"{prefix}/facts/{r}" for r in ranks]
            self._wait(ranks, keys, "dist_gc.attach", timeout)
            found = _diff("", {r: json.loads(self.store.get(k)) for r, k in zip(ranks, keys)})
            diffs += [d for d in found if d not in diffs]
        if diffs:
            raise RuntimeError(
                f"dist_gc: ranks {self.ranks} disagree on the GC setup ({self.what}): " + "; ".join(diffs)
                + ". Every rank must attach GC with the same settings to the same model; otherwise replicas drift "
                "apart or GC's collectives hang"
            )

    # ------------------------------------------------------------------ remove
    def mark_removed(self, after_step: int) -> None:
        """This rank removed GC after its step ``after_step`` (``remove()`` is collective:
        every rank must call it, after the same step)."""
        for _, prefix in self.channels:
            self.store.set(f"{prefix}/removed/{self.rank}", str(after_step))
            self.store.add(f"{prefix}/removed", 1)

    def check_removed(self, step: int) -> None:
        """Raise when a peer removed GC before step ``step``, which this rank is about to
        centralize (one store round trip per group per optimizer step; more only after a
        removal): the ranks would now update differently, and this rank's GC collectives
        would pair with the peer's engine collectives. A peer that removed after ``step``
        (it merely got there first) is fine."""
        early: dict[int, int] = {}
        for ranks, prefix in self.channels:
            if int(self.store.add(f"{prefix}/removed", 0)) == 0:
                continue
            for r in ranks:
                key = f"{prefix}/removed/{r}"
                if r != self.rank and self.store.check([key]) and int(self.store.get(key)) < step:
                    early[r] = int(self.store.get(key))
        if early:
            raise RuntimeError(
                f"dist_gc: rank(s) {sorted(early)} removed GC ({self.what}) after step(s) {sorted(set(early.values()))}, "
                f"while rank {self.rank} still runs it at step {step}: handle.remove() is collective — call it on every "
                "rank, at the same point"
            )
