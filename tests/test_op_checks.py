"""The operators' argument checks (fastpeft/ops/_checks.py): one per operator, run before a backend.

For every operator and every bad argument, every backend available here ("torch", "cpp",
"triton" in the interpreter on a CPU machine, see tests/conftest.py) raises the same
``ValueError`` with a message naming the operator, the argument, what was expected and what
was given; where the compiled operator (``native_*``, csrc/common.h) checks the same condition
its message says the same. The checks run before any kernel, so this file is fast even with
the Triton interpreter.
"""
import pytest
import torch

import fastpeft.ops as ops
from fastpeft import _ext
from fastpeft.ops import _checks
from fastpeft.quant import formats as QF

M, K, N, S, R = 3, 64, 6, 2, 4
V = 10  # embedding rows


def _linear_args():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    a, bt = torch.randn(S, R, K, generator=g), torch.randn(S, R, N, generator=g)
    sc, ts = torch.ones(S), torch.tensor([[1], [0], [-1]], dtype=torch.int32)
    return [x, w, b, a, bt, sc, ts, None, None, None]


def _embedding_args():
    g = torch.Generator().manual_seed(1)
    ids, w = torch.tensor([1, 4, 9]), torch.randn(V, N, generator=g)
    a, bt = torch.randn(S, R, V, generator=g), torch.randn(S, R, N, generator=g)
    return [ids, w, a, bt, torch.ones(S), torch.tensor([[1]], dtype=torch.int32)]


def _quant_args(fmt):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(N, K, generator=g)
    if fmt == 4:
        packed, st = QF.quantize_4bit(w, "nf4", 64, True)
        q = [packed, st.absmax, st.code, st.state2.absmax, st.state2.code, st.offset, N, 64, 256, None]
    else:
        q = list(QF.quantize_8bit_rowwise(w))
    rest = _linear_args()
    return [rest[0], *q, *rest[2:]]


OPS = {
    "adapter_linear": (torch.ops.fastpeft.adapter_linear, _linear_args),
    "adapter_embedding": (torch.ops.fastpeft.adapter_embedding, _embedding_args),
    "adapter_linear_4bit": (torch.ops.fastpeft.adapter_linear_4bit, lambda: _quant_args(4)),
    "adapter_linear_8bit": (torch.ops.fastpeft.adapter_linear_8bit, lambda: _quant_args(8)),
}
# argument positions
LIN = dict(x=0, weight=1, bias=2, lora_a=3, lora_b=4, slot_scales=5, token_slots=6, dora_scale=7, input_scale=8,
           output_scale=9)
EMB = dict(ids=0, weight=1, lora_a=2, lora_b=3, slot_scales=4, token_slots=5)
Q4 = dict(x=0, qweight=1, absmax=2, bias=11, lora_a=12, lora_b=13, slot_scales=14, token_slots=15, dora_scale=16,
          input_scale=17, output_scale=18)
Q8 = dict(x=0, qweight=1, row_scale=2, bias=3, lora_a=4, lora_b=5, slot_scales=6, token_slots=7, dora_scale=8,
          input_scale=9, output_scale=10)


def _set(**changes):
    """A case: argument name -> function of the valid argument list giving the bad value."""
    return changes


# (op, case id, {argument: bad value from the valid args}, expected message, same text as native_*)
CASES = [
    ("adapter_linear", "x-3d", _set(x=lambda a: a[0][None]), "x must be [M, K], got [1, 3, 64]", True),
    ("adapter_linear", "weight-1d", _set(weight=lambda a: a[1].reshape(-1)), f"weight must be [N, K], got [{N * K}]",
     True),
    ("adapter_linear", "weight-k", _set(weight=lambda a: a[1][:, :-1]),
     "weight must be [N, K] with K = x.size(1) = 64, got [6, 63]", True),
    ("adapter_linear", "bias", _set(bias=lambda a: a[2][:-1]), "bias must be [N] = [6], got [5]", True),
    ("adapter_linear", "input_scale", _set(input_scale=lambda a: torch.ones(K - 1)),
     "input_scale must be [K] or [M, K] with M = 3, K = 64, got [63]", True),
    ("adapter_linear", "output_scale", _set(output_scale=lambda a: torch.ones(2, N)),
     "output_scale must be [N] or [M, N] with M = 3, N = 6, got [2, 6]", True),
    ("adapter_linear", "lora_b-missing", _set(lora_b=lambda a: None),
     "lora_a and token_slots are given, so lora_b and slot_scales must be too", True),
    ("adapter_linear", "lora_a-k", _set(lora_a=lambda a: a[3][:, :, :-1]),
     "lora_a must be [S, R, K] with K = 64, got [2, 4, 63]", True),
    ("adapter_linear", "lora_b-n", _set(lora_b=lambda a: a[4][:, :, :-1]),
     "lora_b must be [S, R, N] = [2, 4, 6] (B transposed), got [2, 4, 5]", True),
    ("adapter_linear", "lora_b-dtype", _set(lora_b=lambda a: a[4].double()),
     "lora_a and lora_b must have the same dtype, got torch.float32 and torch.float64", False),
    ("adapter_linear", "lora-int", _set(lora_a=lambda a: a[3].long(), lora_b=lambda a: a[4].long()),
     "lora_a must be floating point, got torch.int64", False),
    ("adapter_linear", "slot_scales", _set(slot_scales=lambda a: torch.ones(S + 1)),
     "slot_scales must be [S] = [2], got [3]", True),
    ("adapter_linear", "token_slots-rows", _set(token_slots=lambda a: a[6][:2]),
     "token_slots must be [M, J] or [1, J] with M = 3, got [2, 1]", True),
    ("adapter_linear", "token_slots-float", _set(token_slots=lambda a: a[6].float()),
     "token_slots must be an integer tensor (int32), got torch.float32", False),
    ("adapter_linear", "dora_scale", _set(dora_scale=lambda a: torch.ones(S + 1, N - 1)),
     "dora_scale must be [S, N] = [2, 6], got [3, 5]", True),
    ("adapter_embedding", "weight-1d", _set(weight=lambda a: a[1].reshape(-1)), f"weight must be [V, D], got [{V * N}]",
     True),
    ("adapter_embedding", "ids-float", _set(ids=lambda a: a[0].float()), "ids must be integer, got torch.float32", False),
    ("adapter_embedding", "ids-2d", _set(ids=lambda a: a[0][None]), "ids must be [M] when adapters apply, got [1, 3]",
     True),
    ("adapter_embedding", "lora_a-v", _set(lora_a=lambda a: a[2][:, :, :-1]),
     "lora_a must be [S, R, V] with V = 10, got [2, 4, 9]", True),
    ("adapter_embedding", "lora_b-d", _set(lora_b=lambda a: a[3][:, :, :-1]),
     "lora_b must be [S, R, D] = [2, 4, 6] (B transposed), got [2, 4, 5]", False),
    ("adapter_embedding", "token_slots-rows", _set(token_slots=lambda a: torch.zeros(2, 1, dtype=torch.int32)),
     "token_slots must be [M, J] or [1, J] with M = 3, got [2, 1]", True),
    ("adapter_linear_4bit", "x-3d", _set(x=lambda a: a[0][None]), "x must be [M, K], got [1, 3, 64]", False),
    ("adapter_linear_4bit", "qweight-bytes", _set(qweight=lambda a: a[1][:-1]),
     "qweight holds 191 bytes, expected (N*K+1)//2 = 192 for N=6, K=64", False),
    ("adapter_linear_4bit", "absmax", _set(absmax=lambda a: a[2][:-1]),
     "absmax has 5 entries, expected ceil(N*K/blocksize) = 6", False),
    ("adapter_linear_4bit", "bias", _set(bias=lambda a: a[11][:-1]), "bias must be [N] = [6], got [5]", False),
    ("adapter_linear_4bit", "lora_b-n", _set(lora_b=lambda a: a[13][:, :, :-1]),
     "lora_b must be [S, R, N] = [2, 4, 6] (B transposed), got [2, 4, 5]", False),
    ("adapter_linear_8bit", "qweight-dtype", _set(qweight=lambda a: a[1].to(torch.uint8)),
     "qweight must be int8 [N, K], got torch.uint8 [6, 64]", False),
    ("adapter_linear_8bit", "qweight-k", _set(qweight=lambda a: a[1][:, :-1]),
     "qweight must be int8 [N, K] with K = x.size(1) = 64, got [6, 63]", False),
    ("adapter_linear_8bit", "row_scale", _set(row_scale=lambda a: a[2][:-1]), "row_scale must be [N] = [6], got [5]",
     False),
    ("adapter_linear_8bit", "dora_scale", _set(dora_scale=lambda a: torch.ones(S, N + 1)),
     "dora_scale must be [S, N] = [2, 6], got [2, 7]", False),
]
POSITIONS = {"adapter_linear": LIN, "adapter_embedding": EMB, "adapter_linear_4bit": Q4, "adapter_linear_8bit": Q8}


def _bad_args(op_name, changes):
    args = OPS[op_name][1]()
    valid = list(args)
    for name, bad in changes.items():
        args[POSITIONS[op_name][name]] = bad(valid)
    return args


def _error(fn, args) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args)
    return str(info.value)


@pytest.mark.parametrize("op_name", list(OPS))
def test_valid_arguments_pass(op_name):
    getattr(_checks, op_name)(*OPS[op_name][1]())


@pytest.mark.parametrize("op_name,case,changes,message,native_same", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_backend_raises_the_same_error(op_name, case, changes, message, native_same):
    op = OPS[op_name][0]
    args = _bad_args(op_name, changes)
    backends = ops.available_backends()
    assert "torch" in backends
    got = {}
    prev = ops.get_backend()
    try:
        for b in backends:
            ops.set_backend(b)
            got[b] = _error(op, args)
    finally:
        ops.set_backend(prev)
    assert set(got.values()) == {f"{op_name}: {message}"}, got
    assert _error(getattr(_checks, op_name), args) == f"{op_name}: {message}"


@pytest.mark.skipif(not _ext.available(), reason=f"fastpeft._C: {_ext.error}")
@pytest.mark.parametrize("op_name,case,changes,message,native_same",
                         [c for c in CASES if c[4]], ids=[f"{c[0]}-{c[1]}" for c in CASES if c[4]])
def test_messages_agree_with_the_compiled_operator(op_name, case, changes, message, native_same):
    """native_adapter_linear / native_adapter_embedding (csrc/common.h) say the same words."""
    native = getattr(torch.ops.fastpeft, f"native_{op_name}").default
    with pytest.raises(RuntimeError) as info:
        native(*_bad_args(op_name, changes))
    assert str(info.value).splitlines()[0] == f"native_{op_name}: {message}"


def test_no_adapter_applies_when_token_slots_is_empty():
    # J == 0: the adapter arguments are not looked at (as in every backend), even inconsistent ones
    args = _linear_args()
    args[4] = None
    args[6] = torch.empty(M, 0, dtype=torch.int32)
    _checks.adapter_linear(*args)
    torch.testing.assert_close(torch.ops.fastpeft.adapter_linear(*args), torch.nn.functional.linear(*args[:3]))


@pytest.mark.gpu
def test_device_mismatch():
    args = _linear_args()
    args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in args]
    bad = list(args)
    bad[4] = args[4].cpu()
    assert _error(torch.ops.fastpeft.adapter_linear, bad) == "adapter_linear: lora_b must be on cuda:0, got cpu"
    bad = list(args)
    bad[1] = args[1].cpu()
    assert _error(torch.ops.fastpeft.adapter_linear, bad) == "adapter_linear: x is on cuda:0 but weight on cpu"
