"""Argument checks of the fastpeft operators: one function per operator, run for every backend.

The body of each routed operator (:mod:`fastpeft.ops._schema`) calls the function of the same
name here *before* it asks the registry for a backend, so a bad argument raises the same
``ValueError`` whichever backend was chosen ("torch", "cpp", "cuda" or "triton"). A message
names the operator, the argument, what was expected and what was given, e.g.::

    adapter_linear: lora_b must be [S, R, N] = [4, 16, 512] (B transposed), got [4, 16, 511]

The wording is that of the compiled operators' own checks (``csrc/common.h``: ``check_linear``
and ``check_lora``, which guard direct callers of ``fastpeft::native_*`` and C++ programs):
the same conditions in the same order, so the first error reported is the same one, and the
same text (``tests/test_op_checks.py``) except that dtypes read ``torch.float32`` here, a
tensor on the wrong device is named, and an embedding's lora_b is ``[S, R, D]``.

Checked (names as in ``_schema.py``: M rows, K in, N out, S slots, R padded rank, J adapters
per row; V, D for embeddings):

* ranks and sizes of every tensor argument against the contract;
* dtype kinds: adapters floating point and of one dtype, ``token_slots`` and ``ids`` integer;
* that every tensor is on the input's device (compared by ``Tensor.get_device()``, which tells
  the CPU from each CUDA device; devices it cannot tell apart are left to the backends).

Not checked here: values (a slot >= S: the CPU kernels raise while they scan the slots, the
reference raises an IndexError, the CUDA kernels treat it as "no adapter"; checking it would
need a device sync), and dtypes that one backend alone cannot compute (float64 in the Triton
kernels): those stay with that backend.

Cost (docs/perf-notes.md): ~1.8 us per decode call with adapters, ~0.7 us without, on the
2-core CPU, where each ``Tensor.shape`` read costs ~100 ns. The layers' eager fast path
(:mod:`fastpeft.ops.fastpath`) calls a backend without the operator body: a plan is made from
arguments that went through these checks and re-checks what can change between its calls (the
input's width).
"""
from __future__ import annotations

import torch
from torch import Tensor

_INTEGER_DTYPES = frozenset(
    d for d in (getattr(torch, n, None) for n in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                                                  "uint64"))
    if isinstance(d, torch.dtype)
)
_FLOAT_DTYPES = frozenset(d for d in vars(torch).values() if isinstance(d, torch.dtype) and d.is_floating_point)


def _dims(t: Tensor) -> str:
    """A shape as the C++ checks print it: ``[3, 16, 77]``."""
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _fail(op: str, what: str):
    raise ValueError(f"{op}: {what}")


def _same_device(op: str, name: str, t: Tensor, like: Tensor, dev: int) -> None:
    if t.get_device() != dev:
        _fail(op, f"{name} must be on {like.device}, got {t.device}")


def _vector(op: str, name: str, t: Tensor, n: int, n_name: str, like: Tensor, dev: int) -> None:
    """``t`` must be ``[n]`` (bias, row scales)."""
    shape = t.shape
    if len(shape) != 1 or shape[0] != n:
        _fail(op, f"{name} must be [{n_name}] = [{n}], got {_dims(t)}")
    _same_device(op, name, t, like, dev)


def _ia3_scale(op: str, name: str, t: Tensor, M: int, n: int, n_name: str, like: Tensor, dev: int) -> None:
    """An IA3 scale: ``[n]``, or ``[M, n]`` / ``[1, n]`` (one row for all rows)."""
    shape = t.shape
    if not ((len(shape) == 1 and shape[0] == n) or (len(shape) == 2 and shape[0] in (M, 1) and shape[1] == n)):
        _fail(op, f"{name} must be [{n_name}] or [M, {n_name}] with M = {M}, {n_name} = {n}, got {_dims(t)}")
    _same_device(op, name, t, like, dev)


def _lora(op: str, like: Tensor, dev: int, M: int, K: int, N: int, lora_a, lora_b, slot_scales, token_slots,
          dora_scale, k_name: str = "K", n_name: str = "N") -> None:
    """The low-rank arguments (``lora_a`` and ``token_slots`` given; nothing to check when
    ``token_slots`` is empty, as no adapter applies then):
    lora_a [S, R, K], lora_b [S, R, N] (B transposed), slot_scales [S], token_slots [M or 1, J]
    integer, dora_scale [S, N] | None; one floating dtype for lora_a and lora_b."""
    ts_shape = token_slots.shape
    if 0 in ts_shape:  # J == 0 (or no rows): no adapter applies, as in every backend
        return
    if lora_b is None or slot_scales is None:
        _fail(op, "lora_a and token_slots are given, so lora_b and slot_scales must be too")
    a_shape = lora_a.shape
    if len(a_shape) != 3 or a_shape[2] != K:
        _fail(op, f"lora_a must be [S, R, {k_name}] with {k_name} = {K}, got {_dims(lora_a)}")
    S, R = a_shape[0], a_shape[1]
    if lora_b.shape != (S, R, N):
        _fail(op, f"lora_b must be [S, R, {n_name}] = [{S}, {R}, {N}] (B transposed), got {_dims(lora_b)}")
    dt = lora_a.dtype
    if lora_b.dtype is not dt:
        _fail(op, f"lora_a and lora_b must have the same dtype, got {dt} and {lora_b.dtype}")
    if dt not in _FLOAT_DTYPES:
        _fail(op, f"lora_a must be floating point, got {dt}")
    sc_shape = slot_scales.shape
    if sc_shape != (S,) and (sc_shape or S != 1):  # [S], or a 0-dim tensor for one slot
        _fail(op, f"slot_scales must be [S] = [{S}], got {_dims(slot_scales)}")
    if len(ts_shape) != 2 or ts_shape[0] not in (1, M):
        _fail(op, f"token_slots must be [M, J] or [1, J] with M = {M}, got {_dims(token_slots)}")
    if token_slots.dtype not in _INTEGER_DTYPES:
        _fail(op, f"token_slots must be an integer tensor (int32), got {token_slots.dtype}")
    if lora_a.get_device() != dev or lora_b.get_device() != dev or slot_scales.get_device() != dev \
            or token_slots.get_device() != dev:
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("slot_scales", slot_scales),
                        ("token_slots", token_slots)):
            _same_device(op, name, t, like, dev)
    if dora_scale is not None:
        if dora_scale.shape != (S, N):
            _fail(op, f"dora_scale must be [S, {n_name}] = [{S}, {N}], got {_dims(dora_scale)}")
        _same_device(op, "dora_scale", dora_scale, like, dev)


def _x(op: str, x: Tensor) -> tuple[int, int]:
    shape = x.shape
    if len(shape) != 2:
        _fail(op, f"x must be [M, K], got {_dims(x)}")
    return shape[0], shape[1]


def _epilogue(op, x, dev, M, K, N, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale,
              output_scale) -> None:
    """What every linear operator checks after its weight: bias [N], the IA3 scales, the adapters."""
    if bias is not None and (bias.shape != (N,) or bias.get_device() != dev):
        _vector(op, "bias", bias, N, "N", x, dev)
    if input_scale is not None:
        _ia3_scale(op, "input_scale", input_scale, M, K, "K", x, dev)
    if output_scale is not None:
        _ia3_scale(op, "output_scale", output_scale, M, N, "N", x, dev)
    if lora_a is not None and token_slots is not None:
        _lora(op, x, dev, M, K, N, lora_a, lora_b, slot_scales, token_slots, dora_scale)


def adapter_linear(x, weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale):
    """Checks of ``adapter_linear``: x [M, K]; weight [N, K] on x's device; bias [N]; input_scale
    [K] | [M or 1, K]; output_scale [N] | [M or 1, N]; and, when adapters apply, lora_a
    [S, R, K], lora_b [S, R, N] (B transposed), slot_scales [S], token_slots [M or 1, J]
    integer, dora_scale [S, N]. Raises ``ValueError``; returns None.

    The hot one (every call that does not go through a fast-path plan): the helpers run only
    for the arguments that are present.
    """
    op = "adapter_linear"
    x_shape = x.shape
    if len(x_shape) != 2:
        _fail(op, f"x must be [M, K], got {_dims(x)}")
    M, K = x_shape
    w_shape = weight.shape
    if len(w_shape) != 2:
        _fail(op, f"weight must be [N, K], got {_dims(weight)}")
    if w_shape[1] != K:
        _fail(op, f"weight must be [N, K] with K = x.size(1) = {K}, got {_dims(weight)}")
    N = w_shape[0]
    dev = x.get_device()
    if weight.get_device() != dev:
        _fail(op, f"x is on {x.device} but weight on {weight.device}")
    _epilogue(op, x, dev, M, K, N, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale,
              output_scale)


def adapter_embedding(ids, weight, lora_a, lora_b, slot_scales, token_slots):
    """Checks of ``adapter_embedding``: weight [V, D]; ids integer (any shape without adapters,
    [M] with them); lora_a [S, R, V], lora_b [S, R, D] (B transposed), slot_scales [S],
    token_slots [M or 1, J] integer, all on weight's device. Raises ``ValueError``."""
    op = "adapter_embedding"
    w_shape = weight.shape
    if len(w_shape) != 2:
        _fail(op, f"weight must be [V, D], got {_dims(weight)}")
    if ids.dtype not in _INTEGER_DTYPES:
        _fail(op, f"ids must be integer, got {ids.dtype}")
    if lora_a is None or token_slots is None or token_slots.numel() == 0:
        return
    if ids.dim() != 1:
        _fail(op, f"ids must be [M] when adapters apply, got {_dims(ids)}")
    _lora(op, weight, weight.get_device(), ids.shape[0], w_shape[0], w_shape[1], lora_a, lora_b, slot_scales,
          token_slots, None, k_name="V", n_name="D")


def adapter_linear_4bit(x, qweight, absmax, code, nested_absmax, nested_code, nested_offset, out_features, blocksize,
                        nested_blocksize, compute_dtype, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale,
                        input_scale, output_scale):
    """Checks of ``adapter_linear_4bit``: x [M, K]; qweight holds ``(N*K+1)//2`` bytes (N =
    out_features); absmax has ``ceil(N*K/blocksize)`` entries; both on x's device; then bias,
    IA3 scales and adapters as :func:`adapter_linear`. Raises ``ValueError``."""
    op = "adapter_linear_4bit"
    M, K = _x(op, x)
    N = out_features
    nbytes = qweight.numel() * qweight.element_size()
    if nbytes != (N * K + 1) // 2:
        _fail(op, f"qweight holds {nbytes} bytes, expected (N*K+1)//2 = {(N * K + 1) // 2} for N={N}, K={K}")
    n_blocks = -(-N * K // blocksize)
    if absmax.numel() != n_blocks:
        _fail(op, f"absmax has {absmax.numel()} entries, expected ceil(N*K/blocksize) = {n_blocks}")
    dev = x.get_device()
    _same_device(op, "qweight", qweight, x, dev)
    _same_device(op, "absmax", absmax, x, dev)
    _epilogue(op, x, dev, M, K, N, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale,
              output_scale)


def adapter_linear_8bit(x, qweight, row_scale, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale,
                        output_scale):
    """Checks of ``adapter_linear_8bit``: x [M, K]; qweight int8 [N, K]; row_scale [N]; both on
    x's device; then bias, IA3 scales and adapters as :func:`adapter_linear`. Raises ``ValueError``."""
    op = "adapter_linear_8bit"
    M, K = _x(op, x)
    q_shape = qweight.shape
    if len(q_shape) != 2 or qweight.dtype != torch.int8:
        _fail(op, f"qweight must be int8 [N, K], got {qweight.dtype} {_dims(qweight)}")
    if q_shape[1] != K:
        _fail(op, f"qweight must be int8 [N, K] with K = x.size(1) = {K}, got {_dims(qweight)}")
    N = q_shape[0]
    dev = x.get_device()
    _same_device(op, "qweight", qweight, x, dev)
    _vector(op, "row_scale", row_scale, N, "N", x, dev)
    _epilogue(op, x, dev, M, K, N, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale,
              output_scale)
