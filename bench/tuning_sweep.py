"""``--tune`` for bench_linear.py and bench_quant.py: turn sweep timings into planner constants.

A sweep times one method under several settings of one knob (a forced path, a split-K factor,
a tile) and records rows ``{"knob": name, "value": setting, "case": (shape, dtype, tokens),
"median_us": t}``. The functions here pick the winners; :func:`write` puts them in the
device's tuning file (``fastpeft/kernels/tuning.py``), which the planners then read.

The rules, kept simple so that a file can be checked by reading the CSV next to it:

* a tile or split-K setting wins when its geometric-mean time over the cases is lowest;
* a row threshold (the most rows a fused path takes, or the fewest from which dequantize +
  cuBLAS wins) is the largest token count up to which the candidate beats the alternative in
  most cases, at every swept count up to it.
"""
from __future__ import annotations

import math
from collections import defaultdict


def best_setting(rows: list[dict], knob: str):
    """The ``value`` of ``knob`` with the lowest geometric-mean ``median_us`` over the cases.

    A value that failed (no time) on a case some other value ran is no candidate: it would be
    written to the tuning file and then fail on that case. None when no value ran everywhere."""
    times: dict = defaultdict(dict)
    cases = set()
    for r in rows:
        if r["knob"] == knob:
            cases.add(r["case"])
            if r.get("median_us"):
                times[_key(r["value"])][r["case"]] = r["median_us"]
    ran = {c for t in times.values() for c in t}
    times = {v: t for v, t in times.items() if set(t) == ran}
    if not times or not ran:
        return None
    common = ran

    def gmean(t):
        return math.exp(sum(math.log(t[c]) for c in common) / len(common))

    winner = min(times, key=lambda v: gmean(times[v]))
    return list(winner) if isinstance(winner, tuple) else winner


def _key(v):
    return tuple(v) if isinstance(v, list) else v


def threshold_rows(rows: list[dict], knob: str, candidate, alternative) -> int | None:
    """The largest token count T such that, at every swept token count <= T, ``candidate`` is
    faster than ``alternative`` in most of the cases timed at that count (None if it never is).

    Rows' ``case`` is (shape, dtype, tokens); the token count is its last element."""
    per_tokens: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["knob"] == knob and r.get("median_us"):
            per_tokens[r["case"][-1]][r["case"][:-1]][_key(r["value"])] = r["median_us"]
    best = None
    for tokens in sorted(per_tokens):
        cases = [t for t in per_tokens[tokens].values() if _key(candidate) in t and _key(alternative) in t]
        if not cases:
            continue
        wins = sum(t[_key(candidate)] < t[_key(alternative)] for t in cases)
        if wins * 2 <= len(cases):
            break
        best = tokens
    return best


def write(bench, planner: str, values: dict, script: str):
    """Merge ``values`` (None entries dropped) into the tuning file of ``bench``'s device and say
    where it went; returns the path. On a CPU the timings come from the Triton interpreter and
    mean nothing: the file goes to bench/results/tuning-dryrun/, which no planner reads."""
    import os

    from fastpeft.kernels import tuning

    gpu = bench.device.type == "cuda"
    directory = None if gpu else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tuning-dryrun")
    kept = {k: v for k, v in values.items() if v is not None}
    meta = {"written_by": f"bench/{script} --tune", "commit": bench.commit, "date": bench.date}
    path = tuning.write(bench.device_name if gpu else "cpu", planner, kept, meta=meta, directory=directory)
    print(f"\ntuning winners: {values}\n-> {path}" + ("" if gpu else " (interpreter: a dry run, not read)"))
    return path
