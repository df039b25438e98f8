"""One schema for every benchmark's rows: the columns, the ratios, the CSV and the printed table.

A benchmark collects its measurements in a :class:`Results` (``bench/common.py``'s ``Bench``
is one, with the device, the timers and the command line on top; ``python -m fastpeft.demo``
uses this one directly)::

    res = Results("generate", "out.csv", device_label(device))
    res.add(method="base", batch=1, median_us=812.0, tokens_per_s=1230.5)
    res.finish(ratio_to="base")       # ratios, CSV, printed table

Every CSV starts with the same columns (:data:`COLUMNS`), in this order, then the columns a
benchmark adds of its own, in the order it first sets them; a cell is empty where a column
does not apply:

* ``device``    the GPU's name, or the CPU model and torch's thread count: "AMD EPYC (2 threads)";
* ``date``      when the run started, "YYYY-MM-DD HH:MM";
* ``commit``    the git commit of the checkout (``+dirty`` with uncommitted changes), "unknown"
                outside one;
* ``bench``     which benchmark: "linear", "quant", "generate", "cpp_ops";
* ``config``    the model or run configuration, where there is one (generate: JSON);
* ``shape``     the layer's shape, "INxOUT" (cpp_ops: with the layer's name in front);
* ``tokens``    rows of the layer's input per call;
* ``adapters``  distinct adapters in the batch; ``mixed``: True when the rows use different
                adapters (``adapter_names=``, per-row token slots);
* ``rank``, ``dtype`` ("fp16", "bf16", "fp32");
* ``method``    what was timed ("base" is the layer or model without adapters);
* ``mode``      "eager", or "graph" for a CUDA-graph replay;
* ``median_us`` the measured time in microseconds, a median (generate: one more decoded
                token, from the medians of a long and a one-token generate);
* ``ratio``     ``median_us`` over that of the reference method (``ratio_to``, "base") in the
                same group of :data:`GROUP_KEYS`; empty without one.

Rows are appended to the CSV (header once); a file with another header is left alone and the
rows go to ``<name>-<N>cols.csv`` beside it.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable

import torch

COLUMNS = ["device", "date", "commit", "bench", "config", "shape", "tokens", "adapters", "mixed", "rank", "dtype",
           "method", "mode", "median_us", "ratio"]
# rows compared with each other (ratios): the same configuration, layer shape, tokens, batch,
# adapters, rank, dtype, quantization format and eager/graph mode
GROUP_KEYS = ("config", "shape", "tokens", "batch", "adapters", "mixed", "rank", "dtype", "fmt", "mode")
# columns a table leaves out by default: the same on every row of a run
_TABLE_SKIP = ("device", "date", "commit", "bench")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# the checkout the installed package sits in, if it does: <repo>/fastpeft/benchmarks/results.py
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- what a row is about ----------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """"fp16", "bf16", "fp32" (other dtypes: torch's name without "torch.")."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_label(device: torch.device) -> str:
    """The ``device`` column: the GPU's name, or "<CPU model> (<torch threads> threads)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def git_commit(repo: str | None = None) -> str:
    """Short commit of the git checkout ``repo`` (default: the one this package sits in), with
    ``+dirty`` when it has uncommitted changes (results appended to ``bench/results/`` by earlier
    runs do not count); "unknown" when ``repo`` is not the top of a checkout (an installed package)."""
    repo = repo or _REPO

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or os.path.realpath(top) != os.path.realpath(repo):
            return "unknown"
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)bench/results")
        return commit + ("+dirty" if dirty else "")
    except Exception:  # no git
        return "unknown"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()


# ---- progress ---------------------------------------------------------------------------------


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
    from huggingface_hub.utils import tqdm

    items = list(items)
    with contextlib.redirect_stdout(_AroundBars(sys.stdout)):
        yield from tqdm(items, desc=desc, total=len(items), leave=False)


# ---- rows -------------------------------------------------------------------------------------


class Results:
    """The rows of one benchmark run, with the identifying columns filled in; writes the CSV,
    prints the table."""

    def __init__(self, name: str, csv_path: str, device: str, commit: str | None = None,
                 started: _dt.datetime | None = None, plot_path: str | None = None):
        self.name = name
        self.device_label = device
        self.commit = git_commit() if commit is None else commit
        self.started = (started or _dt.datetime.now()).strftime("%Y-%m-%d %H:%M")
        self.csv_path = csv_path
        self.plot_path = plot_path or os.path.splitext(csv_path)[0] + ".png"
        self.rows: list[dict] = []

    def add(self, **fields) -> dict:
        """Record one measurement (``median_us`` and what describes it: see the module's columns)."""
        row = {"device": self.device_label, "date": self.started, "commit": self.commit, "bench": self.name,
               "mode": "eager"}
        row.update(fields)
        self.rows.append(row)
        return row

    def add_ratios(self, baseline: str = "base", column: str = "ratio", keys: Iterable[str] = GROUP_KEYS) -> None:
        add_ratios(self.rows, baseline, keys, column)

    def write_csv(self) -> str:
        """Append the rows to ``csv_path``; returns the path written (see :func:`write_csv`)."""
        return write_csv(self.rows, self.csv_path)

    def print_table(self, columns: list | None = None) -> None:
        print_table(self.rows, columns)

    def finish(self, ratio_to: str | None = "base", table_columns: list | None = None) -> str:
        """Ratios to ``ratio_to``, the CSV, the table; returns the CSV's path."""
        if ratio_to:
            self.add_ratios(ratio_to)
        path = self.write_csv()
        self.print_table(table_columns)
        print(f"\n{len(self.rows)} rows -> {path}")
        return path


def add_ratios(rows: list[dict], baseline: str, keys: Iterable[str] = GROUP_KEYS, column: str = "ratio") -> None:
    """``row[column] = median_us / median_us of the baseline method`` within each group of ``keys``
    ("" where the group has no baseline row)."""
    keys = tuple(keys)
    base = {tuple(r.get(k) for k in keys): r["median_us"] for r in rows if r.get("method") == baseline}
    for r in rows:
        b = base.get(tuple(r.get(k) for k in keys))
        r[column] = round(r["median_us"] / b, 4) if b else ""


def write_csv(rows: list[dict], path: str) -> str:
    """Append ``rows`` to ``path``: :data:`COLUMNS` first, then the rows' other keys in the order
    they first appear; the header is written once. When ``path`` already holds another header the
    rows go to ``<path stem>-<N>cols.csv`` instead (columns are never mixed). Returns that path."""
    if not rows:
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = []
    for r in rows:
        for k in r:
            if k not in COLUMNS and k not in extra:
                extra.append(k)
    columns = COLUMNS + extra
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
    return path


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.1f}"
    return v


def print_table(rows: list[dict], columns: list | None = None) -> None:
    """A fixed-width table of ``rows``; ``columns`` by default: every column the rows set except
    the identifying ones (device, date, commit, bench), ``median_us`` and ``ratio`` last."""
    if not rows:
        print("(no rows)")
        return
    if columns is None:
        columns = []
        for r in rows:
            columns += [c for c in r if c not in columns and c not in _TABLE_SKIP]
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
