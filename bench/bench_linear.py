#!/usr/bin/env python
"""Adapted linear layer: torch base vs PEFT's LoRA layer vs merged weights vs fastpeft (Triton).

For each layer shape (in x out), token count, rank and dtype, the median time of

* ``base``           the base ``nn.Linear`` alone (cuBLAS),
* ``merged``         ``F.linear`` with ``W + scale * B @ A`` precomputed (what merging buys),
* ``peft``           ``peft.tuners.lora.Linear`` built by ``peft`` on the same ``nn.Linear``
                     (adapters in fp32, PEFT's default ``autocast_adapter_dtype``),
* ``fastpeft``       ``torch.ops.fastpeft.adapter_linear`` with the triton backend,
* ``fastpeft-kernel`` the same kernels called without the ``custom_op`` dispatch (its cost),
* ``fastpeft[path]`` with ``--paths``: each kernel path forced (sets the dispatch thresholds),

eagerly and replayed from a CUDA graph, with the ratio to ``base``. Then a mixed batch: 64
tokens, each with its own adapter (64 distinct), PEFT's ``adapter_names=`` forward vs fastpeft,
with the achieved bandwidth (bytes of W, every A and B, x and y over the median time) next to
the measured device copy bandwidth.

GPU:  python bench/bench_linear.py                      (all shapes; a few minutes)
      python bench/bench_linear.py --paths decode,fused,preshrunk,split:inside,split:preshrunk --tokens 1,16,32,64,128,256,512
CPU:  python bench/bench_linear.py --quick              (tiny shapes, Triton interpreter: exercises
                                                         the script; its fastpeft timings mean nothing)
Rows: bench/results/linear-<device>-<date>.csv (see bench/common.py), a table, a plot.
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch

if not torch.cuda.is_available():  # the Triton kernels run in the interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common import DTYPES, Bench, add_common_args, copy_bandwidth, sweep  # noqa: E402

FULL = dict(
    shapes=[(4096, 4096), (4096, 14336), (14336, 4096)],
    tokens=[1, 8, 16, 64, 512, 4096],
    ranks=[16, 64],
    dtypes=["fp16", "bf16"],
    multi_tokens=64,
)
QUICK = dict(shapes=[(64, 64), (64, 96), (96, 64)], tokens=[1, 8, 40], ranks=[8], dtypes=["fp16", "bf16"], multi_tokens=8)


def parse_args():
    p = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--shapes", default=None, help="comma list of INxOUT, e.g. 4096x4096,4096x14336")
    p.add_argument("--tokens", default=None, help="comma list of token counts")
    p.add_argument("--ranks", default=None, help="comma list of ranks")
    p.add_argument("--dtypes", default=None, help="comma list of fp16,bf16,fp32")
    p.add_argument("--paths", default="", help="also time fastpeft with these paths forced: decode, fused, preshrunk, split, "
                   "split:inside, split:preshrunk (comma list)")
    p.add_argument("--no-multi", action="store_true", help="skip the mixed-batch (one adapter per token) section")
    p.add_argument("--multi-adapters", type=int, default=None, help="distinct adapters in the mixed batch (default: = tokens)")
    p.add_argument("--tune", action="store_true", help="sweep paths, split-K and tiles and write the winners to this "
                   "device's tuning file, fastpeft/kernels/configs/<device>.json (on a CPU: to bench/results/tuning-dryrun/, "
                   "since interpreter timings mean nothing)")
    return p.parse_args()


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear


def build_peft_layer(linear: nn.Linear, rank: int, n_adapters: int = 1):
    """A ``peft.tuners.lora.Linear`` around ``linear`` with ``n_adapters`` random adapters a0, a1, ..."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(_Holder(linear), cfg, adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", cfg)
    layer = model.base_model.model.proj
    layer.set_adapter("a0")
    with torch.no_grad():  # non-trivial B (PEFT's own init would make it zero)
        for name in layer.lora_B:
            layer.lora_B[name].weight.normal_(0, 0.02)
    return layer.eval()


def stack_adapters(layer, names):
    """fastpeft's stacked tensors from a PEFT layer: lora_a [S, R, K], lora_b [S, R, N], scales [S]."""
    a = torch.stack([layer.lora_A[n].weight.detach() for n in names])
    b = torch.stack([layer.lora_B[n].weight.detach().t() for n in names])
    sc = torch.tensor([float(layer.scaling[n]) for n in names], dtype=torch.float32, device=a.device)
    return a.contiguous(), b.contiguous(), sc


def _forced(LP, spec):
    """``override`` for a --paths entry: "decode", "fused", "preshrunk", "split", "split:inside", "split:preshrunk"."""
    if not spec:
        return LP.override()
    path, _, shrink = spec.partition(":")
    return LP.override(path=path, split_shrink=shrink or None)


def main():
    args = parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.shapes:
        cfg["shapes"] = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    for key in ("tokens", "ranks"):
        if getattr(args, key):
            cfg[key] = [int(v) for v in getattr(args, key).split(",")]
    if args.dtypes:
        cfg["dtypes"] = args.dtypes.split(",")
    paths = [p for p in args.paths.split(",") if p]

    import fastpeft.ops as ops
    from fastpeft.kernels import lora_linear as LL
    from fastpeft.kernels import lora_plan as LP

    bench = Bench("linear", args)
    dev = bench.device
    if "triton" not in ops.available_backends():
        raise SystemExit(f"triton backend unavailable: {ops.available_backends(verbose=True)['triton']}")
    ops.set_backend("triton")
    graphs = dev.type == "cuda" and not args.no_graphs
    modes = ["eager"] + (["graph"] if graphs else [])
    print(f"device: {bench.device_name}  commit: {bench.commit}  modes: {modes}"
          + ("  (Triton interpreter: fastpeft timings are not meaningful)" if dev.type == "cpu" else ""))

    def timed(fn, mode):
        try:
            return bench.time(fn, cuda_graph=(mode == "graph"))
        except Exception as e:  # e.g. a method that cannot be captured in a CUDA graph
            print(f"  skipped ({mode}): {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            return None

    torch.manual_seed(0)
    for (K, N) in sweep(cfg["shapes"], "linear shapes"):
        shape = f"{K}x{N}"
        for dname in cfg["dtypes"]:
            dtype = DTYPES[dname]
            linear = nn.Linear(K, N, bias=False, device=dev, dtype=dtype)
            with torch.no_grad():
                linear.weight.normal_(0, K**-0.5)
            for rank in cfg["ranks"]:
                layer = build_peft_layer(linear, rank)
                a, b, sc = stack_adapters(layer, ["a0"])
                merged = (linear.weight.float() + sc[0] * (b[0].t().float() @ a[0].float())).to(dtype)
                ts = torch.zeros(1, 1, dtype=torch.int32, device=dev)
                for tokens in cfg["tokens"]:
                    x = torch.randn(tokens, K, device=dev, dtype=dtype)
                    w = linear.weight
                    methods = {
                        "base": partial(F.linear, x, w),
                        "merged": partial(F.linear, x, merged),
                        "peft": partial(layer, x),
                        "fastpeft": partial(torch.ops.fastpeft.adapter_linear, x, w, None, a, b, sc, ts, None, None, None),
                        "fastpeft-kernel": partial(LL.adapter_linear, x, w, None, a, b, sc, ts, None, None, None),
                    }
                    with torch.no_grad():
                        want = layer(x).float()
                        got = methods["fastpeft"]().float()
                    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
                    if err > 2e-2:
                        print(f"  WARNING {shape} t={tokens} r={rank} {dname}: fastpeft vs peft rel. error {err:.3g}")
                    for mode in modes:
                        for name, fn in methods.items():
                            with torch.no_grad():
                                us = timed(fn, mode)
                            if us is not None:
                                extra = {"rel_err": round(err, 6)} if name == "fastpeft" else {}
                                bench.add(shape=shape, tokens=tokens, rank=rank, dtype=dname, method=name, mode=mode,
                                          median_us=us, **extra)
                        for path in paths:
                            with _forced(LP, path), torch.no_grad():
                                us = timed(methods["fastpeft"], mode)
                            if us is not None:
                                bench.add(shape=shape, tokens=tokens, rank=rank, dtype=dname,
                                          method=f"fastpeft[{path}]", mode=mode, median_us=us)
                    print(f"  {shape} {dname} r={rank} tokens={tokens} done")
                del layer

    try:
        if not args.no_multi:
            mixed_batch_section(bench, cfg, args, modes, timed, paths)
        if args.tune:
            tune_section(bench, cfg, timed)
    finally:  # the rows measured so far are written even when a later section fails
        bench.finish(ratio_to="base", plot_x="tokens", plot_title=f"adapted linear / base, {bench.device_name}",
                     plot_where=lambda r: not r.get("mixed") and not r["method"].startswith("tune["))


def mixed_batch_section(bench, cfg, args, modes, timed, paths):
    """T tokens, each with its own adapter: bytes moved vs the device's copy bandwidth."""
    from fastpeft.kernels import lora_plan as LP

    dev = bench.device
    T = cfg["multi_tokens"]
    S = args.multi_adapters or T
    copy_gbps = copy_bandwidth(dev, quick=bench.quick)
    print(f"\nmixed batch: {T} tokens, {S} distinct adapters; device copy bandwidth {copy_gbps:.0f} GB/s")
    for (K, N) in sweep(cfg["shapes"], "mixed-batch shapes"):
        shape = f"{K}x{N}"
        for dname in cfg["dtypes"]:
            dtype = DTYPES[dname]
            linear = nn.Linear(K, N, bias=False, device=dev, dtype=dtype)
            with torch.no_grad():
                linear.weight.normal_(0, K**-0.5)
            for rank in cfg["ranks"]:
                names = [f"a{i}" for i in range(S)]
                layer = build_peft_layer(linear, rank, S)
                a, b, sc = stack_adapters(layer, names)
                x = torch.randn(T, K, device=dev, dtype=dtype)
                row_names = [names[i % S] for i in range(T)]
                ts = torch.tensor([[i % S] for i in range(T)], dtype=torch.int32, device=dev)
                w = linear.weight
                nbytes = (w.numel() * w.element_size() + a.numel() * a.element_size() + b.numel() * b.element_size()
                          + x.numel() * x.element_size() + T * N * x.element_size())
                methods = {
                    "base": partial(F.linear, x, w),
                    "peft": partial(layer, x, adapter_names=row_names),
                    "fastpeft": partial(torch.ops.fastpeft.adapter_linear, x, w, None, a, b, sc, ts, None, None, None),
                }
                with torch.no_grad():
                    want = layer(x, adapter_names=row_names).float()
                    got = methods["fastpeft"]().float()
                err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
                if err > 2e-2:
                    print(f"  WARNING mixed {shape} r={rank} {dname}: fastpeft vs peft rel. error {err:.3g}")
                for mode in modes:
                    runs = list(methods.items()) + [(f"fastpeft[{p}]", methods["fastpeft"], p) for p in paths]
                    for item in runs:
                        name, fn = item[0], item[1]
                        forced = item[2] if len(item) == 3 else None
                        with _forced(LP, forced), torch.no_grad():
                            us = timed(fn, mode)
                        if us is None:
                            continue
                        gbps = nbytes / (us * 1e-6) / 1e9
                        bench.add(shape=shape, tokens=T, rank=rank, dtype=dname, method=name, mode=mode, median_us=us,
                                  adapters=S, mixed=True, GBps=round(gbps, 1), copy_GBps=round(copy_gbps, 1),
                                  bw_fraction=round(gbps / copy_gbps, 3))
                print(f"  mixed {shape} {dname} r={rank} done (bytes {nbytes / 1e6:.1f} MB)")
                del layer


# candidates of the --tune sweep (BM, BN, BK, num_warps, num_stages); the first of each is the built-in rule
TUNE_DECODE_TILES = [(16, 128, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (16, 64, 64, 4, 3), (16, 256, 64, 8, 3)]
TUNE_FUSED_TILES_32 = [(32, 128, 64, 4, 3), (32, 64, 64, 4, 3), (32, 128, 32, 4, 4)]
TUNE_FUSED_TILES_64 = [(64, 128, 64, 8, 3), (64, 64, 64, 4, 3), (64, 128, 32, 4, 4), (128, 128, 64, 8, 3)]
TUNE_SPLIT_K = [1, 2, 4, 8, 16]
TUNE_TOKENS = [1, 16, 32, 64, 128, 256, 512, 1024]


def tune_section(bench, cfg, timed):
    """Time each knob's candidates on the configured shapes and dtypes (first rank), eager, and
    write the winners to the device's tuning file (bench/tuning_sweep.py has the rules)."""
    from fastpeft.kernels import lora_plan as LP

    import tuning_sweep

    dev = bench.device
    rank = cfg["ranks"][0]
    tokens_list = TUNE_TOKENS if not bench.quick else [1, 16, 40]
    rows = []

    def time_knob(knob, values, tokens, make_override):
        for (K, N) in sweep(cfg["shapes"], f"tune {knob}"):
            for dname in cfg["dtypes"]:
                dtype = DTYPES[dname]
                linear = nn.Linear(K, N, bias=False, device=dev, dtype=dtype)
                layer = build_peft_layer(linear, rank)
                a, b, sc = stack_adapters(layer, ["a0"])
                ts = torch.zeros(1, 1, dtype=torch.int32, device=dev)
                for t in tokens:
                    x = torch.randn(t, K, device=dev, dtype=dtype)
                    fn = partial(torch.ops.fastpeft.adapter_linear, x, linear.weight, None, a, b, sc, ts, None, None, None)
                    for v in values:
                        with make_override(v), torch.no_grad():
                            us = timed(fn, "eager")
                        rows.append(dict(knob=knob, value=v, case=(f"{K}x{N}", dname, t), median_us=us))
                        if us is not None:
                            bench.add(shape=f"{K}x{N}", tokens=t, rank=rank, dtype=dname, method=f"tune[{knob}={v}]",
                                      median_us=us)

    def path_override(v):
        return LP.override(path=v)

    time_knob("path", ["decode", "fused", "preshrunk", "split"], tokens_list, path_override)
    time_knob("split_k", TUNE_SPLIT_K, [1], lambda v: LP.override(split_k=v))
    time_knob("decode_tile", TUNE_DECODE_TILES, [1], lambda v: LP.override(tile=v))
    time_knob("fused_tile_32", TUNE_FUSED_TILES_32, [32], lambda v: LP.override(path="fused", tile=v))
    time_knob("fused_tile_64", TUNE_FUSED_TILES_64, [128], lambda v: LP.override(path="fused", tile=v))

    # the fused family (best of decode/fused/preshrunk per case) against the split path
    fam = [dict(r, value="fused_family") for r in rows if r["knob"] == "path" and r["value"] != "split" and r["median_us"]]
    best: dict = {}
    for r in fam:
        if r["case"] not in best or r["median_us"] < best[r["case"]]["median_us"]:
            best[r["case"]] = r
    vs_split = list(best.values()) + [r for r in rows if r["knob"] == "path" and r["value"] == "split"]
    winners = {
        "FUSED_MAX_ROWS": tuning_sweep.threshold_rows(vs_split, "path", "fused_family", "split"),
        "MAX_SPLIT_K": tuning_sweep.best_setting(rows, "split_k"),
        "DECODE_TILE": tuning_sweep.best_setting(rows, "decode_tile"),
        "FUSED_TILE_32": tuning_sweep.best_setting(rows, "fused_tile_32"),
        "FUSED_TILE_64": tuning_sweep.best_setting(rows, "fused_tile_64"),
    }
    tuning_sweep.write(bench, "lora_linear", winners, "bench_linear.py")


if __name__ == "__main__":
    main()
