"""Fused multi-tensor GC kernels: one call per step for every tensor of the step.

Each backend takes the step's :class:`~dist_gc.kernels.table.KernelItem` s with one
contiguous 1-D view per item (``source.view(-1)[start : start + numel]``) and offers:

``accumulate(items, views, sums, fuse)``
    adds each item's partial channel sums into the fp32 ``sums`` buffer
    (``sums[sum_start + i0*k2 + i2]``, zeroed by the caller). With ``fuse``, for
    ``final`` items it instead writes the means (sums / ``count``) into those slots and
    subtracts them from the view in place, in fp32, rounded once to the view's dtype.
``subtract(items, views, means)``
    ``view -= means[sum_start + i0*k2 + i2]`` in fp32, rounded once.

Backends: ``cpu`` (a C++/OpenMP extension JIT-built once and cached, :mod:`.cpu`),
``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``, :mod:`.triton`). The engine
falls back to its torch ops (``kernel="torch"``) for anything a backend does not take.
"""
