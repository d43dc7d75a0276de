"""Triton kernels: 2-d depthwise conv forward, grad-input, grad-weight (+ grad-bias); fused separable forward.

Every kernel reads and writes through explicit element strides, so NCHW, channels_last and
non-contiguous tensors share one code path. A program owns a tile of BLOCK_P output pixels (a run of the
row-major order, or a TILE_W-wide rectangle) x BLOCK_C channels; the host picks the tile so that the
unit-stride dimension (pixels in NCHW, channels in channels_last) is the long side, for coalesced loads.
Products accumulate in fp32 (fp64 for fp64). Padding is implicit: taps outside the input are masked, never materialized.

- forward: ``y[n, c, oh, ow] = sum_{kh, kw} x[n, c // m, oh·s - pad + kh·d, ...] · w[c, kh, kw]``;
- grad-input gathers, for every input pixel, the output pixels that read it (stride handled by a
  divisibility mask, no zero insertion), over the m output channels of each input channel;
- grad-weight: one program per (channel block, tap, split of the N·OH output rows) writes a partial
  sum; the host adds the partials in a fixed order (deterministic, no atomics). The extra tap index
  ``KH·KW`` sums grad-output alone: the bias gradient;
- experimental, opt-in kernels on tensor cores, stride 1 only: a forward (``depthwise_forward_toeplitz_kernel``,
  chunks of a kernel row's taps as Toeplitz matrices) and a weight gradient
  (``depthwise_grad_weight_toeplitz_kernel``, input rows times Toeplitz matrices of grad-output rows).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pixel_tile(pid, ROWS, COLS, BLOCK_P: tl.constexpr, TILE_W: tl.constexpr):
    """Row, column and validity of program ``pid``'s BLOCK_P pixels: a run of the row-major order
    (``TILE_W`` = 0), or a (BLOCK_P / TILE_W) x TILE_W rectangle, whose pixels share more of their input
    windows (fewer input rows per output)."""
    i = tl.arange(0, BLOCK_P)
    if TILE_W == 0:
        flat = pid * BLOCK_P + i
        row = flat // COLS
        col = flat % COLS
        ok = flat < ROWS * COLS
    else:
        tiles_w = tl.cdiv(COLS, TILE_W)
        row = (pid // tiles_w) * (BLOCK_P // TILE_W) + i // TILE_W
        col = (pid % tiles_w) * TILE_W + i % TILE_W
        ok = (row < ROWS) & (col < COLS)
    return row, col, ok


@triton.jit
def _depthwise_tap(acc, x_base, w_ptr, c, c_ok, row_ok, iw, W, offset, tap, KH, KW, EVEN_C: tl.constexpr):
    """Adds one tap: the input at ``x_base + offset`` (masked where column ``iw`` is outside the input) times
    the tap's weights. ``EVEN_C``: every channel of the tile exists (no channel mask)."""
    ok = row_ok & (iw.to(tl.uint32) < tl.cast(W, tl.uint32))  # one unsigned compare: 0 <= iw < W
    if EVEN_C:
        xv = tl.load(x_base + offset, mask=ok[:, None], other=0.0)
        wv = tl.load(w_ptr + c * (KH * KW) + tap)
    else:
        xv = tl.load(x_base + offset, mask=ok[:, None] & c_ok[None, :], other=0.0)
        wv = tl.load(w_ptr + c * (KH * KW) + tap, mask=c_ok, other=0.0)
    return acc + xv.to(acc.dtype) * wv.to(acc.dtype)[None, :]


@triton.jit
def _depthwise_row(
    acc, x_base, w_ptr, c, c_ok, p_ok, ih0, iw0, kh, rows, W, row_step, col_step, KH, KW, DIL_H, DIL_W,
    EVEN_C: tl.constexpr, STATIC_KW: tl.constexpr,
):  # fmt: skip
    """Adds kernel row ``kh``'s taps (unrolled at compile time when ``STATIC_KW`` = KW, else a loop)."""
    row_ok = p_ok & ((ih0 + kh * DIL_H).to(tl.uint32) < rows)
    if STATIC_KW > 0:
        for kw in tl.static_range(STATIC_KW):
            acc = _depthwise_tap(
                acc, x_base, w_ptr, c, c_ok, row_ok, iw0 + kw * DIL_W, W, kh * row_step + kw * col_step,
                kh * STATIC_KW + kw, KH, KW, EVEN_C,
            )  # fmt: skip
    else:
        for kw in range(0, KW):
            acc = _depthwise_tap(
                acc, x_base, w_ptr, c, c_ok, row_ok, iw0 + kw * DIL_W, W, kh * row_step + kw * col_step,
                kh * KW + kw, KH, KW, EVEN_C,
            )  # fmt: skip
    return acc


@triton.jit
def _depthwise_tile(
    x_chan,
    w_ptr,
    c,
    c_ok,
    ih0,
    iw0,
    p_ok,
    H,
    W,
    sxh,
    sxw,
    KH,
    KW,
    DIL_H,
    DIL_W,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STATIC_KH: tl.constexpr = 0,
    STATIC_KW: tl.constexpr = 0,
    EVEN_C: tl.constexpr = False,
):
    """Depthwise outputs for BLOCK_P pixels (top-left input corners ``ih0``, ``iw0``) x BLOCK_C channels;
    ``x_chan`` points at each channel's input plane. Taps outside the input read as zeros. With
    ``STATIC_KH``/``STATIC_KW`` (= KH, KW) the kernel-row / tap loops are unrolled at compile time (STATIC_KW
    alone: each row's taps). Each pixel's window corner is addressed once; a tap adds a scalar offset to it."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    x_base = x_chan + (ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw)[:, None]
    row_step = tl.cast(sxh, tl.int64) * DIL_H
    col_step = tl.cast(sxw, tl.int64) * DIL_W
    rows = tl.cast(H, tl.uint32)
    if STATIC_KH > 0:
        for kh in tl.static_range(STATIC_KH):
            acc = _depthwise_row(
                acc, x_base, w_ptr, c, c_ok, p_ok, ih0, iw0, kh, rows, W, row_step, col_step, KH, KW, DIL_H, DIL_W,
                EVEN_C, STATIC_KW,
            )  # fmt: skip
    else:
        for kh in range(0, KH):
            acc = _depthwise_row(
                acc, x_base, w_ptr, c, c_ok, p_ok, ih0, iw0, kh, rows, W, row_step, col_step, KH, KW, DIL_H, DIL_W,
                EVEN_C, STATIC_KW,
            )  # fmt: skip
    return acc


@triton.jit
def _forward_tile(
    x_ptr, w_ptr, b_ptr, n, H, W, C_OUT, OH, OW, sxn, sxc, sxh, sxw, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
    DIL_H, DIL_W, MULT, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    STATIC_KH: tl.constexpr, STATIC_KW: tl.constexpr, TILE_W: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    """This program's (pixels x channels) tile of image ``n``'s depthwise output, bias added, in ACC; with the
    pixels' rows, columns and validity and the channels and theirs."""
    oh, ow, p_ok = _pixel_tile(tl.program_id(0), OH, OW, BLOCK_P, TILE_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C_OUT
    x_chan = x_ptr + n * sxn + (c // MULT).to(tl.int64)[None, :] * sxc
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    acc = _depthwise_tile(
        x_chan, w_ptr, c, c_ok, ih0, iw0, p_ok, H, W, sxh, sxw, KH, KW, DIL_H, DIL_W,
        ACC, BLOCK_P, BLOCK_C, STATIC_KH, STATIC_KW, EVEN_C,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
    return acc, oh, ow, p_ok, c, c_ok


@triton.jit
def depthwise_forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    H,
    W,
    C_OUT,
    OH,
    OW,
    sxn,
    sxc,
    sxh,
    sxw,
    syn,
    syc,
    syh,
    syw,
    KH,
    KW,
    STRIDE_H,
    STRIDE_W,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    MULT,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STATIC_KH: tl.constexpr = 0,
    STATIC_KW: tl.constexpr = 0,
    TILE_W: tl.constexpr = 0,
    EVEN_C: tl.constexpr = False,
):
    n = tl.program_id(2).to(tl.int64)
    acc, oh, ow, p_ok, c, c_ok = _forward_tile(
        x_ptr, w_ptr, b_ptr, n, H, W, C_OUT, OH, OW, sxn, sxc, sxh, sxw, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
        DIL_H, DIL_W, MULT, HAS_BIAS, ACC, BLOCK_P, BLOCK_C, STATIC_KH, STATIC_KW, TILE_W, EVEN_C,
    )  # fmt: skip
    y_offset = n * syn + c.to(tl.int64)[None, :] * syc + (oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None]
    tl.store(y_ptr + y_offset, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def _mid_activation(mid, MID_ACT: tl.constexpr):
    """relu | relu6 | hardswish | silu | gelu (codes 1-5, as ``separable.MID_ACTIVATIONS``) in the accumulator."""
    if MID_ACT == 1:  # relu
        mid = tl.maximum(mid, 0.0)
    elif MID_ACT == 2:  # relu6
        mid = tl.minimum(tl.maximum(mid, 0.0), 6.0)
    elif MID_ACT == 3:  # hardswish: x·relu6(x + 3) / 6
        mid = mid * tl.minimum(tl.maximum(mid + 3.0, 0.0), 6.0) / 6.0
    elif MID_ACT == 4:  # silu: x·sigmoid(x)
        mid = mid * tl.sigmoid(mid)
    elif MID_ACT == 5:  # gelu (erf form): x·Φ(x)
        mid = 0.5 * mid * (1.0 + tl.erf(mid * 0.7071067811865476))
    return mid


@triton.jit
def depthwise_moments_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    sum_ptr,
    m2_ptr,
    H,
    W,
    C_OUT,
    OH,
    OW,
    sxn,
    sxc,
    sxh,
    sxw,
    KH,
    KW,
    STRIDE_H,
    STRIDE_W,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    MULT,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STATIC_KH: tl.constexpr = 0,
    STATIC_KW: tl.constexpr = 0,
    TILE_W: tl.constexpr = 0,
    EVEN_C: tl.constexpr = False,
    MID_ACT: tl.constexpr = 0,
    ROUND: tl.constexpr = False,
    SUMS_ONLY: tl.constexpr = False,
    FINALIZE: tl.constexpr = False,
    BLOCK_Q: tl.constexpr = 16,
    BLOCK_T: tl.constexpr = 16,
    FOLD: tl.constexpr = False,
    HAS_GAMMA: tl.constexpr = False,
    HAS_BETA: tl.constexpr = False,
    RUNNING: tl.constexpr = False,
    counter_ptr=None,
    mean_ptr=None,
    var_ptr=None,
    gamma_ptr=None,
    beta_ptr=None,
    fw_ptr=None,
    fb_ptr=None,
    rm_ptr=None,
    rv_ptr=None,
    eps=None,
    momentum_hi=None,
    momentum_lo=None,
):
    """The forward's tile, reduced instead of stored: per channel, the sum of the tile's outputs and their
    squared deviations from the tile's mean (M2), at ``[n, pixel program, channel]`` of (N, P, C_OUT) buffers;
    a tile's pixel count follows from its place (``_tile_pixels``). Combined in a fixed order afterwards (Chan
    et al.'s pairwise formula): deterministic. ``MID_ACT``: of the activated outputs; ``ROUND``: of the outputs
    rounded to x's dtype (as stored); ``SUMS_ONLY``: the sums alone (``m2_ptr`` unused: channel means).
    ``FINALIZE`` (one launch of the whole batch): the last program of each channel block to finish also does
    ``finalize_moments_kernel``'s work for that block (``FOLD``, ``RUNNING`` and the pointers after them as
    there; ``counter_ptr``: one zeroed int32 per channel block; the counter picks the program, the order of the
    combination stays fixed), so that no second launch is needed."""
    n = tl.program_id(2).to(tl.int64)
    pid_p = tl.program_id(0)
    acc, _, _, p_ok, c, c_ok = _forward_tile(
        x_ptr, w_ptr, b_ptr, n, H, W, C_OUT, OH, OW, sxn, sxc, sxh, sxw, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
        DIL_H, DIL_W, MULT, HAS_BIAS, ACC, BLOCK_P, BLOCK_C, STATIC_KH, STATIC_KW, TILE_W, EVEN_C,
    )  # fmt: skip
    acc = _mid_activation(acc, MID_ACT)
    if ROUND:
        acc = acc.to(x_ptr.dtype.element_ty).to(ACC)
    total = tl.sum(tl.where(p_ok[:, None], acc, 0.0), axis=0)
    part = (n * tl.num_programs(0) + pid_p) * C_OUT
    tl.store(sum_ptr + part + c, total, mask=c_ok)
    if not SUMS_ONLY:
        count = tl.sum(p_ok.to(ACC), axis=0)
        deviation = tl.where(p_ok[:, None], acc - (total / count)[None, :], 0.0)
        tl.store(m2_ptr + part + c, tl.sum(deviation * deviation, axis=0), mask=c_ok)
    if FINALIZE:
        programs = tl.num_programs(0) * tl.num_programs(2)
        if _last_program(counter_ptr, tl.program_id(1), programs):
            _finalize_channels(
                c, c_ok, C_OUT, sum_ptr, m2_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, fw_ptr,
                fb_ptr, rm_ptr, rv_ptr, programs, tl.num_programs(0), OH * OW, OW, KH * KW, eps, momentum_hi,
                momentum_lo, ACC, BLOCK_Q, BLOCK_C, BLOCK_T, BLOCK_P, TILE_W, FOLD, HAS_BIAS, HAS_GAMMA, HAS_BETA,
                RUNNING,
            )  # fmt: skip


@triton.jit
def _finalize_channels(
    c, c_ok, C,
    sum_ptr, m2_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, fw_ptr, fb_ptr, rm_ptr, rv_ptr, PARTS,
    P, PIXELS, COLS, TAPS, eps, momentum_hi, momentum_lo, ACC: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, PART_PIXELS: tl.constexpr, TILE_W: tl.constexpr, FOLD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, RUNNING: tl.constexpr,
):  # fmt: skip
    """``finalize_moments_kernel``'s work for the channels ``c`` (validity ``c_ok``) of C: shared with the
    statistics launches that finalize in their last program (``FINALIZE``)."""
    rows = tl.arange(0, BLOCK_Q)
    total = tl.zeros((BLOCK_C,), dtype=ACC)
    for q0 in range(0, PARTS, BLOCK_Q):
        q = q0 + rows
        ok = (q < PARTS)[:, None] & c_ok[None, :]
        total += tl.sum(tl.load(sum_ptr + q.to(tl.int64)[:, None] * C + c[None, :], mask=ok, other=0.0).to(ACC), 0)
    # in floating point (N·PIXELS can pass 2**31), whether or not Triton made PARTS and P constants (value 1)
    count_all = (tl.zeros((BLOCK_C,), dtype=ACC) + PARTS // P) * PIXELS
    mean = total / count_all
    m2 = tl.zeros((BLOCK_C,), dtype=ACC)
    for q0 in range(0, PARTS, BLOCK_Q):
        q = q0 + rows
        q_ok = q < PARTS
        ok = q_ok[:, None] & c_ok[None, :]
        offsets = q.to(tl.int64)[:, None] * C + c[None, :]
        count = _tile_pixels(q % P, PIXELS // COLS, COLS, PART_PIXELS, TILE_W).to(ACC)
        part_sum = tl.load(sum_ptr + offsets, mask=ok, other=0.0).to(ACC)
        deviation = tl.where(ok, part_sum / count[:, None] - mean[None, :], 0.0)
        part_m2 = tl.load(m2_ptr + offsets, mask=ok, other=0.0).to(ACC)
        m2 += tl.sum(part_m2 + count[:, None] * deviation * deviation, 0)
    var = m2 / count_all
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(var_ptr + c, var, mask=c_ok)
    if RUNNING:
        # in ACC (a Python float under the interpreter, an fp32 scalar on a GPU: no .to() on either)
        momentum = tl.zeros((BLOCK_C,), dtype=ACC) + momentum_hi + momentum_lo
        running_mean = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(ACC)
        running_var = tl.load(rv_ptr + c, mask=c_ok, other=0.0).to(ACC)
        unbiased = var * (count_all / (count_all - 1.0))
        tl.store(rm_ptr + c, running_mean + momentum * (mean - running_mean), mask=c_ok)
        tl.store(rv_ptr + c, running_var + momentum * (unbiased - running_var), mask=c_ok)
    if FOLD:
        if ACC == tl.float64:  # noqa: SIM108, SIM300 (a compile-time branch: fp32 takes the other)
            root = tl.sqrt(var + eps)
        else:
            root = tl.sqrt_rn(var + eps)  # tl.sqrt is the fast approximation in fp32
        scale = 1.0 / root
        if HAS_GAMMA:
            scale *= tl.load(gamma_ptr + c, mask=c_ok, other=1.0).to(ACC)
        shift = -mean * scale
        if HAS_BETA:
            shift += tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(ACC)
        if HAS_BIAS:
            shift += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC) * scale
        tl.store(fb_ptr + c, _rounded(shift, fb_ptr.dtype.element_ty), mask=c_ok)
        for t0 in range(0, TAPS, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = c_ok[:, None] & (t < TAPS)[None, :]
            offsets = c.to(tl.int64)[:, None] * TAPS + t[None, :]
            taps = tl.load(w_ptr + offsets, mask=ok, other=0.0).to(ACC) * scale[:, None]
            tl.store(fw_ptr + offsets, _rounded(taps, fw_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _tile_pixels(pid, ROWS, COLS, BLOCK_P: tl.constexpr, TILE_W: tl.constexpr):
    """How many of program ``pid``'s BLOCK_P pixels lie inside the ROWS x COLS image (``_pixel_tile``'s
    ``ok.sum()``, from the tile's place): a run of the row-major order cut by the image's end, or a rectangle cut
    by its bottom and right edges."""
    if TILE_W == 0:  # (one return: Triton would trace the rest with TILE_W = 0 after an early one)
        pixels = tl.minimum(ROWS * COLS - pid * BLOCK_P, BLOCK_P)
    else:
        tiles_w = tl.cdiv(COLS, TILE_W)
        rows = tl.minimum(ROWS - (pid // tiles_w) * (BLOCK_P // TILE_W), BLOCK_P // TILE_W)
        pixels = rows * tl.minimum(COLS - (pid % tiles_w) * TILE_W, TILE_W)
    return pixels


@triton.jit
def _rounded(value, dtype: tl.constexpr):
    """``value`` (fp32 or fp64) in ``dtype``, rounded to nearest even as PyTorch rounds. bf16: in the integers,
    the float32 bits' upper half rounded and reinterpreted (Triton's interpreter truncates fp32 -> bf16 and
    mangles subnormals; a GPU rounds: this agrees on both). Finite values."""
    if dtype == tl.bfloat16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        upper = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # to nearest, ties to even
        return upper.to(tl.uint16).to(dtype, bitcast=True)
    return value.to(dtype)


@triton.jit
def _last_program(counter_ptr, block, programs):
    """Whether this program is the last of the ``programs`` sharing ``block``'s counter (int32, zeroed before
    the launch) to finish: it then reads what the others stored. The barrier orders the stores of all this
    program's threads before the counter's increment, whose release (``acq_rel``, GPU scope) publishes them to
    the program that sees the last count, and whose acquire makes the others' stores visible to that program
    (the pattern of CUDA's threadFenceReduction sample)."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr + block, 1, sem="acq_rel", scope="gpu") == programs - 1


@triton.jit
def finalize_moments_kernel(
    sum_ptr,
    m2_ptr,
    mean_ptr,
    var_ptr,
    w_ptr,
    b_ptr,
    gamma_ptr,
    beta_ptr,
    fw_ptr,
    fb_ptr,
    rm_ptr,
    rv_ptr,
    PARTS,
    P,
    C,
    PIXELS,
    COLS,
    TAPS,
    eps,
    momentum_hi,
    momentum_lo,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PART_PIXELS: tl.constexpr,
    TILE_W: tl.constexpr = 0,
    FOLD: tl.constexpr = False,
    HAS_BIAS: tl.constexpr = False,
    HAS_GAMMA: tl.constexpr = False,
    HAS_BETA: tl.constexpr = False,
    RUNNING: tl.constexpr = False,
):
    """Per-tile reductions (``depthwise_moments_kernel``'s, or the fused kernel's statistics epilogue's) to each
    channel's mean and biased variance, in one launch instead of a dozen small operators: the ``PARTS`` = N·P
    rows of (N, P, C) sums and M2s combined by Chan et al.'s formula, ``M2 = Σ M2_q + Σ count_q·(mean_q - mean)²``,
    in a fixed order. A part's pixel count is that of its tile (``_tile_pixels``): a run of ``PART_PIXELS``
    pixels of an image's ``PIXELS`` (rows of ``COLS``), or with ``TILE_W`` a rectangle of PART_PIXELS / TILE_W x
    TILE_W of them. With ``FOLD``, also the BatchNorm with those statistics folded into the depthwise conv:
    ``fw[c, t] = w[c, t]·s``, ``fb[c] = beta[c] + (b[c] - mean)·s``, ``s = gamma[c] / sqrt(var + eps)``
    (computed in ``ACC``, stored rounded to nearest in the folded tensors' dtype: the conv's). With
    ``RUNNING``, the running statistics ``rm``/``rv`` (in ``ACC``) moved towards the batch's in place as
    ``F.batch_norm`` moves them (unbiased variance), by the momentum ``momentum_hi + momentum_lo`` (a float
    argument is fp32: the pair carries a float64 momentum to ~48 bits)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    _finalize_channels(
        c, c < C, C, sum_ptr, m2_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, fw_ptr, fb_ptr,
        rm_ptr, rv_ptr, PARTS, P, PIXELS, COLS, TAPS, eps, momentum_hi, momentum_lo, ACC, BLOCK_Q, BLOCK_C, BLOCK_T,
        PART_PIXELS, TILE_W, FOLD, HAS_BIAS, HAS_GAMMA, HAS_BETA, RUNNING,
    )  # fmt: skip


@triton.jit
def _toeplitz_dot(acc, a, b, DOT_IN_FP32: tl.constexpr):
    """``acc + a @ b`` (3-d, batched) for the Toeplitz kernels: fp32 in full precision, fp16/bf16 on tensor cores
    with ``b`` in ``a``'s dtype, accumulating in fp32. ``DOT_IN_FP32``: the same products in fp32 (the
    interpreter's bf16 ``tl.dot`` is wrong, triton-lang/triton#11584)."""
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def depthwise_forward_toeplitz_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    H,
    W,
    C_OUT,
    OH,
    OW,
    sxn,
    sxc,
    sxh,
    sxw,
    syn,
    syc,
    syh,
    syw,
    KH,
    KW,
    PAD_H,
    PAD_W,
    MULT,
    HAS_BIAS: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Stride-1, dilation-1 forward on tensor cores (experimental, opt-in: ``Tiles.toeplitz``). For each channel
    and kernel row, BLOCK_J outputs of an output row are a product of BLOCK_I input columns with a Toeplitz
    matrix of a chunk of the row's taps, T[i, j] = w[kw0 + i - j] (chunks of BLOCK_I - BLOCK_J + 1 taps, so any
    kernel width runs); BLOCK_R output rows make the product's M dimension and BLOCK_C channels its batch (a
    3-d ``tl.dot``). Each input element is loaded once per kernel row and chunk instead of once per tap; the
    products waste about BLOCK_I / chunk of the tensor-core work."""
    chunk = BLOCK_I - BLOCK_J + 1  # taps per product (a compile-time constant)
    n = tl.program_id(2).to(tl.int64)
    tiles_w = tl.cdiv(OW, BLOCK_J)
    oh0 = (tl.program_id(0) // tiles_w) * BLOCK_R
    ow0 = (tl.program_id(0) % tiles_w) * BLOCK_J
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c3 = c[:, None, None]
    c_ok = c3 < C_OUT
    r = tl.arange(0, BLOCK_R)
    i = tl.arange(0, BLOCK_I)
    j = tl.arange(0, BLOCK_J)
    lag = i[:, None] - j[None, :]  # which tap of the chunk links input column i to output column j
    lag_ok = (lag >= 0) & (lag < chunk)
    x_chan = x_ptr + n * sxn + (c3 // MULT).to(tl.int64) * sxc
    w_chan = w_ptr + c3 * (KH * KW)
    acc = tl.zeros((BLOCK_C, BLOCK_R, BLOCK_J), dtype=tl.float32)
    for kh in range(0, KH):
        ih = oh0 + r + kh - PAD_H
        x_rows = x_chan + (ih.to(tl.int64) * sxh)[None, :, None]
        row_ok = c_ok & (ih.to(tl.uint32) < tl.cast(H, tl.uint32))[None, :, None]
        for kw0 in range(0, KW, chunk):
            iw = ow0 + kw0 + i - PAD_W
            col_ok = iw.to(tl.uint32) < tl.cast(W, tl.uint32)
            a = tl.load(x_rows + (iw.to(tl.int64) * sxw)[None, None, :], mask=row_ok & col_ok[None, None, :], other=0.0)
            tap = kw0 + lag
            taps = tl.load(w_chan + kh * KW + tap[None, :, :], mask=c_ok & (lag_ok & (tap < KW))[None, :, :], other=0.0)
            acc = _toeplitz_dot(acc, a, taps, DOT_IN_FP32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c3, mask=c_ok, other=0.0).to(tl.float32)
    oh = oh0 + r
    ow = ow0 + j
    y_offset = (
        n * syn
        + c3.to(tl.int64) * syc
        + (oh.to(tl.int64) * syh)[None, :, None]
        + (ow.to(tl.int64) * syw)[None, None, :]
    )
    out_ok = c_ok & (oh < OH)[None, :, None] & (ow < OW)[None, None, :]
    tl.store(y_ptr + y_offset, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _grad_input_tap(
    acc, gy_row, w_tap, c_ok, row_ok, iw, kw, OW, sgw, STRIDE_W: tl.constexpr, PAD_W, DIL_W, EVEN_C: tl.constexpr
):  # fmt: skip
    """Adds the grad-output pixels that tap ``kw`` of the current kernel row maps onto the input pixels.
    ``gy_row``: each pixel's grad-output row; with stride 1 already at the pixel's column ``iw + PAD_W``, so
    that a tap adds a scalar offset (as in the forward)."""
    tw = iw + PAD_W - kw * DIL_W  # = ow·STRIDE_W for the output column that reads this input column
    if STRIDE_W == 1:
        ok = row_ok & (tw.to(tl.uint32) < tl.cast(OW, tl.uint32))  # one unsigned compare: 0 <= tw < OW
        gy = gy_row - kw * DIL_W * sgw
    else:
        ow = tw // STRIDE_W
        ok = row_ok & (tw >= 0) & (tw == ow * STRIDE_W) & (ow < OW)
        gy = gy_row + (ow.to(tl.int64) * sgw)[:, None]
    if EVEN_C:
        gv = tl.load(gy, mask=ok[:, None], other=0.0)
        wv = tl.load(w_tap)
    else:
        gv = tl.load(gy, mask=ok[:, None] & c_ok[None, :], other=0.0)
        wv = tl.load(w_tap, mask=c_ok, other=0.0)
    return acc + gv.to(acc.dtype) * wv.to(acc.dtype)[None, :]


@triton.jit
def depthwise_grad_input_kernel(
    gy_ptr,
    w_ptr,
    gx_ptr,
    C_IN,
    H,
    W,
    OH,
    OW,
    sgn,
    sgc,
    sgh,
    sgw,
    sxn,
    sxc,
    sxh,
    sxw,
    KH,
    KW,
    STRIDE_H: tl.constexpr,  # constants: the divisions by the stride below become shifts
    STRIDE_W: tl.constexpr,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    MULT,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TILE_W: tl.constexpr = 0,
    STATIC_KW: tl.constexpr = 0,
    EVEN_C: tl.constexpr = False,
):
    """Input gradient: for every input pixel, the output pixels that read it, over the m output channels of each
    input channel. ``EVEN_C``: every channel of the tile exists (no channel mask)."""
    n = tl.program_id(2).to(tl.int64)
    ih, iw, p_ok = _pixel_tile(tl.program_id(0), H, W, BLOCK_P, TILE_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C_IN
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    # stride 1: each pixel's grad-output column iw + PAD_W addressed once, per kernel row (else per tap)
    col = (iw + PAD_W).to(tl.int64) * sgw if STRIDE_W == 1 else tl.zeros_like(iw).to(tl.int64)
    for j in range(0, MULT):
        c_out = c * MULT + j
        gy_chan = gy_ptr + n * sgn + c_out.to(tl.int64)[None, :] * sgc
        for kh in range(0, KH):
            w_row = w_ptr + c_out * (KH * KW) + kh * KW
            th = ih + PAD_H - kh * DIL_H  # = oh·STRIDE_H for the output row that reads this input row
            if STRIDE_H == 1:
                oh = th
                row_ok = p_ok & (th.to(tl.uint32) < tl.cast(OH, tl.uint32))
            else:
                oh = th // STRIDE_H
                row_ok = p_ok & (th >= 0) & (th == oh * STRIDE_H) & (oh < OH)
            gy_row = gy_chan + (oh.to(tl.int64) * sgh + col)[:, None]
            if STATIC_KW > 0:  # the row's taps unrolled
                for kw in tl.static_range(STATIC_KW):
                    acc = _grad_input_tap(
                        acc, gy_row, w_row + kw, c_ok, row_ok, iw, kw, OW, sgw, STRIDE_W, PAD_W, DIL_W, EVEN_C
                    )
            else:
                for kw in range(0, KW):
                    acc = _grad_input_tap(
                        acc, gy_row, w_row + kw, c_ok, row_ok, iw, kw, OW, sgw, STRIDE_W, PAD_W, DIL_W, EVEN_C
                    )
    x_offset = n * sxn + c.to(tl.int64)[None, :] * sxc + (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None]
    tl.store(gx_ptr + x_offset, acc.to(gx_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def depthwise_grad_weight_kernel(
    x_ptr,
    gy_ptr,
    partial_ptr,
    N,
    H,
    W,
    C_OUT,
    OH,
    OW,
    OH_BLOCKS,
    GROUPS,
    sxn,
    sxc,
    sxh,
    sxw,
    sgn,
    sgc,
    sgh,
    sgw,
    KH,
    KW,
    STRIDE_H,
    STRIDE_W,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    MULT,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
    LOOP_TAPS: tl.constexpr = False,
    HAS_BIAS: tl.constexpr = True,
):
    """One program per (channel block, tap, split); with ``LOOP_TAPS`` one per (channel block, split) that
    walks every tap over its pixels. A split is ``GROUPS`` consecutive (image, block of BLOCK_P / BLOCK_W
    output rows) groups, walked BLOCK_W columns at a time: pixel indices need no per-pixel division. Taps
    KH·KW of them, plus with ``HAS_BIAS`` the bias's (grad-output alone): partial is (splits, C_OUT, taps)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    c_ok = c < C_OUT
    x_chan = x_ptr + (c // MULT).to(tl.int64)[None, :] * sxc
    gy_chan = gy_ptr + c.to(tl.int64)[None, :] * sgc
    if HAS_BIAS:  # noqa: SIM108 (a compile-time branch)
        taps = KH * KW + 1
    else:
        taps = KH * KW
    if LOOP_TAPS:
        for tap in range(0, taps):
            _grad_weight_tap(
                x_chan, gy_chan, partial_ptr, c, c_ok, tap, taps, split, N, H, W, C_OUT, OH, OW, OH_BLOCKS, GROUPS,
                sxn, sxh, sxw, sgn, sgh, sgw, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, ACC, BLOCK_P,
                BLOCK_C, BLOCK_W,
            )  # fmt: skip
    else:
        _grad_weight_tap(
            x_chan, gy_chan, partial_ptr, c, c_ok, tl.program_id(1), taps, split, N, H, W, C_OUT, OH, OW, OH_BLOCKS,
            GROUPS, sxn, sxh, sxw, sgn, sgh, sgw, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, ACC,
            BLOCK_P, BLOCK_C, BLOCK_W,
        )  # fmt: skip


@triton.jit
def _grad_weight_tap(
    x_chan, gy_chan, partial_ptr, c, c_ok, tap, taps, split, N, H, W, C_OUT, OH, OW, OH_BLOCKS, GROUPS, sxn, sxh, sxw,
    sgn, sgh, sgw, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """partial[split, c, tap] = sum over the split's pixels of grad-output x the tap's input (tap KH·KW:
    grad-output alone, the bias gradient); ``taps``: partial's row length."""
    p = tl.arange(0, BLOCK_P)
    row_in_block = p // BLOCK_W  # powers of two: shifts
    col_in_block = p % BLOCK_W
    kh = tap // KW
    kw = tap % KW
    first = split * GROUPS
    last = tl.minimum(first + GROUPS, N * OH_BLOCKS)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    if tap == KH * KW:  # the bias: grad-output summed
        for group in range(first, last):
            n = (group // OH_BLOCKS).to(tl.int64)
            oh = (group % OH_BLOCKS) * (BLOCK_P // BLOCK_W) + row_in_block
            gy_row = gy_chan + n * sgn + (oh.to(tl.int64) * sgh)[:, None]
            for ow0 in range(0, OW, BLOCK_W):
                ow = ow0 + col_in_block
                ok = (oh < OH) & (ow < OW)
                acc += tl.load(gy_row + (ow.to(tl.int64) * sgw)[:, None], mask=ok[:, None] & c_ok[None, :], other=0.0)
    else:
        for group in range(first, last):
            n = (group // OH_BLOCKS).to(tl.int64)
            oh = (group % OH_BLOCKS) * (BLOCK_P // BLOCK_W) + row_in_block
            ih = oh * STRIDE_H - PAD_H + kh * DIL_H
            row_ok = (oh < OH) & (ih.to(tl.uint32) < tl.cast(H, tl.uint32))
            gy_row = gy_chan + n * sgn + (oh.to(tl.int64) * sgh)[:, None]
            x_row = x_chan + n * sxn + (ih.to(tl.int64) * sxh)[:, None]
            for ow0 in range(0, OW, BLOCK_W):
                ow = ow0 + col_in_block
                iw = ow * STRIDE_W - PAD_W + kw * DIL_W
                ok = row_ok & (ow < OW) & (iw.to(tl.uint32) < tl.cast(W, tl.uint32))
                mask = ok[:, None] & c_ok[None, :]
                gv = tl.load(gy_row + (ow.to(tl.int64) * sgw)[:, None], mask=mask, other=0.0)
                xv = tl.load(x_row + (iw.to(tl.int64) * sxw)[:, None], mask=mask, other=0.0)
                acc += gv.to(ACC) * xv.to(ACC)
    total = tl.sum(acc, axis=0)
    out = partial_ptr + (split * C_OUT + c).to(tl.int64) * taps + tap
    tl.store(out, total, mask=c_ok)


@triton.jit
def depthwise_grad_weight_toeplitz_kernel(
    x_ptr,
    gy_ptr,
    partial_ptr,
    H,
    W,
    C_OUT,
    OH,
    OW,
    ROWS,
    ROWS_PER_SPLIT,
    sxn,
    sxc,
    sxh,
    sxw,
    sgn,
    sgc,
    sgh,
    sgw,
    KH,
    KW,
    PAD_H,
    PAD_W,
    MULT,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Stride-1, dilation-1 weight gradient on tensor cores (experimental, opt-in: ``Tiles.toeplitz``). Per
    channel, output row and BLOCK_J output columns, a BLOCK_KH x BLOCK_KW block of taps gains the product of
    the BLOCK_KH input rows those taps read (x BLOCK_I input columns) with a Toeplitz matrix of the grad-output
    row, G[i, q] = gy[ow0 + i - q]; BLOCK_C channels are the batch of a 3-d ``tl.dot``. A program takes a
    channel block, a tap block and ROWS_PER_SPLIT of the N·OH output rows and writes partial[split, c, tap]."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c3 = c[:, None, None]
    c_ok = c3 < C_OUT
    tap_blocks_w = tl.cdiv(KW, BLOCK_KW)
    kh0 = (tl.program_id(1) // tap_blocks_w) * BLOCK_KH
    kw0 = (tl.program_id(1) % tap_blocks_w) * BLOCK_KW
    split = tl.program_id(2)
    r = tl.arange(0, BLOCK_KH)
    i = tl.arange(0, BLOCK_I)
    q = tl.arange(0, BLOCK_KW)
    lag = i[:, None] - q[None, :]  # the output column (in the block) that links input column i to tap q
    lag_ok = (lag >= 0) & (lag < BLOCK_J)
    x_chan = x_ptr + (c3 // MULT).to(tl.int64) * sxc
    gy_chan = gy_ptr + c3.to(tl.int64) * sgc
    acc = tl.zeros((BLOCK_C, BLOCK_KH, BLOCK_KW), dtype=tl.float32)
    first = split * ROWS_PER_SPLIT
    last = tl.minimum(first + ROWS_PER_SPLIT, ROWS)
    for row in range(first, last):
        n = (row // OH).to(tl.int64)
        oh = row % OH
        ih = oh - PAD_H + kh0 + r
        x_rows = x_chan + n * sxn + (ih.to(tl.int64) * sxh)[None, :, None]
        rows_ok = c_ok & (ih.to(tl.uint32) < tl.cast(H, tl.uint32))[None, :, None]
        gy_row = gy_chan + n * sgn + oh.to(tl.int64) * sgh
        for ow0 in range(0, OW, BLOCK_J):
            iw = ow0 - PAD_W + kw0 + i
            col_ok = iw.to(tl.uint32) < tl.cast(W, tl.uint32)
            a_ok = rows_ok & col_ok[None, None, :]
            a = tl.load(x_rows + (iw.to(tl.int64) * sxw)[None, None, :], mask=a_ok, other=0.0)
            ow = ow0 + lag
            g_ok = c_ok & (lag_ok & (ow < OW))[None, :, :]
            g = tl.load(gy_row + (ow.to(tl.int64) * sgw)[None, :, :], mask=g_ok, other=0.0)
            acc = _toeplitz_dot(acc, a, g, DOT_IN_FP32)
    kh = kh0 + r
    kw = kw0 + q
    taps = (kh * KW)[None, :, None] + kw[None, None, :]
    out = partial_ptr + (split * C_OUT + c3).to(tl.int64) * (KH * KW) + taps
    tl.store(out, acc, mask=c_ok & (kh < KH)[None, :, None] & (kw < KW)[None, None, :])


@triton.jit
def separable_forward_kernel(
    x_ptr,
    dw_ptr,
    dwb_ptr,
    pw_ptr,
    pwb_ptr,
    y_ptr,
    sum_ptr,
    m2_ptr,
    scale_ptr,
    H,
    W,
    C_MID,
    C_OUT,
    OH,
    OW,
    sxn,
    sxc,
    sxh,
    sxw,
    syn,
    syc,
    syh,
    syw,
    KH,
    KW,
    STRIDE_H,
    STRIDE_W,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    MULT,
    HAS_DW_BIAS: tl.constexpr,
    HAS_PW_BIAS: tl.constexpr,
    MID_ACT: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    STATIC_KH: tl.constexpr = 0,
    STATIC_KW: tl.constexpr = 0,
    STATS: tl.constexpr = False,
    HAS_SCALE: tl.constexpr = False,
    FINALIZE: tl.constexpr = False,
    BLOCK_Q: tl.constexpr = 16,
    RUNNING: tl.constexpr = False,
    counter_ptr=None,
    mean_ptr=None,
    var_ptr=None,
    rm_ptr=None,
    rv_ptr=None,
    momentum_hi=None,
    momentum_lo=None,
):
    """Fused depthwise + (relu | relu6 | hardswish | silu | gelu) + pointwise: per block of mid channels, the
    depthwise tile is computed in registers (``ACC``), activated, rounded to the input dtype (as PyTorch's block
    would store it) and multiplied into the pointwise block with ``tl.dot``; the intermediate never reaches
    memory. ``STATS``: a statistics epilogue for a BatchNorm after the pointwise conv — per output channel, the
    sum of the tile's stored outputs and their squared deviations from the tile's mean (M2) at ``[n, pixel
    program, channel]`` of (N, P, C_OUT) buffers, as ``depthwise_moments_kernel`` stores them. ``HAS_SCALE``: the
    activated tile, rounded to x's dtype, times a per-image, per-channel scale (``scale_ptr``: (N, C_MID), x's
    dtype; squeeze-excitation) before the pointwise product. ``FINALIZE`` (with ``STATS``, one launch of the
    whole batch): the last program of each output block to finish combines the block's statistics, as
    ``finalize_moments_kernel`` would in a second launch (``RUNNING`` and the pointers after it as there;
    ``counter_ptr``: one zeroed int32 per output block)."""
    n = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    p_ok = p < OH * OW
    o_ok = o < C_OUT
    oh = p // OW
    ow = p % OW
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=ACC)
    for c0 in range(0, C_MID, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C_MID
        x_chan = x_ptr + n * sxn + (c // MULT).to(tl.int64)[None, :] * sxc
        mid = _depthwise_tile(
            x_chan, dw_ptr, c, c_ok, ih0, iw0, p_ok, H, W, sxh, sxw, KH, KW, DIL_H, DIL_W,
            ACC, BLOCK_P, BLOCK_C, STATIC_KH, STATIC_KW,
        )  # fmt: skip
        if HAS_DW_BIAS:
            mid += tl.load(dwb_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
        mid = _mid_activation(mid, MID_ACT)
        if HAS_SCALE:  # as PyTorch's block: the stored activation times the stored scale, rounded again below
            scale = tl.load(scale_ptr + n * C_MID + c, mask=c_ok, other=0.0).to(ACC)
            mid = mid.to(y_ptr.dtype.element_ty).to(ACC) * scale[None, :]
        pw = tl.load(pw_ptr + o[None, :] * C_MID + c[:, None], mask=c_ok[:, None] & o_ok[None, :], other=0.0)
        mid_rounded = mid.to(y_ptr.dtype.element_ty)  # what PyTorch's depthwise conv would have stored
        pw = pw.to(y_ptr.dtype.element_ty)
        if DOT_IN_FP32:  # same products (bf16 x bf16 is exact in fp32); works around the interpreter's bf16 dot
            acc += tl.dot(mid_rounded.to(tl.float32), pw.to(tl.float32), input_precision="ieee", out_dtype=ACC)
        else:
            acc += tl.dot(mid_rounded, pw, input_precision=PRECISION, out_dtype=ACC)
    if HAS_PW_BIAS:
        acc += tl.load(pwb_ptr + o, mask=o_ok, other=0.0).to(ACC)[None, :]
    y_offset = n * syn + o.to(tl.int64)[None, :] * syc + (oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None]
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_offset, out, mask=p_ok[:, None] & o_ok[None, :])
    if STATS:  # of the values stored (rounded to y's dtype), as a BatchNorm reading y would see them
        stored = out.to(ACC)
        count = tl.sum(p_ok.to(ACC), axis=0)
        total = tl.sum(tl.where(p_ok[:, None], stored, 0.0), axis=0)
        deviation = tl.where(p_ok[:, None], stored - (total / count)[None, :], 0.0)
        part = (n * tl.num_programs(0) + tl.program_id(0)) * C_OUT
        tl.store(sum_ptr + part + o, total, mask=o_ok)
        tl.store(m2_ptr + part + o, tl.sum(deviation * deviation, axis=0), mask=o_ok)
        if FINALIZE:
            programs = tl.num_programs(0) * tl.num_programs(2)
            if _last_program(counter_ptr, tl.program_id(1), programs):
                _finalize_channels(
                    o, o_ok, C_OUT, sum_ptr, m2_ptr, mean_ptr, var_ptr, None, None, None, None, None, None, rm_ptr,
                    rv_ptr, programs, tl.num_programs(0), OH * OW, OW, 1, None, momentum_hi, momentum_lo, ACC,
                    BLOCK_Q, BLOCK_O, 16, BLOCK_P, 0, False, False, False, False, RUNNING,
                )  # fmt: skip
