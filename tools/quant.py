"""GGUF block formats -> onnxruntime MatMulNBits weights, exactly where the formats allow.

A linear weight W (N outputs, K inputs) becomes `QuantLinear`: integer codes (N, K), a scale per
block of 32 (N, K/32) and, for affine formats, a per-block additive minimum (N, K/32):

    W[n, k] = scale[n, b] * (codes[n, k] - zero_point) + minimum[n, b]      b = k // 32

MatMulNBits computes `x @ (scale * (codes - zero_point))^T` itself. The `minimum` term, which its
integer zero point cannot express, is added in the graph as `blocksum(x) @ minimum^T`, where
blocksum(x)[b] = sum of x over block b: exact, and ~16x faster than float zero points (measured).

Exact carry-overs (no re-quantization): Q4_0, Q4_1, Q8_0, and Q4_K (its 32-element sub-blocks are
affine 4-bit with scale d*sc and minimum -dmin*m). Everything else (F32/F16/BF16, Q5_K, Q6_K, and any
4-bit target from an 8-bit or float source) is dequantized with `gguf` and re-quantized here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # MatMulNBits block size shared by Q4_0/Q4_1/Q8_0 and Q4_K's sub-blocks


@dataclass(frozen=True)
class QuantLinear:
    """codes: (N, K) uint8; scale: (N, K//BLOCK) float32; minimum: (N, K//BLOCK) float32 or None."""

    codes: np.ndarray
    scale: np.ndarray
    minimum: np.ndarray | None
    bits: int
    zero_point: int  # MatMulNBits' default for `bits` when no zero_points input: 2**(bits-1)
    exact: bool  # True when carried over from the GGUF without re-quantization

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return int(n), int(k)

    def dequantize(self) -> np.ndarray:
        """(N, K) float32, for references and tests."""
        n, k = self.shape
        c = self.codes.astype(np.float32).reshape(n, k // BLOCK, BLOCK) - self.zero_point
        w = c * self.scale[:, :, None]
        if self.minimum is not None:
            w = w + self.minimum[:, :, None]
        out: np.ndarray = w.reshape(n, k).astype(np.float32)
        return out

    def permute_rows(self, order: np.ndarray) -> QuantLinear:
        """Reorders output features (rows); blocks run along K, so this is exact."""
        mn = None if self.minimum is None else self.minimum[order]
        return QuantLinear(self.codes[order], self.scale[order], mn, self.bits, self.zero_point, self.exact)

    def packed(self) -> np.ndarray:
        """MatMulNBits input B: (N, K//BLOCK, BLOCK*bits//8) uint8; element 2i in the low nibble of byte i."""
        n, k = self.shape
        if self.bits == 8:
            return self.codes.reshape(n, k // BLOCK, BLOCK).astype(np.uint8)
        c = self.codes.reshape(n, k // BLOCK, BLOCK // 2, 2)
        packed: np.ndarray = (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)
        return packed


def concat_rows(parts: list[QuantLinear]) -> QuantLinear:
    """Fuses linears that share an input (q|k|v, gate|up) into one MatMulNBits."""
    bits = {p.bits for p in parts}
    if len(bits) != 1:
        raise ValueError("cannot fuse linears with different bit widths")
    if len({p.zero_point for p in parts}) != 1:
        # Mixed zero points (e.g. Q4_0's 8 beside a re-quantized affine part): express every part as affine
        # with zero point 0, folding its zero point into the minimum; quant_linear shifts back later.
        parts = [_as_affine_zp0(p) for p in parts]
    zps = {p.zero_point for p in parts}
    affine = any(p.minimum is not None for p in parts)
    mins = [p.minimum if p.minimum is not None else np.zeros_like(p.scale) for p in parts]
    return QuantLinear(
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scale for p in parts]),
        np.concatenate(mins) if affine else None,
        bits.pop(),
        zps.pop(),
        all(p.exact for p in parts),
    )


def _as_affine_zp0(q: QuantLinear) -> QuantLinear:
    """scale*(c - z) + m == scale*c + (m - z*scale): the same weights with zero point 0."""
    base = q.minimum if q.minimum is not None else np.zeros_like(q.scale)
    minimum = (base - q.zero_point * q.scale).astype(np.float32)
    return QuantLinear(q.codes, q.scale, minimum, q.bits, 0, q.exact)


def _f16(raw: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 -> (...) float32 through little-endian float16."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF Q4 layout (..., 16) bytes -> (..., 32) codes: element j in qs[j] & 15, element j+16 in qs[j] >> 4."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def from_q4_0(raw: np.ndarray, n: int, k: int) -> QuantLinear:
    """Q4_0 block (18 bytes): d f16, 16 bytes of nibbles; w = d * (q - 8)."""
    b = raw.reshape(n, k // BLOCK, 18)
    return QuantLinear(_nibbles(b[..., 2:]).reshape(n, k), _f16(b[..., 0:2]), None, 4, 8, True)


def from_q4_1(raw: np.ndarray, n: int, k: int) -> QuantLinear:
    """Q4_1 block (20 bytes): d f16, m f16, 16 bytes of nibbles; w = d * q + m."""
    b = raw.reshape(n, k // BLOCK, 20)
    return QuantLinear(_nibbles(b[..., 4:]).reshape(n, k), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4, 0, True)


def from_q8_0(raw: np.ndarray, n: int, k: int) -> QuantLinear:
    """Q8_0 block (34 bytes): d f16, 32 int8; w = d * q. Stored as uint8 q + 128 (zero point 128)."""
    b = raw.reshape(n, k // BLOCK, 34)
    q = b[..., 2:].view(np.int8).astype(np.int16) + 128
    return QuantLinear(q.astype(np.uint8).reshape(n, k), _f16(b[..., 0:2]), None, 8, 128, True)


def _k4_scales_mins(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed bytes -> 8 six-bit scales and 8 six-bit mins (llama.cpp get_scale_min_k4)."""
    s = np.empty((*sc.shape[:-1], 8), np.uint8)
    m = np.empty_like(s)
    s[..., :4] = sc[..., 0:4] & 63
    m[..., :4] = sc[..., 4:8] & 63
    s[..., 4:] = (sc[..., 8:12] & 0x0F) | ((sc[..., 0:4] >> 6) << 4)
    m[..., 4:] = (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)
    return s, m


def from_q4_k(raw: np.ndarray, n: int, k: int) -> QuantLinear:
    """Q4_K super-block (144 bytes, 256 values): d f16, dmin f16, 12 bytes scales/mins, 128 bytes codes.

    Sub-block j (32 values) is w = d*sc_j*q - dmin*m_j: affine 4-bit with block 32, carried over exactly.
    Codes: 64-value groups g; values 0..31 of group g are the low nibbles of qs[32g:32g+32], 32..63 the high.
    """
    b = raw.reshape(n, k // 256, 144)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k4_scales_mins(b[..., 4:16])
    qs = b[..., 16:].reshape(n, k // 256, 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)
    scale = (d[..., None] * sc).reshape(n, k // BLOCK)
    minimum = (-(dmin[..., None] * mn)).reshape(n, k // BLOCK)
    return QuantLinear(codes, scale.astype(np.float32), minimum.astype(np.float32), 4, 0, True)


def quantize_affine4(w: np.ndarray) -> QuantLinear:
    """Float (N, K) -> 4-bit affine per block of 32 (min/max, like Q4_1). Re-quantizes: not exact."""
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    scale = (hi - lo) / 15.0
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.rint((blocks - lo[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
    return QuantLinear(q.reshape(n, k), scale.astype(np.float32), lo.astype(np.float32), 4, 0, False)


def quantize_sym8(w: np.ndarray) -> QuantLinear:
    """Float (N, K) -> symmetric 8-bit per block of 32 (absmax / 127, like Q8_0). Not exact."""
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
    scale = np.abs(blocks).max(axis=2) / 127.0
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.rint(blocks / safe[..., None]), -127, 127).astype(np.int16) + 128
    return QuantLinear(q.astype(np.uint8).reshape(n, k), scale.astype(np.float32), None, 8, 128, False)


def widen_to_8bit(q: QuantLinear) -> QuantLinear:
    """Exact 4-bit -> 8-bit container (same scale/minimum; codes shifted to the 8-bit zero point)."""
    if q.bits == 8:
        return q
    minimum, zp = q.minimum, q.zero_point
    if minimum is not None and zp == 0:
        # Centre affine codes (0..15 -> -8..7) and move 8*scale into the minimum: int8-activation kernels
        # then multiply smaller, zero-mean codes, which measurably lowers their rounding error.
        minimum, zp = (minimum + 8.0 * q.scale).astype(np.float32), 8
    codes = (q.codes.astype(np.int16) - zp + 128).astype(np.uint8)
    return QuantLinear(codes, q.scale, minimum, 8, 128, q.exact)
