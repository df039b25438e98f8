"""Benchmark building blocks shared by ``python -m fastpeft.demo`` and the scripts in the
repository's ``bench/`` folder (which add the command lines, the timers and the sweeps).

* :mod:`fastpeft.benchmarks.results`: one row schema for every benchmark (the leading columns,
  the ratios, the CSV, the printed table), the device label, the git commit;
* :mod:`fastpeft.benchmarks.plots`: the PNGs (matplotlib, the ``bench`` extra; optional);
* :mod:`fastpeft.benchmarks.generate`: end-to-end greedy decoding of a Llama-shaped model with
  PEFT adapters: base, merged, PEFT, ``fastpeft.optimize`` and ``fastpeft.PeftModel``.

Nothing here is imported by ``import fastpeft``; peft, transformers and matplotlib are imported
only by the functions that need them.
"""
