"""End-to-end greedy decoding speed: base model, merged weights, PEFT, and fastpeft.

A Llama-shaped model is built from a config (random weights, no download): about 1B parameters
on a GPU, a small one on the CPU (``--hidden/--layers/...`` change it). Adapters are made with
the peft library and saved in PEFT's format, then timed as

* ``base``      the model without adapters (the floor)
* ``merged``    ``merge_and_unload()`` of one adapter (one adapter only: no mixed batches)
* ``peft``      ``peft.PeftModel`` (PEFT's unfused layers; mixed batches via ``adapter_names=``)
* ``optimize``  the same PEFT model after ``fastpeft.optimize`` (the one-line change)
* ``fastpeft``  ``fastpeft.PeftModel.from_pretrained`` + ``load_adapter``

for batch 1 and a batch of B rows (16 on the CPU, 32 on a GPU) with one adapter, and the B rows
with N distinct adapters (``mixed``: row i uses adapter i mod N). Each timing is a greedy
``generate`` of a fixed number of new tokens with the KV cache; ``decode_ms`` is the time of one
more token, ``(t(T) - t(1)) / (T - 1)``, the figure that matters for serving. Medians over
``--repeats``, the methods interleaved within each repeat (a busy machine slows all alike).

Rows (device, date, git commit, config, method, batch, adapters, tokens/s, ratios to base and to
PEFT) are appended to ``bench/results/generate-<device>-<date>.csv``; a table is printed and a
plot (PNG, matplotlib: the ``bench`` extra) is written next to the CSV.

    .venv/bin/python bench/bench_generate.py            # CPU: ~1-2 minutes on 2 cores
    .venv/bin/python bench/bench_generate.py --quick    # smaller model, fewer repeats
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from common import bar_plot, git_commit, print_table, sweep, write_csv  # noqa: E402  (bench/common.py)

RESULTS_DIR = os.path.join(HERE, "results")
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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def build_base(config: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A Llama-shaped causal LM with random weights."""
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
    """name -> (model, mixed-batch support). Every model has its own copy of the weights."""
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

    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and m._packed]
    stack = sum(m._packed["a"].nbytes + m._packed["bt"].nbytes for m in layers)
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
    label = device_label(device)
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    commit = git_commit()
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
            group.append(dict(device=label, date=date, commit=commit, config=cfg_text, method=m, batch=b,
                              adapters=n, mixed=names is not None, new_tokens=new_tokens,
                              tokens_per_s=round(b * new_tokens / full, 2), decode_ms=round(decode * 1e3, 3),
                              decode_tokens_per_s=round(b / decode, 1), full_ms=round(full * 1e3, 2)))
        ref = {r["method"]: r for r in group}
        for r in group:
            for key, other in (("vs_base", "base"), ("vs_peft", "peft")):
                o = ref.get(other)
                r[key] = round(r["decode_ms"] / o["decode_ms"], 3) if o and o["decode_ms"] else ""
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


def write_rows(rows: list, path: str) -> str:
    """Append ``rows`` to the CSV at ``path`` through bench/common.py (its leading columns, then these)."""
    write_csv(rows, path)
    return path


TABLE = ["method", "batch", "adapters", "mixed", "tokens_per_s", "decode_ms", "decode_tokens_per_s", "vs_base",
         "vs_peft", "vs_peft_e2e"]


def plot(rows: list, path: str) -> str:
    """Decode tokens/s per method and scenario, as a PNG (bench/common.py's bar_plot)."""
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
    return bar_plot(path, f"greedy decode, {rows[0]['device'][:60]}", labels, series, "decode tokens/s (higher is better)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
    p.add_argument("--hidden", type=int), p.add_argument("--layers", type=int), p.add_argument("--inter", type=int)
    p.add_argument("--heads", type=int), p.add_argument("--kv-heads", type=int), p.add_argument("--vocab", type=int)
    p.add_argument("--batch", type=int, default=None, help="rows of the large batch (CPU 16, GPU 32)")
    p.add_argument("--adapters", type=int, default=None, help="distinct adapters of the mixed batch (default: batch)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mixed-ranks", action="store_true",
                   help="adapter ranks rank, rank-1, ..., 1 cycling (a0: the largest) instead of all equal")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (CPU fp32, GPU bf16)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    config = dict(GPU_CONFIG if gpu else (QUICK_CONFIG if args.quick else CPU_CONFIG))
    for k, a in (("hidden_size", "hidden"), ("num_hidden_layers", "layers"), ("intermediate_size", "inter"),
                 ("num_attention_heads", "heads"), ("num_key_value_heads", "kv_heads"), ("vocab_size", "vocab")):
        if getattr(args, a) is not None:
            config[k] = getattr(args, a)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or ("bf16" if gpu else "fp32")]
    batch = args.batch or (32 if gpu else 16)
    n_adapters = args.adapters or batch
    new_tokens = args.new_tokens or (32 if gpu else (8 if args.quick else 16))
    repeats = args.repeats or (3 if args.quick else (10 if gpu else 5))
    methods = tuple(m for m in args.methods.split(",") if m)
    print(f"device: {device_label(device)}; model {config}; {dtype}; batch 1 and {batch}; {n_adapters} adapters "
          f"rank {args.rank}{' down to 1' if args.mixed_ranks else ''}; {new_tokens} new tokens; {repeats} repeats")
    t0 = time.time()
    rows = run(config, device, dtype, batch, n_adapters, args.rank, new_tokens, args.prompt, repeats, methods,
               mixed_ranks=args.mixed_ranks)
    print_table(rows, TABLE)
    stem = f"generate-{'gpu' if gpu else 'cpu'}-{_dt.datetime.now():%Y-%m-%d}" + ("-quick" if args.quick else "")
    path = write_rows(rows, args.out or os.path.join(RESULTS_DIR, stem + ".csv"))
    print(f"\n{len(rows)} rows -> {path}  ({time.time() - t0:.0f} s)")
    if not args.no_plot:
        out = plot(rows, os.path.splitext(path)[0] + ".png")
        if out:
            print(f"plot -> {out}")
    return rows


if __name__ == "__main__":
    main()
