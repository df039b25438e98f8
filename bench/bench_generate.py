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
The measuring is ``fastpeft.benchmarks.generate`` (the demo runs it too); this script is its
command line.

Rows (bench/common.py's columns: device, date, git commit, config, method, ...; median_us =
decode_ms in µs, ratio = to base; then batch, tokens/s, decode_ms, ratios to base and to PEFT)
are appended to ``bench/results/generate-<cpu|gpu>-<date>.csv``; a table is printed and a plot
(PNG, matplotlib: the ``bench`` extra) is written next to the CSV.

    .venv/bin/python bench/bench_generate.py            # CPU: ~1-2 minutes on 2 cores
    .venv/bin/python bench/bench_generate.py --quick    # smaller model, fewer repeats
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from fastpeft.benchmarks import generate as gen  # noqa: E402
from fastpeft.benchmarks.generate import CPU_CONFIG, GPU_CONFIG, METHODS, QUICK_CONFIG, TABLE  # noqa: E402

from common import DTYPES, Bench  # noqa: E402  (bench/common.py)


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
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    batch = args.batch or (32 if gpu else 16)
    n_adapters = args.adapters or batch
    new_tokens = args.new_tokens or (32 if gpu else (8 if args.quick else 16))
    repeats = args.repeats or (3 if args.quick else (10 if gpu else 5))
    methods = tuple(m for m in args.methods.split(",") if m)
    stem = f"generate-{'gpu' if gpu else 'cpu'}-{_dt.datetime.now():%Y-%m-%d}" + ("-quick" if args.quick else "")
    bench = Bench("generate", args, stem=stem, device=str(device))
    print(f"device: {bench.device_label}; model {config}; {dtype}; batch 1 and {batch}; {n_adapters} adapters "
          f"rank {args.rank}{' down to 1' if args.mixed_ranks else ''}; {new_tokens} new tokens; {repeats} repeats")
    t0 = time.time()
    rows = gen.run(config, device, dtype, batch, n_adapters, args.rank, new_tokens, args.prompt, repeats, methods,
                   mixed_ranks=args.mixed_ranks)
    for r in rows:
        bench.add(**r)
    bench.finish(ratio_to="base", table_columns=TABLE, plot=gen.plot)
    print(f"({time.time() - t0:.0f} s)")
    return bench.rows


if __name__ == "__main__":
    main()
