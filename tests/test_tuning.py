"""Per-device tuning files (fastpeft/kernels/tuning.py): the planners read the file of the device
at hand and fall back to their built-in rules, with a warning, for whatever is wrong in it."""
import json
import warnings

import pytest
import torch

from fastpeft import ops
from fastpeft.kernels import tuning

needs_triton = pytest.mark.skipif("triton" not in ops.available_backends(),
                                  reason=f"triton: {ops.available_backends(verbose=True).get('triton')}")

CPU = torch.device("cpu")


@pytest.fixture
def tuning_dir(tmp_path, monkeypatch):
    from fastpeft.kernels import lora_plan as LP

    monkeypatch.setenv("FASTPEFT_TUNING_DIR", str(tmp_path))
    tuning.clear_cache()
    LP._plans.clear()
    yield tmp_path
    tuning.clear_cache()
    LP._plans.clear()


def _plan(M, R=16, N=4096, K=4096):
    from fastpeft.kernels import lora_plan as LP

    h = torch.float16
    return LP._make_plan(CPU, M, N, K, h, h, torch.float32, R, 1, True, 1, True, False, False, False, "highest")


@needs_triton
def test_no_file_means_the_built_in_rules(tuning_dir):
    from fastpeft.kernels import lora_plan as LP
    from fastpeft.kernels import quant_linear as QL

    assert tuning.rules("lora_linear", CPU, {"FUSED_MAX_ROWS": 256}) == {"FUSED_MAX_ROWS": 256}
    assert _plan(LP.FUSED_MAX_ROWS).path != "split" and _plan(LP.FUSED_MAX_ROWS + 1).path == "split"
    assert _plan(1).meta["BN"] == LP.DECODE_TILE[1]
    assert QL.plan_path(QL.PREFILL_MIN_ROWS - 1, 16, CPU) == "fused"


@needs_triton
def test_dense_planner_reads_the_file_of_its_device(tuning_dir):
    from fastpeft.kernels import lora_plan as LP
    from fastpeft.kernels import quant_linear as QL

    path = tuning.write("cpu", "lora_linear", {"FUSED_MAX_ROWS": 32, "DECODE_TILE": (16, 64, 64, 4, 2), "MAX_SPLIT_K": 1},
                        meta={"written_by": "test"})
    assert path == tuning_dir / "cpu.json"
    tuning.write("cpu", "quant_linear", {"PREFILL_MIN_ROWS": 8})
    data = json.loads(path.read_text())
    assert data["lora_linear"]["FUSED_MAX_ROWS"] == 32 and data["quant_linear"] == {"PREFILL_MIN_ROWS": 8}
    LP._plans.clear()
    assert _plan(32).path != "split" and _plan(33).path == "split"  # was fused up to 256 rows
    p = _plan(1)
    assert (p.meta["BM"], p.meta["BN"], p.meta["num_warps"]) == (16, 64, 4) and p.split_k == 1
    assert QL.plan_path(8, 16, CPU) == "dequant" and QL.plan_path(7, 16, CPU) == "fused"
    assert QL.plan_path(8, 16) == "fused"  # no device: the module's constants


@needs_triton
def test_a_device_reads_only_its_own_file(tuning_dir):
    tuning.write("NVIDIA H200", "lora_linear", {"FUSED_MAX_ROWS": 32})
    assert (tuning_dir / "nvidia-h200.json").exists()
    assert _plan(64).path != "split"  # the CPU (interpreter) has no file here


@pytest.mark.parametrize("content,match", [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "holds a list"),
    ('{"lora_linear": 5}', "is not an object"),
    ('{"lora_linear": {"FUSED_MAX_ROWZ": 8}}', "FUSED_MAX_ROWZ is not a tunable"),
    ('{"lora_linear": {"FUSED_MAX_ROWS": "8"}}', "FUSED_MAX_ROWS = '8' is not a valid value"),
    ('{"lora_linear": {"FUSED_MAX_ROWS": -8}}', "is not a valid value"),
    ('{"lora_linear": {"DECODE_TILE": [16, 64]}}', "DECODE_TILE = \\[16, 64\\] is not a valid value"),
    ('{"lora_linear": {"FUSED_MAX_ROWS": 32.0}}', "FUSED_MAX_ROWS = 32.0 is not a valid value"),
    ('{"lora_linear": {"FUSED_MAX_ROWS": true}}', "FUSED_MAX_ROWS = True is not a valid value"),
    ('{"lora_linear": {"MAX_AREREAD_FRACTION": "x"}}', "MAX_AREREAD_FRACTION = 'x' is not a valid value"),
    ('{"lora_linear": {"DECODE_TILE": [16, 100, 64, 4, 3]}}', "DECODE_TILE .* is not a valid value"),  # BN not 2^k
    ('{"lora_linear": {"DECODE_TILE": [8, 128, 64, 4, 3]}}', "DECODE_TILE .* is not a valid value"),  # BM < 16
    ('{"lora_linear": {"DECODE_TILE": [16, 128, 64, 3, 3]}}', "DECODE_TILE .* is not a valid value"),  # 3 warps
])
@needs_triton
def test_malformed_file_falls_back_with_a_warning(tuning_dir, content, match):
    from fastpeft.kernels import lora_plan as LP

    (tuning_dir / "cpu.json").write_text(content)
    with pytest.warns(UserWarning, match=match):
        p_small, p_big = _plan(LP.FUSED_MAX_ROWS), _plan(LP.FUSED_MAX_ROWS + 1)
    assert p_small.path != "split" and p_big.path == "split"  # the built-in rule
    assert _plan(1).meta["BN"] == LP.DECODE_TILE[1]


@needs_triton
def test_good_keys_apply_beside_a_bad_one(tuning_dir):
    (tuning_dir / "cpu.json").write_text('{"lora_linear": {"FUSED_MAX_ROWS": 32, "BOGUS": 1}}')
    with pytest.warns(UserWarning, match="BOGUS"):
        assert _plan(33).path == "split"


@needs_triton
def test_fused_kernel_with_tuned_tiles_matches_the_reference(tuning_dir):
    """The tuned values change only the schedule, never the result."""
    from fastpeft.kernels import lora_plan as LP
    from fastpeft.ops import reference

    tuning.write("cpu", "lora_linear", {"DECODE_TILE": (16, 32, 32, 4, 2), "MAX_SPLIT_K": 2, "MIN_K_PER_SPLIT": 32})
    p = LP._make_plan(CPU, 3, 45, 77, torch.float32, torch.float32, torch.float32, 4, 1, False, 2, False, False,
                      False, False, "highest")
    assert (p.meta["BN"], p.meta["BK"], p.meta["num_stages"]) == (32, 32, 2)  # the file's tile is the one run
    g = torch.Generator().manual_seed(0)
    M, K, N, S, R = 3, 77, 45, 2, 4
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K**0.5
    a, bt = torch.randn(S, R, K, generator=g) / K**0.5, torch.randn(S, R, N, generator=g)
    sc, ts = torch.tensor([0.5, 2.0]), torch.tensor([[1], [0], [-1]], dtype=torch.int32)
    prev = ops.get_backend()
    ops.set_backend("triton")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a well-formed file: no warning
            got = torch.ops.fastpeft.adapter_linear(x, w, None, a, bt, sc, ts, None, None, None)
    finally:
        ops.set_backend(prev)
    want = reference.adapter_linear(x, w, None, a, bt, sc, ts, None, None, None)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_sweep_rules_pick_the_winners():
    """bench/tuning_sweep.py: lowest geometric mean for a setting; a row threshold up to which the
    candidate wins most cases at every swept count."""
    from bench import tuning_sweep as ts

    def row(knob, value, shape, tokens, us):
        return dict(knob=knob, value=value, case=(shape, "bf16", tokens), median_us=us)

    rows = [row("split_k", 1, "a", 1, 10.0), row("split_k", 2, "a", 1, 6.0), row("split_k", 4, "a", 1, 7.0),
            row("split_k", 1, "b", 1, 10.0), row("split_k", 2, "b", 1, 9.0), row("split_k", 4, "b", 1, 5.0),
            row("split_k", 8, "a", 1, None)]  # a failed timing is no candidate
    assert ts.best_setting(rows, "split_k") == 4  # gmean 5.9 vs 7.3 vs 10
    tiles = [row("tile", [16, 64, 64, 4, 3], "a", 1, 3.0), row("tile", [16, 128, 64, 4, 3], "a", 1, 2.0)]
    assert ts.best_setting(tiles, "tile") == [16, 128, 64, 4, 3]
    # a tile that failed on case b is no candidate, however fast it was on a
    tiles += [row("tile", [16, 64, 64, 4, 3], "b", 1, 3.0), row("tile", [16, 128, 64, 4, 3], "b", 1, None)]
    assert ts.best_setting(tiles, "tile") == [16, 64, 64, 4, 3]
    assert ts.best_setting(rows, "nothing") is None

    path = []
    for t, (fused, split) in {1: (1, 2), 16: (1, 2), 64: (2, 3), 256: (5, 4), 1024: (1, 9)}.items():
        for shape in ("a", "b", "c"):
            path += [row("path", "fused", shape, t, fused), row("path", "split", shape, t, split)]
    # fused wins up to 64 tokens; at 256 it loses, so the win at 1024 does not count
    assert ts.threshold_rows(path, "path", "fused", "split") == 64
    assert ts.threshold_rows(path, "path", "split", "fused") is None


@needs_triton
def test_cached_plans_follow_a_new_file(tuning_dir):
    """Plans cached by adapter_linear are made afresh after a tuning file is written."""
    from fastpeft.kernels import lora_linear as LL
    from fastpeft.kernels import lora_plan as LP

    x, w = torch.randn(40, 64), torch.randn(48, 64)
    a, bt = torch.randn(1, 4, 64), torch.randn(1, 4, 48)
    sc, ts = torch.ones(1), torch.zeros(1, 1, dtype=torch.int32)
    LL.adapter_linear(x, w, None, a, bt, sc, ts, None, None, None)
    assert {p.path for p in LP._plans.values()} == {"fused"}
    tuning.write("cpu", "lora_linear", {"FUSED_MAX_ROWS": 16})  # 40 rows now above it
    LL.adapter_linear(x, w, None, a, bt, sc, ts, None, None, None)
    assert {p.path for p in LP._plans.values()} == {"split"}


@needs_triton
def test_metadata_is_kept_per_planner(tuning_dir):
    tuning.write("cpu", "lora_linear", {"FUSED_MAX_ROWS": 64}, meta={"written_by": "a"})
    tuning.write("cpu", "quant_linear", {"PREFILL_MIN_ROWS": 128}, meta={"written_by": "b"})
    data = json.loads((tuning_dir / "cpu.json").read_text())
    assert data["lora_linear"]["_meta"] == {"written_by": "a"} and data["quant_linear"]["_meta"] == {"written_by": "b"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # metadata keys are no tunables: no warning
        assert _plan(64).path != "split" and _plan(65).path == "split"


def test_an_old_path_name_in_a_file_loads_under_its_new_name(tuning_dir):
    """The path "given" is now "preshrunk": a file written before the rename still applies, with a warning."""
    (tuning_dir / "cpu.json").write_text('{"planner": {"PATH": "given", "ROWS": 8}}')
    with pytest.warns(UserWarning, match="planner.PATH = 'given' is the old name of 'preshrunk'"):
        got = tuning.rules("planner", CPU, {"PATH": "preshrunk", "ROWS": 4})
    assert got == {"PATH": "preshrunk", "ROWS": 8}


@needs_triton
def test_override_takes_the_old_path_name_with_a_deprecation_warning():
    from fastpeft.kernels import lora_plan as LP

    with pytest.warns(DeprecationWarning, match="'given' is now called 'preshrunk'"):
        with LP.override(path="given"):
            assert LP._overrides["path"] == "preshrunk"
    with pytest.warns(DeprecationWarning, match="split_shrink 'given'"):
        with LP.override(split_shrink="given"):
            assert LP._overrides["split_shrink"] == "preshrunk"
    with pytest.raises(ValueError, match="unknown path 'nope'"):
        with LP.override(path="nope"):
            pass
