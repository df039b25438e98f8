#!/usr/bin/env python
"""Quantized bases: fastpeft's fused dequantize + matmul + LoRA vs the fp16 layer, bitsandbytes and PEFT.

Layer 4096 -> 14336 (a Llama-3-8B MLP up projection), LoRA r=16, x in fp16 (4-bit compute dtype
fp16). Per token count, the median time of

* ``base``              ``F.linear`` with the dense fp16 weight (cuBLAS): the reference of the ratios,
* ``bnb``               ``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` alone,
* ``bnb+peft``          PEFT's LoRA layer on that bitsandbytes layer (adapters fp32, PEFT's default),
* ``bnb-dequant+cublas`` (4-bit) ``bnb.functional.dequantize_4bit`` then ``F.linear``, plus the LoRA
                        delta in PyTorch: what a prefill pays with bitsandbytes' own kernels,
* ``fastpeft``          ``quantized_adapter_linear`` (``torch.ops.fastpeft.adapter_linear_4bit/8bit``,
                        Triton backend, adapters in the activation dtype),
* ``fastpeft[PATH]``    with ``--paths``: the kernel path forced ("fused", "dequant"), which sets
                        ``PREFILL_MIN_ROWS`` in fastpeft/kernels/quant_linear.py,

for NF4 (double quantization) at 1..16 tokens and at 4096 tokens, and for LLM.int8 at 1..16
tokens, eager (and replayed from a CUDA graph unless --no-graphs), with the achieved weight
bandwidth (packed bytes / time) next to the device's copy bandwidth.

GPU:  python bench/bench_quant.py                 (a few minutes)
      python bench/bench_quant.py --paths fused,dequant --tokens 1,16,64,256,1024,4096
CPU:  python bench/bench_quant.py --quick         (tiny layer, Triton interpreter: checks the script;
                                                   its fastpeft timings mean nothing)
Rows: bench/results/quant-<device>-<date>.csv (see bench/common.py), a table, a plot.
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

from common import DTYPES, Bench, add_common_args, copy_bandwidth  # noqa: E402

FULL = dict(shape=(4096, 14336), rank=16, decode=[1, 2, 4, 8, 16], prefill=[4096], dtype="fp16")
QUICK = dict(shape=(128, 256), rank=8, decode=[1, 16], prefill=[64], dtype="fp16")


def parse_args():
    p = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--shape", default=None, help="INxOUT, e.g. 4096x14336")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--tokens", default=None, help="comma list of decode token counts (default 1,2,4,8,16)")
    p.add_argument("--prefill", default=None, help="comma list of prefill token counts (default 4096)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="activation dtype (default fp16)")
    p.add_argument("--formats", default="nf4,int8", help="comma list of nf4, fp4, int8")
    p.add_argument("--paths", default="", help="also time forced kernel paths: comma list of fused, dequant, base_fused")
    return p.parse_args()


class _Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer


def peft_layer(layer, bits, rank):
    """PEFT's LoRA layer on a bitsandbytes layer, built by peft itself (random A and B)."""
    import peft

    model = _Wrap(layer)
    setattr(model, "is_loaded_in_4bit" if bits == 4 else "is_loaded_in_8bit", True)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"],
                                                    lora_dropout=0.0, init_lora_weights=False))
    pm.eval()
    return pm.base_model.model.proj


def stacked(lora_layer, dtype, device):
    A = lora_layer.lora_A["default"].weight
    B = lora_layer.lora_B["default"].weight
    a = A.detach().to(device=device, dtype=dtype)[None].contiguous()
    b = B.detach().t().to(device=device, dtype=dtype)[None].contiguous()
    scale = torch.tensor([lora_layer.scaling["default"]], dtype=torch.float32, device=device)
    slots = torch.zeros(1, 1, dtype=torch.int32, device=device)
    return a, b, scale, slots


def main():
    args = parse_args()
    cfg = QUICK if args.quick else FULL
    if args.shape:
        k, n = args.shape.lower().split("x")
        cfg = dict(cfg, shape=(int(k), int(n)))
    if args.rank:
        cfg = dict(cfg, rank=args.rank)
    if args.tokens:
        cfg = dict(cfg, decode=[int(t) for t in args.tokens.split(",")])
    if args.prefill is not None:
        cfg = dict(cfg, prefill=[int(t) for t in args.prefill.split(",") if t])
    if args.dtype:
        cfg = dict(cfg, dtype=args.dtype)
    bench = Bench("quant", args)
    dev = bench.device

    import bitsandbytes.functional as BF

    import fastpeft.ops as ops
    from fastpeft.kernels import quant_linear as QL
    from fastpeft.quant.layers import make_linear4bit, make_linear8bit, quantized_adapter_linear

    if "triton" in ops.available_backends():
        ops.set_backend("triton")
    else:
        print(f"triton backend unavailable ({ops.available_backends(verbose=True)['triton']}): fastpeft rows use 'torch'")
    graphs = dev.type == "cuda" and not args.no_graphs
    paths = [p for p in args.paths.split(",") if p]
    K, N = cfg["shape"]
    R = cfg["rank"]
    dt = DTYPES[cfg["dtype"]]
    shape = f"{K}x{N}"
    gbps_copy = copy_bandwidth(dev, quick=bench.quick)
    print(f"device {bench.device_name}: copy bandwidth {gbps_copy:.0f} GB/s")

    torch.manual_seed(0)
    dense = nn.Linear(K, N, bias=False, device=dev, dtype=dt)
    w = dense.weight.detach()

    def time_and_add(fn, *, fmt, tokens, method, wbytes=None, graph=True):
        rows = []
        try:
            us = bench.time(fn)
        except Exception as e:  # a method that cannot run here: say so, keep going
            print(f"skip {method} ({fmt}, {tokens} tokens): {type(e).__name__}: {e}")
            return
        extra = {} if wbytes is None else {"weight_gbps": round(wbytes / (us * 1e-6) / 1e9, 1)}
        rows.append(bench.add(shape=shape, tokens=tokens, rank=R, dtype=cfg["dtype"], method=method, fmt=fmt,
                              median_us=us, mode="eager", **extra))
        if graphs and graph:
            try:
                gus = bench.time(fn, cuda_graph=True)
                bench.add(shape=shape, tokens=tokens, rank=R, dtype=cfg["dtype"], method=method, fmt=fmt, median_us=gus,
                          mode="graph", **({} if wbytes is None else {"weight_gbps": round(wbytes / (gus * 1e-6) / 1e9, 1)}))
            except Exception as e:
                print(f"no CUDA graph for {method}: {type(e).__name__}: {e}")

    for fmt in [f for f in args.formats.split(",") if f]:
        bits = 8 if fmt == "int8" else 4
        if bits == 4:
            layer = make_linear4bit(w, None, quant_type=fmt, double_quant=True, compute_dtype=dt)
            qbytes = K * N // 2 + (K * N // 64) + (K * N // 64 // 256) * 4
        else:
            layer = make_linear8bit(w, None)
            qbytes = K * N + 4 * N
        layer = layer.to(dev)
        plain = _Wrap(layer).proj  # bitsandbytes alone (the same module object, before PEFT wraps it)
        lora = peft_layer(layer, bits, R).to(dev)
        a, b, sc, slots = stacked(lora, dt, dev)
        token_counts = list(cfg["decode"]) + (list(cfg["prefill"]) if bits == 4 else [])
        for T in token_counts:
            x = torch.randn(T, K, device=dev, dtype=dt)
            with torch.no_grad():
                time_and_add(partial(F.linear, x, w), fmt=fmt, tokens=T, method="base", wbytes=K * N * 2)
                time_and_add(partial(plain, x), fmt=fmt, tokens=T, method="bnb", wbytes=qbytes)
                time_and_add(partial(lora, x), fmt=fmt, tokens=T, method="bnb+peft", wbytes=qbytes)
                if bits == 4 and T in cfg["prefill"]:
                    qs = layer.weight.quant_state
                    A32, B32 = lora.lora_A["default"].weight, lora.lora_B["default"].weight
                    s = lora.scaling["default"]

                    def deq_cublas(x=x, layer=layer, qs=qs, A32=A32, B32=B32, s=s):
                        W = BF.dequantize_4bit(layer.weight.data, qs).to(dt)
                        return F.linear(x, W) + (F.linear(F.linear(x.float(), A32), B32) * s).to(dt)

                    time_and_add(deq_cublas, fmt=fmt, tokens=T, method="bnb-dequant+cublas", wbytes=qbytes)
                time_and_add(partial(quantized_adapter_linear, layer, x, a, b, sc, slots, None, None, None), fmt=fmt,
                             tokens=T, method="fastpeft", wbytes=qbytes)
                for p in paths:
                    def forced(p=p, x=x, layer=layer, a=a, b=b, sc=sc, slots=slots):
                        QL.FORCE_PATH = p
                        try:
                            return quantized_adapter_linear(layer, x, a, b, sc, slots, None, None, None)
                        finally:
                            QL.FORCE_PATH = None

                    time_and_add(forced, fmt=fmt, tokens=T, method=f"fastpeft[{p}]", wbytes=qbytes, graph=False)
    bench.finish(ratio_to="base", plot_x="tokens", plot_where=lambda r: r.get("mode") == "eager")
    if not torch.cuda.is_available():
        print("\nCPU run: Triton ran in the interpreter; these fastpeft timings are not performance numbers.")


if __name__ == "__main__":
    main()
