"""Tiny Transformers models built from configs (random weights, no download) for parity tests."""
import copy

import torch
import transformers as tf


def tiny(arch: str, seed: int = 0):
    """(model, make_inputs(batch, seq)) for arch in llama/opt/gpt2/roberta_tok/t5."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=96)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "llama_q":  # bitsandbytes' CPU kernels need widths that are multiples of its block (64)
        cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=96)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "opt":
        cfg = tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                           word_embed_proj_dim=32, max_position_embeddings=64)
        model = tf.OPTForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "roberta_tok":
        cfg = tf.RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=96, max_position_embeddings=80, num_labels=5)
        model = tf.RobertaForTokenClassification(cfg)
    elif arch == "t5":
        cfg = tf.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=96,
                          decoder_start_token_id=0)
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(arch)
    model.eval()

    def inputs(batch=2, seq=7, seed=1):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 90, (batch, seq), generator=g)
        kw = dict(input_ids=ids)
        if arch == "t5":
            kw["decoder_input_ids"] = torch.randint(3, 90, (batch, 5), generator=g)
        return kw

    return model, inputs


def logits(model, kw):
    with torch.no_grad():
        out = model(**kw)
    return out.logits if hasattr(out, "logits") else out[0]


def randomize_adapters(model, seed=3, scale=0.2):
    """Give every adapter tensor random values (fresh adapters are often a no-op by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in ("lora_", "ia3_l", "modules_to_save")):
                if "lora_magnitude_vector" in n or "ia3_l" in n:
                    p.copy_(p + scale * torch.randn(p.shape, generator=g).to(p.dtype))
                else:
                    p.copy_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def fresh_copy(model):
    return copy.deepcopy(model)
