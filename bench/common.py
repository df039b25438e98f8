"""Shared helpers for the benchmark scripts in bench/: timing, CUDA graphs, bandwidth, and ``Bench``.

Every bench script measures medians the same way and writes its rows through ``Bench``, so
results from different scripts and machines share one schema and can be put side by side::

    from common import Bench, timer_for, add_common_args

    args = add_common_args(argparse.ArgumentParser()).parse_args()
    bench = Bench("linear", args)               # device, date, git commit, output paths
    t = bench.time(fn)                          # median microseconds (eager)
    t_graph = bench.time(fn, cuda_graph=True)   # median of a CUDA-graph replay of fn (GPU only)
    bench.add(shape="4096x4096", tokens=1, rank=16, dtype="bf16", method="base", mode="eager", median_us=t)
    bench.finish(ratio_to="base", plot_x="tokens")  # ratios, CSV, printed table, plot

Timing: on a GPU ``triton.testing.do_bench`` (median, L2 flushed before every call, so
memory-bound kernels are not flattered by a warm cache); on a CPU ``torch.utils.benchmark.Timer``
(blocked autorange, the median per-call time). Plots are PNGs drawn by matplotlib (the
``bench`` extra); sweeps show a progress bar that prints around the scripts' own lines.
Rows go to ``bench/results/<name>-<device>-<date>.csv`` (appending, header once; a script may
name its file otherwise) with the columns of ``fastpeft.benchmarks.results`` first
(``device, date, commit, bench, config, shape, tokens, adapters, mixed, rank, dtype, method,
mode, median_us, ratio``), then the keys a script adds. The rows, the CSV, the table and the
plots are ``fastpeft.benchmarks``' (the demo writes its rows with the same code).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
from collections.abc import Callable

import torch

from fastpeft.benchmarks.plots import bar_plot, plot_ratios
from fastpeft.benchmarks.results import (
    COLUMNS,
    GROUP_KEYS,
    Results,
    add_ratios,
    cpu_model,
    device_label,
    dtype_name,
    git_commit,
    print_table,
    slug,
    sweep,
    write_csv,
)

__all__ = [  # the helpers the scripts import from here (several are fastpeft.benchmarks')
    "COLUMNS", "BASE_COLUMNS", "DTYPES", "GROUP_KEYS", "RESULTS_DIR", "Bench", "Results", "add_common_args", "add_ratios",
    "bar_plot", "capture_cuda_graph", "copy_bandwidth", "cpu_model", "default_device", "device_label", "device_name",
    "dtype_name", "git_commit", "interleaved_medians_us", "plot_ratios", "print_table", "slug", "sweep", "time_cpu",
    "time_cuda", "timer_for", "write_csv",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
BASE_COLUMNS = COLUMNS  # the former name
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
    """The device's short name, for file names and titles (the CSV's ``device`` column is
    ``device_label``: on a CPU with the model and the thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


# ---- timing -----------------------------------------------------------------------------------


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


def _nothing():
    return None


def thread_time_rounds(variants: dict, min_time: float, rounds: int) -> dict:
    """``{name: [µs per call in each round]}`` for ``variants`` (name -> zero-argument callable),
    interleaved over ``rounds`` rounds of about ``min_time / rounds`` s each, timed with the
    thread's CPU time (``time.thread_time_ns``): with one torch thread that time is the call's own
    work, which other jobs on a loaded machine do not inflate the way they inflate wall time."""
    import time

    for f in variants.values():
        f()
        f()
    calls = {}
    for n, f in variants.items():  # calls per round from one timed call
        t0 = time.thread_time_ns()
        f()
        calls[n] = max(1, int(min_time / rounds / max((time.thread_time_ns() - t0) * 1e-9, 1e-6)))
    per = {n: [] for n in variants}
    for _ in range(rounds):
        for n, f in variants.items():
            t0 = time.thread_time_ns()
            for _ in range(calls[n]):
                f()
            per[n].append((time.thread_time_ns() - t0) / 1e3 / calls[n])
    return per


def cpu_medians_us(variants: dict, min_time: float, rounds: int = 15) -> tuple[dict, dict]:
    """``(median µs per call, paired ratio)`` of each variant: thread CPU time over interleaved
    rounds (:func:`thread_time_rounds`) when torch runs one thread, else wall time
    (:func:`interleaved_medians_us`, no paired ratio). The paired ratio is the median over rounds
    of the variant's time over the first variant's time *in the same round*: on a loaded machine
    rounds drift together, and the pairing cancels that."""
    if torch.get_num_threads() != 1:
        return interleaved_medians_us({n: (_nothing, f) for n, f in variants.items()}, min_time), {}
    per = thread_time_rounds(variants, min_time, rounds)
    ref = per[next(iter(variants))]
    paired = {n: statistics.median(t / r for t, r in zip(v, ref, strict=True)) for n, v in per.items()}
    return {n: statistics.median(v) for n, v in per.items()}, paired


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


class Bench(Results):
    """One script run: the device and its timer, and the rows (``fastpeft.benchmarks.results``'
    schema); ``finish`` writes the CSV, prints the table and draws the plot.

    ``stem``: the CSV's file name without ``.csv`` (default ``<name>-<device>-<date>``, with
    ``-quick`` for ``--quick``), in ``bench/results/`` unless ``--out`` names the file; the plot
    goes beside it. ``device``: the device to use whatever ``args.device`` says (e.g. "cpu").
    """

    def __init__(self, name: str, args: argparse.Namespace, stem: str | None = None, device: str | None = None):
        now = _dt.datetime.now()
        self.args = args
        self.device = default_device(device or getattr(args, "device", None))
        self.device_name = device_name(self.device)
        self.date = now.strftime("%Y-%m-%d")
        self.quick = bool(getattr(args, "quick", False))
        self.time = timer_for(self.device, self.quick, getattr(args, "warmup", None), getattr(args, "rep", None))
        stem = stem or f"{name}-{slug(self.device_name)}-{self.date}" + ("-quick" if self.quick else "")
        csv_path = getattr(args, "out", None) or os.path.join(RESULTS_DIR, stem + ".csv")
        super().__init__(name, csv_path, device_label(self.device), commit=git_commit(ROOT), started=now)

    def finish(self, ratio_to: str | None = "base", plot_x: str = "tokens", table_columns: list | None = None,
               plot_title: str | None = None, plot_where: Callable[[dict], bool] | None = None,
               panel_keys=("shape", "rank", "dtype"), plot: Callable[[list, str], str | None] | None = None) -> str:
        """Ratios to ``ratio_to`` (per GROUP_KEYS group), CSV, table; then (unless ``--no-plot``)
        ``plot(rows, png_path)`` when given, else the ratios vs ``plot_x`` of the rows ``plot_where``
        keeps. Returns the CSV's path."""
        path = super().finish(ratio_to, table_columns)
        if not getattr(self.args, "no_plot", False):
            rows = [r for r in self.rows if plot_where is None or plot_where(r)]
            if plot is not None:
                out = plot(rows, self.plot_path) if rows else None
                if out:
                    print(f"plot -> {out}")
            else:
                plot_ratios(rows, self.plot_path, x=plot_x, panel_keys=panel_keys,
                            title=plot_title or f"{self.name} on {self.device_name}")
        return path
