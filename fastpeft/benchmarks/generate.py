"""End-to-end greedy decoding speed: base model, merged weights, PEFT, and fastpeft.

The core of ``bench/bench_generate.py`` (its command line, CSV and plot) and of
``python -m fastpeft.demo``'s timing. A Llama-shaped model is built from a config (random
weights, no download); adapters are made with the peft library and saved in PEFT's format,
then timed as

* ``base``      the model without adapters (the floor)
* ``merged``    ``merge_and_unload()`` of one adapter (one adapter only: no mixed batches)
* ``peft``      ``peft.PeftModel`` (PEFT's unfused layers; mixed batches via ``adapter_names=``)
* ``optimize``  the same PEFT model after ``fastpeft.optimize`` (the one-line change)
* ``fastpeft``  ``fastpeft.PeftModel.from_pretrained`` + ``load_adapter``

for batch 1 and a batch of B rows with one adapter, and the B rows with N distinct adapters
(``mixed``: row i uses adapter i mod N). Each timing is a greedy ``generate`` of a fixed number
of new tokens with the KV cache; ``decode_ms`` is the time of one more token,
``(t(T) - t(1)) / (T - 1)``, the figure that matters for serving. Medians over ``repeats``, the
methods interleaved within each repeat (a busy machine slows all alike).

:func:`run` returns the rows (the columns of :mod:`fastpeft.benchmarks.results` this benchmark
sets, ``median_us`` = ``decode_ms`` in µs, and its own: batch, new_tokens, tokens_per_s,
decode_ms, decode_tokens_per_s, full_ms, and the time ratios vs_base / vs_peft of the decode
and, ``_e2e``, of the whole generate); a :class:`~fastpeft.benchmarks.results.Results` adds the
identifying columns and writes them. peft and transformers are imported when first needed.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
import warnings

import torch

from .results import dtype_name, sweep

METHODS = ("base", "merged", "peft", "optimize", "fastpeft")

# CPU default: hidden 512 / 4 layers / vocab 4096 (~19M parameters, fp32; every linear layer
# adapted); all methods, scenarios and repeats take ~1 minute on 2 cores. A 1024-wide model
# (--hidden 1024 --inter 2816 --heads 16 --kv-heads 4 --vocab 8192) takes ~3.5 minutes.
CPU_CONFIG = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096)
QUICK_CONFIG = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=2048)
# GPU default: TinyLlama-1.1B's shape
GPU_CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(config: dict, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0):
    """A Llama-shaped causal LM with random weights (seeded), in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(**config, max_position_embeddings=512, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).to(dtype=dtype, device=device).eval()
    model.generation_config.pad_token_id = 0
    return model


def adapter_rank(i: int, rank: int, mixed_ranks: bool) -> int:
    """Rank of adapter ``a<i>``: ``rank``, or with ``mixed_ranks`` rank, rank - 1, ..., 1, rank, ...
    (a0, the batch-1 adapter, has the largest)."""
    return rank - i % rank if mixed_ranks else rank


def make_peft_adapters(base, n: int, rank: int, folder: str, targets=TARGETS, seed: int = 1,
                       mixed_ranks: bool = False) -> list:
    """``n`` LoRA adapters made by peft (random non-zero weights) saved in PEFT's format under
    ``folder/a<i>``; returns their folders."""
    import peft

    def cfg(i):
        r = adapter_rank(i, rank, mixed_ranks)
        return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)

    pm = peft.get_peft_model(copy.deepcopy(base), cfg(0), adapter_name="a0")
    for i in range(1, n):
        pm.add_adapter(f"a{i}", cfg(i))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5).to(p.dtype))
    pm.save_pretrained(folder)
    return [os.path.join(folder, f"a{i}") for i in range(n)]  # PEFT: a non-"default" name gets a subfolder


def build_methods(base, folders: list, methods=METHODS) -> dict:
    """name -> model. Every model has its own copy of the weights."""
    import peft

    import fastpeft

    out = {}
    if "base" in methods:
        out["base"] = copy.deepcopy(base)
    if "merged" in methods:
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="a0")
        out["merged"] = pm.merge_and_unload().eval()
    if "peft" in methods or "optimize" in methods:
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="a0")
        for i, f in enumerate(folders[1:], 1):
            pm.load_adapter(f, adapter_name=f"a{i}")
        pm.set_adapter("a0")
        pm.eval()
        if "peft" in methods:
            out["peft"] = pm
        if "optimize" in methods:
            om = copy.deepcopy(pm) if "peft" in methods else pm
            out["optimize"] = fastpeft.optimize(om)
    if "fastpeft" in methods:
        fm = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="a0")
        for i, f in enumerate(folders[1:], 1):
            fm.load_adapter(f, adapter_name=f"a{i}")
        fm.set_adapter("a0")
        fm.eval()
        out["fastpeft"] = fm
    return out


def _generate(model, ids, new_tokens: int, names: list | None):
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    if names is not None:
        kw["adapter_names"] = names  # PEFT's API: peft.PeftModel, fastpeft.PeftModel, optimized PEFT model
    return model.generate(ids, **kw)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_generate(model, ids, new_tokens, names, device) -> float:
    """Seconds of one greedy ``generate`` of ``new_tokens`` tokens."""
    _sync(device)
    t0 = time.perf_counter()
    out = _generate(model, ids, new_tokens, names)
    _sync(device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t0


def scenarios(batch: int, n_adapters: int) -> list:
    """(batch, adapters, mixed names or None)."""
    rows = [(1, 1, None), (batch, 1, None)]
    if n_adapters > 1:
        rows.append((batch, n_adapters, [f"a{i % n_adapters}" for i in range(batch)]))
    return rows


def stack_memory(model) -> tuple:
    """(bytes of fastpeft's LoRA stacks, bytes of the adapters' own weights) of a packed model."""
    from fastpeft.nn import LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and m.bank.packed]
    stack = sum(m.bank.nbytes() for m in layers)
    own = sum(p.numel() * p.element_size() for m in layers for n in m._adapters for p in m._params_of(n))
    return stack, own


def run(config: dict, device: torch.device, dtype: torch.dtype, batch: int, n_adapters: int, rank: int,
        new_tokens: int, prompt_len: int, repeats: int, methods=METHODS, log=print, mixed_ranks: bool = False,
        progress: bool = True) -> list:
    """Time every method on every scenario; returns the result rows (medians). ``progress``: a bar over the scenarios."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = build_base(config, dtype, device)
        n_params = sum(p.numel() for p in base.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            folders = make_peft_adapters(base, n_adapters, rank, tmp, mixed_ranks=mixed_ranks)
            models = build_methods(base, folders, methods)
    del base
    g = torch.Generator().manual_seed(0)
    ranks = f"{rank}..1 cycling" if mixed_ranks else rank
    cfg_text = json.dumps(dict(config, params=n_params, dtype=str(dtype).replace("torch.", ""), rank=ranks,
                               targets="all-linear", new_tokens=new_tokens, prompt=prompt_len), separators=(",", ":"))
    rows = []
    cases = scenarios(batch, n_adapters)
    for b, n, names in (sweep(cases, "scenarios") if progress else cases):
        ids = torch.randint(3, config["vocab_size"], (b, prompt_len), generator=g).to(device)
        todo = [m for m in models if not (names is not None and m in ("base", "merged"))]
        times = {m: {"full": [], "one": []} for m in todo}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for m in todo:  # warm-up (first calls allocate, pack, resolve backends)
                for t in (1, new_tokens):
                    time_generate(models[m], ids, t, names if m not in ("base", "merged") else None, device)
            for _ in range(repeats):
                for m in todo:
                    nm = names if m not in ("base", "merged") else None
                    times[m]["one"].append(time_generate(models[m], ids, 1, nm, device))
                    times[m]["full"].append(time_generate(models[m], ids, new_tokens, nm, device))
        group = []
        for m in todo:
            full = statistics.median(times[m]["full"])
            one = statistics.median(times[m]["one"])
            decode = max(full - one, 1e-9) / max(new_tokens - 1, 1)
            group.append(dict(config=cfg_text, adapters=n, mixed=names is not None, rank=ranks, dtype=dtype_name(dtype),
                              method=m, median_us=round(decode * 1e6, 1), batch=b, new_tokens=new_tokens,
                              tokens_per_s=round(b * new_tokens / full, 2), decode_ms=round(decode * 1e3, 3),
                              decode_tokens_per_s=round(b / decode, 1), full_ms=round(full * 1e3, 2)))
        ref = {r["method"]: r for r in group}
        pairs = (("vs_base", "base"), ("vs_peft", "peft"))
        for r in group:
            for key, other in pairs:
                o = ref.get(other)
                r[key] = round(r["decode_ms"] / o["decode_ms"], 3) if o and o["decode_ms"] else ""
            for key, other in pairs:
                o = ref.get(other)
                r[key + "_e2e"] = round(r["full_ms"] / o["full_ms"], 3) if o else ""
        rows += group
        log(f"  batch {b}, {n} adapter(s){' mixed' if names else ''}: done")
    for m in ("fastpeft", "optimize"):
        if m in models:
            stack, own = stack_memory(models[m])
            if own:
                log(f"  {m}: adapter stacks {stack / 1e6:.2f} MB for {own / 1e6:.2f} MB of adapter weights "
                    f"({stack / own:.3f}x)")
    return rows


# the columns of the printed table
TABLE = ["method", "batch", "adapters", "mixed", "tokens_per_s", "decode_ms", "decode_tokens_per_s", "vs_base",
         "vs_peft", "vs_peft_e2e"]


def plot(rows: list, path: str) -> str:
    """Decode tokens/s per method and scenario, as a PNG (matplotlib: the ``bench`` extra)."""
    from .plots import bar_plot

    groups = sorted({(r["batch"], r["adapters"]) for r in rows})
    labels = [f"batch {b}, {n} adapter{'s' if n > 1 else ''}" for b, n in groups]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    series = {}
    for m in methods:
        vals = []
        for gkey in groups:
            r = next((r for r in rows if r["method"] == m and (r["batch"], r["adapters"]) == gkey), None)
            vals.append(r["decode_tokens_per_s"] if r else None)
        series[m] = vals
    device = str(rows[0].get("device", ""))
    return bar_plot(path, f"greedy decode, {device[:60]}", labels, series, "decode tokens/s (higher is better)")
