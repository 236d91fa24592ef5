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

__all__ = ["Agreement", "Agreements", "group_ranks", "peer_ranks", "sync_timeout"]

#: Seconds a rank waits for its peers to reach the same point (``DIST_GC_SYNC_TIMEOUT``).
DEFAULT_SYNC_TIMEOUT = 300.0

_EPOCHS: dict[tuple[int, ...], int] = {}


def sync_timeout() -> float:
    return float(os.environ.get("DIST_GC_SYNC_TIMEOUT", DEFAULT_SYNC_TIMEOUT))


def peer_ranks(groups: Iterable[Any]) -> tuple[int, ...]:
    """Global ranks of every group (the union, sorted); ``()`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return ()
    ranks: set[int] = {dist.get_rank()}
    for g in groups:
        if g is None:
            ranks |= set(range(dist.get_world_size()))
        else:
            ranks |= set(dist.get_process_group_ranks(g))
    return tuple(sorted(ranks))


def group_ranks(group: Any) -> tuple[int, ...]:
    """Global ranks of ``group`` (``None``: the default group), sorted."""
    if group is None:
        return tuple(range(dist.get_world_size()))
    return tuple(sorted(dist.get_process_group_ranks(group)))


def _store() -> Any:
    from torch.distributed import distributed_c10d

    get = getattr(distributed_c10d, "_get_default_store", None)
    if get is None:  # pragma: no cover - present in every torch dist_gc supports
        raise RuntimeError("dist_gc: this torch has no default c10d store; cannot check the GC setup across ranks")
    return get()


def _disagree(ranks: Sequence[int], what: str, diffs: Sequence[str]) -> str:
    return (f"dist_gc: ranks {list(ranks)} disagree on the GC setup ({what}): " + "; ".join(diffs)
            + ". Every rank must attach GC with the same settings to the same model; otherwise replicas drift "
            "apart or GC's collectives hang")


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
    """The GC control channel of one handle among ``ranks`` (global ranks, this one
    included). Every rank of ``ranks`` must create it at the same point (``attach``)."""

    def __init__(self, ranks: Sequence[int], what: str) -> None:
        self.ranks = tuple(ranks)
        self.rank = dist.get_rank()
        epoch = _EPOCHS.get(self.ranks, 0)
        _EPOCHS[self.ranks] = epoch + 1
        self.prefix = f"dist_gc/{'.'.join(map(str, self.ranks))}/{epoch}"
        self.what = what
        self.store = _store()

    def _wait(self, keys: list[str], doing: str, timeout: float) -> None:
        try:
            self.store.wait(keys, datetime.timedelta(seconds=timeout))
        except Exception:  # noqa: BLE001 - a timeout: name the missing ranks
            missing = [r for r, k in zip(self.ranks, keys) if not self.store.check([k])]
            raise RuntimeError(
                f"dist_gc: rank(s) {missing or '?'} of {list(self.ranks)} did not reach {doing} within {timeout:g} s "
                f"({self.what}). GC must be attached (and removed) on every rank, at the same point of the program; "
                "DIST_GC_SYNC_TIMEOUT sets the wait"
            ) from None

    def publish(self, facts: Mapping[str, Any]) -> None:
        """Publish this rank's ``facts`` (JSON-able); never waits."""
        self.store.set(f"{self.prefix}/facts/{self.rank}", json.dumps(facts, sort_keys=True))

    def differences(self, *, timeout: float | None = None) -> list[str]:
        """Wait for every peer's published facts; what differs between them (empty: all agree)."""
        timeout = sync_timeout() if timeout is None else timeout
        keys = [f"{self.prefix}/facts/{r}" for r in self.ranks]
        self._wait(keys, "dist_gc.attach", timeout)
        peers = {r: json.loads(self.store.get(k)) for r, k in zip(self.ranks, keys)}
        return _diff("", peers)

    def compare(self, facts: Mapping[str, Any], *, timeout: float | None = None) -> None:
        """Publish ``facts`` (JSON-able), wait for every peer's, raise ``RuntimeError`` on
        every rank if any differ, naming each differing fact and the ranks on each side."""
        self.publish(facts)
        diffs = self.differences(timeout=timeout)
        if diffs:
            raise RuntimeError(_disagree(self.ranks, self.what, diffs))

    # ------------------------------------------------------------------ remove
    def mark_removed(self, after_step: int) -> None:
        """This rank removed GC after its step ``after_step`` (``remove()`` is collective:
        every rank must call it, after the same step)."""
        self.store.set(f"{self.prefix}/removed/{self.rank}", str(after_step))
        self.store.add(f"{self.prefix}/removed", 1)

    def check_removed(self, step: int) -> None:
        """Raise when a peer removed GC before step ``step``, which this rank is about to
        centralize (one store round trip per optimizer step; more only after a removal):
        the ranks would now update differently, and this rank's GC collectives would pair
        with the peer's engine collectives. A peer that removed after ``step`` (it merely
        got there first) is fine."""
        if int(self.store.add(f"{self.prefix}/removed", 0)) == 0:
            return
        gone = {}
        for r in self.ranks:
            key = f"{self.prefix}/removed/{r}"
            if r != self.rank and self.store.check([key]):
                gone[r] = int(self.store.get(key))
        early = {r: s for r, s in gone.items() if s < step}
        if early:
            raise RuntimeError(
                f"dist_gc: rank(s) {sorted(early)} removed GC ({self.what}) after step(s) {sorted(set(early.values()))}, "
                f"while rank {self.rank} still runs it at step {step}: handle.remove() is collective — call it on every "
                "rank, at the same point"
            )


class Agreements:
    """One :class:`Agreement` per group of ranks that GC's setup couples, used together.

    Why per group and not one channel over the union of this rank's groups: under 2-D
    parallelism the union is not the same set on every rank (tensor parallel x data
    parallel at W=4: rank 0 is in {0,1} and {0,2}, rank 1 in {0,1} and {1,3}), so a
    union-keyed channel would wait for peers that publish elsewhere. And ranks of one
    group share only part of the setup (MoE: every rank holds the dense parameters, only
    an expert-data-parallel group holds the same experts; pipeline: each stage its own
    layers), so each group compares the facts that concern it.

    Every rank publishes the facts of all its groups before it waits for any peer, so
    no order of groups can deadlock. A disagreement raises on every rank of the groups
    that disagree; a rank outside them fails at its next collective with them (their
    processes stop)."""

    def __init__(self, groups: Sequence[Sequence[int]], what: str) -> None:
        self.channels = [Agreement(g, what) for g in dict.fromkeys(tuple(sorted(g)) for g in groups)]
        self.what = what

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({r for c in self.channels for r in c.ranks}))

    def compare(self, facts: Mapping[tuple[int, ...], Mapping[str, Any]], *, timeout: float | None = None) -> None:
        """``facts[ranks]``: what the ranks of that group must share. Publish every group's
        facts, then wait for and compare each group's; raise ``RuntimeError`` naming every
        group that disagrees."""
        for c in self.channels:
            c.publish(facts[c.ranks])
        problems = []
        for c in self.channels:
            diffs = c.differences(timeout=timeout)
            if diffs:
                problems.append(_disagree(c.ranks, self.what, diffs))
        if problems:
            raise RuntimeError(" | ".join(problems))

    def mark_removed(self, after_step: int) -> None:
        for c in self.channels:
            c.mark_removed(after_step)

    def check_removed(self, step: int) -> None:
        """One store round trip per group per optimizer step (see :meth:`Agreement.check_removed`)."""
        for c in self.channels:
            c.check_removed(step)
