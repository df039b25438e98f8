#!/usr/bin/env python
"""Adapted convolutions: the base conv vs merged weights vs PEFT's LoRA conv layer vs fastpeft's.

For each conv shape, dtype and adapter kind ("lora", "dora", "ia3"), the median time of

* ``base``              the base ``nn.Conv1d`` / ``nn.Conv2d`` alone,
* ``merged``            one conv with the folded kernel ``W + s * dK`` (what merging buys),
* ``peft``              PEFT's layer (``peft.tuners.lora.Conv2d`` & co., adapters in fp32: PEFT's
                        default ``autocast_adapter_dtype``) on the same base conv,
* ``fastpeft``          fastpeft's layer as inference runs it: the cached folded kernel,
* ``fastpeft-unfused``  fastpeft's layer forced onto PEFT's composition (base + lora_B(lora_A(x)) * s),
                        the other candidate route,
* ``fastpeft-rebuild``  the first call after a change (the kernel is folded again),

and a mixed batch (rows alternate between two adapters, ``adapter_names=``): PEFT vs fastpeft.
``median_us``: with ``--threads 1`` (the default) the median over interleaved rounds of the
*CPU time of the calling thread* per call (``time.thread_time``; torch runs single-threaded
ops in it), so the time other processes take from a shared machine does not count; with more
threads, wall time (``common.interleaved_medians_us``). Rows carry the ratios to ``base``,
``peft`` (``vs_peft``) and ``merged`` (``vs_merged``) and the largest difference from PEFT's
output (``max_abs_diff``, relative ``rel_err``).

CPU:  python bench/bench_conv.py            (SD-like Conv2d 320->320 3x3 32x32 batch 2, Conv1d 64->64 k3 L256 batch 4)
      python bench/bench_conv.py --quick    (tiny shapes)
Rows: bench/results/conv-cpu-<date>.csv (fastpeft.benchmarks.results' columns), a table.
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

from torch import nn  # noqa: E402

from common import DTYPES, Bench, add_common_args, cpu_medians_us, sweep  # noqa: E402

FULL = dict(
    shapes=[  # (dims, C_in, C_out, kernel, padding, spatial size, batch)
        (2, 320, 320, 3, 1, 32, 2),  # a Stable-Diffusion UNet resnet conv at 256x256 latents / 8
        (1, 64, 64, 3, 1, 256, 4),
    ],
    ranks=[8],
    dtypes=["fp32", "bf16"],
    kinds=["lora", "dora", "ia3"],
    min_time=2.0,
)
QUICK = dict(shapes=[(2, 32, 32, 3, 1, 16, 2), (1, 16, 16, 3, 1, 64, 4)], ranks=[4], dtypes=["fp32"],
             kinds=["lora", "dora", "ia3"], min_time=0.2)


def parse_args():
    p = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16")
    p.add_argument("--kinds", default=None, help="comma list of lora,dora,ia3")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timing per variant (interleaved rounds)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: thread CPU time, steady on a "
                   "shared machine; more: wall time)")
    return p.parse_args()


class _Holder(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def build_pair(conv: nn.Module, kind: str, rank: int):
    """PEFT's and fastpeft's layer on copies of ``conv``, two adapters a0, a1 with the same
    random weights (non-zero B; IA3 vectors around 1)."""
    import peft

    import fastpeft

    if kind == "ia3":
        kw = dict(target_modules=["conv"], feedforward_modules=[])
        pcfg, fcfg = peft.IA3Config(**kw), fastpeft.IA3Config(**kw)
    else:
        kw = dict(r=rank, lora_alpha=2 * rank, target_modules=["conv"], use_dora=kind == "dora")
        pcfg, fcfg = peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_Holder(copy.deepcopy(conv)), pcfg, adapter_name="a0")
        pm.add_adapter("a1", copy.deepcopy(pcfg))
        fm = fastpeft.get_peft_model(_Holder(copy.deepcopy(conv)), fcfg, adapter_name="a0")
        fm.add_adapter("a1", copy.deepcopy(fcfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype))
            elif "ia3_l" in n or "magnitude" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    fm.load_state_dict(pm.state_dict())
    player, flayer = pm.base_model.model.conv, fm.base_model.model.conv
    player.set_adapter("a0")
    flayer.set_adapter("a0")
    return player.eval(), flayer.eval()


def measure(bench, conv, x, kind, rank, common, min_time):
    """Time every variant of one (shape, dtype, rank, kind) and add the rows."""
    player, flayer = build_pair(conv, kind, rank)
    base = flayer.base_layer
    batch = x.shape[0]
    names = ["a0", "a1"] * (batch // 2) + ["a0"] * (batch % 2)
    variants = {"base": lambda: base(x), "peft": lambda: player(x), "fastpeft": lambda: flayer(x)}
    if kind != "ia3":
        with torch.no_grad():
            w, b = flayer._kernel(("a0",))
        variants["merged"] = lambda: base._conv_forward(x, w, b)
        variants["fastpeft-unfused"] = lambda: flayer._forward_unfused(x, ["a0"], None)

        def rebuild():
            flayer.bank.mark_stale()
            return flayer(x)

        variants["fastpeft-rebuild"] = rebuild
    mixed = {"base": lambda: base(x), "fastpeft": lambda: flayer(x, adapter_names=names)}
    if kind == "lora":  # PEFT refuses mixed batches with DoRA and has none for IA3
        mixed["peft"] = lambda: player(x, adapter_names=names)
    with torch.no_grad():
        want, got = player(x).double(), flayer(x).double()
        diff = (got - want).abs().max().item()
        rel = diff / want.abs().max().clamp_min(1e-12).item()
        md = None
        if "peft" in mixed:
            md = (mixed["fastpeft"]().double() - mixed["peft"]().double()).abs().max().item()
        print(f"  {common['shape']} {common['dtype']} {kind}: fastpeft vs peft max|diff| {diff:.3g} (rel {rel:.2g})"
              + ("" if md is None else f", mixed {md:.3g}"))
        times = medians_us(variants, min_time)
        mixed_times = medians_us(mixed, min_time)
    for name, us in times.items():
        extra = dict(max_abs_diff=f"{diff:.3g}", rel_err=f"{rel:.2g}") if name == "fastpeft" else {}
        bench.add(**common, adapters=1, mixed=False, method=name, median_us=round(us, 1), **extra)
    for name, us in mixed_times.items():
        extra = dict(max_abs_diff=f"{md:.3g}") if name == "fastpeft" and md is not None else {}
        bench.add(**common, adapters=2, mixed=True, method=name, median_us=round(us, 1), **extra)


def medians_us(variants: dict, min_time: float, rounds: int = 15) -> dict:
    """Median µs per call per variant (``common.cpu_medians_us``: thread CPU time with one torch
    thread, else wall time)."""
    return cpu_medians_us(variants, min_time, rounds)[0]


def main():
    args = parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.dtypes:
        cfg["dtypes"] = args.dtypes.split(",")
    if args.kinds:
        cfg["kinds"] = args.kinds.split(",")
    min_time = args.min_time or cfg["min_time"]
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = f"conv-cpu-{datetime.date.today().isoformat()}" + ("-quick" if args.quick else "")
    bench = Bench("conv", args, stem=stem, device="cpu")
    print(f"device: {bench.device_label}  commit: {bench.commit}  torch threads: {torch.get_num_threads()}")
    torch.manual_seed(0)
    for dims, cin, cout, k, pad, size, batch in sweep(cfg["shapes"], "conv shapes"):
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        shape = f"conv{dims}d {cin}x{cout} k{k} {'x'.join([str(size)] * dims)}"
        for dname in cfg["dtypes"]:
            dtype = DTYPES[dname]
            conv = conv_cls(cin, cout, k, padding=pad).to(dtype)
            x = torch.randn(batch, cin, *([size] * dims)).to(dtype)
            tokens = batch * size ** dims
            for rank in cfg["ranks"]:
                for kind in [k for k in cfg["kinds"] if not (k == "ia3" and dims == 1)]:  # PEFT: no IA3 on Conv1d
                    common = dict(config=kind, shape=shape, tokens=tokens, batch=batch,
                                  rank=rank if kind != "ia3" else "", dtype=dname)
                    measure(bench, conv, x, kind, rank, common, min_time)
    bench.add_ratios("peft", column="vs_peft")
    bench.add_ratios("merged", column="vs_merged")
    bench.finish(ratio_to="base", plot=lambda rows, path: None)


if __name__ == "__main__":
    main()
