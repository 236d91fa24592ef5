"""The Triton kernels of :mod:`dist_gc.kernels.triton` (see its docstring for the design).

A module of its own so that ``triton`` is imported only when a kernel is first needed
(``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, and jit functions resolve
the helpers they call through their module's globals)."""

import triton
import triton.language as tl

__all__ = ["partials_kernel", "reduce_kernel", "subtract_kernel"]


@triton.jit
def _round(y, DT: tl.constexpr):
    # fp32 -> DT, round to nearest even, as torch. bf16 by hand: the interpreter's cast
    # truncates (and its "rtne" rounds ties up) where the GPU's cvt.rn rounds to even;
    # integer ops give the same bits on both (c10's rounding, NaN kept NaN). fp16: numpy
    # and cvt.rn both round to nearest even.
    if DT == tl.bfloat16:
        b = y.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(y != y, 0x7FC0, r)
        out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DT == tl.float32:
        out = y
    else:
        out = y.to(DT)
    return out


@triton.jit
def _decode(itab, blocks, NF: tl.constexpr):
    # multi_tensor_apply: the program's (item, local block) from the host's block table,
    # then the item's row of the item table, and the box's coordinates in the item
    # (scalar integer divisions, once per program)
    pid = tl.program_id(0)
    item = tl.load(blocks + 2 * pid)
    lid = tl.load(blocks + 2 * pid + 1)
    f = itab + item * NF
    a1 = tl.load(f + 1)
    k2 = tl.load(f + 2)
    a3 = tl.load(f + 3)
    n_cb = tl.load(f + 6)
    n_rb = tl.load(f + 7)
    n_lb = tl.load(f + 8)
    lb = lid % n_lb
    t = lid // n_lb
    rb = t % n_rb
    t = t // n_rb
    cb = t % n_cb
    i0 = t // n_cb
    return item, f, i0, a1, k2, a3, cb, rb, lb, n_lb


# ---- partial sums: one program per box, fp32 partials into its own slots
@triton.jit
def _col_partials(base, partials, i0, a1, k2, a3, r_lo, r_hi, cb, box_x, pbase, P, rb,
                  TR: tl.constexpr, TQ: tl.constexpr):
    W = k2 * a3
    n_qb = (W + TQ - 1) // TQ
    for qb in range(cb * box_x, tl.minimum(cb * box_x + box_x, n_qb)):
        q = qb * TQ + tl.arange(0, TQ)
        qm = q < W
        acc = tl.zeros((TR, TQ), tl.float32)
        for r0 in range(r_lo, r_hi, TR):
            r = r0 + tl.arange(0, TR)
            row = (i0 * a1 + r) * W
            m = (r < r_hi)[:, None] & qm[None, :]
            acc += tl.load(base + row[:, None] + q[None, :], mask=m, other=0.0).to(tl.float32)
        s = tl.sum(acc, axis=0)
        # column q is column j3 = q % a3 of channel q // a3: one partial per (column, box)
        tl.store(partials + pbase + (i0 * k2 + q // a3) * P + rb * a3 + q % a3, s, mask=qm)


@triton.jit
def _mid_partials(base, partials, i0, a1, k2, a3, r_lo, r_hi, cb, box_x, pbase, P, rb,
                  TC: tl.constexpr, TL: tl.constexpr):
    n_ctb = (k2 + TC - 1) // TC
    for ctb in range(cb * box_x, tl.minimum(cb * box_x + box_x, n_ctb)):
        c = ctb * TC + tl.arange(0, TC)
        cm = c < k2
        acc = tl.zeros((TC, TL), tl.float32)
        for r in range(r_lo, r_hi):
            rowc = ((i0 * a1 + r) * k2 + c) * a3
            for j0 in range(0, a3, TL):
                j = j0 + tl.arange(0, TL)
                m = cm[:, None] & (j < a3)[None, :]
                acc += tl.load(base + rowc[:, None] + j[None, :], mask=m, other=0.0).to(tl.float32)
        s = tl.sum(acc, axis=1)
        tl.store(partials + pbase + (i0 * k2 + c) * P + rb, s, mask=cm)


@triton.jit
def _long_partials(base, partials, i0, a1, k2, a3, r_lo, r_hi, cb, box_x, pbase, P, rb, lb, n_lb,
                   TL: tl.constexpr):
    j_lo = lb * box_x
    j_hi = tl.minimum(j_lo + box_x, a3)
    acc = tl.zeros((TL,), tl.float32)
    for r in range(r_lo, r_hi):
        rowp = base + ((i0 * a1 + r) * k2 + cb) * a3
        for j0 in range(j_lo, j_hi, TL):
            j = j0 + tl.arange(0, TL)
            acc += tl.load(rowp + j, mask=j < j_hi, other=0.0).to(tl.float32)
    tl.store(partials + pbase + (i0 * k2 + cb) * P + rb * n_lb + lb, tl.sum(acc, axis=0))


@triton.jit
def partials_kernel(ptrs, itab, blocks, partials, DT: tl.constexpr, NF: tl.constexpr,
                    COL_TR: tl.constexpr, COL_TQ: tl.constexpr, MID_TC: tl.constexpr,
                    MID_TL: tl.constexpr, LONG_TL: tl.constexpr):
    item, f, i0, a1, k2, a3, cb, rb, lb, n_lb = _decode(itab, blocks, NF)
    base = tl.load(ptrs + item).to(tl.pointer_type(DT))
    path = tl.load(f + 5)
    box_rows = tl.load(f + 9)
    box_x = tl.load(f + 10)
    pbase = tl.load(f + 11)
    P = tl.load(f + 12)
    r_lo = rb * box_rows
    r_hi = tl.minimum(r_lo + box_rows, a1)
    if path == 0:
        _col_partials(base, partials, i0, a1, k2, a3, r_lo, r_hi, cb, box_x, pbase, P, rb, COL_TR, COL_TQ)
    elif path == 1:
        _mid_partials(base, partials, i0, a1, k2, a3, r_lo, r_hi, cb, box_x, pbase, P, rb, MID_TC, MID_TL)
    else:
        _long_partials(base, partials, i0, a1, k2, a3, r_lo, r_hi, cb, box_x, pbase, P, rb, lb, n_lb, LONG_TL)


# ---- reduce: one owner lane per sums slot, partials added in a fixed order
@triton.jit
def reduce_kernel(partials, sums, rslot, uptr, rdiv, ustart, ulen, n_slots,
                  FUSE: tl.constexpr, BS: tl.constexpr, RB: tl.constexpr):
    s = tl.program_id(0) * BS + tl.arange(0, BS)
    sm = s < n_slots
    slot = tl.load(rslot + s, mask=sm, other=0)
    u0 = tl.load(uptr + s, mask=sm, other=0)
    u1 = tl.load(uptr + s + 1, mask=sm, other=0)
    acc = tl.zeros((BS,), tl.float32)
    # a slot's units: one run of partials per item touching it, in item order
    for k in range(0, tl.max(u1 - u0, axis=0)):
        u = u0 + k
        um = sm & (u < u1)
        st = tl.load(ustart + u, mask=um, other=0)
        ln = tl.load(ulen + u, mask=um, other=0)
        vacc = tl.zeros((BS, RB), tl.float32)
        for c0 in range(0, tl.max(ln, axis=0), RB):
            c = c0 + tl.arange(0, RB)
            m = um[:, None] & (c[None, :] < ln[:, None])
            vacc += tl.load(partials + st[:, None] + c[None, :], mask=m, other=0.0)
        acc += tl.sum(vacc, axis=1)
    old = tl.load(sums + slot, mask=sm, other=0.0)
    out = old + acc
    if FUSE:
        div = tl.load(rdiv + s, mask=sm, other=0.0)
        # final slots (div = count > 0): the mean, IEEE division as torch's div_
        out = tl.where(div > 0, tl.math.div_rn(acc, tl.where(div > 0, div, 1.0)), out)
    tl.store(sums + slot, out, mask=sm)


# ---- subtraction: same boxes, x = round(fp32(x) - mean)
@triton.jit
def _col_sub(base, means, i0, a1, k2, a3, r_lo, r_hi, cb, box_x, mbase, DT: tl.constexpr,
             TR: tl.constexpr, TQ: tl.constexpr):
    W = k2 * a3
    n_qb = (W + TQ - 1) // TQ
    for qb in range(cb * box_x, tl.minimum(cb * box_x + box_x, n_qb)):
        q = qb * TQ + tl.arange(0, TQ)
        qm = q < W
        mu = tl.load(means + mbase + q // a3, mask=qm, other=0.0)
        for r0 in range(r_lo, r_hi, TR):
            r = r0 + tl.arange(0, TR)
            p = base + ((i0 * a1 + r) * W)[:, None] + q[None, :]
            m = (r < r_hi)[:, None] & qm[None, :]
            x = tl.load(p, mask=m, other=0.0).to(tl.float32)
            tl.store(p, _round(x - mu[None, :], DT), mask=m)


@triton.jit
def _mid_sub(base, means, i0, a1, k2, a3, r_lo, r_hi, cb, box_x, mbase, DT: tl.constexpr,
             TC: tl.constexpr, TL: tl.constexpr):
    n_ctb = (k2 + TC - 1) // TC
    for ctb in range(cb * box_x, tl.minimum(cb * box_x + box_x, n_ctb)):
        c = ctb * TC + tl.arange(0, TC)
        cm = c < k2
        mu = tl.load(means + mbase + c, mask=cm, other=0.0)
        for r in range(r_lo, r_hi):
            rowc = ((i0 * a1 + r) * k2 + c) * a3
            for j0 in range(0, a3, TL):
                j = j0 + tl.arange(0, TL)
                p = base + rowc[:, None] + j[None, :]
                m = cm[:, None] & (j < a3)[None, :]
                x = tl.load(p, mask=m, other=0.0).to(tl.float32)
                tl.store(p, _round(x - mu[:, None], DT), mask=m)


@triton.jit
def _long_sub(base, means, i0, a1, k2, a3, r_lo, r_hi, cb, box_x, mbase, lb, DT: tl.constexpr,
              TL: tl.constexpr):
    j_lo = lb * box_x
    j_hi = tl.minimum(j_lo + box_x, a3)
    mu = tl.load(means + mbase + cb)
    for r in range(r_lo, r_hi):
        rowp = base + ((i0 * a1 + r) * k2 + cb) * a3
        for j0 in range(j_lo, j_hi, TL):
            j = j0 + tl.arange(0, TL)
            m = j < j_hi
            x = tl.load(rowp + j, mask=m, other=0.0).to(tl.float32)
            tl.store(rowp + j, _round(x - mu, DT), mask=m)


@triton.jit
def subtract_kernel(ptrs, itab, blocks, means, DT: tl.constexpr, NF: tl.constexpr,
                    COL_TR: tl.constexpr, COL_TQ: tl.constexpr, MID_TC: tl.constexpr,
                    MID_TL: tl.constexpr, LONG_TL: tl.constexpr):
    item, f, i0, a1, k2, a3, cb, rb, lb, n_lb = _decode(itab, blocks, NF)
    base = tl.load(ptrs + item).to(tl.pointer_type(DT))
    path = tl.load(f + 5)
    box_rows = tl.load(f + 9)
    box_x = tl.load(f + 10)
    mbase = tl.load(f + 4) + i0 * k2
    r_lo = rb * box_rows
    r_hi = tl.minimum(r_lo + box_rows, a1)
    if path == 0:
        _col_sub(base, means, i0, a1, k2, a3, r_lo, r_hi, cb, box_x, mbase, DT, COL_TR, COL_TQ)
    elif path == 1:
        _mid_sub(base, means, i0, a1, k2, a3, r_lo, r_hi, cb, box_x, mbase, DT, MID_TC, MID_TL)
    else:
        _long_sub(base, means, i0, a1, k2, a3, r_lo, r_hi, cb, box_x, mbase, lb, DT, LONG_TL)
