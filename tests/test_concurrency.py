"""Concurrent callers of one model: each call gets exactly its own adapters, changes made while
others run are seen whole or not at all, and nothing of a call survives it.

8 threads x 50 forwards over 8 adapters, mixing ``adapter_names=``, ``fastpeft.mixed_batch`` and
plain calls, while one more thread loads, deletes and switches adapters: every output equals the
single-threaded result for the same names, and afterwards the model equals its state before.
Also: mixed batches of asyncio tasks that end out of order, and blocks ended out of order by hand.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

import fastpeft
from fastpeft.nn import AdapterLayer

from models import fresh_copy, logits, randomize_adapters, tiny

NAMES = [f"a{i}" for i in range(8)]
TARGETS = ["q_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def served():
    base, inputs = tiny("llama")
    fm = fastpeft.get_peft_model(fresh_copy(base), fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                                 adapter_name=NAMES[0])
    for i, n in enumerate(NAMES[1:], 1):
        fm.add_adapter(n, fastpeft.LoraConfig(r=2 + i % 3, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(fm, seed=11)
    fm.eval()
    kw = inputs(batch=3, seq=5)
    with torch.no_grad():
        alone = {n: (fm.set_adapter(n), logits(fm, kw))[1] for n in NAMES}  # [3, T, V] per adapter
    fm.set_adapter(NAMES[0])
    return fm, kw, alone


def _expected(alone, row_names):
    return torch.stack([alone[n][i] for i, n in enumerate(row_names)])


def _layer_state(fm):
    return [(m._row_selection, tuple(m._open_blocks), tuple(m._active), m.bank.rows is None)
            for m in fm.modules() if isinstance(m, AdapterLayer)]


def test_threads_each_get_their_own_adapters_while_another_changes_them(served, tmp_path):
    fm, kw, alone = served
    fm.save_pretrained(str(tmp_path), selected_adapters=[NAMES[3]])
    folder = str(tmp_path / NAMES[3]) if (tmp_path / NAMES[3]).exists() else str(tmp_path)
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    state = _layer_state(fm)
    errors, bad, stop = [], [], threading.Event()

    def caller(seed):
        rng = random.Random(seed)
        try:
            for _ in range(50):
                how = rng.choice(["names", "block", "plain"])
                rows = [rng.choice(NAMES) for _ in range(3)]
                with torch.no_grad():
                    if how == "names":
                        got = fm(**kw, adapter_names=rows).logits
                    elif how == "block":
                        with fastpeft.mixed_batch(fm, rows):
                            got = fm(**kw).logits
                    else:  # the active adapter: a0 or a1, whichever the switcher set last
                        got = fm(**kw).logits
                        rows = None
                if rows is None:
                    if not any(torch.allclose(got, alone[n], atol=1e-5, rtol=1e-5) for n in NAMES[:2]):
                        bad.append(("plain", None))
                elif not torch.allclose(got, _expected(alone, rows), atol=1e-5, rtol=1e-5):
                    bad.append((how, rows))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def changer():
        i = 0
        try:
            while not stop.is_set():
                fm.load_adapter(folder, adapter_name="extra")
                fm.set_adapter(NAMES[i % 2])
                fm.delete_adapter("extra")
                i += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(8)]
    other = threading.Thread(target=changer)
    other.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    other.join(timeout=60)
    assert not errors, errors[:3]
    assert not bad, f"{len(bad)} of 400 forwards got other adapters, e.g. {bad[:3]}"
    fm.set_adapter(NAMES[0])
    assert _layer_state(fm) == state and "extra" not in fm.peft_config
    after = fm.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(logits(fm, kw), alone[NAMES[0]], atol=1e-6, rtol=1e-6)


def test_asyncio_tasks_ending_out_of_order(served):
    fm, kw, alone = served
    state = _layer_state(fm)
    order = []

    async def task(rows, hold, done_first):
        with fastpeft.mixed_batch(fm, rows):
            await asyncio.sleep(0)
            with torch.no_grad():
                first = logits(fm, kw)
            if done_first is None:
                await hold.wait()  # task a stays inside its block until b has left its own
            else:
                await asyncio.sleep(0)
            with torch.no_grad():
                second = logits(fm, kw)
        order.append(tuple(rows))
        if done_first is not None:
            done_first.set()
        return first, second

    async def main():
        gate = asyncio.Event()
        a = asyncio.create_task(task(["a1", "a2", "a3"], gate, None))  # enters first, leaves last
        b = asyncio.create_task(task(["a4", "a5", "a6"], gate, gate))
        return await asyncio.gather(a, b)

    (a1, a2), (b1, b2) = asyncio.run(main())
    assert order == [("a4", "a5", "a6"), ("a1", "a2", "a3")]
    for got in (a1, a2):
        torch.testing.assert_close(got, _expected(alone, ["a1", "a2", "a3"]), atol=1e-5, rtol=1e-5)
    for got in (b1, b2):
        torch.testing.assert_close(got, _expected(alone, ["a4", "a5", "a6"]), atol=1e-5, rtol=1e-5)
    assert _layer_state(fm) == state
    with torch.no_grad():
        torch.testing.assert_close(logits(fm, kw), alone[NAMES[0]], atol=1e-6, rtol=1e-6)


def test_blocks_ended_out_of_order_by_hand_leave_nothing(served):
    fm, kw, alone = served
    state = _layer_state(fm)
    outer = fastpeft.mixed_batch(fm, ["a1", "a1", "a1"])
    inner = fastpeft.mixed_batch(fm, ["a2", "a3", "a4"])
    outer.__enter__()
    inner.__enter__()
    with torch.no_grad():
        torch.testing.assert_close(logits(fm, kw), _expected(alone, ["a2", "a3", "a4"]), atol=1e-5, rtol=1e-5)
    outer.__exit__(None, None, None)  # the outer block ends first
    with torch.no_grad():
        torch.testing.assert_close(logits(fm, kw), _expected(alone, ["a2", "a3", "a4"]), atol=1e-5, rtol=1e-5)
    inner.__exit__(None, None, None)
    assert _layer_state(fm) == state
    with torch.no_grad():
        torch.testing.assert_close(logits(fm, kw), alone[NAMES[0]], atol=1e-6, rtol=1e-6)


def test_a_forward_names_every_row(served):
    fm, kw, alone = served
    state = _layer_state(fm)
    with pytest.raises(ValueError, match="2 adapter names for a batch of 3"):
        with torch.no_grad():
            fm(**kw, adapter_names=["a1", "a2"])
    kw6 = {k: torch.cat([v, v]) for k, v in kw.items()}  # 6 rows: 3 names would repeat each twice
    with pytest.raises(ValueError, match="3 adapter names for a batch of 6"):
        with torch.no_grad():
            fm(**kw6, adapter_names=["a1", "a2", "a3"])
    assert _layer_state(fm) == state


def test_threads_on_a_peft_model_after_optimize():
    """fastpeft.mixed_batch on a PEFT model after fastpeft.optimize: per call as well (PEFT's own
    ``adapter_names=`` injects the names through hooks every thread sees: PEFT's behaviour)."""
    import peft

    base, inputs = tiny("llama")
    pm = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                             adapter_name=NAMES[0])
    for n in NAMES[1:4]:
        pm.add_adapter(n, peft.LoraConfig(r=3, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(pm, seed=5)
    pm.eval()
    fastpeft.optimize(pm)
    kw = inputs(batch=3, seq=4)
    with torch.no_grad():
        alone = {n: (pm.set_adapter(n), logits(pm, kw))[1] for n in NAMES[:4]}
    pm.set_adapter(NAMES[0])
    bad, errors = [], []

    def caller(seed):
        rng = random.Random(seed)
        try:
            for _ in range(20):
                rows = [rng.choice(NAMES[:4]) for _ in range(3)]
                with fastpeft.mixed_batch(pm, rows), torch.no_grad():
                    got = logits(pm, kw)
                if not torch.allclose(got, _expected(alone, rows), atol=1e-5, rtol=1e-5):
                    bad.append(rows)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not bad, (errors[:2], bad[:3])
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, kw), alone[NAMES[0]], atol=1e-6, rtol=1e-6)


def test_offloaded_layers_serve_concurrent_callers():
    """An offloading bank (keep_adapters_on_cpu) with fewer device slots than the callers' adapters:
    a thread of mixed batches and a thread of plain calls each get their own outputs."""
    from fastpeft.offload import keep_adapters_on_cpu

    base, inputs = tiny("llama")
    fm = fastpeft.get_peft_model(fresh_copy(base), fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                                 adapter_name="a")
    for n in ("b", "c"):
        fm.add_adapter(n, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(fm, seed=9)
    fm.eval()
    kw = inputs(batch=2, seq=4)
    with torch.no_grad():
        alone = {n: (fm.set_adapter(n), logits(fm, kw))[1] for n in ("a", "b", "c")}
    fm.set_adapter("a")
    keep_adapters_on_cpu(fm, max_on_device=2)
    bad, errors = [], []

    def mixed():
        try:
            for _ in range(40):
                with torch.no_grad():
                    got = fm(**kw, adapter_names=["b", "c"]).logits
                if not torch.allclose(got, _expected(alone, ["b", "c"]), atol=1e-5, rtol=1e-5):
                    bad.append("mixed")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def plain():
        try:
            for _ in range(40):
                with torch.no_grad():
                    got = logits(fm, kw)
                if not torch.allclose(got, alone["a"], atol=1e-5, rtol=1e-5):
                    bad.append("plain")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=mixed), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not bad, (errors[:2], len(bad), bad[:3])


def test_a_generation_of_a_with_adapters_model_sees_one_set_of_adapters(tmp_path):
    from transformers import LogitsProcessor, LogitsProcessorList

    base, inputs = tiny("llama")
    model = fastpeft.with_adapters(fresh_copy(base))
    for n in ("x", "y"):
        model.add_adapter(fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), adapter_name=n)
    randomize_adapters(model, seed=3)
    model.set_adapter("x")
    model.eval()
    started, times = threading.Event(), {}

    class Slow(LogitsProcessor):
        def __call__(self, input_ids, scores):
            started.set()
            threading.Event().wait(0.05)
            return scores

    def gen():
        ids = inputs(batch=1, seq=3)["input_ids"]
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([Slow()]))
        times["generate_done"] = time.monotonic()

    t = threading.Thread(target=gen)
    t.start()
    assert started.wait(60)
    model.set_adapter("y")  # waits for the generation in progress
    times["switched"] = time.monotonic()
    t.join(60)
    assert times["switched"] >= times["generate_done"]


def test_two_threads_changing_adapters_from_inside_their_forwards_get_an_error_not_a_deadlock():
    from fastpeft._locks import RWLock

    lock = RWLock()
    both_reading, outcome = threading.Barrier(2), []

    def worker():
        with lock.reading():
            both_reading.wait()
            try:
                with lock.writing():
                    outcome.append("changed")
            except RuntimeError as e:
                outcome.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert sorted(o == "changed" for o in outcome) == [False, True]
