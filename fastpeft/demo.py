"""``python -m fastpeft.demo``: the main job end to end on a built-in model, no downloads.

1. builds the default small Llama-shaped model from a config (random weights);
2. makes a LoRA adapter with the **peft** library and saves it in PEFT's format;
3. loads it back with **fastpeft** (``fastpeft.PeftModel.from_pretrained``), and also turns a PEFT
   model into fastpeft's with ``fastpeft.optimize``;
4. checks both against PEFT's unfused computation: prints the max abs difference of the logits,
   exits with code 1 above the tolerance;
5. times greedy decoding (base, merged, PEFT, ``fastpeft.optimize``, fastpeft; batch 1, a 16-row
   batch with one adapter and one with 16 distinct adapters) with ``fastpeft.benchmarks.generate``
   (what ``bench/bench_generate.py`` runs), prints the table and writes the rows
   (``fastpeft.benchmarks.results``' columns) to ``<out-dir>/decode-cpu.csv`` and a plot to
   ``decode-cpu.png`` (the plot needs matplotlib, the ``bench`` extra; without it it is skipped).

``--quick``: a smaller model and fewer repetitions. ``--no-timing``: the checks only.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
import tempfile
import time
import warnings

import torch

from .benchmarks import generate as gen

TARGETS = gen.TARGETS
TOLERANCE = 1e-4  # fp32 logits of O(1): a few ulps of accumulated rounding, far below any real difference


@contextlib.contextmanager
def _library_notices_hidden():
    """Two notices the libraries print while the demo runs, which read like fastpeft failures:

    * bitsandbytes, imported by peft, logs "Failed to load CPU gemm_4bit_forward from
      kernels-community ..." once, at import, on CPUs with AVX512-BF16 when its optional
      ``kernels`` package is missing (installing it does not help here: it downloads kernels
      from the Hub at run time);
    * transformers' FutureWarning about ``is_gradient_checkpointing``, raised inside peft.

    Only these two, only for the duration of the block: that logger's level is restored and the
    warning filter is scoped, so a user's own warnings and logging are untouched.
    """
    bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        bnb_log.setLevel(level)


def build_model(config: dict, seed: int = 0):
    """The demo's base model: ``fastpeft.benchmarks.generate.build_base`` in fp32 on the CPU."""
    return gen.build_base(config, torch.float32, torch.device("cpu"), seed)


def check_parity(config: dict, folder: str) -> float:
    """PEFT adapter -> PEFT format -> fastpeft; returns the largest logit difference seen."""
    import peft

    import fastpeft

    base = build_model(config)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:  # a fresh adapter is a no-op (B = 0): give it real weights
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    pm.eval()
    pm.save_pretrained(folder)
    print(f"  adapter made by peft {peft.__version__} and saved in PEFT's format: {sorted(os.listdir(folder))}")

    ids = torch.randint(3, config["vocab_size"], (4, 24), generator=g)
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
        with pm.disable_adapter():
            base_logits = pm(input_ids=ids).logits
    fm = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    with torch.no_grad():
        got = fm(input_ids=ids).logits
    d_load = (got - expected).abs().max().item()
    print(f"  fastpeft.PeftModel.from_pretrained vs PEFT: max |diff| = {d_load:.2e} "
          f"(the adapter moves the logits by {(expected - base_logits).abs().max().item():.2f})")
    fastpeft.optimize(pm)
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    d_opt = (got - expected).abs().max().item()
    kinds = sorted({type(m).__name__ for m in pm.modules() if isinstance(m, fastpeft.nn.AdapterLayer)})
    print(f"  fastpeft.optimize(peft_model) ({', '.join(kinds)} layers) vs PEFT: max |diff| = {d_opt:.2e}")
    return max(d_load, d_opt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fastpeft demo: PEFT adapter -> fastpeft, checked and timed")
    p.add_argument("--quick", action="store_true", help="smaller model, fewer repetitions")
    p.add_argument("--no-timing", action="store_true", help="only the correctness checks")
    p.add_argument("--out-dir", default="demo-output", help="where the timing CSV and PNG go (default: ./demo-output)")
    args = p.parse_args(argv)
    t_start = time.time()
    import fastpeft

    config = dict(gen.QUICK_CONFIG if args.quick else gen.CPU_CONFIG)
    print(f"fastpeft {fastpeft.__version__}, torch {torch.__version__}; backends: {fastpeft.available_backends()}")
    print(f"model: Llama-shaped {config} (random weights), fp32 on the CPU")

    print("\n[1/2] correctness against PEFT's unfused computation")
    with tempfile.TemporaryDirectory() as tmp, _library_notices_hidden():
        diff = check_parity(config, tmp)
    ok = diff <= TOLERANCE
    print(f"  => {'OK' if ok else 'FAILED'}: max |diff| {diff:.2e} {'<=' if ok else '>'} tolerance {TOLERANCE:.0e}")
    if not ok:
        return 1
    if args.no_timing:
        return 0

    print("\n[2/2] greedy decoding with the KV cache (medians; decode_ms = one more token; "
          "vs_peft = time ratio to PEFT)")
    from .benchmarks.plots import have_matplotlib
    from .benchmarks.results import Results, device_label

    device = torch.device("cpu")
    with _library_notices_hidden():
        rows = gen.run(config, device, torch.float32, batch=16, n_adapters=16, rank=16,
                       new_tokens=8 if args.quick else 16, prompt_len=16, repeats=2 if args.quick else 5,
                       methods=("base", "merged", "peft", "optimize", "fastpeft"), log=lambda *_: None,
                       progress=False)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "decode-cpu" + ("-quick" if args.quick else ""))
    if os.path.exists(stem + ".csv"):
        os.remove(stem + ".csv")  # this run's rows only
    results = Results("generate", stem + ".csv", device_label(device))
    for r in rows:
        results.add(**r)
    results.add_ratios("base")
    results.print_table(["method", "batch", "adapters", "tokens_per_s", "decode_ms", "vs_base", "vs_peft"])
    results.write_csv()
    if have_matplotlib():
        png = gen.plot(results.rows, stem + ".png")
        print(f"  rows -> {stem}.csv, plot -> {png}")
    else:
        print(f"  rows -> {stem}.csv (no plot: matplotlib is not installed; pip install 'fastpeft[bench]')")
    print("  (optimize = a peft.PeftModel after fastpeft.optimize; fastpeft = fastpeft.PeftModel; the 16-row "
          "batch uses adapter_names= with 16 distinct adapters; full runs: bench/bench_generate.py)")
    print(f"\ndone in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
