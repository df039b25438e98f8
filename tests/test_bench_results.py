"""fastpeft.benchmarks.results: the one row schema of the bench scripts and the demo."""
import csv

from fastpeft.benchmarks import generate as gen
from fastpeft.benchmarks.results import COLUMNS, Results, git_commit, print_table


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_rows_share_the_leading_columns_and_ratios_stay_in_their_group(tmp_path, capsys):
    res = Results("linear", str(tmp_path / "r.csv"), "cpu (1 threads)", commit="abc")
    res.add(shape="8x8", tokens=1, method="base", median_us=10.0)
    res.add(shape="8x8", tokens=1, method="fastpeft", median_us=5.0, rel_err=0.0)
    res.add(shape="8x8", tokens=1, adapters=4, mixed=True, method="base", median_us=20.0, GBps=1.5)
    res.add(shape="8x8", tokens=1, adapters=4, mixed=True, method="fastpeft", median_us=30.0)
    res.add(shape="8x8", tokens=2, method="fastpeft", median_us=7.0)  # no base at 2 tokens
    path = res.finish(ratio_to="base")
    header, *rows = _read(path)
    assert header == COLUMNS + ["rel_err", "GBps"]
    assert [r[header.index("ratio")] for r in rows] == ["1", "0.5", "1", "1.5", ""]
    assert {r[header.index("bench")] for r in rows} == {"linear"}
    assert {r[header.index("commit")] for r in rows} == {"abc"}
    table = capsys.readouterr().out
    assert "bench" not in table.splitlines()[0] and "median_us" in table

    again = Results("linear", path, "cpu (1 threads)", commit="abc")
    again.add(shape="8x8", tokens=1, method="base", median_us=1.0)
    assert again.write_csv() == str(tmp_path / "r-15cols.csv")  # another layout: never mixed in
    assert len(_read(path)) == 6


def test_commit_is_unknown_outside_a_checkout(tmp_path):
    assert git_commit(str(tmp_path)) == "unknown"


def test_generate_scenarios_and_ranks():
    assert gen.scenarios(4, 2) == [(1, 1, None), (4, 1, None), (4, 2, ["a0", "a1", "a0", "a1"])]
    assert gen.scenarios(4, 1) == [(1, 1, None), (4, 1, None)]
    assert [gen.adapter_rank(i, 3, True) for i in range(4)] == [3, 2, 1, 3]
    assert gen.adapter_rank(5, 3, False) == 3


def test_table_puts_the_measurements_last(capsys):
    print_table([{"device": "d", "method": "base", "median_us": 1.0, "ratio": 1.0, "batch": 2}])
    head = capsys.readouterr().out.splitlines()[0].split()
    assert head == ["method", "batch", "median_us", "ratio"]
