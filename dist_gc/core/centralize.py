"""The math of gradient centralization on one (piece of a) tensor. Imports only torch.

A gradient ``G`` of shape ``(d_0, ..., d_{n-1})`` with output dim ``k`` is viewed as
``(outer, channels, inner) = (prod(d_:k), d_k, prod(d_k+1:))``: channel ``c`` holds
the elements ``G[..., c, ...]``, a contiguous run of ``inner`` elements repeated every
``channels * inner`` elements of the flattened tensor. ``mode="tensor"`` is the same
geometry with ``(1, 1, numel)``. Everything the sharded engine does is expressed in
this geometry, so one code path serves dim-0, strided (dim 1, last dim) and whole-tensor
means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .device import on_accelerator

__all__ = [
    "Geometry",
    "geometry_of",
    "normalize_dim",
    "centralize_",
    "add_sums_",
    "subtract_means_",
    "centralize_in_one_pass_",
    "scratch_for",
    "fits_mixed_kernels",
    "accumulation_dtype",
    "DEFAULT_TEMP_BYTES",
]

#: Temporaries made by low-precision subtraction are bounded by this many bytes
#: (the engine raises it to 1% of the local gradient shard when that is larger).
DEFAULT_TEMP_BYTES = 64 * 2**20

_WIDE = (torch.float32, torch.float64)


@dataclass(frozen=True, slots=True)
class Geometry:
    """How the means of one tensor are laid out in its row-major flattening, viewed as
    ``(groups, outer, channels, inner)``: channel ``(g, c)`` — sums index
    ``g * channels + c`` — averages the ``outer * inner`` elements ``[g, :, c, :]``.

    An output dim ``k`` gives ``(1, prod(d_:k), d_k, prod(d_k+1:))``; ``mode="tensor"``
    gives ``(1, 1, 1, numel)``. ``groups > 1`` blocks the tensor: stacked expert weights
    (leading batch dims) or a grouped ``ConvTranspose`` (dim 0 is ``(groups, in/groups)``)."""

    outer: int
    channels: int
    inner: int
    groups: int = 1

    @property
    def count(self) -> int:
        """Elements averaged by each mean."""
        return self.outer * self.inner

    @property
    def period(self) -> int:
        """Elements between two consecutive occurrences of one channel's runs."""
        return self.channels * self.inner

    @property
    def group_numel(self) -> int:
        return self.outer * self.channels * self.inner

    @property
    def numel(self) -> int:
        return self.groups * self.group_numel

    @property
    def num_channels(self) -> int:
        """Means of the whole tensor (the length of its sums vector)."""
        return self.groups * self.channels


def normalize_dim(dim: int, ndim: int, *, name: str = "tensor") -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}: output_dim={dim} is out of range for a {ndim}-dim tensor (allowed: {-ndim}..{ndim - 1})")
    return dim % ndim


def geometry_of(shape: Sequence[int], mode: str = "channel", output_dim: int = 0, *, batch_dims: int = 0, groups: int = 1,
                name: str = "tensor") -> Geometry:
    """Geometry of a tensor of ``shape``.

    ``mode="channel"`` averages every dim except ``output_dim`` (and the leading
    ``batch_dims``, which index independent stacked weights); ``mode="tensor"`` averages
    all dims but the batch dims. ``groups`` (channel mode): the first averaged dim is
    ``(groups, d / groups)`` and only the second factor is averaged — a grouped
    ``ConvTranspose`` weight ``(in, out/groups, *k)`` with output dim 1, whose channel
    ``g * out_g + j`` is the block ``weight[g*in_g:(g+1)*in_g, j]``.

    Raises ``ValueError`` naming ``name`` when the dims do not fit ``shape``."""
    ndim = len(shape)
    if not 0 <= batch_dims < max(ndim, 1):
        raise ValueError(f"{name}: batch_dims={batch_dims} does not fit a {ndim}-dim tensor (allowed: 0..{ndim - 1})")
    blocks = math.prod(shape[:batch_dims])
    if mode == "tensor":
        return Geometry(1, 1, math.prod(shape[batch_dims:]), blocks)
    if mode != "channel":
        raise ValueError(f"mode={mode!r} (allowed: 'channel' or 'tensor')")
    d = normalize_dim(output_dim, ndim, name=name)
    if d < batch_dims:
        raise ValueError(f"{name}: output_dim={output_dim} is one of its {batch_dims} batch dim(s) (allowed: {batch_dims}..{ndim - 1})")
    outer = math.prod(shape[batch_dims:d])
    if groups > 1:
        if d == batch_dims or shape[batch_dims] % groups:
            raise ValueError(f"{name}: groups={groups} does not divide dim {batch_dims} of shape {tuple(shape)} before output dim {d}")
        outer //= groups
        blocks *= groups
    return Geometry(outer, shape[d], math.prod(shape[d + 1 :]), blocks)


def _chunks(x: torch.Tensor, other: torch.Tensor, limit: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Split ``x`` (and the broadcast-shaped ``other`` alongside it) into views of at
    most ``limit`` elements, so that fp32 temporaries stay bounded."""
    if x.numel() <= limit:
        yield x, other
        return
    d = next(i for i in range(x.dim()) if x.size(i) > 1)
    step = max(1, x.size(d) * limit // x.numel())
    for start in range(0, x.size(d), step):
        n = min(step, x.size(d) - start)
        o = other.narrow(d, start, n) if other.size(d) > 1 else other
        yield from _chunks(x.narrow(d, start, n), o, limit)


#: On CPU, fp32 chunks this size (4 MiB) stay in cache between the cast, the reduction
#: and the write-back. Measured (2-core x86, torch 2.13): bf16 GC of a 32000x1024
#: tensor takes 3.1x a copy with 1M-element chunks, 4.9x with 8M, 44x with torch's
#: mixed-dtype kernels (``sum(dtype=float32)``, ``bf16.sub_(fp32)``).
CPU_CHUNK_ELEMS = 2**20
#: Below this many elements a low-precision tensor on CPU uses the mixed-dtype kernels
#: (fewer calls; their slowness does not matter at this size).
CPU_MIXED_MAX_ELEMS = 2**14


def _chunk_elems(limit_bytes: int, device: torch.device | None = None) -> int:
    # A chunk's explicit fp32 copy takes at most half the budget; the rest is slack for
    # the statistics and the allocator, so the measured peak stays under the budget.
    # On CPU a cache-sized chunk is also much faster (see CPU_CHUNK_ELEMS); on GPUs a
    # large chunk keeps the kernel count low.
    budget = max(1, limit_bytes // 8)
    return budget if on_accelerator(device) else min(budget, CPU_CHUNK_ELEMS)


def fits_mixed_kernels(x: torch.Tensor, limit_bytes: int = DEFAULT_TEMP_BYTES) -> bool:
    """Whether ``x`` may go through torch's kernels directly (one call each for the
    sums and the subtraction) rather than the chunked fp32 path: always for fp32/fp64
    (no cast needed); for 16-bit tensors on GPUs up to
    ``limit_bytes / 64`` elements (those kernels were measured to hold up to ~4 fp32
    temporaries the size of the input: 1/4 of the budget), on CPU only tiny ones."""
    if x.dtype in _WIDE:
        return True
    if on_accelerator(x.device):
        return x.numel() <= limit_bytes // 64
    return x.numel() <= min(CPU_MIXED_MAX_ELEMS, limit_bytes // 64)


def _as_fp32(xc: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """An fp32 copy of ``xc``, in ``scratch`` when given (reused across chunks: no
    allocation, and on CPU no fresh pages to fault in, per chunk)."""
    if scratch is None:
        return xc.float()
    return scratch[: xc.numel()].view(xc.shape).copy_(xc)


def scratch_for(x: torch.Tensor, limit_bytes: int = DEFAULT_TEMP_BYTES, reuse: torch.Tensor | None = None) -> torch.Tensor | None:
    """A reusable fp32 buffer for the chunked path of ``x``: ``reuse`` when it is big
    enough (or when ``x`` needs no chunking, so a later tensor can still use it), else a
    new one of one chunk (at most half of ``limit_bytes``)."""
    if fits_mixed_kernels(x, limit_bytes):
        return reuse
    need = min(x.numel(), _chunk_elems(limit_bytes, x.device))
    if reuse is not None and reuse.numel() >= need and reuse.device == x.device:
        return reuse
    return torch.empty(need, dtype=torch.float32, device=x.device)


def add_sums_(x: torch.Tensor, sums: torch.Tensor, limit_bytes: int = DEFAULT_TEMP_BYTES, scratch: torch.Tensor | None = None) -> None:
    """``sums += x`` reduced (in fp32) over every dim where ``sums`` has size 1.

    ``sums`` is an fp32 view with ``x.dim()`` dims, broadcastable to ``x``.
    ``scratch``: optional fp32 buffer of at least one chunk (see :func:`scratch_for`)."""
    dims = tuple(i for i in range(x.dim()) if sums.size(i) == 1)
    if fits_mixed_kernels(x, limit_bytes):
        sums.add_(x.sum(dims, keepdim=True, dtype=sums.dtype) if dims else x.to(sums.dtype))
        return
    for xc, sc in _chunks(x, sums, _chunk_elems(limit_bytes, x.device)):
        xf = _as_fp32(xc, scratch)
        sc.add_(xf.sum(dims, keepdim=True) if dims else xf)


def subtract_means_(x: torch.Tensor, means: torch.Tensor, limit_bytes: int = DEFAULT_TEMP_BYTES, scratch: torch.Tensor | None = None) -> None:
    """``x -= means`` in place, computed in fp32 (``means`` is fp32) and rounded once
    to ``x.dtype``."""
    if fits_mixed_kernels(x, limit_bytes):
        x.sub_(means)
        return
    for xc, mc in _chunks(x, means, _chunk_elems(limit_bytes, x.device)):
        xc.copy_(_as_fp32(xc, scratch).sub_(mc))


def centralize_in_one_pass_(x: torch.Tensor, means: torch.Tensor, dims: tuple[int, ...], limit_bytes: int = DEFAULT_TEMP_BYTES,
                            scratch: torch.Tensor | None = None) -> bool:
    """When ``x`` holds whole channels (its means need nothing from elsewhere) and fits in
    one chunk: write its fp32 means over ``dims`` into ``means`` and subtract them, with
    as few kernels as ``x.sub_(x.mean(dims, keepdim=True))`` (plus one cast each way
    for 16-bit ``x``, in ``scratch``). Returns False, doing nothing, when ``x`` needs
    the chunked path."""
    if fits_mixed_kernels(x, limit_bytes):
        torch.mean(x, dims, keepdim=True, dtype=means.dtype, out=means)
        x.sub_(means)
        return True
    if scratch is None or scratch.numel() < x.numel():
        return False
    xf = _as_fp32(x, scratch)
    torch.mean(xf, dims, keepdim=True, out=means)
    x.copy_(xf.sub_(means))
    return True


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in the wider of fp32 and the gradient's dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def centralize_(tensor: torch.Tensor, *, mode: str = "channel", output_dim: int = 0, batch_dims: int = 0, groups: int = 1) -> torch.Tensor:
    """Gradient centralization of a full tensor, in place; returns ``tensor``.

    ``mode="channel"``: ``G -= G.mean(dims != output_dim)``, one mean per output
    channel (Yong et al., ECCV 2020, eq. 3). ``mode="tensor"``: ``G -= G.mean()``.
    ``batch_dims`` leading dims index independent stacked weights (one set of means
    each); ``groups`` blocks dim 0 of a grouped ``ConvTranspose`` weight (see
    :func:`geometry_of`). Statistics are accumulated in fp32 (fp64 for fp64 tensors)
    whatever the dtype, and the result is rounded once to the tensor's dtype.

    Example::

        >>> g = torch.tensor([[1.0, 3.0], [2.0, 6.0]])
        >>> centralize_(g)
        tensor([[-1.,  1.],
                [-2.,  2.]])
    """
    if tensor.dim() == 0:
        raise ValueError("centralize_: a 0-dim tensor has no channels to centralize")
    geo = geometry_of(tensor.shape, mode, output_dim, batch_dims=batch_dims, groups=groups)
    if not tensor.is_contiguous() and geo.groups > 1:
        raise ValueError("centralize_: a blocked geometry (batch_dims or groups) needs a contiguous tensor")
    view = tensor.view(geo.groups, geo.outer, geo.channels, geo.inner) if geo.groups > 1 else tensor
    shape = [1] * view.dim()
    if geo.groups > 1:
        shape[0], shape[2] = geo.groups, geo.channels
    elif mode == "channel":
        shape[normalize_dim(output_dim, tensor.dim())] = geo.channels
    sums = torch.zeros(shape, dtype=accumulation_dtype(tensor.dtype), device=tensor.device)
    scratch = scratch_for(view)
    add_sums_(view, sums, scratch=scratch)
    subtract_means_(view, sums.div_(geo.count), scratch=scratch)
    return tensor
