"""Triton kernels of ``field_matmul`` on CUDA (imported lazily by ``slip_vllm.core.field``).

One GEMM kernel computes, for a tile of BLOCK_M output channels x BLOCK_T tokens,
    acc_j = W_tile . d_j^T      (int8 x int8 -> int32 on the tensor cores, one product per limb)
for the L balanced limbs d_j = byte_j(x) - 128 of the masked activations, reading each weight tile
once from memory for all limbs, and in its epilogue recombines sum_j 256^j acc_j in int64, adds
the per-channel correction and reduces mod p.  The exactness argument is in ``field.py``: for
L <= 5 (p <= 2^40) the recombination needs no intermediate reduction; for L = 6 (p < 2^48) the
Horner value of limbs 5..1 (|.| < 2^62.01) is reduced mod p once before the last limb is added,
and split-K partials are reduced to [0, p) before the finalizer adds them.  The weight is
``FieldWeight.w8``: the int8 W_q, or the stacked digit planes [W_hi | W_lo] of an int16 W_q, which
``field.field_matmul`` multiplies with x' = [(256 x) mod p | x].

Three ways to feed the limbs (``KernelConfig.mode``):
* "fused": the kernel loads X~ as int64 and splits it into limbs in registers on the fly
  (low word XOR 0x80808080 gives limbs 0..3 as its bytes, the high word XOR 0x8080 limbs 4, 5);
* "planes": a memory-bound pre-pass writes the limb planes int8 [L, T, n] once (5 bytes per
  element instead of 8, and no integer work in the GEMM's inner loop), then the GEMM runs one
  product per limb;
* "stacked": the same planes, but limbs 0..3 of a token tile are stacked along the product's N
  dimension, so one wide product (and one read of the weight tile from shared memory) serves
  four limbs; limbs 4 and 5 get one more product each.
The operands are in the layout that int8 tensor-core products want: W [m, n] and the limbs
[T, n] both K-contiguous ("second operand column-major").  Small T uses split-K so that enough
thread blocks stream the weight; the partial int64 sums are added and reduced by a second kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

@triton.jit
def _split_limbs_kernel(X, XL, numel, plane, L: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0)
    lo = x.to(tl.int32) ^ -2139062144
    tl.store(XL + offs, lo.to(tl.int8), mask=mask)
    if L > 1:
        tl.store(XL + plane + offs, (lo >> 8).to(tl.int8), mask=mask)
    if L > 2:
        tl.store(XL + 2 * plane + offs, (lo >> 16).to(tl.int8), mask=mask)
    if L > 3:
        tl.store(XL + 3 * plane + offs, (lo >> 24).to(tl.int8), mask=mask)
    if L > 4:
        hi = (x >> 32).to(tl.int32) ^ 32896
        tl.store(XL + 4 * plane + offs, hi.to(tl.int8), mask=mask)
        if L > 5:
            tl.store(XL + 5 * plane + offs, (hi >> 8).to(tl.int8), mask=mask)


@triton.jit
def _mod_p(t, p, inv_p):
    """t mod p in [0, p) for int64 |t| < 2^63: two float64 quotient estimates, then exact fix-ups
    (cheaper than a 64-bit integer division; every step is exact in int64)."""
    q = (t.to(tl.float64) * inv_p).to(tl.int64)
    r = t - q * p  # |r| <= |t| * 2^-50 + p
    q = (r.to(tl.float64) * inv_p).to(tl.int64)
    r = r - q * p  # |r| <= 2p
    r = tl.where(r < 0, r + p, r)
    r = tl.where(r < 0, r + p, r)
    r = tl.where(r >= p, r - p, r)
    return r


@triton.jit
def _field_gemm_kernel(
    X, W, OUT, OFF,
    T, M, N, p,
    stride_xt, stride_xl, stride_wm, stride_ot, stride_os,
    K_PER_SPLIT,
    L: tl.constexpr, MODE: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SLOTS: tl.constexpr,
):
    # MODE 0 (fused): X is int64 [T, n], split into limbs in registers.
    # MODE 1 (planes): X is int8 limb planes [L, T, n]; one tensor-core product per limb.
    # MODE 2 (stacked): the same planes; limbs 0..SLOTS-1 of BLOCK_T tokens are stacked along the
    #   product's N dimension (one wide product, W tile read from shared memory once for them),
    #   limb 4 (if L = 5) in a second product.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    inv_p = 1.0 / p.to(tl.float64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_t = tl.cdiv(T, BLOCK_T)
    in_group = GROUP_M * num_t
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_size)
    pid_t = (pid % in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_t = offs_t < T
    k0 = pid_k * K_PER_SPLIT
    w_ptrs = W + offs_m[:, None] * stride_wm + (k0 + offs_k)[None, :]
    x_ptrs = X + offs_t[:, None] * stride_xt + (k0 + offs_k)[None, :]
    # stacked rows: row r holds limb r // BLOCK_T of token r % BLOCK_T
    rows = tl.arange(0, SLOTS * BLOCK_T)
    slot = rows // BLOCK_T
    tok = pid_t * BLOCK_T + rows % BLOCK_T
    mask_s = (tok < T) & (slot < L)
    s_ptrs = X + slot[:, None] * stride_xl + tok[:, None] * stride_xt + (k0 + offs_k)[None, :]

    acc0 = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.int32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.int32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.int32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.int32)
    acc4 = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.int32)
    acc5 = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.int32)
    accs = tl.zeros((BLOCK_M, SLOTS * BLOCK_T), dtype=tl.int32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        if EVEN_K:
            wmask = mask_m[:, None]
            xmask = mask_t[:, None]
            smask = mask_s[:, None]
        else:
            kmask = (k0 + kk + offs_k) < N
            wmask = mask_m[:, None] & kmask[None, :]
            xmask = mask_t[:, None] & kmask[None, :]
            smask = mask_s[:, None] & kmask[None, :]
        w = tl.load(w_ptrs, mask=wmask, other=0)
        if MODE == 0:
            x = tl.load(x_ptrs, mask=xmask, other=0)
            lo = x.to(tl.int32) ^ -2139062144
            acc0 = tl.dot(w, tl.trans(lo.to(tl.int8)), acc0, out_dtype=tl.int32)
            if L > 1:
                acc1 = tl.dot(w, tl.trans((lo >> 8).to(tl.int8)), acc1, out_dtype=tl.int32)
            if L > 2:
                acc2 = tl.dot(w, tl.trans((lo >> 16).to(tl.int8)), acc2, out_dtype=tl.int32)
            if L > 3:
                acc3 = tl.dot(w, tl.trans((lo >> 24).to(tl.int8)), acc3, out_dtype=tl.int32)
            if L > 4:
                hi32 = (x >> 32).to(tl.int32) ^ 32896
                acc4 = tl.dot(w, tl.trans(hi32.to(tl.int8)), acc4, out_dtype=tl.int32)
                if L > 5:
                    acc5 = tl.dot(w, tl.trans((hi32 >> 8).to(tl.int8)), acc5, out_dtype=tl.int32)
        elif MODE == 1:
            d0 = tl.load(x_ptrs, mask=xmask, other=0)
            acc0 = tl.dot(w, tl.trans(d0), acc0, out_dtype=tl.int32)
            if L > 1:
                d1 = tl.load(x_ptrs + stride_xl, mask=xmask, other=0)
                acc1 = tl.dot(w, tl.trans(d1), acc1, out_dtype=tl.int32)
            if L > 2:
                d2 = tl.load(x_ptrs + 2 * stride_xl, mask=xmask, other=0)
                acc2 = tl.dot(w, tl.trans(d2), acc2, out_dtype=tl.int32)
            if L > 3:
                d3 = tl.load(x_ptrs + 3 * stride_xl, mask=xmask, other=0)
                acc3 = tl.dot(w, tl.trans(d3), acc3, out_dtype=tl.int32)
            if L > 4:
                d4 = tl.load(x_ptrs + 4 * stride_xl, mask=xmask, other=0)
                acc4 = tl.dot(w, tl.trans(d4), acc4, out_dtype=tl.int32)
            if L > 5:
                d5 = tl.load(x_ptrs + 5 * stride_xl, mask=xmask, other=0)
                acc5 = tl.dot(w, tl.trans(d5), acc5, out_dtype=tl.int32)
        else:
            ds = tl.load(s_ptrs, mask=smask, other=0)
            accs = tl.dot(w, tl.trans(ds), accs, out_dtype=tl.int32)
            if L > SLOTS:
                d4 = tl.load(x_ptrs + 4 * stride_xl, mask=xmask, other=0)
                acc4 = tl.dot(w, tl.trans(d4), acc4, out_dtype=tl.int32)
            if L > 5:
                d5 = tl.load(x_ptrs + 5 * stride_xl, mask=xmask, other=0)
                acc5 = tl.dot(w, tl.trans(d5), acc5, out_dtype=tl.int32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        s_ptrs += BLOCK_K

    # epilogue: sum_j 256^j acc_j (|.| < 2^62.01, exact in int64)
    if L > 5:
        # 6 limbs: t = sum_{j=1..5} 256^(j-1) acc_j (|t| < 2^62.01), reduced mod p, then 256 t + acc_0
        if MODE == 2:
            a3 = tl.reshape(accs, (BLOCK_M, SLOTS, BLOCK_T)).to(tl.int64)
            sl = tl.arange(0, SLOTS)
            sh = (tl.maximum(sl - 1, 0) * 8).to(tl.int64)
            t = tl.sum(tl.where((sl >= 1)[None, :, None], a3 << sh[None, :, None], 0), axis=1)
            a0 = tl.sum(tl.where((sl == 0)[None, :, None], a3, 0), axis=1)
        else:
            t = (acc1.to(tl.int64) + (acc2.to(tl.int64) << 8) + (acc3.to(tl.int64) << 16))
            a0 = acc0.to(tl.int64)
        t += (acc4.to(tl.int64) << 24) + (acc5.to(tl.int64) << 32)
        tot = (_mod_p(t, p, inv_p) << 8) + a0
    elif MODE == 2:
        a3 = tl.reshape(accs, (BLOCK_M, SLOTS, BLOCK_T))
        sh = (tl.arange(0, SLOTS) * 8).to(tl.int64)
        tot = tl.sum(a3.to(tl.int64) << sh[None, :, None], axis=1)
        if L > SLOTS:
            tot += acc4.to(tl.int64) << 32
    else:
        tot = acc0.to(tl.int64)
        if L > 1:
            tot += acc1.to(tl.int64) << 8
        if L > 2:
            tot += acc2.to(tl.int64) << 16
        if L > 3:
            tot += acc3.to(tl.int64) << 24
        if L > 4:
            tot += acc4.to(tl.int64) << 32
    out_ptrs = OUT + pid_k * stride_os + offs_t[None, :] * stride_ot + offs_m[:, None]
    omask = mask_m[:, None] & mask_t[None, :]
    if not PARTIAL:
        off = tl.load(OFF + offs_m, mask=mask_m, other=0)
        r = _mod_p(tot + off[:, None], p, inv_p)
        tl.store(out_ptrs, r, mask=omask)
    elif L > 5:
        tl.store(out_ptrs, _mod_p(tot, p, inv_p), mask=omask)  # the finalizer adds values below 2^48
    else:
        tl.store(out_ptrs, tot, mask=omask)


@triton.jit
def _finalize_kernel(P, OUT, OFF, numel, M, p, stride_s, split, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    inv_p = 1.0 / p.to(tl.float64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tot = tl.load(P + offs, mask=mask, other=0)
    for s in range(1, split):
        tot += tl.load(P + s * stride_s + offs, mask=mask, other=0)
    off = tl.load(OFF + offs % M, mask=mask, other=0)
    tl.store(OUT + offs, _mod_p(tot + off, p, inv_p), mask=mask)


MODES = {"fused": 0, "planes": 1, "stacked": 2}


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 128
    block_t: int = 64
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8
    split_k: int = 0  # 0: automatic (see _split_k)
    mode: str = "stacked"  # "fused" | "planes" | "stacked"

    def short(self) -> str:
        return (f"{self.mode[0].upper()}{self.block_m}x{self.block_t}x{self.block_k}"
                f"w{self.num_warps}s{self.num_stages}k{self.split_k}"
                + (f"g{self.group_m}" if self.group_m != 8 else ""))


# Candidates swept by ``benchmarks/bench_field_gemm.py --tune``.
_SHAPES = [
    (64, 16, 128, 4, 4), (64, 16, 256, 4, 3), (128, 16, 128, 4, 4),
    (64, 32, 128, 4, 4), (128, 32, 128, 8, 4), (256, 32, 128, 8, 3),
    (64, 64, 128, 4, 3), (128, 64, 128, 8, 3), (128, 64, 64, 8, 4),
]
CANDIDATES = [KernelConfig(bm, bt, bk, w, st, 8, 0, mode)
              for mode in ("stacked", "planes") for (bm, bt, bk, w, st) in _SHAPES]
CANDIDATES += [KernelConfig(64, 16, 128, 4, 4, 8, 0, "fused"), KernelConfig(128, 64, 64, 8, 4, 8, 0, "fused")]

_SM_COUNT = {}
_INDEX_LIMIT = 2**31 - 1  # largest element offset the kernels may form
_SMEM_BUDGET = 200 * 1024  # bytes of shared memory for the pipelined tiles (H100/H200: 227 KB a block)


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def pick_config(T: int, m: int, n: int) -> KernelConfig:
    """Default tile shapes by token count, from the H200 sweep (``bench_field_gemm.py --tune``):
    stacked limbs everywhere; small tiles with split-K for decode; 128x64 tiles for mid T (fewest
    re-reads of the limb planes); 64x32 tiles with one warpgroup for large T."""
    if T <= 16:
        return KernelConfig(64, 16, 256, 4, 3, 8, 0, "stacked")
    if T <= 512:
        return KernelConfig(128, 64, 128, 8, 3, 8, 0, "stacked")
    return KernelConfig(64, 32, 128, 4, 4, 8, 0, "stacked")


def _split_k(cfg: KernelConfig, T: int, m: int, n: int, sms: int) -> int:
    """Split-K factor: explicit, or (auto) enough to reach about two waves when the output tiles
    fill less than half the multiprocessors; a divisor of the K steps, each split >= 4 steps."""
    k_tiles = triton.cdiv(n, cfg.block_k)
    if cfg.split_k:
        return max(1, min(cfg.split_k, k_tiles))
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(T, cfg.block_t)
    if 2 * tiles > sms:
        return 1
    target = triton.cdiv(2 * sms, tiles)
    best = 1
    for d in range(1, min(target, k_tiles // 4) + 1):
        if k_tiles % d == 0:
            best = d
    return best


def split_limbs(x: torch.Tensor, L: int) -> torch.Tensor:
    """int64 [T, n] -> int8 limb planes [L, T, n] (limb j = byte_j(x) - 128)."""
    T, n = x.shape
    xl = torch.empty((L, T, n), dtype=torch.int8, device=x.device)
    numel = T * n
    BLOCK = 2048
    _split_limbs_kernel[(triton.cdiv(numel, BLOCK),)](x, xl, numel, numel, L=L, BLOCK=BLOCK, num_warps=4)
    return xl


def field_matmul_triton(x: torch.Tensor, fw, config: Optional[KernelConfig] = None) -> torch.Tensor:
    """(x @ fw.w8.T) mod fw.p for CUDA int64 x [T, fw.k]; returns int64 [T, m].

    x is what ``field.field_matmul`` hands the backends: the masked activations, or for an int16
    weight its x' = [(256 x) mod p | x] (width ``fw.k`` = 2n)."""
    T, n = x.shape
    m, L, p = fw.m, fw.L, fw.p
    w = fw.w8
    if L > 6 or w is None or n != fw.k:
        raise ValueError(f"field_matmul_triton: needs p < 2^48 and x of width {fw.k} (got L={L}, width {n})")
    off = fw.offset
    if T == 0:
        return torch.empty((0, m), dtype=torch.int64, device=x.device)
    cfg = config or pick_config(T, m, n)
    split = _split_k(cfg, T, m, n, _sm_count(x.device))
    # keep every element offset inside int32 (the kernels index with 32-bit arithmetic): chunk T
    rows = _INDEX_LIMIT // max(n * L, m * split)
    if rows < T:
        rows = max(1, rows)
        fixed = replace(cfg, split_k=split)
        return torch.cat([field_matmul_triton(x[i:i + rows], fw, fixed) for i in range(0, T, rows)])
    mode = MODES[cfg.mode]
    k_tiles = triton.cdiv(n, cfg.block_k)
    k_per = triton.cdiv(k_tiles, split) * cfg.block_k
    split = triton.cdiv(n, k_per)
    even_k = (n % cfg.block_k == 0) and (k_per * split == n)
    slots = 1 if L == 1 else (2 if L == 2 else 4)
    if mode == 0:
        xin, stride_xl, rows_per_t = x, 0, 8
    else:
        xin, stride_xl = split_limbs(x, L), T * n
        rows_per_t = L if mode == 1 else slots + max(0, L - slots)
    out = torch.empty((T, m), dtype=torch.int64, device=x.device)
    dst = out if split == 1 else torch.empty((split, T, m), dtype=torch.int64, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(T, cfg.block_t), split)
    # pipelined stages must fit in shared memory (int64 X tiles are 8 bytes an element)
    per_stage = cfg.block_k * (cfg.block_m + cfg.block_t * rows_per_t)
    stages = max(1, min(cfg.num_stages, _SMEM_BUDGET // per_stage))
    _field_gemm_kernel[grid](
        xin, w, dst, off, T, m, n, p,
        n, stride_xl, w.stride(0), m, T * m,
        k_per,
        L=L, MODE=mode, PARTIAL=split > 1, EVEN_K=even_k,
        BLOCK_M=cfg.block_m, BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        SLOTS=slots, num_warps=cfg.num_warps, num_stages=stages,
    )
    if split > 1:
        numel = T * m
        BLOCK = 1024
        _finalize_kernel[(triton.cdiv(numel, BLOCK),)](
            dst, out, off, numel, m, p, T * m, split, BLOCK=BLOCK, num_warps=4)
    return out
