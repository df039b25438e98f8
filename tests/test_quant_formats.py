"""fastpeft.quant.formats against bitsandbytes itself: bytes, scales and dequantized values, bit for bit."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from fastpeft.quant import formats as F  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_dynamo():
    # bitsandbytes' odd-shape CPU dequantization goes through torch.compile: seconds per shape.
    # Eager gives the same values.
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def _weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[::97] *= 40  # outliers: absmax far from the typical value
    if w.numel() > 200:
        w.view(-1)[64:128] = 0  # an all-zero block
    return w.to(dtype)


def test_codes_match_bnb():
    assert torch.equal(F.dynamic_code(), BF.create_dynamic_map().float())
    assert torch.equal(F.code_4bit("nf4"), BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(F.code_4bit("fp4"), BF.get_4bit_type("fp4", device="cpu"))


@pytest.mark.parametrize("n", [256, 1000, 256 * 9 + 13, 70000])
def test_blockwise_8bit_matches_bnb(n):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 3
    q1, s1 = BF.quantize_blockwise(a, blocksize=256)
    q2, a2 = F.quantize_blockwise_8bit(a, F.dynamic_code(), 256)
    assert torch.equal(q1, q2) and torch.equal(s1.absmax, a2)
    assert torch.equal(BF.dequantize_blockwise(q1, s1), F.dequantize_blockwise_8bit(q2, a2, F.dynamic_code(), 256))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(96, 128), (77, 128), (33, 63), (5, 7), (300, 520)])
def test_4bit_matches_bnb(shape, quant_type, double_quant, dtype):
    w = _weights(shape, dtype)
    p1, s1 = BF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    p2, s2 = F.quantize_4bit(w, quant_type, 64, double_quant)
    assert p2.dtype == torch.uint8 and p2.shape == p1.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(p1, p2), "packed bytes differ"
    assert torch.equal(s1.absmax, s2.absmax)
    assert s2.shape == s1.shape and s2.dtype == s1.dtype and s2.blocksize == s1.blocksize
    if double_quant:
        assert torch.equal(s1.offset, s2.offset)
        assert torch.equal(s1.state2.absmax, s2.state2.absmax)
        assert torch.equal(s1.state2.code, s2.state2.code) and s2.state2.blocksize == s1.state2.blocksize
    else:
        assert not s2.nested
    for out_dtype in DTYPES:  # dequantization to every dtype, from bnb's and from our state
        s1.dtype = out_dtype
        want = BF.dequantize_4bit(p1, s1)
        assert torch.equal(F.dequantize_4bit(p2, s2, out_dtype), want)
        assert torch.equal(F.dequantize_4bit(p1, F.QuantState4bit.from_bnb(s1)), want)
    # our state converts to a bnb QuantState that bnb dequantizes identically
    assert torch.equal(BF.dequantize_4bit(p2, s2.to_bnb()), F.dequantize_4bit(p2, s2))


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_4bit_other_blocksizes(blocksize):
    w = _weights((64, 256), torch.float16, seed=3)
    p1, s1 = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    p2, s2 = F.quantize_4bit(w, "nf4", blocksize, True)
    assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax) and torch.equal(s1.state2.absmax, s2.state2.absmax)
    assert torch.equal(BF.dequantize_4bit(p1, s1), F.dequantize_4bit(p2, s2))


def test_4bit_quant_storage_matches_bnb():
    w = _weights((64, 128), torch.bfloat16, seed=4)
    p1, s1 = BF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
    p2, s2 = F.quantize_4bit(w, "nf4", 64, True, quant_storage=torch.bfloat16)
    assert p2.dtype == torch.bfloat16 and torch.equal(p1.view(torch.uint8), p2.view(torch.uint8))
    assert torch.equal(F.dequantize_4bit(p2, s2), BF.dequantize_4bit(p1, s1))


def test_4bit_bad_arguments():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="quant_type"):
        F.quantize_4bit(w, "int4")
    with pytest.raises(ValueError, match="blocksize"):
        F.quantize_4bit(w, "nf4", blocksize=48)
    with pytest.raises(ValueError, match="float"):
        F.quantize_4bit(w.double(), "nf4")


@pytest.mark.parametrize("dtype", DTYPES)
def test_8bit_matches_bnb_int8params(dtype):
    lin = torch.nn.Linear(72, 40).to(dtype)
    with torch.no_grad():
        lin.weight[3] = 0  # an all-zero row
        lin.weight[5, 7] = 9.0  # an outlier
    ref = bnb.nn.Linear8bitLt(72, 40, has_fp16_weights=False)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")  # Int8Params quantizes here
    cb, scb = F.quantize_8bit_rowwise(lin.weight)
    assert cb.dtype == torch.int8 and scb.dtype == torch.float32
    assert torch.equal(ref.weight.data, cb) and torch.equal(ref.weight.SCB, scb)
    # bitsandbytes' int8_vectorwise_dequant multiplies in another order: equal to one rounding
    torch.testing.assert_close(F.dequantize_8bit(cb, scb, torch.float32), BF.int8_vectorwise_dequant(cb, scb),
                               rtol=2e-7, atol=0)
    # bitsandbytes' fp path (training on CPU) multiplies by exactly our dequantized weight
    ref.train()
    x = torch.randn(3, 72, dtype=dtype)
    want = ref(x)
    got = torch.nn.functional.linear(x, F.dequantize_8bit(cb, scb, dtype), lin.bias.to(dtype))
    assert torch.equal(got, want)


def test_8bit_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        F.quantize_8bit_rowwise(torch.randn(4))
    with pytest.raises(ValueError, match="floating"):
        F.quantize_8bit_rowwise(torch.ones(2, 2, dtype=torch.int32))
