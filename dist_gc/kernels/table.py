"""The kernel table: every region of a compiled plan as a 4-dim canonical view.

A region's view (``Region.shape``) and its sums shape (size 1 on averaged dims) are
collapsed — size-1 dims dropped, neighbouring dims of the same kind merged — into

    (k0, a1, k2, a3)   kept, averaged, kept, averaged

so that element ``(i0, j1, i2, j3)`` sits at ``((i0*a1 + j1)*k2 + i2)*a3 + j3`` of the
region's contiguous data and its mean at ``sums[sum_start + i0*k2 + i2]``. Every region
the layouts build fits (they come from the ``(groups, outer, channels, inner)``
geometry: kept, averaged, kept, averaged), e.g.

* channel mode, output dim 0, whole rows ``(rows, inner)``: ``(1, 1, rows, inner)``;
* output dim 1 of a 2-D weight ``(out_rows, cols)``: ``(1, rows, cols, 1)``;
* ``mode="tensor"``: ``(1, 1, 1, numel)``;
* a blocked geometry (stacked experts, grouped ConvTranspose): ``(groups, outer, channels, inner)``.

Kernels (:mod:`dist_gc.kernels`) run over a table of these, one call per step for all
tensors. Pure Python: no tensors, no devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["KernelItem", "canonical_shape", "kernel_items"]


@dataclass(frozen=True, slots=True)
class KernelItem:
    """One region as a kernel sees it."""

    item: int
    """Index in ``CompiledPlans.items``."""
    source: int
    start: int
    """First element of the region in its source's flattening."""
    shape: tuple[int, int, int, int]
    """``(k0, a1, k2, a3)``: kept, averaged, kept, averaged (see the module docstring)."""
    sum_start: int
    """Slot of the region's first mean in the engine-wide sums buffer."""
    final: bool
    """No collective completes its means and no other region of this rank shares them:
    with ``fuse`` the kernel writes means and subtracts right away."""
    exclusive: bool
    """No other region of this rank writes its sums slots (kernels may parallelise
    over items that are; the others are summed one after another)."""
    count: float
    """Elements each of its means averages over the whole tensor (the divisor)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_sums(self) -> int:
        return self.shape[0] * self.shape[2]


def canonical_shape(shape: Sequence[int], sum_shape: Sequence[int]) -> tuple[int, int, int, int] | None:
    """``(k0, a1, k2, a3)`` of a view of ``shape`` whose sums have ``sum_shape`` (size 1 on
    averaged dims, the view's size on kept ones); ``None`` when the view does not fit
    that pattern (the torch path then handles it)."""
    if len(shape) != len(sum_shape):
        return None
    runs: list[list] = []  # [size, kept]
    for v, s in zip(shape, sum_shape):
        if s not in (1, v):
            return None
        if v == 1:
            continue
        kept = s == v
        if runs and runs[-1][1] == kept:
            runs[-1][0] *= v
        else:
            runs.append([v, kept])
    # Right-aligned, so that a contiguous averaged run is always a3 (the inner loop).
    if not runs or not runs[0][1]:
        runs.insert(0, [1, True])
    if runs[-1][1]:
        runs.append([1, False])
    if len(runs) == 2:
        runs[:0] = [[1, True], [1, False]]
    if len(runs) != 4:
        return None
    return (runs[0][0], runs[1][0], runs[2][0], runs[3][0])


def kernel_items(compiled, plans: Sequence) -> tuple[tuple[KernelItem, ...], tuple[int, ...]]:
    """Kernel items for ``compiled`` (a ``CompiledPlans`` of ``plans``), and the indices of
    the items no kernel can take (left to the torch path)."""
    out: list[KernelItem] = []
    rest: list[int] = []
    for i, it in enumerate(compiled.items):
        plan = plans[it.plan]
        r = it.region
        if r.shape is None:
            # the source itself (a whole tensor, a DTensor's local block), as its own shape
            shape = canonical_shape(r.source_shape, r.sum_shape) if r.source_shape is not None else None
            start = 0
        else:
            shape = canonical_shape(r.shape, r.sum_shape)
            start = r.start
        if shape is None or math.prod(shape) != it.numel or shape[0] * shape[2] != it.sum_stop - it.sum_start:
            rest.append(i)
            continue
        out.append(KernelItem(i, r.source, start, shape, it.sum_start, it.final, it.exclusive, float(plan.elements_per_mean)))
    return tuple(out), tuple(rest)
