"""``fastpeft.quantize`` quantizes with bitsandbytes' own code on the model's device, so its layers
are byte for byte what Transformers' ``BitsAndBytesConfig`` makes of the same weights (CPU here;
the same test runs on CUDA tensors on a GPU machine)."""
import itertools

import pytest
import torch

import fastpeft

bnb = pytest.importorskip("bitsandbytes")
tf = pytest.importorskip("transformers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bytes(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _saved_llama(tmp_path, dtype):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False,
                         attention_bias=True)  # biases on q/k/v/o too
    tf.AutoModelForCausalLM.from_config(cfg).to(dtype).save_pretrained(tmp_path)
    return tmp_path


CASES = [(4, qt, dq) for qt, dq in itertools.product(("nf4", "fp4"), (True, False))] + [(8, None, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,quant_type,double_quant", CASES)
def test_quantize_equals_bitsandbytesconfig_byte_for_byte(tmp_path, dtype, bits, quant_type, double_quant):
    folder = _saved_llama(tmp_path, dtype)
    if bits == 4:
        qc = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant)
    else:
        qc = tf.BitsAndBytesConfig(load_in_8bit=True)
    theirs = tf.AutoModelForCausalLM.from_pretrained(folder, device_map=DEVICE, quantization_config=qc)
    ours = tf.AutoModelForCausalLM.from_pretrained(folder, device_map=DEVICE)
    kw = dict(quant_type=quant_type, double_quant=double_quant) if bits == 4 else {}
    fastpeft.quantize(ours, bits=bits, **kw)
    cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    n_theirs = sum(isinstance(m, cls) for m in theirs.modules())
    assert n_theirs == sum(isinstance(m, cls) for m in ours.modules()) == 14  # 7 projections x 2 layers; lm_head kept
    # compared before any forward: bitsandbytes' CPU forward may repack the weight in place
    s_ours, s_theirs = ours.state_dict(), theirs.state_dict()
    assert set(s_ours) == set(s_theirs)
    differ = [k for k, t in s_theirs.items()
              if s_ours[k].dtype != t.dtype or s_ours[k].shape != t.shape or not torch.equal(_bytes(s_ours[k]), _bytes(t))]
    assert differ == [], f"{len(differ)} tensors differ from BitsAndBytesConfig's, e.g. {differ[:4]}"
