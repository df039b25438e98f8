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

Writes bench/results/cpp_ops_<date>.csv (device, date, commit) and prints a table.

    python bench/bench_cpp_ops.py            # all shapes, fp32 + bf16
    python bench/bench_cpp_ops.py --quick    # one small shape (smoke test)
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import subprocess
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

from common import bar_plot, interleaved_medians_us, sweep, write_csv  # noqa: E402  (bench/common.py)

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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small shape, short timings")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/cpp_ops_<date>.csv)")
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

    meta = dict(
        device=f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)",
        date=dt.datetime.now().isoformat(timespec="seconds"),
        commit=commit(),
        torch=torch.__version__,
    )
    rows = []
    print(
        f"{'shape':28s} {'mode':11s} {'dtype':8s} | {'base':>9s} {'peft':>9s} {'torch':>9s} {'cpp':>9s} {'native':>9s}"
        f" {'vsTorch':>7s} {'vsPEFT':>7s} |"
        f" {'lora:torch':>8s} {'cpp':>8s} {'speedup':>7s}   (us, medians)"
    )
    before = fops.get_backend()
    try:
        for shape_name, (K, N) in sweep(shapes.items(), "shapes"):
            for mode, (M, S, per_row) in MODES.items():
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
                    rows.append(
                        dict(
                            meta,
                            shape=shape_name,
                            mode=mode,
                            M=M,
                            K=K,
                            N=N,
                            rank=RANK,
                            adapters=S,
                            dtype=str(dtype).replace("torch.", ""),
                            base_us=round(t["base"], 1),
                            peft_us=round(t["peft"], 1) if "peft" in t else "",
                            torch_us=round(t["torch"], 1),
                            cpp_us=round(t["cpp"], 1),
                            native_us=round(t["native"], 1),
                            speedup_cpp_vs_torch=round(t["torch"] / t["cpp"], 3),
                            speedup_cpp_vs_peft=round(t["peft"] / t["cpp"], 3) if "peft" in t else "",
                            lora_torch_us=round(t["lora_torch"], 1),
                            lora_cpp_us=round(t["lora_cpp"], 1),
                            lora_speedup=round(t["lora_torch"] / t["lora_cpp"], 3),
                        )
                    )
                    r = rows[-1]
                    print(
                        f"{shape_name:28s} {mode:11s} {r['dtype']:8s} | {r['base_us']:9.1f} {t.get('peft', math.nan):9.1f} "
                        f"{r['torch_us']:9.1f} {r['cpp_us']:9.1f} {r['native_us']:9.1f} {r['speedup_cpp_vs_torch']:6.2f}x "
                        f"{t.get('peft', math.nan) / t['cpp']:6.2f}x | "
                        f"{r['lora_torch_us']:8.1f} {r['lora_cpp_us']:8.1f} {r['lora_speedup']:6.2f}x",
                        flush=True,
                    )
    finally:
        fops.set_backend(before)

    default = f"cpp_ops_{dt.date.today().isoformat()}_{torch.get_num_threads()}t.csv"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / default
    write_csv(rows, str(out))
    print(f"\n{meta['device']}, torch {meta['torch']}, commit {meta['commit']}; wrote {out}")
    if not args.no_plot:
        groups = [f"{r['shape']} {r['mode']} {r['dtype']}" for r in rows]
        series = {m: [r[f"{m}_us"] / r["base_us"] if r[f"{m}_us"] != "" else None for r in rows]
                  for m in ("peft", "torch", "cpp", "native")}
        png = bar_plot(str(out.with_suffix(".png")), f"adapted linear / base, {meta['device']}", groups, series,
                       "time / base (lower is better)")
        print(f"plot -> {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
