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
memory-bound kernels are not flattered by a warm cache); on a CPU ``torch.utils.benchmark.Timer``
(blocked autorange, the median per-call time). Plots are PNGs drawn by matplotlib (the
``bench`` extra); sweeps show a progress bar that prints around the scripts' own lines.
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
    parser.add_argument("--rep", type=int, default=None,
                        help="GPU: ms of repetitions per timing (do_bench rep); CPU: units of 10 ms of blocked autorange")
    parser.add_argument("--warmup", type=int, default=None, help="GPU: ms of warm-up (do_bench warmup); CPU: untimed calls")
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


class _AroundBars:
    """A stdout whose writes go through ``tqdm.write``: printed lines appear above the progress
    bars (which live on stderr) instead of through them."""

    def __init__(self, real):
        self.real = real

    def write(self, text: str) -> int:
        from tqdm import tqdm

        tqdm.write(text, file=self.real, end="")
        return len(text)

    def flush(self) -> None:
        self.real.flush()


def sweep(items, desc: str):
    """Iterate ``items`` under a progress bar (huggingface_hub's tqdm: ``HF_HUB_DISABLE_PROGRESS_BARS=1``
    hides it); what the loop prints meanwhile goes above the bar, and the bar goes away at the end."""
    import contextlib
    import sys

    from huggingface_hub.utils import tqdm

    items = list(items)
    with contextlib.redirect_stdout(_AroundBars(sys.stdout)):
        yield from tqdm(items, desc=desc, total=len(items), leave=False)


def time_cpu(fn: Callable[[], object], warmup: int = 2, rep: int = 10) -> float:
    """Median time of ``fn()`` in microseconds on the CPU, by ``torch.utils.benchmark.Timer``'s
    blocked autorange (blocks of calls until ``rep`` x 10 ms have been measured, at least one
    block; the median over the blocks' per-call times). ``warmup`` untimed calls first."""
    from torch.utils import benchmark

    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=max(rep, 1) * 0.01).median * 1e6


def interleaved_medians_us(variants: dict, min_time: float = 0.4, rounds: int = 5, warmup: int = 3) -> dict:
    """Median call time (us) of each variant, measured round-robin: ``rounds`` rounds, in each a
    ``torch.utils.benchmark.Timer`` blocked autorange of ``min_time / rounds`` s per variant;
    the result is the median over the rounds. Interleaving makes every variant see the same
    background load on a shared machine, so the ratios stay meaningful when absolute times
    wobble. ``variants``: name -> (setup, fn); ``setup()`` runs untimed before each measurement
    (e.g. ``set_backend``)."""
    from torch.utils import benchmark

    for setup, fn in variants.values():
        setup()
        for _ in range(warmup):
            fn()
    per_round = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (setup, fn) in variants.items():
            setup()
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            per_round[name].append(timer.blocked_autorange(min_run_time=min_time / rounds).median)
    return {name: statistics.median(v) * 1e6 for name, v in per_round.items()}


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
               plot_title: str | None = None, plot_where: Callable[[dict], bool] | None = None,
               panel_keys=("shape", "rank", "dtype")) -> None:
        """Ratios to ``ratio_to`` (per GROUP_KEYS group), CSV, table, plot of the rows ``plot_where`` keeps."""
        if ratio_to:
            add_ratios(self.rows, ratio_to)
        write_csv(self.rows, self.csv_path)
        print_table(self.rows, table_columns)
        print(f"\n{len(self.rows)} rows -> {self.csv_path}")
        if not getattr(self.args, "no_plot", False):
            rows = [r for r in self.rows if plot_where is None or plot_where(r)]
            plot_ratios(rows, self.plot_path, x=plot_x, panel_keys=panel_keys,
                        title=plot_title or f"{self.name} on {self.device_name}")


# rows compared with each other: same layer shape, tokens, rank, dtype, eager/graph, and batch
# kind (an extra key a script may set, e.g. "mixed64" for one adapter per token)
GROUP_KEYS = ("shape", "tokens", "rank", "dtype", "mode", "batch", "fmt")


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


def _pyplot():
    """matplotlib's pyplot on the Agg backend; a clear error when the ``bench`` extra is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit(f"the plots need matplotlib ({e}): pip install -e '.[bench]' (or pass --no-plot)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, svg: bool, rect=(0, 0, 1, 1)) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=120)
    if svg:
        fig.savefig(os.path.splitext(path)[0] + ".svg")
    return path


def plot_ratios(rows: list[dict], path: str, x: str = "tokens", panel_keys=("shape", "rank", "dtype"),
                mode: str = "eager", title: str = "", svg: bool = False) -> str | None:
    """Ratio-to-baseline vs ``x`` (log axis), one line per method, one panel per ``panel_keys``:
    a PNG at ``path`` (and an SVG beside it with ``svg``). Returns the path, or None without rows."""
    sel = [r for r in rows if r.get("mode", "eager") == mode and r.get("ratio") not in ("", None)]
    if not sel:
        print("plot skipped: no rows with ratios")
        return None
    plt = _pyplot()
    panels = sorted({tuple(r.get(k) for k in panel_keys) for r in sel}, key=str)
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    methods = sorted({r["method"] for r in sel})
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}  # one colour per method everywhere
    for ax, panel in zip(axes.flat, panels, strict=False):
        prow = [r for r in sel if tuple(r.get(k) for k in panel_keys) == panel]
        for method in sorted({r["method"] for r in prow}):
            pts = sorted((float(r[x]), float(r["ratio"])) for r in prow if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method, color=colors[method])
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(" ".join(f"{k}={v}" for k, v in zip(panel_keys, panel, strict=True)), fontsize=8)
        ax.set_xlabel(x)
        ax.set_ylabel("time / base")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[m], marker="o", label=m) for m in methods]
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncols=min(6, len(methods)), bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title, fontsize=10)
    _save(fig, path, svg, rect=(0, 0.06 * ((len(methods) + 5) // 6) / nrows, 1, 1))
    plt.close(fig)
    print(f"plot -> {path}")
    return path


def bar_plot(path: str, title: str, groups: list[str], series: dict, ylabel: str = "", svg: bool = False) -> str:
    """Grouped bars: ``groups`` along x, ``series`` name -> one value (or None: no bar) per group.
    Writes a PNG at ``path`` (and an SVG beside it with ``svg``); returns the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7.5, 1.3 * len(groups)), 4.0))
    width = 0.8 / max(len(series), 1)
    for k, (name, vals) in enumerate(series.items()):
        xs = [i + k * width for i, v in enumerate(vals) if v is not None]
        shown = [v for v in vals if v is not None]
        bars = ax.bar(xs, shown, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.0f}" if abs(v) >= 10 else f"{v:.3g}" for v in shown], fontsize=6, padding=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    long = max((len(g) for g in groups), default=0) > 18
    ax.set_xticklabels(groups, fontsize=8, rotation=20 if long else 0, ha="right" if long else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncols=min(5, len(series)))
    ax.margins(y=0.15)
    _save(fig, path, svg)
    plt.close(fig)
    return path
