"""``import fastpeft`` vs ``import torch``, side by side: wall time of fresh interpreters.

    python tools/import_time.py [--runs 9]

Each run starts one interpreter that imports torch and one that imports fastpeft (which
imports torch), alternating so that both see the same machine load; prints the medians and
the difference (the target: at most 0.3 s). Also lists the heavy optional libraries that
``import fastpeft`` pulled in (there should be none: transformers, triton, peft,
bitsandbytes and accelerate are imported where they are first needed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HEAVY = ("transformers", "triton", "peft", "bitsandbytes", "accelerate")


def wall(code: str, env: dict) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    wall("import fastpeft", env)  # warm the file cache once
    torch_s, fastpeft_s = [], []
    for _ in range(args.runs):
        torch_s.append(wall("import torch", env))
        fastpeft_s.append(wall("import fastpeft", env))
    pulled = subprocess.run(
        [sys.executable, "-c", f"import sys, fastpeft; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"],
        check=True, env=env, capture_output=True, text=True).stdout.strip()
    t, f = statistics.median(torch_s), statistics.median(fastpeft_s)
    print(f"import torch    median {t:.3f} s  (min {min(torch_s):.3f}, max {max(torch_s):.3f}, {args.runs} runs)")
    print(f"import fastpeft median {f:.3f} s  (min {min(fastpeft_s):.3f}, max {max(fastpeft_s):.3f})")
    print(f"fastpeft - torch: {f - t:+.3f} s (target <= 0.3 s); optional libraries imported: {pulled or 'none'}")


if __name__ == "__main__":
    main()
