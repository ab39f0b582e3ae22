"""Triton RoPE (rotate-half / neox) and Qwen3's fused per-head q/k RMSNorm + RoPE, forward and backward.

q ``[B, S, Hq, D]``, k ``[B, S, Hk, D]`` (token and head strides are arguments, the last dim contiguous); the table
cos/sin ``[B or 1, S, D]``, or built in the kernel from int64 ``position_ids`` and fp32 ``inv_freq [D/2]``. One
program per (token, block of heads); the weight gradients reduce in two deterministic stages (``col_sum``).
Semantics, rounding and the algorithm: ``docs/ops/rope.md``.
"""

import torch
import triton
import triton.language as tl

from .rms_norm import col_sum, col_sum_kernel  # noqa: F401  (col_sum_kernel is specced in rms_norm.py)
from .spec import CompileSpec, one_per_variant

BLOCK_HEADS = 4
BWD_PROGRAMS = 128  # fixed: the weight-gradient summation order never depends on the device
NUM_WARPS = 4


@triton.jit
def _cos_sin(f):
    """cos and sin of fp32 ``f`` (any magnitude up to ~1e6), accurate to the last fp32 bit.

    tl.cos/tl.sin lower to the approximate instructions (poor at large angles) and libdevice's full-range cosf
    keeps a 28-byte local array for its Payne-Hanek path (a stack frame in every kernel that calls it). Instead:
    Cody-Waite reduction by pi/2 in fp64 with a three-part pi/2 whose parts are exact in fp32 (so k * part is
    exact in fp64; the split's residual is 1.7e-15 per unit of k), then fp64 Taylor polynomials on
    |r| <= pi/4 (truncation < 1e-17) and the quadrant's signs. The fp32 results round the fp64 values.
    """
    x = f.to(tl.float64)
    k = tl.floor(x * 0.6366197723675814 + 0.5)
    r = ((x - k * 1.5703125) - k * 0.0004837512969970703) - k * 7.549790126404332e-08
    r2 = r * r
    sp = 1.6059043836821613e-10 + r2 * -7.647163731819816e-13
    sp = -2.505210838544172e-08 + r2 * sp
    sp = 2.755731922398589e-06 + r2 * sp
    sp = -0.0001984126984126984 + r2 * sp
    sp = 0.008333333333333333 + r2 * sp
    sp = -0.16666666666666666 + r2 * sp
    sn = r + r * r2 * sp
    cp = -1.1470745597729725e-11 + r2 * 4.779477332387385e-14
    cp = 2.08767569878681e-09 + r2 * cp
    cp = -2.755731922398589e-07 + r2 * cp
    cp = 2.48015873015873e-05 + r2 * cp
    cp = -0.001388888888888889 + r2 * cp
    cp = 0.041666666666666664 + r2 * cp
    cp = -0.5 + r2 * cp
    cs = 1.0 + r2 * cp
    q = k.to(tl.int64) & 3
    cos = tl.where(q == 0, cs, tl.where(q == 1, -sn, tl.where(q == 2, -cs, sn)))
    sin = tl.where(q == 0, sn, tl.where(q == 1, cs, tl.where(q == 2, -sn, -cs)))
    return cos.to(tl.float32), sin.to(tl.float32)


@triton.jit
def _table(cos_ptr, sin_ptr, pos_ptr, inv_freq_ptr, b, s, scb, scs, ssb, sss, spb, sps, dt: tl.constexpr,
           HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, FROM_POS: tl.constexpr):
    d = tl.arange(0, BLOCK_HALF)
    dm = d < HALF
    if FROM_POS:
        p = tl.load(pos_ptr + b * spb + s * sps).to(tl.float32)
        f = p * tl.load(inv_freq_ptr + d, mask=dm, other=0.0)
        cf, sf = _cos_sin(f)
        c1 = cf.to(dt).to(tl.float32)
        s1 = sf.to(dt).to(tl.float32)
        c2 = c1
        s2 = s1
    else:
        cb = cos_ptr + b * scb + s * scs
        sb = sin_ptr + b * ssb + s * sss
        c1 = tl.load(cb + d, mask=dm, other=0.0).to(tl.float32)
        c2 = tl.load(cb + HALF + d, mask=dm, other=0.0).to(tl.float32)
        s1 = tl.load(sb + d, mask=dm, other=0.0).to(tl.float32)
        s2 = tl.load(sb + HALF + d, mask=dm, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _fwd_block(x_base, o_base, w_ptr, sh, nh, hb, c1, c2, s1, s2, eps, HALF: tl.constexpr,
               BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, HAS_NORM: tl.constexpr):
    h = hb * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    d = tl.arange(0, BLOCK_HALF)
    m = (h < nh)[:, None] & (d < HALF)[None, :]
    xo = h.to(tl.int64)[:, None] * sh + d[None, :]
    x1 = tl.load(x_base + xo, mask=m, other=0.0)
    x2 = tl.load(x_base + xo + HALF, mask=m, other=0.0)
    dt = x_base.dtype.element_ty
    y1 = x1.to(tl.float32)
    y2 = x2.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
        # normed rounded to the input dtype, then weight * normed rounded (the exact fp32 product rounded once)
        y1 = (w1[None, :] * (y1 * rstd[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        y2 = (w2[None, :] * (y2 * rstd[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    # q*cos + rotate_half(q)*sin with each product and the sum in the input dtype
    o1 = (y1 * c1[None, :]).to(dt).to(tl.float32) - (y2 * s1[None, :]).to(dt).to(tl.float32)
    o2 = (y2 * c2[None, :]).to(dt).to(tl.float32) + (y1 * s2[None, :]).to(dt).to(tl.float32)
    oo = h.to(tl.int64)[:, None] * (2 * HALF) + d[None, :]
    tl.store(o_base + oo, o1.to(dt), mask=m)
    tl.store(o_base + oo + HALF, o2.to(dt), mask=m)


@triton.jit
def qk_norm_rope_fwd_kernel(
    q_ptr, k_ptr,  # [B, S, Hq|Hk, D] inputs (strides below, last dim contiguous)
    qw_ptr, kw_ptr,  # [D] norm weights (read with HAS_NORM)
    cos_ptr, sin_ptr,  # [B or 1, S, D] table (read unless FROM_POS)
    pos_ptr, inv_freq_ptr,  # [B or 1, S] int64 positions, [D/2] fp32 (read with FROM_POS)
    qo_ptr, ko_ptr,  # [B, S, Hq|Hk, D] outputs, contiguous
    S, Hq, Hk,  # sequence length, head counts
    sqb, sqs, sqh, skb, sks, skh,  # q / k strides (batch, token, head) in elements
    scb, scs, ssb, sss, spb, sps,  # cos / sin / positions strides (batch 0 when broadcast)
    eps,  # norm epsilon
    HALF: tl.constexpr,  # D / 2
    BLOCK_HALF: tl.constexpr,  # power of two >= HALF
    BLOCK_HEADS: tl.constexpr,  # heads per program
    HAS_NORM: tl.constexpr,  # per-head RMSNorm before the rotation
    FROM_POS: tl.constexpr,  # table from positions + inv_freq
):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    b = t // S
    s = t % S
    dt = q_ptr.dtype.element_ty
    c1, c2, s1, s2 = _table(cos_ptr, sin_ptr, pos_ptr, inv_freq_ptr, b, s, scb, scs, ssb, sss, spb, sps, dt, HALF,
                            BLOCK_HALF, FROM_POS)
    nqb = tl.cdiv(Hq, BLOCK_HEADS)
    if hb < nqb:
        _fwd_block(q_ptr + b * sqb + s * sqs, qo_ptr + t * Hq * (2 * HALF), qw_ptr, sqh, Hq, hb, c1, c2, s1, s2, eps,
                   HALF, BLOCK_HALF, BLOCK_HEADS, HAS_NORM)
    else:
        _fwd_block(k_ptr + b * skb + s * sks, ko_ptr + t * Hk * (2 * HALF), kw_ptr, skh, Hk, hb - nqb, c1, c2, s1,
                   s2, eps, HALF, BLOCK_HALF, BLOCK_HEADS, HAS_NORM)


@triton.jit
def _bwd_block(g_base, x_base, dx_base, w_ptr, sh, nh, hb, c1, c2, s1, s2, eps, HALF: tl.constexpr,
               BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, HAS_NORM: tl.constexpr):
    h = hb * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    d = tl.arange(0, BLOCK_HALF)
    m = (h < nh)[:, None] & (d < HALF)[None, :]
    go = h.to(tl.int64)[:, None] * (2 * HALF) + d[None, :]
    g1 = tl.load(g_base + go, mask=m, other=0.0).to(tl.float32)
    g2 = tl.load(g_base + go + HALF, mask=m, other=0.0).to(tl.float32)
    gy1 = g1 * c1[None, :] + g2 * s2[None, :]
    gy2 = g2 * c2[None, :] - g1 * s1[None, :]
    dt = dx_base.dtype.element_ty
    a1 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    if HAS_NORM:
        xo = h.to(tl.int64)[:, None] * sh + d[None, :]
        x1 = tl.load(x_base + xo, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + xo + HALF, mask=m, other=0.0).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        n1 = x1 * rstd[:, None]
        n2 = x2 * rstd[:, None]
        w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
        dn1 = gy1 * w1[None, :]
        dn2 = gy2 * w2[None, :]
        cm = (tl.sum(dn1 * n1, axis=1) + tl.sum(dn2 * n2, axis=1)) / (2 * HALF)
        gy1_ = gy1
        gy2_ = gy2
        gy1 = rstd[:, None] * (dn1 - n1 * cm[:, None])
        gy2 = rstd[:, None] * (dn2 - n2 * cm[:, None])
        a1 = tl.sum(gy1_ * n1.to(dt).to(tl.float32), axis=0)
        a2 = tl.sum(gy2_ * n2.to(dt).to(tl.float32), axis=0)
    tl.store(dx_base + go, gy1.to(dt), mask=m)
    tl.store(dx_base + go + HALF, gy2.to(dt), mask=m)
    return a1, a2


@triton.jit
def qk_norm_rope_bwd_kernel(
    gq_ptr, gk_ptr,  # [B, S, Hq|Hk, D] output gradients, contiguous
    q_ptr, k_ptr,  # forward inputs (strides below; read with HAS_NORM)
    qw_ptr, kw_ptr,  # [D] norm weights
    cos_ptr, sin_ptr, pos_ptr, inv_freq_ptr,  # the forward's table / positions
    dq_ptr, dk_ptr,  # [B, S, Hq|Hk, D] input gradients, contiguous
    pq_ptr, pk_ptr,  # fp32 weight-gradient partials [programs, q|k head blocks, D] (HAS_NORM)
    ntok, tok_per_prog,  # B * S, tokens per program
    S, Hq, Hk,
    sqb, sqs, sqh, skb, sks, skh,
    scb, scs, ssb, sss, spb, sps,
    eps,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, HAS_NORM: tl.constexpr,
    FROM_POS: tl.constexpr,
):
    pid = tl.program_id(0)
    hb = tl.program_id(1)
    nqb = tl.cdiv(Hq, BLOCK_HEADS)
    nkb = tl.cdiv(Hk, BLOCK_HEADS)
    dt = q_ptr.dtype.element_ty
    acc1 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    start = pid.to(tl.int64) * tok_per_prog
    count = tl.minimum(start + tok_per_prog, ntok) - start
    for i in range(0, count):
        t = start + i  # int64 offsets: B*S*H*D may pass 2^31
        b = t // S
        s = t % S
        c1, c2, s1, s2 = _table(cos_ptr, sin_ptr, pos_ptr, inv_freq_ptr, b, s, scb, scs, ssb, sss, spb, sps, dt,
                                HALF, BLOCK_HALF, FROM_POS)
        if hb < nqb:
            a1, a2 = _bwd_block(gq_ptr + t * Hq * (2 * HALF), q_ptr + b * sqb + s * sqs, dq_ptr + t * Hq * (2 * HALF),
                                qw_ptr, sqh, Hq, hb, c1, c2, s1, s2, eps, HALF, BLOCK_HALF, BLOCK_HEADS, HAS_NORM)
        else:
            a1, a2 = _bwd_block(gk_ptr + t * Hk * (2 * HALF), k_ptr + b * skb + s * sks, dk_ptr + t * Hk * (2 * HALF),
                                kw_ptr, skh, Hk, hb - nqb, c1, c2, s1, s2, eps, HALF, BLOCK_HALF, BLOCK_HEADS,
                                HAS_NORM)
        acc1 += a1
        acc2 += a2
    if HAS_NORM:
        d = tl.arange(0, BLOCK_HALF)
        dm = d < HALF
        if hb < nqb:
            base = pq_ptr + (pid.to(tl.int64) * nqb + hb) * (2 * HALF)
        else:
            base = pk_ptr + (pid.to(tl.int64) * nkb + hb - nqb) * (2 * HALF)
        tl.store(base + d, acc1, mask=dm)
        tl.store(base + HALF + d, acc2, mask=dm)


def _common(q, k, cos, sin, pos):
    """Strides and flags shared by the forward and backward launches (pointer args for absent tensors: q)."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    from_pos = pos is not None
    if from_pos:
        tab = (0, 0, 0, 0, 0 if pos.shape[0] == 1 else pos.stride(0), pos.stride(1))
    else:
        tab = (0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1),
               0 if sin.shape[0] == 1 else sin.stride(0), sin.stride(1), 0, 0)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2)) + tab
    nblocks = (triton.cdiv(Hq, BLOCK_HEADS), triton.cdiv(Hk, BLOCK_HEADS))
    meta = dict(HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_HEADS=BLOCK_HEADS, FROM_POS=from_pos)
    return B * S, S, Hq, Hk, strides, nblocks, meta


def qk_norm_rope_fwd(q, k, qw, kw, cos, sin, pos, inv_freq, eps, qo, ko):
    """Launch the forward. ``qw/kw`` None: no norm; ``pos`` (int64) + ``inv_freq`` given: table from positions."""
    ntok, S, Hq, Hk, strides, nblocks, meta = _common(q, k, cos, sin, pos)
    if ntok == 0:
        return
    has_norm = qw is not None
    qk_norm_rope_fwd_kernel[(ntok, nblocks[0] + nblocks[1])](
        q, k, qw if has_norm else q, kw if has_norm else k, cos if pos is None else q, sin if pos is None else q,
        pos if pos is not None else q, inv_freq if pos is not None else q, qo, ko, S, Hq, Hk, *strides, eps,
        HAS_NORM=has_norm, num_warps=NUM_WARPS, num_stages=1, **meta)


def qk_norm_rope_bwd(gq, gk, q, k, qw, kw, cos, sin, pos, inv_freq, eps, dq, dk, dqw, dkw):
    """Launch the backward; ``gq/gk/dq/dk`` contiguous. Fills ``dqw/dkw [D]`` when there is a norm."""
    ntok, S, Hq, Hk, strides, nblocks, meta = _common(q, k, cos, sin, pos)
    has_norm = qw is not None
    D = q.shape[3]
    if ntok == 0:
        if has_norm:
            dqw.zero_(), dkw.zero_()
        return
    progs = min(ntok, BWD_PROGRAMS)
    per = triton.cdiv(ntok, progs)
    progs = triton.cdiv(ntok, per)
    pq = torch.empty((progs * nblocks[0] if has_norm else 0, D), dtype=torch.float32, device=q.device)
    pk = torch.empty((progs * nblocks[1] if has_norm else 0, D), dtype=torch.float32, device=q.device)
    qk_norm_rope_bwd_kernel[(progs, nblocks[0] + nblocks[1])](
        gq, gk, q, k, qw if has_norm else q, kw if has_norm else k, cos if pos is None else q,
        sin if pos is None else q, pos if pos is not None else q, inv_freq if pos is not None else q, dq, dk,
        pq if has_norm else dq, pk if has_norm else dk, ntok, per, S, Hq, Hk, *strides, eps,
        HAS_NORM=has_norm, num_warps=NUM_WARPS, num_stages=1, **meta)
    if has_norm:
        col_sum(pq, dqw)
        col_sum(pk, dkw)


_MODELS = (("30B-A3B", 2048, 32, 4), ("235B-A22B", 4096, 64, 4))
_D = 128
# (phase, B, S) the specs cover: decode at T = 1 and T = 8 tokens (one new token per sequence), prefill of 4096
_PHASES = (("decode T=1", 1, 1), ("decode T=8", 8, 1), ("prefill T=4096", 1, 4096))


def _launch_ints(hq: int, hk: int, B: int, S: int, from_pos: bool) -> dict:
    """The integer arguments _common() passes for q [B, S, hq, D] and k [B, S, hk, D] (views of the q and k
    projections [B, S, H*D]: token stride H*D, head stride D) with cos/sin [B, S, D] (batch stride 0 at B = 1) or
    position_ids [B, S] (the layouts transformers passes)."""
    ints = {"S": S, "Hq": hq, "Hk": hk, "sqb": S * hq * _D, "sqs": hq * _D, "sqh": _D,
            "skb": S * hk * _D, "sks": hk * _D, "skh": _D}
    bstride = lambda n: 0 if B == 1 else n  # noqa: E731  (_common: a batch of 1 is broadcast, stride 0)
    if from_pos:
        ints.update(scb=0, scs=0, ssb=0, sss=0, spb=bstride(S), sps=1)
    else:
        ints.update(scb=bstride(S * _D), scs=_D, ssb=bstride(S * _D), sss=_D, spb=0, sps=0)
    return ints


def compile_specs() -> list[CompileSpec]:
    """Every (norm, table source) variant x dtype x phase at both models' attention shapes (head_dim 128).

    Decode (S = 1) makes ``S`` a constexpr, and from positions at B > 1 the positions' batch stride too (it is
    S = 1); the backward's ``ntok`` and ``tok_per_prog`` are 1 at T = 1, ``tok_per_prog`` is 1 up to 128 tokens.
    An absent tensor's pointer is another tensor of q's dtype (see the launchers), so it is typed so here: the
    positions / inv_freq without FROM_POS, the fp32 partials without HAS_NORM. The two models' head counts are
    multiples of 16 (Hq) and the same (Hk), so their launches are the same variants: one spec covers both.
    """
    fwd, bwd = [], []
    for model, _hidden, hq, hk in _MODELS:
        for dt in ("bf16", "fp16", "fp32"):
            for has_norm in (True, False):
                for from_pos in (False, True):
                    what = f"{'qk_norm_rope' if has_norm else 'rope'}{'_positions' if from_pos else ''}"
                    ptrs = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "qw_ptr", "kw_ptr", "cos_ptr", "sin_ptr")}
                    tail = {"pos_ptr": "*i64", "inv_freq_ptr": "*fp32"} if from_pos else \
                        {"pos_ptr": f"*{dt}", "inv_freq_ptr": f"*{dt}"}  # the launchers pass q
                    partials = {"pq_ptr": "*fp32", "pk_ptr": "*fp32"} if has_norm else \
                        {"pq_ptr": f"*{dt}", "pk_ptr": f"*{dt}"}  # the launcher passes dq, dk
                    strides = {"sqb": "i64", "sqs": "i64", "sqh": "i64", "skb": "i64", "sks": "i64", "skh": "i64",
                               "scb": "i64", "scs": "i64", "ssb": "i64", "sss": "i64", "spb": "i64", "sps": "i64",
                               "eps": "fp32"}
                    consts = {"HALF": _D // 2, "BLOCK_HALF": _D // 2, "BLOCK_HEADS": BLOCK_HEADS,
                              "HAS_NORM": has_norm, "FROM_POS": from_pos}
                    cs = {k: "constexpr" for k in consts}
                    fsig = {**ptrs, **tail, "qo_ptr": f"*{dt}", "ko_ptr": f"*{dt}", "S": "i32", "Hq": "i32",
                            "Hk": "i32", **strides, **cs}
                    bsig = {"gq_ptr": f"*{dt}", "gk_ptr": f"*{dt}", **ptrs, **tail, "dq_ptr": f"*{dt}",
                            "dk_ptr": f"*{dt}", **partials, "ntok": "i32", "tok_per_prog": "i32", "S": "i32",
                            "Hq": "i32", "Hk": "i32", **strides, **cs}
                    for phase, B, S in _PHASES:
                        ints = _launch_ints(hq, hk, B, S, from_pos)
                        fields = {"what": what, "dt": dt, "phase": f"{phase} (B={B} S={S})",
                                  "model": f"{model} Hq={hq} Hk={hk}"}
                        fwd.append((CompileSpec(
                            kernel="qk_norm_rope_fwd_kernel", fn=qk_norm_rope_fwd_kernel, signature=fsig,
                            constexprs=consts, label="", num_warps=NUM_WARPS, num_stages=1, ints=ints,
                        ), fields))
                        ntok = B * S
                        per = triton.cdiv(ntok, min(ntok, BWD_PROGRAMS))
                        bwd.append((CompileSpec(
                            kernel="qk_norm_rope_bwd_kernel", fn=qk_norm_rope_bwd_kernel, signature=bsig,
                            constexprs=consts, label="", num_warps=NUM_WARPS, num_stages=1,
                            ints={**ints, "ntok": ntok, "tok_per_prog": per},
                        ), fields))
    template = f"{{what}} {{dt}} {{phase}} ({{model}}; D={_D})"
    return one_per_variant(fwd, template) + one_per_variant(bwd, template)
