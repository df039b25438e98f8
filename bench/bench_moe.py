#!/usr/bin/env python
"""LoRA on MoE expert parameters (``target_parameters``): base model vs fastpeft vs PEFT vs merged.

A tiny MoE causal LM built from a Transformers config (random weights, no download): gpt-oss
(experts stored ``[E, in, out]``, ``is_transposed``: the model PEFT's own target_parameters tests
use) and Mixtral (``[E, out, in]``), 2 layers, 4 experts (2 per token), hidden 64, expert width
128, LoRA rank 8 on ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``. For each input
shape (batch x sequence), the median time of one model forward under ``torch.inference_mode()``:

* ``base``              the model without adapters,
* ``merged``            the same model with the adapter merged into the expert weights (PEFT's
                        ``merge_and_unload``): the lower bound,
* ``peft``              ``peft.get_peft_model`` (ParamWrapper: a parametrization registered and
                        removed, and ``W + s B A`` recomputed, for every expert stack on every call),
* ``fastpeft``          ``fastpeft.PeftModel`` (fastpeft/nn/lora_param.py: ``W'`` cached until an input
                        changes, the experts' own forward run with it),
* ``fastpeft-inner``    the adapted model without the PeftModel wrapper (its lock and hooks),
* ``fastpeft-rebuild``  the first call after a change (every cached ``W'`` recomputed),

and a mixed batch (rows alternate between two adapters, ``adapter_names=``; PEFT refuses mixed
batches on parameter targets): ``base``, ``fastpeft`` (one call of the experts per adapter on its
rows) and ``fastpeft-one`` (the same batch with one adapter for all rows).

``median_us``: with ``--threads 1`` (the default) the median over interleaved rounds of the calling
thread's CPU time per call, so other processes on a shared machine do not count; with more threads
wall time (``common.interleaved_medians_us``). Rows carry ``ratio`` (to ``base``), ``vs_peft``,
``vs_merged``, ``paired_ratio`` (the median over rounds of the time over ``base``'s in the same
round: steadier than ``ratio`` on a loaded machine) and the largest difference of the logits from
PEFT's (``max_abs_diff``; mixed rows: from the per-adapter runs).

CPU:  python bench/bench_moe.py           (gpt-oss and Mixtral, 1x1, 1x16 and 4x64 tokens; ~1 minute)
      python bench/bench_moe.py --quick   (gpt-oss, one shape, short timings)
Rows: bench/results/moe-cpu-<date>.csv (fastpeft.benchmarks.results' columns), a table.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import Bench, add_common_args, cpu_medians_us, sweep  # noqa: E402

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
FULL = dict(archs=["gpt_oss", "mixtral"], shapes=[(1, 1), (1, 16), (4, 64)], min_time=0.8)
QUICK = dict(archs=["gpt_oss"], shapes=[(2, 16)], min_time=0.2)


def parse_args():
    p = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--archs", default=None, help="comma list of gpt_oss,mixtral")
    p.add_argument("--shapes", default=None, help="comma list of BATCHxSEQ, e.g. 1x16,4x64")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--expert-width", type=int, default=128)
    p.add_argument("--experts", type=int, default=4, help="experts per layer (2 per token)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timing per variant (interleaved rounds)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: thread CPU time, steady on a "
                   "shared machine; more: wall time)")
    return p.parse_args()


def tiny_moe(arch: str, hidden: int, width: int, experts: int = 4):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=hidden, intermediate_size=width, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, num_local_experts=experts, num_experts_per_tok=2)
    if arch == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**common)).eval()
    return tf.GptOssForCausalLM(tf.GptOssConfig(**common, head_dim=hidden // 4, sliding_window=32,
                                                layer_types=["sliding_attention", "full_attention"])).eval()


def build(arch: str, args):
    """(base, fastpeft model, peft model, merged model): adapters a0 and a1 with the same random
    weights in fastpeft and PEFT (non-zero B), a0 active."""
    import peft

    import fastpeft

    base = tiny_moe(arch, args.hidden, args.expert_width, getattr(args, "experts", 4))
    kw = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=[], target_parameters=TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), adapter_name="a0")
        pm.add_adapter("a1", peft.LoraConfig(**kw))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kw), adapter_name="a0")
        fm.add_adapter("a1", fastpeft.LoraConfig(**kw))
        fm.load_state_dict(pm.state_dict())
        merged = copy.deepcopy(pm).merge_and_unload()
    pm.set_adapter("a0")
    fm.set_adapter("a0")
    return base, fm.eval(), pm.eval(), merged.eval()


def medians_us(variants: dict, min_time: float, rounds: int = 31) -> tuple[dict, dict]:
    """``(median µs per call, paired ratio)`` per variant (``common.cpu_medians_us``)."""
    return cpu_medians_us(variants, min_time, rounds)


def measure(bench, arch, batch, seq, args, min_time):
    from fastpeft import tuner
    from fastpeft.nn.lora_param import LoraParam

    base, fm, pm, merged = build(arch, args)
    inner = fm.base_model.model
    layers = [m for m in inner.modules() if isinstance(m, LoraParam)]
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(2))
    names = ["a0", "a1"] * (batch // 2) + ["a0"] * (batch % 2)

    def rebuild():
        for m in layers:
            m.bank.mark_stale()
        return fm(input_ids=ids)

    variants = {"base": lambda: base(input_ids=ids), "merged": lambda: merged(input_ids=ids),
                "peft": lambda: pm(input_ids=ids), "fastpeft": lambda: fm(input_ids=ids),
                "fastpeft-inner": lambda: inner(input_ids=ids), "fastpeft-rebuild": rebuild}
    mixed = {"base": lambda: base(input_ids=ids), "fastpeft": lambda: fm(input_ids=ids, adapter_names=names),
             "fastpeft-one": lambda: fm(input_ids=ids)}
    common = dict(config=arch, shape=f"E{args.experts} h{args.hidden} w{args.expert_width} L2", tokens=batch * seq, batch=batch,
                  rank=args.rank, dtype="fp32")
    with torch.inference_mode():
        want = pm(input_ids=ids).logits.double()
        diff = (fm(input_ids=ids).logits.double() - want).abs().max().item()
        mdiff = (merged(input_ids=ids).logits.double() - want).abs().max().item()
        per_adapter = {}
        for n in ("a0", "a1"):
            tuner.set_adapter(inner, n)
            per_adapter[n] = fm(input_ids=ids).logits.double()
        tuner.set_adapter(inner, "a0")
        got = fm(input_ids=ids, adapter_names=names).logits.double()
        mixdiff = max((got[i] - per_adapter[n][i]).abs().max().item() for i, n in enumerate(names)) if batch > 1 else 0.0
        print(f"  {arch} {batch}x{seq}: fastpeft vs peft max|diff| {diff:.3g}, merged vs peft {mdiff:.3g}, "
              f"mixed rows vs per-adapter runs {mixdiff:.3g}")
        times, paired = medians_us(variants, min_time)
        mixed_times, mixed_paired = medians_us(mixed, min_time) if batch > 1 else ({}, {})
    for name, us in times.items():
        extra = dict(max_abs_diff=f"{diff:.3g}") if name == "fastpeft" else \
            dict(max_abs_diff=f"{mdiff:.3g}") if name == "merged" else {}
        bench.add(**common, adapters=1, mixed=False, method=name, median_us=round(us, 1),
                  paired_ratio=round(paired[name], 4) if paired else "", **extra)
    for name, us in mixed_times.items():
        extra = dict(max_abs_diff=f"{mixdiff:.3g}") if name == "fastpeft" else {}
        bench.add(**common, adapters=2 if name == "fastpeft" else 1, mixed=True, method=name, median_us=round(us, 1),
                  paired_ratio=round(mixed_paired[name], 4) if mixed_paired else "", **extra)


def main():
    args = parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.archs:
        cfg["archs"] = args.archs.split(",")
    if args.shapes:
        cfg["shapes"] = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    min_time = args.min_time or cfg["min_time"]
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = f"moe-cpu-{datetime.date.today().isoformat()}" + ("-quick" if args.quick else "")
    bench = Bench("moe", args, stem=stem, device="cpu")
    print(f"device: {bench.device_label}  commit: {bench.commit}  torch threads: {torch.get_num_threads()}")
    for arch in sweep(cfg["archs"], "archs"):
        for batch, seq in cfg["shapes"]:
            measure(bench, arch, batch, seq, args, min_time)
    same_input = ("config", "tokens", "batch", "rank", "dtype")  # (mixed rows: vs the one-adapter peft / merged run)
    bench.add_ratios("base", keys=same_input + ("mixed",))
    bench.add_ratios("peft", column="vs_peft", keys=same_input)
    bench.add_ratios("merged", column="vs_merged", keys=same_input)
    bench.finish(ratio_to=None, plot=lambda rows, path: None)


if __name__ == "__main__":
    main()
