"""Op-level CPU timing: the compiled "cpp" backend vs the pure-PyTorch "torch" backend.

For Llama-ish projection shapes (K -> N) with rank-16 LoRA adapters:

* ``decode-1``: batch 1, one adapter (token_slots [[0]]);
* ``mixed-16``: 16 rows, each on its own adapter out of 16 (token_slots [16, 1]);
* ``prefill-128``: 128 rows on one adapter.

Columns: ``base`` = ``F.linear`` alone (the floor), ``peft`` = PEFT's own ``lora.Linear``
layer with the same weights (mixed batch through its ``adapter_names=``), ``torch`` / ``cpp`` = the routed operator
``torch.ops.fastpeft.adapter_linear`` under ``set_backend("torch")`` / ``set_backend("cpp")``
(what a model layer calls), ``native`` = ``torch.ops.fastpeft.native_adapter_linear`` called
directly (no Python custom-op routing). ``lora:torch`` / ``lora:cpp``: the low-rank part
alone, ``y + sum_j lora_j(x)`` on a precomputed base output, by the reference
(``reference.apply_adapters``) and by ``native_lora_shrink_expand``; the base GEMV of a decode
step is memory-bound and its time wobbles with other processes' memory traffic, which this
pair of columns leaves out. Medians of ``time.perf_counter`` over many calls after warm-up,
all variants timed round-robin.

Rows through bench/common.py's ``Bench`` (its columns: device, date, commit, bench, shape,
tokens, adapters, mixed, rank, dtype, method, mode, median_us, ratio = time / base; then
``case`` (decode-1, ...), K, N, torch_version, ``vs_peft`` = time / PEFT's layer and
``vs_torch`` = time / the same work under the torch backend): one row per method, methods
base, peft, torch, cpp, native, lora:torch, lora:cpp. Appended to
bench/results/cpp_ops_<date>_<threads>t.csv; a line per case as it runs, the table, a plot.

    python bench/bench_cpp_ops.py            # all shapes, fp32 + bf16
    python bench/bench_cpp_ops.py --quick    # one small shape (smoke test)
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import fastpeft.ops as fops  # noqa: E402
from fastpeft import _ext  # noqa: E402
from fastpeft.ops import reference  # noqa: E402

from common import Bench, bar_plot, dtype_name, interleaved_medians_us, sweep  # noqa: E402  (bench/common.py)

SHAPES = {  # name: (K, N)
    "llama7b.q_proj 4096x4096": (4096, 4096),
    "llama7b.up_proj 4096x11008": (4096, 11008),
    "llama7b.down_proj 11008x4096": (11008, 4096),
    "llama1b.q_proj 2048x2048": (2048, 2048),
}
QUICK_SHAPES = {"small 1024x1024": (1024, 1024)}
MODES = {  # name: (rows, adapters, per-row slots?)
    "decode-1": (1, 1, False),
    "mixed-16": (16, 16, True),
    "prefill-128": (128, 1, False),
}
RANK = 16


def make_peft_layer(inp, S, dtype):
    """PEFT's own lora.Linear with the same weights (scaling alpha / r = 2.0), or None."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear
    except Exception:  # noqa: BLE001
        return None
    x, w, _, a, bt = inp[:5]
    try:
        cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, init_lora_weights=False)
        base = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer = PeftLinear(base, "a0", config=cfg, r=RANK, lora_alpha=2 * RANK, init_lora_weights=False)
        for i in range(1, S):
            layer.update_layer(f"a{i}", r=RANK, lora_alpha=2 * RANK, config=cfg, lora_dropout=0.0, init_lora_weights=False)
        with torch.no_grad():
            base.weight.copy_(w.float())
            for i in range(S):
                layer.lora_A[f"a{i}"].weight.copy_(a[i].float())
                layer.lora_B[f"a{i}"].weight.copy_(bt[i].float().t())
        return layer.to(dtype).eval()
    except Exception as e:  # noqa: BLE001  (a PEFT API change must not stop the benchmark)
        print(f"(PEFT layer unavailable: {type(e).__name__}: {e})")
        return None


def make_inputs(M, K, N, S, per_row, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype)
    b = None
    a = (torch.randn(S, RANK, K, generator=g) / math.sqrt(K)).to(dtype)
    bt = (torch.randn(S, RANK, N, generator=g) / math.sqrt(RANK)).to(dtype)
    sc = torch.full((S,), 2.0)
    ts = (torch.arange(M, dtype=torch.int32) % S).reshape(M, 1) if per_row else torch.zeros(1, 1, dtype=torch.int32)
    return (x, w, b, a, bt, sc, ts, None, None, None)


# methods -> key of the timing; the torch-backend counterpart of each (vs_torch)
METHODS = {"base": "base", "peft": "peft", "torch": "torch", "cpp": "cpp", "native": "native",
           "lora:torch": "lora_torch", "lora:cpp": "lora_cpp"}
SAME_WORK_ON_TORCH = {"torch": "torch", "cpp": "torch", "native": "torch", "lora:torch": "lora_torch",
                      "lora:cpp": "lora_torch"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small shape, short timings")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/cpp_ops_<date>_<threads>t.csv)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = ap.parse_args()
    if not _ext.available():
        print(f"fastpeft._C not available: {_ext.error}")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    min_time = 0.1 if args.quick else 0.4
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    native = torch.ops.fastpeft.native_adapter_linear.default
    shrink_expand = torch.ops.fastpeft.native_lora_shrink_expand.default
    routed = torch.ops.fastpeft.adapter_linear

    bench = Bench("cpp_ops", args, stem=f"cpp_ops_{dt.date.today().isoformat()}_{torch.get_num_threads()}t", device="cpu")
    print(f"{bench.device_label}, torch {torch.__version__}, commit {bench.commit}")
    print(
        f"{'shape':28s} {'case':11s} {'dtype':8s} | {'base':>9s} {'peft':>9s} {'torch':>9s} {'cpp':>9s} {'native':>9s}"
        f" {'vsTorch':>7s} {'vsPEFT':>7s} |"
        f" {'lora:torch':>8s} {'cpp':>8s} {'speedup':>7s}   (us, medians)"
    )
    before = fops.get_backend()
    try:
        for shape_name, (K, N) in sweep(shapes.items(), "shapes"):
            for case, (M, S, per_row) in MODES.items():
                for dtype in dtypes:
                    inp = make_inputs(M, K, N, S, per_row, dtype)
                    x, w, _, a, bt, sc, ts = inp[:7]
                    y0 = F.linear(x, w)
                    nothing = lambda: None  # noqa: E731
                    peft_layer = make_peft_layer(inp, S, dtype)
                    peft_names = [f"a{int(s)}" for s in ts[:, 0]] if per_row else None

                    def peft_call(x=x, peft_layer=peft_layer, peft_names=peft_names):
                        with torch.no_grad():
                            return peft_layer(x) if peft_names is None else peft_layer(x, adapter_names=peft_names)

                    t = interleaved_medians_us(
                        {
                            "base": (nothing, partial(F.linear, x, w)),
                            **({"peft": (nothing, peft_call)} if peft_layer is not None else {}),
                            "torch": (partial(fops.set_backend, "torch"), partial(routed, *inp)),
                            "cpp": (partial(fops.set_backend, "cpp"), partial(routed, *inp)),
                            "native": (nothing, partial(native, *inp)),
                            "lora_torch": (nothing, partial(reference.apply_adapters, y0, x, None, a, bt, sc, ts, None)),
                            "lora_cpp": (nothing, partial(shrink_expand, y0, x, a, bt, sc, ts)),
                        },
                        min_time,
                    )
                    fops.set_backend("torch")
                    tol = 1e-3 if dtype == torch.float32 else 1e-1  # bf16: a few ulps of |y| ~ 4
                    torch.testing.assert_close(native(*inp), routed(*inp), rtol=tol, atol=tol)
                    keys = dict(shape=shape_name, tokens=M, adapters=S, mixed=per_row, rank=RANK, dtype=dtype_name(dtype))
                    for method, key in METHODS.items():
                        if key not in t:
                            continue
                        peft_ref = t.get("peft") if not method.startswith("lora:") else None
                        torch_ref = t.get(SAME_WORK_ON_TORCH.get(method, ""))
                        bench.add(**keys, method=method, median_us=round(t[key], 1), case=case, K=K, N=N,
                                  torch_version=torch.__version__,
                                  vs_peft=round(t[key] / peft_ref, 4) if peft_ref else "",
                                  vs_torch=round(t[key] / torch_ref, 4) if torch_ref else "")
                    print(
                        f"{shape_name:28s} {case:11s} {keys['dtype']:8s} | {t['base']:9.1f} {t.get('peft', math.nan):9.1f} "
                        f"{t['torch']:9.1f} {t['cpp']:9.1f} {t['native']:9.1f} {t['torch'] / t['cpp']:6.2f}x "
                        f"{t.get('peft', math.nan) / t['cpp']:6.2f}x | "
                        f"{t['lora_torch']:8.1f} {t['lora_cpp']:8.1f} {t['lora_torch'] / t['lora_cpp']:6.2f}x",
                        flush=True,
                    )
    finally:
        fops.set_backend(before)

    bench.finish(ratio_to="base", table_columns=["shape", "case", "dtype", "method", "median_us", "ratio", "vs_peft",
                                                 "vs_torch"],
                 plot=lambda rows, path: plot(rows, path, bench.device_label))
    return 0


def plot(rows: list, path: str, device: str) -> str:
    """Time over the base layer's per method (peft, torch, cpp, native) and case, as grouped bars."""
    cases = list(dict.fromkeys((r["shape"], r["case"], r["dtype"]) for r in rows))
    ratio = {(r["shape"], r["case"], r["dtype"], r["method"]): r["ratio"] for r in rows}
    series = {m: [ratio.get((*c, m)) or None for c in cases] for m in ("peft", "torch", "cpp", "native")}
    return bar_plot(path, f"adapted linear / base, cpu: {device}", [" ".join(c) for c in cases], series,
                    "time / base (lower is better)")


if __name__ == "__main__":
    raise SystemExit(main())
