"""Shared helpers for the benchmark scripts in bench/: timing, CUDA graphs, bandwidth, CSV, table, plot.

Every bench script measures medians the same way and writes rows with the same leading
columns, so results from different scripts and machines can be put side by side::

    from common import Bench, timer_for, add_common_args

    args = add_common_args(argparse.ArgumentParser()).parse_args()
    bench = Bench("linear", args)               # device name, date, git commit, output paths
    t = bench.time(fn)                          # median microseconds (eager)
    t_graph = bench.time(fn, cuda_graph=True)   # median of a CUDA-graph replay of fn (GPU only)
    bench.add(shape="4096x4096", tokens=1, rank=16, dtype="bf16", method="base", mode="eager", median_us=t)
    bench.finish(ratio_to="base", plot_x="tokens")  # ratios, CSV, printed table, plot

Timing: on a GPU ``triton.testing.do_bench`` (median, L2 flushed before every call, so
memory-bound kernels are not flattered by a warm cache); on a CPU ``time.perf_counter`` medians.
Rows go to ``bench/results/<name>-<device>-<date>.csv`` (appending, header once) with the
columns ``device, date, commit, shape, tokens, rank, dtype, method, median_us, ratio`` first,
then ``mode`` and any extra keys a script adds.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BASE_COLUMNS = ["device", "date", "commit", "shape", "tokens", "rank", "dtype", "method", "median_us", "ratio"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ---- environment ------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--quick, --device, --out, --no-plot, --no-graphs, --rep, --warmup."""
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (runs on a CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", default=None, help="CSV path (default: bench/results/<name>-<device>-<date>.csv)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--rep", type=int, default=None, help="GPU: ms of repetitions per timing (do_bench rep); CPU: calls")
    parser.add_argument("--warmup", type=int, default=None, help="GPU: ms of warm-up (do_bench warmup); CPU: calls")
    return parser


def default_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def git_commit() -> str:
    """Short commit of the working tree, with ``+dirty`` when it has uncommitted changes
    (results appended to ``bench/results/`` by earlier runs do not count)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        commit = sha.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top)bench/results"], cwd=here, capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # no git
        return "unknown"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()


# ---- timing -----------------------------------------------------------------------------------


def time_cpu(fn: Callable[[], object], warmup: int = 2, rep: int = 10) -> float:
    """Median wall time of ``fn()`` in microseconds (CPU tensors)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, rep)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def time_cuda(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn()`` in microseconds via ``triton.testing.do_bench`` (L2 flushed per call)."""
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    return ms * 1e3


def capture_cuda_graph(fn: Callable[[], object], warmup: int = 3):
    """Capture ``fn()`` into a CUDA graph (after warm-up on a side stream, as PyTorch advises).

    Returns ``(replay, out)``: a callable replaying the graph, and the output tensor(s) the graph
    writes into.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph.replay, out


def timer_for(device: torch.device, quick: bool = False, warmup: int | None = None, rep: int | None = None):
    """A ``time(fn, cuda_graph=False) -> median µs`` function for ``device``."""

    def time_fn(fn: Callable[[], object], cuda_graph: bool = False) -> float:
        if device.type == "cuda":
            w = warmup if warmup is not None else (5 if quick else 25)
            r = rep if rep is not None else (20 if quick else 100)
            if cuda_graph:
                replay, _ = capture_cuda_graph(fn)
                return time_cuda(replay, w, r)
            return time_cuda(fn, w, r)
        if cuda_graph:
            raise RuntimeError("CUDA graphs need a CUDA device")
        return time_cpu(fn, warmup if warmup is not None else 1, rep if rep is not None else (3 if quick else 10))

    return time_fn


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, quick: bool = False) -> float:
    """Measured device copy bandwidth in GB/s (read + write bytes of ``dst.copy_(src)``)."""
    if quick:
        nbytes = min(nbytes, 1 << 24)
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    src.fill_(1.0)
    us = timer_for(device, quick)(lambda: dst.copy_(src))
    return 2 * n * 2 / (us * 1e-6) / 1e9


# ---- results ----------------------------------------------------------------------------------


class Bench:
    """Collects rows for one script run; writes the CSV, prints the table, draws the plot."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name = name
        self.args = args
        self.device = default_device(getattr(args, "device", None))
        self.device_name = device_name(self.device)
        self.date = _dt.datetime.now().strftime("%Y-%m-%d")
        self.commit = git_commit()
        self.quick = bool(getattr(args, "quick", False))
        self.time = timer_for(self.device, self.quick, getattr(args, "warmup", None), getattr(args, "rep", None))
        self.rows: list[dict] = []
        stem = f"{name}-{slug(self.device_name)}-{self.date}" + ("-quick" if self.quick else "")
        self.csv_path = getattr(args, "out", None) or os.path.join(RESULTS_DIR, stem + ".csv")
        self.plot_path = os.path.splitext(self.csv_path)[0] + ".png"

    def add(self, **fields) -> dict:
        """Record one measurement (``median_us`` plus whatever describes it)."""
        row = {"device": self.device_name, "date": self.date, "commit": self.commit, "mode": "eager"}
        row.update(fields)
        self.rows.append(row)
        return row

    def finish(self, ratio_to: str | None = "base", plot_x: str = "tokens", table_columns: list | None = None,
               plot_title: str | None = None, plot_where: Callable[[dict], bool] | None = None) -> None:
        """Ratios to ``ratio_to`` (per GROUP_KEYS group), CSV, table, plot of the rows ``plot_where`` keeps."""
        if ratio_to:
            add_ratios(self.rows, ratio_to)
        write_csv(self.rows, self.csv_path)
        print_table(self.rows, table_columns)
        print(f"\n{len(self.rows)} rows -> {self.csv_path}")
        if not getattr(self.args, "no_plot", False):
            rows = [r for r in self.rows if plot_where is None or plot_where(r)]
            plot_ratios(rows, self.plot_path, x=plot_x, title=plot_title or f"{self.name} on {self.device_name}")


# rows compared with each other: same layer shape, tokens, rank, dtype, eager/graph, and batch
# kind (an extra key a script may set, e.g. "mixed64" for one adapter per token)
GROUP_KEYS = ("shape", "tokens", "rank", "dtype", "mode", "batch")


def add_ratios(rows: list[dict], baseline: str, keys: Iterable[str] = GROUP_KEYS) -> None:
    """``ratio = median_us / median_us of the baseline method`` within each group of ``keys``."""
    keys = tuple(keys)
    base = {tuple(r.get(k) for k in keys): r["median_us"] for r in rows if r.get("method") == baseline}
    for r in rows:
        b = base.get(tuple(r.get(k) for k in keys))
        r["ratio"] = round(r["median_us"] / b, 4) if b else ""


def write_csv(rows: list[dict], path: str) -> None:
    """Append ``rows`` to ``path`` (header written once; standard columns first, then extras)."""
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = []
    for r in rows:
        for k in r:
            if k not in BASE_COLUMNS and k not in extra:
                extra.append(k)
    columns = BASE_COLUMNS + extra
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header and header != columns:  # another layout: keep both, never mix columns
            root, ext = os.path.splitext(path)
            path = f"{root}-{len(columns)}cols{ext}"
            exists = os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if not exists:
            w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in columns})


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.1f}"
    return v


def print_table(rows: list[dict], columns: list | None = None) -> None:
    """A fixed-width table of ``rows`` (default: the varying descriptive columns + timings)."""
    if not rows:
        print("(no rows)")
        return
    if columns is None:
        skip = {"device", "date", "commit"}
        columns = [c for c in rows[0] if c not in skip]
        for r in rows:
            columns += [c for c in r if c not in columns and c not in skip]
        # keep the measured numbers at the end
        columns = [c for c in columns if c not in ("median_us", "ratio")] + ["median_us", "ratio"]
    cells = [[str(_fmt(r.get(c, ""))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _numeric(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def plot_ratios(rows: list[dict], path: str, x: str = "tokens", panel_keys=("shape", "rank", "dtype"),
                mode: str = "eager", title: str = "") -> str | None:
    """Ratio-to-baseline vs ``x`` (log axis), one line per method, one panel per ``panel_keys``.

    Skips with a message when matplotlib is not importable. Returns the path written, or None.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # not installed / no backend
        print(f"plot skipped: matplotlib not importable ({type(e).__name__}: {e})")
        return None
    sel = [r for r in rows if r.get("mode", "eager") == mode and r.get("ratio") not in ("", None)]
    if not sel:
        print("plot skipped: no rows with ratios")
        return None
    panels = sorted({tuple(r.get(k) for k in panel_keys) for r in sel}, key=str)
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        prow = [r for r in sel if tuple(r.get(k) for k in panel_keys) == panel]
        for method in sorted({r["method"] for r in prow}):
            pts = sorted((float(r[x]), float(r["ratio"])) for r in prow if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(" ".join(f"{k}={v}" for k, v in zip(panel_keys, panel, strict=True)), fontsize=8)
        ax.set_xlabel(x)
        ax.set_ylabel("time / base")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot -> {path}")
    return path


_SVG_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def svg_bars(path: str, title: str, groups: list[str], series: dict, ylabel: str = "") -> str:
    """Grouped bar chart as a standalone SVG file (no plotting library needed).

    ``groups``: labels along x; ``series``: name -> one value (or None: no bar) per group.
    Returns the path written."""
    width, height, left, bottom, top = 760, 360, 60, 60, 40
    plot_w, plot_h = width - left - 20, height - bottom - top
    vmax = max([v for vals in series.values() for v in vals if v is not None] or [1.0]) * 1.1
    gw = plot_w / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)

    def esc(t) -> str:
        return str(t).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="13">{esc(title)}</text>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
           f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" '
           f'text-anchor="middle">{esc(ylabel)}</text>']
    for i in range(5):  # y ticks
        v = vmax * i / 4
        y = top + plot_h - plot_h * i / 4
        label = f"{v:.0f}" if vmax >= 100 else f"{v:.3g}"
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for gi, g in enumerate(groups):
        x0 = left + gi * gw + gw * 0.1
        out.append(f'<text x="{left + gi * gw + gw / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{esc(g)}</text>')
        for si, (name, vals) in enumerate(series.items()):
            v = vals[gi]
            if v is None:
                continue
            h = plot_h * v / vmax
            out.append(f'<rect x="{x0 + si * bw:.1f}" y="{top + plot_h - h:.1f}" width="{bw * 0.95:.1f}" '
                       f'height="{h:.1f}" fill="{_SVG_COLORS[si % len(_SVG_COLORS)]}"><title>{esc(name)}: {v:.4g}'
                       f'</title></rect>')
    for si, name in enumerate(series):  # legend
        x = left + 10 + si * 110
        out.append(f'<rect x="{x}" y="{height - 22}" width="10" height="10" fill="{_SVG_COLORS[si % len(_SVG_COLORS)]}"/>'
                   f'<text x="{x + 14}" y="{height - 13}">{esc(name)}</text>')
    out.append("</svg>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out))
    return path
