#!/usr/bin/env python
"""Quantized bases: fastpeft's fused dequantize + matmul + LoRA vs the fp16 layer, bitsandbytes and PEFT.

Layer 4096 -> 14336 (a Llama-3-8B MLP up projection), LoRA r=16, x in fp16 (4-bit compute dtype
fp16). Per token count, the median time of

* ``base``              ``F.linear`` with the dense fp16 weight (cuBLAS): the reference of the ratios,
* ``bnb``               ``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` alone,
* ``bnb+peft``          PEFT's LoRA layer on that bitsandbytes layer (adapters fp32, PEFT's default),
* ``bnb-gemm_4bit+lora`` (4-bit, CUDA) ``torch.ops.bitsandbytes.gemm_4bit`` (bitsandbytes' own fused
                        op, what its Linear4bit runs at inference) plus the LoRA delta in PyTorch,
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
Tune: python bench/bench_quant.py --tune         (sweeps path threshold, split-K, tiles; writes
                                                   fastpeft/kernels/configs/<device>.json)
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

from common import DTYPES, Bench, add_common_args, copy_bandwidth, sweep  # noqa: E402

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
    p.add_argument("--tune", action="store_true", help="sweep the fused/dequant threshold, split-K and tiles (NF4) and "
                   "write the winners to this device's tuning file (on a CPU: to bench/results/tuning-dryrun/)")
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


def bnb_gemm_4bit_lora(x, packed, qs, lora_a, lora_b, scale):
    """bitsandbytes' own fused 4-bit op (``torch.ops.bitsandbytes.gemm_4bit``, what its
    ``Linear4bit`` runs at inference, CUDA) for the base, PEFT's LoRA in PyTorch on top: the
    baseline a user of bitsandbytes + PEFT compares with. Nested absmax as ``matmul_4bit`` passes it."""
    if qs.nested:
        y = torch.ops.bitsandbytes.gemm_4bit(x, packed, qs.shape, qs.state2.absmax, qs.blocksize, qs.quant_type,
                                             absmax_8bit=qs.absmax, absmax_code=qs.state2.code, absmax_offset=qs.offset)
    else:
        y = torch.ops.bitsandbytes.gemm_4bit(x, packed, qs.shape, qs.absmax, qs.blocksize, qs.quant_type)
    return y + (F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scale).to(y.dtype)


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

    for fmt in sweep([f for f in args.formats.split(",") if f], "formats"):
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
                if bits == 4 and dev.type == "cuda" and hasattr(torch.ops.bitsandbytes, "gemm_4bit"):
                    qs = layer.weight.quant_state
                    A32, B32 = lora.lora_A["default"].weight, lora.lora_B["default"].weight
                    s = lora.scaling["default"]
                    time_and_add(partial(bnb_gemm_4bit_lora, x, layer.weight.data, qs, A32, B32, s), fmt=fmt, tokens=T,
                                 method="bnb-gemm_4bit+lora", wbytes=qbytes)
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
    try:
        if args.tune:
            tune_section(bench, w, R, dt, cfg["dtype"], make_linear4bit, QL, quantized_adapter_linear, stacked, peft_layer)
    finally:  # the rows measured so far are written even when the tuning sweep fails
        bench.finish(ratio_to="base", plot_x="tokens", panel_keys=("shape", "fmt", "dtype"),
                     plot_where=lambda r: r.get("mode") == "eager" and not r["method"].startswith("tune["))
    if not torch.cuda.is_available():
        print("\nCPU run: Triton ran in the interpreter; these fastpeft timings are not performance numbers.")


# --tune candidates (BM, BN, BK, num_warps, num_stages); the first is the built-in rule
TUNE_DECODE_TILES = [(16, 64, 64, 8, 3), (16, 128, 64, 8, 3), (16, 64, 128, 8, 3), (16, 64, 64, 4, 4)]
TUNE_SPLIT_K = [1, 2, 4, 8]
TUNE_TOKENS = [1, 16, 64, 128, 256, 512, 1024]


def tune_section(bench, w, R, dt, dname, make_linear4bit, QL, quantized_adapter_linear, stacked, peft_layer):
    """NF4 with double quantization: fused kernel vs dequantize + cuBLAS per token count (sets
    PREFILL_MIN_ROWS), split-K and decode tiles of the fused kernel; writes the winners."""
    import tuning_sweep

    dev = bench.device
    K, N = w.shape[1], w.shape[0]
    layer = make_linear4bit(w, None, quant_type="nf4", double_quant=True, compute_dtype=dt).to(dev)
    a, b, sc, slots = stacked(peft_layer(layer, 4, R).to(dev), dt, dev)
    rows = []

    def time_knob(knob, attr, values, tokens):
        for t in sweep(tokens, f"tune {knob}"):
            x = torch.randn(t, K, device=dev, dtype=dt)
            for v in values:
                old = getattr(QL, attr)
                setattr(QL, attr, v)
                try:
                    with torch.no_grad():
                        us = bench.time(partial(quantized_adapter_linear, layer, x, a, b, sc, slots, None, None, None))
                except Exception as e:  # a tile that does not compile on this device: not a candidate
                    print(f"  tune {knob}={v} at {t} tokens: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                    us = None
                finally:
                    setattr(QL, attr, old)
                rows.append(dict(knob=knob, value=v, case=(f"{K}x{N}", dname, t), median_us=us))
                if us is not None:
                    bench.add(shape=f"{K}x{N}", tokens=t, rank=R, dtype=dname, method=f"tune[{knob}={v}]", fmt="nf4",
                              median_us=us, mode="eager")

    time_knob("path", "FORCE_PATH", ["fused", "dequant"], TUNE_TOKENS if not bench.quick else [1, 16, 64])
    time_knob("split_k", "FORCE_SPLIT_K", TUNE_SPLIT_K, [1])
    time_knob("decode_tile", "FORCE_TILE", TUNE_DECODE_TILES, [1])
    fused_up_to = tuning_sweep.threshold_rows(rows, "path", "fused", "dequant")
    swept = sorted({r["case"][-1] for r in rows if r["knob"] == "path" and r["median_us"]})
    above = [t for t in swept if fused_up_to is None or t > fused_up_to]
    winners = {
        # dequantize + cuBLAS from the first swept count where the fused kernel stops winning
        # (the smallest count when it never wins; no key when it wins everywhere: built-in rule)
        "PREFILL_MIN_ROWS": above[0] if above else None,
        "MAX_SPLIT_K": tuning_sweep.best_setting(rows, "split_k"),
        "DECODE_TILE": tuning_sweep.best_setting(rows, "decode_tile"),
    }
    tuning_sweep.write(bench, "quant_linear", winners, "bench_quant.py")


if __name__ == "__main__":
    main()
