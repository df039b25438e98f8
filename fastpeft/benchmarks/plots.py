"""The benchmarks' PNGs, drawn by matplotlib (the ``bench`` extra; the library does not need it).

:func:`have_matplotlib` says whether plots can be drawn; the plotting functions raise
``SystemExit`` with the install hint when matplotlib is missing (what a bench script wants:
stop with the reason, or rerun with ``--no-plot``).
"""
from __future__ import annotations

import importlib.util
import os


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


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
