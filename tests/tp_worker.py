"""The ranks of tests/test_tensor_parallel.py: one process each, forked from the test (gloo) or
started as ``python tests/tp_worker.py RANK WORLD PORT DIR BACKEND`` (nccl).

Each rank shards the base model the test saved in DIR, loads the PEFT-saved adapters there with
fastpeft, and writes what the test checks: ``out<rank>.pt`` (logits, gradients gathered to full
shapes, a state dict), ``info<rank>.json`` (routes taken, shapes, the collectives counted, the
errors raised), ``saved<rank>/`` (fastpeft's saves).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

COL, ROW = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), ("o_proj", "down_proj")
GRAD_CASES = ("lora", "dora", "ia3")


def _split_param_name(n: str):
    """``<layer>.lora_B.<adapter>.weight`` -> (layer, "lora_B", "weight"); ``<layer>.ia3_l.<adapter>``
    -> (layer, "ia3_l", None)."""
    parts = n.split(".")
    if parts[-1] != "default":
        return ".".join(parts[:-3]), parts[-3], parts[-1]
    return ".".join(parts[:-2]), parts[-2], None


_T0 = time.monotonic()


def _stamp(what: str) -> None:
    """Seconds since the run started, in the worker's log (shown when a run fails or times out)."""
    print(f"[{time.monotonic() - _T0:6.1f} s] {what}", flush=True)


def _worker(rank: int, world: int, port: int, root: str, backend: str) -> None:
    import copy
    import datetime

    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from transformers import LlamaForCausalLM

    import fastpeft
    from fastpeft.parallel import CommCounter
    from fastpeft.parallel import tensor_parallel as tpmod

    _stamp("imports")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dev = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=40))
    mesh = init_device_mesh(dev.type, (world,))
    refs = torch.load(os.path.join(root, "refs.pt"))
    ids = refs["ids"].to(dev)
    pristine = LlamaForCausalLM.from_pretrained(os.path.join(root, "base")).eval().to(dev)
    path = lambda name: os.path.join(root, name)  # noqa: E731
    out, info = {}, {"errors": {}, "comm": {}}

    def projections(i):
        return {f"model.layers.{i}.{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{p}": p
                for p in COL + ROW}

    def sharded(hf: bool = False):
        if hf:  # Transformers' own loading with the model's tp_plan (Llama: q/k/v/gate/up "colwise", o/down "rowwise")
            from transformers.distributed.configuration_utils import DistributedConfig

            return LlamaForCausalLM.from_pretrained(path("base"), distributed_config=DistributedConfig(tp_size=world)).eval()
        m = copy.deepcopy(pristine)
        names = {k: p for i in range(2) for k, p in projections(i).items()}
        return parallelize_module(m, mesh, {k: ColwiseParallel() if p in COL else RowwiseParallel() for k, p in names.items()})

    def logits(m, **kw):
        with torch.no_grad():
            return m(input_ids=ids, **kw).logits.cpu()

    def events(fn):
        with CommCounter() as c:
            fn()
        return [list(e) for e in c.events]

    _stamp("LoRA (+ a second adapter")
    # LoRA (+ a second adapter): logits, mixed batch, two active adapters, routes, shapes, saving
    calls = {"fused": 0, "unfused": 0}
    run_fused, lora_delta = tpmod.run_fused, tpmod.lora_delta

    def counted(key, fn):
        def wrapper(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapper

    def routes(fn):
        """(fused calls, unfused calls) of the tensor-parallel layers while ``fn`` runs."""
        calls.update(fused=0, unfused=0)
        tpmod.run_fused, tpmod.lora_delta = counted("fused", run_fused), counted("unfused", lora_delta)
        try:
            result = fn()
        finally:
            tpmod.run_fused, tpmod.lora_delta = run_fused, lora_delta
        return result, [calls["fused"], calls["unfused"]]

    info["calls"] = {}
    fm = fastpeft.PeftModel.from_pretrained(sharded(), path("lora"))
    out["lora"], info["calls"]["lora"] = routes(lambda: logits(fm))
    layer0 = fm.base_model.model.model.layers[0]
    mods = {"q_proj": layer0.self_attn.q_proj, "v_proj": layer0.self_attn.v_proj, "o_proj": layer0.self_attn.o_proj,
            "down_proj": layer0.mlp.down_proj}
    info["styles"] = {k: m._tp.style for k, m in mods.items()}
    info["shapes"] = {k: [list(m.lora_A["default"].weight.shape), list(m.lora_B["default"].weight.shape)]
                      for k, m in mods.items()}
    M = ids.numel()
    for k in ("q_proj", "o_proj"):
        m = mods[k]
        x = torch.randn(M, m.in_features, device=dev)
        with torch.no_grad():
            info["comm"][f"{k}_base"] = events(lambda: m.base_layer(x))  # noqa: B023
            info["comm"][f"{k}_lora"] = events(lambda: m(x))  # noqa: B023
    with CommCounter() as c:
        logits(fm)
    info["comm"]["model_lora"] = {"count": c.count, "bytes": c.bytes}
    with fm.disable_adapter():
        with CommCounter() as c:
            out["base"] = logits(fm)
    info["comm"]["model_base"] = {"count": c.count, "bytes": c.bytes}
    fm.load_adapter(path("other"), "other")
    fm.set_adapter("other")
    out["other"] = logits(fm)
    fm.set_adapter("default")
    out["mixed"] = logits(fm, adapter_names=["default", "other", "__base__"])
    fm.base_model.set_adapter(["default", "other"])
    out["multi"] = logits(fm)
    fm.base_model.set_adapter("default")
    try:
        fm.merge_adapter()
    except Exception as e:  # noqa: BLE001
        info["errors"]["merge"] = [type(e).__name__, str(e)]
    fm.save_pretrained(path(f"saved{rank}/lora"))
    full = {k: v.clone() for k, v in fm.state_dict().items() if ".lora_" in k}  # gathered: PEFT's shapes
    with torch.no_grad():
        for n, p in fm.named_parameters():
            if ".lora_" in n:
                p.zero_()
    out["zeroed"] = logits(fm)
    fm.load_state_dict(full, strict=False)  # full tensors: each rank keeps its pieces
    out["reloaded"] = logits(fm)
    mm = fastpeft.with_adapters(sharded())
    mm.load_adapter(path("lora"))
    out["mixin_state_dict"] = {k: v.cpu() for k, v in mm.get_adapter_state_dict().items()}

    _stamp("DoRA and IA3")
    # DoRA and IA3
    fd = fastpeft.PeftModel.from_pretrained(sharded(), path("dora"))
    o = fd.base_model.model.model.layers[0].self_attn.o_proj
    x = torch.randn(M, o.in_features, device=dev)
    with torch.no_grad():
        info["comm"]["dora_o_proj_first"] = events(lambda: o(x))
        info["comm"]["dora_o_proj_cached"] = events(lambda: o(x))
    out["dora"], info["calls"]["dora"] = routes(lambda: logits(fd))
    fd.save_pretrained(path(f"saved{rank}/dora"))
    fi = fastpeft.PeftModel.from_pretrained(sharded(), path("ia3"))
    out["ia3"], info["calls"]["ia3"] = routes(lambda: logits(fi))
    fi.save_pretrained(path(f"saved{rank}/ia3"))

    _stamp("Transformers' tp_plan")
    # Transformers' from_pretrained(distributed_config=DistributedConfig(tp_size=2)): its tp_plan styles
    fh = fastpeft.PeftModel.from_pretrained(sharded(hf=True), path("lora"))
    out["lora_hf_tp_plan"], info["calls"]["lora_hf_tp_plan"] = routes(lambda: logits(fh))
    attn = fh.base_model.model.model.layers[1].self_attn
    info["hf_plans"] = [(m._tp.source, m._tp.style) for m in (attn.q_proj, attn.o_proj)]

    _stamp("training")
    # training: gradients of the sharded adapters, gathered
    for case in GRAD_CASES:
        ft = fastpeft.PeftModel.from_pretrained(sharded(), path(case), is_trainable=True).train()
        ft(input_ids=ids).logits.pow(2).mean().backward()
        grads = {}
        for n, p in ft.named_parameters():
            if p.grad is None:
                continue
            owner_path, container, pname = _split_param_name(n)
            owner = ft.get_submodule(owner_path)
            d = owner._tp.shard_dim(owner, container, pname, p.shape)
            g = p.grad if d is None else owner._tp.gather(p.grad, d, owner._tp.global_shape(owner, container, pname,
                                                                                           p.shape)[d])
            grads[n] = g.detach().cpu().clone()
        out[f"grads_{case}"] = grads
        if case == "lora":  # what a training step of one layer communicates, with and without the adapter
            for k in ("q_proj", "o_proj"):
                m = ft.get_submodule(f"base_model.model.model.layers.0.{'self_attn'}.{k}")
                x = torch.randn(M, m.in_features, device=dev, requires_grad=True)
                info["comm"][f"train_{k}_base"] = events(lambda: m.base_layer(x).pow(2).sum().backward())  # noqa: B023
                info["comm"][f"train_{k}_lora"] = events(lambda: m(x).pow(2).sum().backward())  # noqa: B023

    _stamp("shardings fastpeft does ")
    # shardings fastpeft does not implement: each must raise, naming it
    lcfg = lambda targets: fastpeft.LoraConfig(r=2, target_modules=targets)  # noqa: E731

    def expect(case, make, targets, cls=fastpeft.LoraConfig):
        try:
            m = make()
            if cls is fastpeft.AdaLoraConfig:
                fastpeft.get_peft_model(m, cls(init_r=2, target_r=1, target_modules=targets, total_step=10))
            else:
                fastpeft.get_peft_model(m, lcfg(targets))
            info["errors"][case] = ["no error", ""]
        except Exception as e:  # noqa: BLE001
            info["errors"][case] = [type(e).__name__, str(e)]

    def styled(style):
        def make():
            return parallelize_module(copy.deepcopy(pristine), mesh, {"model.layers.0.self_attn.q_proj": style})
        return make

    def by_hand(placement):
        def make():
            m = copy.deepcopy(pristine)
            q = m.model.layers[0].self_attn.q_proj
            q.weight = nn.Parameter(distribute_tensor(q.weight.detach(), mesh, [placement]), requires_grad=False)
            return m
        return make

    expect("gathered_output", styled(ColwiseParallel(output_layouts=Replicate())), ["q_proj"])
    expect("sequence_parallel", styled(ColwiseParallel(input_layouts=Shard(1))), ["q_proj"])
    embedding = {"model.embed_tokens": RowwiseParallel()}
    expect("sharded_embedding", lambda: parallelize_module(copy.deepcopy(pristine), mesh, embedding), ["embed_tokens"])
    expect("dtensor_without_style", by_hand(Shard(0)), ["q_proj"])
    expect("replicated_placement", by_hand(Replicate()), ["q_proj"])
    expect("adalora", styled(ColwiseParallel()), ["q_proj"], cls=fastpeft.AdaLoraConfig)
    try:  # the base sharded after the adapter was added: its adapter is whole
        late = fastpeft.get_peft_model(copy.deepcopy(pristine), lcfg(["q_proj"]))
        parallelize_module(late, mesh, {"base_model.model.model.layers.0.self_attn.q_proj.base_layer": ColwiseParallel()})
        logits(late)
        info["errors"]["sharded_after_adapters"] = ["no error", ""]
    except Exception as e:  # noqa: BLE001
        info["errors"]["sharded_after_adapters"] = [type(e).__name__, str(e)]

    _stamp("torch.save(out, path")
    torch.save(out, path(f"out{rank}.pt"))
    with open(path(f"info{rank}.json"), "w") as f:
        json.dump(info, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
