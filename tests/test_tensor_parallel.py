"""Tensor parallelism: adapters on base layers sharded by ``torch.distributed.tensor.parallel``.

One run of two processes (``gloo`` on CPU; ``nccl`` on two GPUs for the gpu-marked variant)
shards a tiny Llama (q/k/v/gate/up column-wise, o/down row-wise; with PyTorch's
``parallelize_module`` and, once, by Transformers' ``from_pretrained(distributed_config=
DistributedConfig(tp_size=2))`` with the model's tp_plan) and loads PEFT-saved
adapters with fastpeft. The parent process computes the references with PEFT on the
unsharded model and checks what the ranks wrote: logits (LoRA, a second adapter, a mixed
batch, two active adapters, DoRA, IA3), gradients, the saved files (equal to PEFT's), the
collectives counted per layer, and the errors for shardings fastpeft does not implement.

The ranks run tests/tp_worker.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from tp_worker import GRAD_CASES, _worker

WORLD = 2
ATOL = 1e-5
TIMEOUT_S = 50  # the two ranks together (forked: ~5 s on 2 busy CPU cores; the references before them ~10 s)


def _dist_ok() -> bool:
    import multiprocessing

    return (torch.distributed.is_available() and torch.distributed.is_gloo_available()
            and "fork" in multiprocessing.get_all_start_methods())


pytestmark = pytest.mark.skipif(not _dist_ok(), reason="needs torch.distributed with gloo, and fork")


def _tiny_llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96)
    return tf.LlamaForCausalLM(cfg).eval()


def _configs():
    import peft

    return {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
        "other": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
        "dora": peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "gate_proj", "down_proj"]),
        "ia3": peft.IA3Config(target_modules=["k_proj", "o_proj", "up_proj", "down_proj"],
                              feedforward_modules=["up_proj", "down_proj"]),
    }


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _prepare(root: str) -> dict:
    """Base model, PEFT-saved adapters and PEFT's outputs on the unsharded model."""
    import copy

    import peft

    from models import randomize_adapters

    base = _tiny_llama()
    base.save_pretrained(os.path.join(root, "base"))
    for i, (name, cfg) in enumerate(_configs().items()):
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        randomize_adapters(pm, seed=3 + i)
        pm.save_pretrained(os.path.join(root, name))
    ids = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(1))
    refs = {"ids": ids, "base": _logits(base, ids)}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(root, "lora"))
    pm.load_adapter(os.path.join(root, "other"), "other")
    refs["lora"] = _logits(pm, ids)
    pm.set_adapter("other")
    refs["other"] = _logits(pm, ids)
    pm.base_model.set_adapter(["default", "other"])
    refs["multi"] = _logits(pm, ids)
    refs["mixed"] = torch.stack([refs["lora"][0], refs["other"][1], refs["base"][2]])
    for name in ("dora", "ia3"):
        refs[name] = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(root, name)), ids)
    for name in GRAD_CASES:
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(root, name), is_trainable=True).train()
        pm(input_ids=ids).logits.pow(2).mean().backward()
        refs[f"grads_{name}"] = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    torch.save(refs, os.path.join(root, "refs.pt"))
    return refs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Forked:
    """A rank forked from this process (CPU, gloo): it inherits the imported torch, Transformers
    and fastpeft (seconds of imports saved per rank); output goes to its log file."""

    def __init__(self, target, args, log: str):
        import multiprocessing

        self.proc = multiprocessing.get_context("fork").Process(target=_forked_main, args=(target, args, log))
        self.proc.start()

    def poll(self):
        return self.proc.exitcode

    def kill(self):
        self.proc.kill()
        self.proc.join()

    @property
    def returncode(self):
        return self.proc.exitcode


def _forked_main(target, args, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(log, "a", buffering=1)
    code = 0
    try:
        torch.set_num_threads(1)  # no OpenMP pool inherited over fork
        target(*args)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)  # no pytest teardown in the child


def _launch(root: str, backend: str) -> None:
    """Run the two ranks (forked for gloo; fresh interpreters for nccl, as CUDA must not be
    forked); raise with their output if one fails or the run outlasts TIMEOUT_S."""
    port = _free_port()
    logs = [os.path.join(root, f"log{r}.txt") for r in range(WORLD)]
    start = time.monotonic()
    if backend == "gloo":
        import torch.distributed.tensor.parallel  # noqa: F401

        import fastpeft  # noqa: F401  (imported once, here, for both ranks)

        procs = [_Forked(_worker, (r, WORLD, port, root, backend), logs[r]) for r in range(WORLD)]
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_worker.py")
        procs = [subprocess.Popen([sys.executable, script, str(r), str(WORLD), str(port), root, backend],
                                  stdout=open(logs[r], "w"), stderr=subprocess.STDOUT, env=env) for r in range(WORLD)]
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < start + TIMEOUT_S:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        text = "".join(f"--- rank {r} (exit {procs[r].returncode}) ---\n" + open(logs[r]).read()[-6000:] for r in failed)
        raise AssertionError(f"tensor-parallel workers failed or timed out ({time.monotonic() - start:.0f} s, "
                             f"limit {TIMEOUT_S} s):\n{text}")


def _run(tmp_path_factory, backend: str):
    root = str(tmp_path_factory.mktemp(f"tp-{backend}"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend (32 ms a linear on a busy 2-core machine)
    try:
        refs = _prepare(root)
        _launch(root, backend)
    finally:
        torch.set_num_threads(threads)
    outs = [torch.load(os.path.join(root, f"out{r}.pt")) for r in range(WORLD)]
    info = [json.load(open(os.path.join(root, f"info{r}.json"))) for r in range(WORLD)]
    return root, refs, outs, info


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    return _run(tmp_path_factory, "gloo")


# ----- the checks -------------------------------------------------------------------------------
LOGIT_CASES = ["base", "lora", "other", "mixed", "multi", "dora", "ia3", "lora_hf_tp_plan"]


@pytest.mark.parametrize("case", LOGIT_CASES)
def test_outputs_equal_unsharded_peft(tp_run, case):
    _, refs, outs, _ = tp_run
    ref = refs["lora" if case == "lora_hf_tp_plan" else case]
    for r in range(WORLD):
        torch.testing.assert_close(outs[r][case], ref, atol=ATOL, rtol=1e-5)


def test_fused_route_on_local_shards(tp_run):
    _, _, _, info = tp_run
    for r in range(WORLD):
        i = info[r]
        # 4 targeted projections of 2 layers: the fused operator on the local shards, never the unfused route
        assert i["calls"] == {"lora": [8, 0], "dora": [8, 0], "ia3": [8, 0], "lora_hf_tp_plan": [8, 0]}
        assert i["hf_plans"] == [["transformers", "colwise"], ["transformers", "rowwise"]]
        assert i["styles"] == {"q_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise", "down_proj": "rowwise"}
        # column-parallel q: A replicated [4, 32], B split [16, 4]; row-parallel o: A split [4, 16], B [32, 4]
        assert i["shapes"]["q_proj"] == [[4, 32], [16, 4]]
        assert i["shapes"]["o_proj"] == [[4, 16], [32, 4]]


def test_row_parallel_adds_no_communication(tp_run):
    _, _, _, info = tp_run
    comm = info[0]["comm"]
    # one all-reduce of [21, 32] float32 per row-parallel layer, with or without the adapter
    assert comm["o_proj_base"] == comm["o_proj_lora"] == [["all_reduce", 21 * 32 * 4]]
    assert comm["q_proj_base"] == comm["q_proj_lora"] == []
    assert comm["dora_o_proj_cached"] == [["all_reduce", 21 * 32 * 4]]
    assert comm["dora_o_proj_first"] == [["all_reduce", 32 * 4], ["all_reduce", 21 * 32 * 4]]  # + the norms, once
    assert comm["model_base"] == comm["model_lora"]
    assert comm["model_base"]["count"] == 4  # o and down of 2 layers


def test_training_communication(tp_run):
    _, _, _, info = tp_run
    comm, x, u = info[0]["comm"], 21 * 32 * 4, 21 * 4 * 4  # [M, K] activations, [M, r] low-rank ones (float32)
    # column-parallel: the base's backward all-reduce of dx; the adapter adds the [M, r] one of d(A x)
    assert comm["train_q_proj_base"] == [["all_reduce", x]]
    assert sorted(comm["train_q_proj_lora"]) == sorted([["all_reduce", x], ["all_reduce", u]])
    # row-parallel: the base's forward all-reduce; the unfused training route adds the [M, r] one of A_l x_l
    assert comm["train_o_proj_base"] == [["all_reduce", x]]
    assert sorted(comm["train_o_proj_lora"]) == sorted([["all_reduce", x], ["all_reduce", u]])


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_equal_unsharded_peft(tp_run, case):
    _, refs, outs, _ = tp_run
    ref = refs[f"grads_{case}"]
    for r in range(WORLD):
        got = outs[r][f"grads_{case}"]
        assert sorted(got) == sorted(ref)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], atol=1e-7, rtol=1e-4, msg=n)


def test_state_dict_round_trip(tp_run):
    from safetensors.torch import load_file

    root, refs, outs, _ = tp_run
    file_sd = load_file(os.path.join(root, "lora", "adapter_model.safetensors"))
    peft_sd = {k.removeprefix("base_model.model."): v for k, v in file_sd.items()}
    for r in range(WORLD):
        mixin_sd = outs[r]["mixin_state_dict"]  # the mixin's get_adapter_state_dict: PEFT's full tensors
        assert sorted(k.removeprefix("base_model.model.") for k in mixin_sd) == sorted(peft_sd)
        for k, v in mixin_sd.items():
            assert torch.equal(v, peft_sd[k.removeprefix("base_model.model.")]), k
        # zeroed adapters, then load_state_dict(full tensors): the outputs come back
        torch.testing.assert_close(outs[r]["zeroed"], refs["base"], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(outs[r]["reloaded"], refs["lora"], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("case", ["lora", "other", "dora", "ia3"])
def test_saved_adapter_equals_peft_file(tp_run, case):
    from safetensors.torch import load_file

    root, _, _, _ = tp_run
    peft_sd = load_file(os.path.join(root, case, "adapter_model.safetensors"))
    for r in range(WORLD):
        sub = {"lora": "lora", "other": os.path.join("lora", "other"), "dora": "dora", "ia3": "ia3"}[case]
        ours = load_file(os.path.join(root, f"saved{r}", sub, "adapter_model.safetensors"))
        assert sorted(ours) == sorted(peft_sd)
        for k in peft_sd:
            assert torch.equal(ours[k], peft_sd[k]), k


ERRORS = {
    "gathered_output": "output_layouts",
    "sequence_parallel": "sequence parallelism",
    "sharded_embedding": "LoraEmbedding",
    "dtensor_without_style": "no ColwiseParallel / RowwiseParallel",
    "replicated_placement": "placements",
    "adalora": "AdaLoraLinear",
    "merge": "merging",
    "sharded_after_adapters": "shard the model first",
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_unimplemented_shardings_raise(tp_run, case):
    _, _, _, info = tp_run
    kind, msg = info[0]["errors"][case]
    assert kind == "NotImplementedError", msg
    assert ERRORS[case] in msg


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="nccl: needs 2 CUDA devices")
def test_nccl_outputs_equal_unsharded_peft(tmp_path_factory):
    _, refs, outs, info = _run(tmp_path_factory, "nccl")
    for case in LOGIT_CASES:
        for r in range(WORLD):
            torch.testing.assert_close(outs[r][case], refs["lora" if case == "lora_hf_tp_plan" else case],
                                       atol=1e-4, rtol=1e-4)
    assert info[0]["comm"]["o_proj_base"] == info[0]["comm"]["o_proj_lora"]
