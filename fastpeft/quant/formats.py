"""bitsandbytes' weight formats in pure PyTorch: 4-bit NF4/FP4 (+ nested absmax) and LLM.int8.

Everything here reproduces what ``bitsandbytes`` 0.50 stores and computes on the CPU, bit for
bit (``tests/test_quant_formats.py`` checks it against the installed ``bitsandbytes``):

4-bit (``bnb.nn.Linear4bit`` / ``Params4bit``)
    * The weight ``W [N, K]`` is flattened row-major (element ``e = n * K + k``) and cut into
      blocks of ``blocksize`` (default 64) consecutive elements; the last block may be short.
    * Per block ``absmax[b] = max |W|`` (float32); each element is scaled to ``[-1, 1]`` by
      ``w * (1 / absmax)`` (the short last block divides) and rounded to the nearest of the 16
      code values (``NF4_CODE`` / ``FP4_CODE``; ties go to the lower code).
    * Two 4-bit indices per byte: element ``2i`` in the high nibble, ``2i + 1`` in the low one;
      an odd element count is padded with the code of 0.0. Storage shape ``[(N*K + 1) // 2, 1]``
      (``uint8``, or the same bytes viewed as ``quant_storage``).
    * Double quantization (``compress_statistics=True``): ``offset = absmax.mean()``, then
      ``absmax - offset`` is quantized blockwise (blocks of 256) to 8 bits with bitsandbytes'
      signed "dynamic" code (``dynamic_code()``): ``absmax_q`` (uint8) plus one float32 scale
      per 256 blocks. Dequantized: ``absmax = dynamic[absmax_q] * absmax2[b // 256] + offset``.
    * Dequantize: ``W = (code[nibble] * absmax[block]).to(dtype)`` computed in float32.

8-bit (``bnb.nn.Linear8bitLt`` / ``Int8Params``, LLM.int8)
    * ``SCB[n] = max_k |W[n, k]|`` of the float16 weight (float32), ``CB = round(W * 127 / SCB)``
      as int8 (round half to even).
    * Dequantize: ``W = (CB * (SCB / 127)).to(dtype)`` (computed in float32; the same
      expression bitsandbytes' fp path ``MatMul8bitFp`` uses).

Where bitsandbytes' own results depend on the device: its CUDA 4-bit quantizer uses a
decision tree with the same midpoints (same results except at exact midpoints), its CUDA 8-bit
blockwise quantizer (for the nested absmax) searches the code directly instead of through the
CPU's 65536-entry table, so a weight quantized on a GPU can differ from one quantized here in
the last bit of a few nested-absmax codes. Dequantization reads whatever is stored, so weights
from either device load and dequantize exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, lru_cache

import torch
from torch import Tensor

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "QuantState4bit",
    "NestedState",
    "code_4bit",
    "dynamic_code",
    "quantize_4bit",
    "dequantize_4bit",
    "dequantize_absmax",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "quantize_8bit_rowwise",
    "dequantize_8bit",
    "FLOAT_DTYPES",
    "BLOCKSIZES_4BIT",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# bitsandbytes accepts these 4-bit block sizes (bnb.functional.quantize_4bit)
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bnb quantizes the absmax in blocks of 256 (and only supports that in matmul)

# NF4: quantiles of N(0, 1) (QLoRA), in index order. Stored as float32, as bitsandbytes does.
_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2), index order, normalised by its max (12).
_FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]

NF4_CODE = torch.tensor(_NF4, dtype=torch.float32)
FP4_CODE = torch.tensor(_FP4, dtype=torch.float32) / 12.0


def code_4bit(quant_type: str, device=None) -> Tensor:
    """The 16-entry lookup table of ``quant_type`` ("nf4" or "fp4"), float32, on ``device``."""
    if quant_type == "nf4":
        code = NF4_CODE
    elif quant_type == "fp4":
        code = FP4_CODE
    else:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return code.to(device) if device is not None else code.clone()


@cache
def _bounds_4bit(quant_type: str):
    """Midpoints between the sorted code values and the map sorted position -> code index."""
    code = code_4bit(quant_type)
    # Stable sort: FP4 holds both +0 and -0; the stable order puts index 0 (+0) first, which
    # is what bitsandbytes' torch.argsort produces for this table.
    order = torch.sort(code, stable=True).indices
    srt = code[order]
    mid = (srt[:-1] + srt[1:]) / 2
    return mid, order


@cache
def _dynamic_code_cpu() -> Tensor:
    # bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for
    # exponent i = 0..6, the 2**i midpoints of linspace(0.1, 1, 2**i + 1) (float32) scaled by
    # 10**(i - 6), with both signs (254 values), plus 0 and 1.0: 256 values, sorted.
    data: list[float] = []
    non_sign_bits, max_exp = 7, 7
    for i in range(max_exp):
        n_frac = int(2 ** (i + non_sign_bits - max_exp) + 1)
        bnd = torch.linspace(0.1, 1, n_frac, dtype=torch.float32)
        means = (bnd[:-1] + bnd[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 256
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_code(device=None) -> Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (256 float32 values) used for the nested absmax."""
    code = _dynamic_code_cpu()
    return code.to(device) if device is not None else code.clone()


@lru_cache(maxsize=8)
def _lut_8bit(code_bytes: bytes) -> Tensor:
    # bitsandbytes' CPU 8-bit blockwise quantizer (0.50): the normalised value v in [-1, 1] is
    # mapped to one of 65536 bins, int((v + 1) * 0.5 * 65535 + 0.5), and a table gives each
    # bin the index of the first code whose upper midpoint is >= the bin's left value.
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    mid = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(65536, dtype=torch.float32)
    val = -1.0 + (2.0 * i) / 65535.0
    return torch.searchsorted(mid, val, right=False).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# 4-bit
# ---------------------------------------------------------------------------------------------


@dataclass
class NestedState:
    """The 8-bit quantization of the (offset-subtracted) 4-bit absmax."""

    absmax: Tensor  # float32 [ceil(n_blocks / blocksize)]
    code: Tensor  # float32 [256] (bitsandbytes' dynamic code)
    blocksize: int = NESTED_BLOCKSIZE
    dtype: torch.dtype = torch.float32


@dataclass
class QuantState4bit:
    """What is needed to dequantize a 4-bit weight; field names follow ``bnb.functional.QuantState``.

    absmax: float32 [n_blocks], or uint8 [n_blocks] when ``state2`` (nested) is set.
    shape: the original weight shape ``(N, K)``. dtype: the original weight dtype.
    code: float32 [16] lookup table. offset: float32 0-d tensor (nested only).
    """

    absmax: Tensor
    shape: torch.Size
    code: Tensor
    blocksize: int
    quant_type: str
    dtype: torch.dtype
    offset: Tensor | None = None
    state2: NestedState | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def to(self, device) -> QuantState4bit:
        s2 = None
        if self.state2 is not None:
            s2 = NestedState(self.state2.absmax.to(device), self.state2.code.to(device), self.state2.blocksize, self.state2.dtype)
        return QuantState4bit(
            self.absmax.to(device),
            self.shape,
            self.code.to(device),
            self.blocksize,
            self.quant_type,
            self.dtype,
            None if self.offset is None else self.offset.to(device),
            s2,
        )

    def to_bnb(self):
        """The equivalent ``bitsandbytes.functional.QuantState`` (requires bitsandbytes)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.state2 is not None:
            state2 = QuantState(
                absmax=self.state2.absmax,
                code=self.state2.code,
                blocksize=self.state2.blocksize,
                dtype=self.state2.dtype,
            )
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size(self.shape),
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )

    @classmethod
    def from_bnb(cls, qs) -> QuantState4bit:
        """Wrap a ``bitsandbytes.functional.QuantState`` (same tensors, no copy)."""
        state2 = None
        if getattr(qs, "nested", False) and qs.state2 is not None:
            state2 = NestedState(qs.state2.absmax, qs.state2.code, int(qs.state2.blocksize), qs.state2.dtype or torch.float32)
        code = qs.code if qs.code is not None else code_4bit(qs.quant_type, qs.absmax.device)
        return cls(
            absmax=qs.absmax,
            shape=torch.Size(qs.shape),
            code=code,
            blocksize=int(qs.blocksize),
            quant_type=qs.quant_type,
            dtype=qs.dtype,
            offset=qs.offset if state2 is not None else None,
            state2=state2,
        )


def _blockwise_absmax(flat: Tensor, blocksize: int):
    """absmax per block of a flat float32 tensor and the index where the short last block starts."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    absmax = flat[:full].reshape(-1, blocksize).abs().amax(dim=1)
    if rem:
        absmax = torch.cat([absmax, flat[full:].abs().amax().reshape(1)])
    return absmax, full


def quantize_blockwise_8bit(A: Tensor, code: Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE):
    """bitsandbytes' CPU 8-bit blockwise quantization of a float32 tensor.

    Returns ``(q uint8 [A.shape], absmax float32 [n_blocks])``; ``code`` defaults to
    :func:`dynamic_code`. Dequantized: ``code[q] * absmax[block]``.
    """
    if code is None:
        code = dynamic_code(A.device)
    flat = A.reshape(-1).float()
    n = flat.numel()
    absmax, _ = _blockwise_absmax(flat, blocksize)
    lut = _lut_8bit(code.detach().float().cpu().contiguous().numpy().tobytes()).to(A.device)
    n_blocks = absmax.numel()
    pad = n_blocks * blocksize - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(n_blocks, blocksize)
    inv = 1.0 / absmax
    v = (blocks * inv.unsqueeze(1)).clamp(-1.0, 1.0)
    t = ((v + 1.0) * 0.5) * 65535.0 + 0.5
    idx = torch.nan_to_num(t, nan=0.0).to(torch.int32).clamp_(0, 65535)
    q = lut[idx.long()]
    q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n].reshape(A.shape), absmax


def dequantize_blockwise_8bit(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int = NESTED_BLOCKSIZE) -> Tensor:
    """``code[q] * absmax[block]`` in float32 (bitsandbytes' dequantize_blockwise)."""
    flat = code.float()[q.reshape(-1).long()]
    n = flat.numel()
    n_blocks = absmax.numel()
    pad = n_blocks * blocksize - n
    out = torch.nn.functional.pad(flat, (0, pad)).view(n_blocks, blocksize) * absmax.float().unsqueeze(1)
    return out.reshape(-1)[:n].reshape(q.shape)


def quantize_4bit(
    w: Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
):
    """Quantize ``w`` to bitsandbytes' 4-bit format.

    Returns ``(packed [(numel + 1) // 2, 1] quant_storage, QuantState4bit)``. Bit for bit what
    ``bnb.functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
    quant_type=quant_type, quant_storage=quant_storage)`` returns on the CPU.
    """
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize!r}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"4-bit quantization takes float16/bfloat16/float32 weights, got {w.dtype}")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    absmax, full = _blockwise_absmax(flat, blocksize)
    safe = absmax.clamp(min=1e-38)
    scaled = (flat[:full].reshape(-1, blocksize) * (1.0 / safe[: full // blocksize]).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:  # the short last block divides (as bitsandbytes does)
        scaled = torch.cat([scaled, (flat[full:] / safe[-1]).clamp(-1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    mid, order = _bounds_4bit(quant_type)
    mid, order = mid.to(w.device), order.to(w.device)
    q = torch.bucketize(scaled, mid, out_int32=True)
    if quant_type != "nf4":
        q = order[q.long()]
    q = q.to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze(1).view(quant_storage).unsqueeze(1)
    code = code_4bit(quant_type, w.device)
    if double_quant:
        offset = absmax.mean()
        qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset, dynamic_code(w.device), NESTED_BLOCKSIZE)
        state = QuantState4bit(
            absmax=qabsmax,
            shape=w.shape,
            code=code,
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=w.dtype,
            offset=offset,
            state2=NestedState(absmax2, dynamic_code(w.device), NESTED_BLOCKSIZE, torch.float32),
        )
    else:
        state = QuantState4bit(absmax=absmax, shape=w.shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=w.dtype)
    return packed, state


def dequantize_absmax(state: QuantState4bit) -> Tensor:
    """The float32 per-block absmax of a 4-bit state (undoing double quantization if nested)."""
    if state.state2 is None:
        return state.absmax.float()
    s2 = state.state2
    absmax = dequantize_blockwise_8bit(state.absmax, s2.absmax, s2.code, s2.blocksize)
    return (absmax + state.offset.float()).float()


def dequantize_4bit(packed: Tensor, state: QuantState4bit, dtype: torch.dtype | None = None) -> Tensor:
    """Dequantize bitsandbytes 4-bit storage to a ``state.shape`` tensor of ``dtype``.

    ``dtype`` defaults to ``state.dtype``. Equal bit for bit to ``bnb.functional.dequantize_4bit``
    on the CPU (computed in float32, rounded once to ``dtype``).
    """
    dtype = dtype or state.dtype
    shape = tuple(state.shape)
    n = 1
    for s in shape:
        n *= s
    b = packed.reshape(-1)
    if b.dtype != torch.uint8:
        b = b.view(torch.uint8)
    hi = (b >> 4).long()
    lo = (b & 0xF).long()
    idx = torch.stack([hi, lo], dim=1).reshape(-1)[:n]
    code = state.code.to(device=b.device, dtype=torch.float32)
    vals = code[idx]
    absmax = dequantize_absmax(state).to(b.device)
    bs = state.blocksize
    pad = absmax.numel() * bs - n
    out = torch.nn.functional.pad(vals, (0, pad)).view(-1, bs) * absmax.unsqueeze(1)
    return out.reshape(-1)[:n].reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# 8-bit (LLM.int8 row-wise)
# ---------------------------------------------------------------------------------------------


def quantize_8bit_rowwise(w: Tensor):
    """LLM.int8 row-wise quantization of a weight ``[N, K]`` as ``bnb.nn.Int8Params`` stores it.

    Returns ``(CB int8 [N, K], SCB float32 [N])``: the weight is cast to float16 first,
    ``SCB = max |W| per row``, ``CB = round(W * (127 / SCB))``; an all-zero row gives zeros.
    """
    if w.dim() != 2:
        raise ValueError(f"8-bit row-wise quantization takes a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"8-bit quantization takes a floating-point weight, got {w.dtype}")
    B = w.detach().contiguous().to(torch.float16)
    scb = B.abs().amax(dim=1).float()
    cb = torch.round(B * (127.0 / scb.unsqueeze(-1)))
    cb = torch.where((scb == 0).unsqueeze(-1), torch.zeros_like(cb), cb).to(torch.int8)
    return cb, scb


def dequantize_8bit(CB: Tensor, SCB: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``CB * (SCB / 127)`` per row, computed in float32 and rounded once to ``dtype``."""
    scale = SCB.float().unsqueeze(1).mul(1.0 / 127.0)
    return (CB.to(torch.float32) * scale).to(dtype)
