"""Decode speed of two source trees side by side: ``bench/bench_generate.py`` of each, alternated.

    .venv/bin/python tools/ab_generate.py --before /path/to/old/checkout [--after .] [--rounds 3]
    .venv/bin/python tools/ab_generate.py --tree old=/tmp/a --tree mid=/tmp/b --tree new=.

Each round runs the ``before`` tree's ``bench/bench_generate.py``, then the ``after`` tree's, in
fresh processes whose ``fastpeft`` is that tree's (its ``bench`` script puts its own tree first on
``sys.path``; build its extension there, or copy the ``.so`` files when the C++ sources are the
same). Alternating rounds give both trees the same share of a busy machine's noise. Printed and
written to ``bench/results/ab-generate-<device>-<date>.csv``: per method and scenario the median
over rounds of ``decode_ms`` and of the ratios to ``base`` and ``peft`` measured *within* each run
and to the base model at the same batch size (``vs_base_batch``), the figures that compare across
trees on a noisy machine: both sides divide by the same run's reference.

Both trees' CSVs must carry ``method, batch, adapters, decode_ms, vs_base, vs_peft`` (every
``bench_generate`` since 2026-11-22 does).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KEYS = ("method", "batch", "adapters")
VALUES = ("decode_ms", "vs_base", "vs_peft")
RATIOS = (*VALUES, "vs_base_batch")


def run_tree(tree: str, out: str, extra: list) -> list:
    """One ``bench_generate`` run of ``tree`` writing ``out``; its rows."""
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, os.path.join(tree, "bench", "bench_generate.py"), "--out", out, "--no-plot", *extra]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def medians(runs: list) -> dict:
    """(method, batch, adapters) -> {value: median over runs}. ``vs_base_batch``: decode_ms over
    the same run's ``base`` at the same batch size (mixed batches have no base row of their own)."""
    acc: dict = {}
    for rows in runs:
        base = {r["batch"]: float(r["decode_ms"]) for r in rows if r["method"] == "base" and r["adapters"] == "1"}
        for r in rows:
            key = tuple(r[k] for k in KEYS)
            for v in VALUES:
                if r.get(v) not in (None, ""):
                    acc.setdefault(key, {}).setdefault(v, []).append(float(r[v]))
            if base.get(r["batch"]) and r.get("decode_ms") not in (None, ""):
                acc.setdefault(key, {}).setdefault("vs_base_batch", []).append(float(r["decode_ms"]) / base[r["batch"]])
    return {k: {v: statistics.median(xs) for v, xs in d.items()} for k, d in acc.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", help="the old checkout")
    p.add_argument("--after", default=ROOT, help="the new checkout (default: this one)")
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                   help="trees to compare, in order (instead of --before/--after; the first is the reference)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default="base,peft,optimize,fastpeft")
    p.add_argument("--out", default=None, help="CSV path (default: bench/results/ab-generate-cpu-<date>.csv)")
    args, extra = p.parse_known_args(argv)
    extra = ["--methods", args.methods, *extra]
    if args.tree:
        trees = dict(t.split("=", 1) for t in args.tree)
    elif args.before:
        trees = {"before": args.before, "after": args.after}
    else:
        p.error("give --before (and --after) or --tree LABEL=PATH ...")
    trees = {k: os.path.abspath(v) for k, v in trees.items()}
    commits = {k: subprocess.run(["git", "-C", t, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
               for k, t in trees.items()}
    runs: dict = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for name, tree in trees.items():
                print(f"round {i + 1}/{args.rounds}: {name} ({commits[name]})", flush=True)
                runs[name].append(run_tree(tree, os.path.join(tmp, f"{name}-{i}.csv"), extra))
    labels = list(trees)
    first, last = labels[0], labels[-1]
    device = runs[last][0][0]["device"]
    med = {k: medians(v) for k, v in runs.items()}
    rows = []
    for key in med[last]:
        row = dict(zip(KEYS, key, strict=True))
        for label in labels:
            m = med[label].get(key, {})
            for v in RATIOS:
                row[f"{label}_{v}"] = round(m.get(v, float("nan")), 3)
        for label in labels[1:]:
            b, a = med[first].get(key, {}), med[label].get(key, {})
            ok = b.get("decode_ms") and a.get("decode_ms")
            row[f"{label}_over_{first}"] = round(a["decode_ms"] / b["decode_ms"], 3) if ok else ""
        rows.append(row)
    date = _dt.datetime.now()
    meta = dict(device=device, date=f"{date:%Y-%m-%d %H:%M}", trees=" ".join(f"{k}={commits[k]}" for k in labels),
                rounds=args.rounds, args=" ".join(extra))
    out = args.out or os.path.join(ROOT, "bench", "results", f"ab-generate-cpu-{date:%Y-%m-%d}.csv")
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*meta, *rows[0]])
        w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})
    cols = [*KEYS, *(f"{lb}_decode_ms" for lb in labels), *(f"{lb}_vs_base_batch" for lb in labels),
            *(f"{lb}_vs_peft" for lb in labels)]
    print(f"\n{device}; medians of {args.rounds} alternated runs; " + ", ".join(f"{k} {commits[k]}" for k in labels))
    print("  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]!s:>18}" for c in cols))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
