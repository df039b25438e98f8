"""Arrow (``arrow_config``): a router adapter mixing a layer's LoRA experts per token, as PEFT 0.21.

The router is an adapter of its own (PEFT names it ``"arrow_router"``; its own ``lora_A`` /
``lora_B`` are created and saved but unused). Its experts ("task adapters") are the layer's other
adapters except ``"arrow_router"`` and ``gks_<digits>`` (PEFT's ``on_adapter_change`` rule,
re-applied whenever an adapter is added to the layer), in the layer's order. For a layer input
``x [..., K]`` (tokens ``t [M, K]``) and experts ``e`` with factors ``A_e [r, K]``, ``B_e [N, r]``
and scalings ``s_e``::

    sim = |t @ P^T|                      P [E, K]: the experts' prototypes
    coeff = softmax(topk_mask(sim, k) / temperature)       (non-top-k scores are -inf)
    delta = dropout_router( sum_e coeff[:, e] * s_e * (t @ A_e^T) @ B_e^T )

A prototype is the top right singular vector of ``B_e A_e`` by 15 power iterations in float32 from
``randn(K)`` (a generator seeded with ``rng_seed`` per expert, else the global one), cast to A's
dtype; built on the first routed forward and again after the set of experts changes. With
``use_gks`` (General Knowledge Subtraction) the mean ``A`` and ``B`` of the ``gks_adapter_names``
adapters are subtracted *in place* from every expert's ``A`` and ``B`` on that first forward
(and from experts added later). Merging is refused (PEFT: "Cannot merge an active Arrow router
adapter"). :func:`create_arrow_model` is PEFT's ``create_arrow_model`` with fastpeft's PeftModel.
"""
from __future__ import annotations

import torch

from . import LoraVariant, sub_config

ROUTER = "arrow_router"
TASK_PREFIX, GKS_PREFIX = "task_", "gks_"


def _is_expert(layer, name: str) -> bool:
    return (name in layer.lora_B and name != ROUTER
            and not (name.startswith(GKS_PREFIX) and name[len(GKS_PREFIX):].isdigit()))


class ArrowVariant(LoraVariant):
    """The router's state on one layer: experts, GKS progress and the cached prototypes."""

    option = "arrow_config"
    fused = False
    kinds = ("linear", "conv1d", "quant")

    def __init__(self, cfg: dict):
        self.top_k = int(cfg.get("top_k", 3))
        self.temperature = float(cfg.get("router_temperature", 1.0))
        self.rng_seed = cfg.get("rng_seed")
        self.use_gks = bool(cfg.get("use_gks", False))
        self.task_names = list(cfg.get("task_adapter_names") or [])
        self.gks_names = list(cfg.get("gks_adapter_names") or [])
        self.gks_done = False
        self.gks_added: list = []
        self.prototypes = None  # [E, K], or None: build on the next forward

    @classmethod
    def prepare(cls, layer, path, config, r):
        cfg = sub_config(config.arrow_config)
        if cfg.get("use_gks") and not cfg.get("gks_adapter_names"):
            raise ValueError("arrow_config: use_gks=True needs the general adapters (gks_adapter_names); create the "
                             "router with create_arrow_model(..., general_adapter_paths=[...])")
        return cls(cfg)

    def check_merge(self, name):
        raise RuntimeError("Cannot merge an active Arrow router adapter. Remove it first.")

    def on_adapter_added(self, layer, name):
        """PEFT's ``on_adapter_change``: the experts are the layer's adapters by the rule above."""
        experts = [k for k in layer.lora_A.keys() if _is_expert(layer, k)]
        if sorted(self.task_names) == sorted(experts):
            return
        if len(self.task_names) < len(experts):
            self.gks_added = [k for k in experts if k not in self.task_names]
        self.task_names = experts
        self.prototypes = None

    @torch.no_grad()
    def _gen_know_sub(self, layer) -> None:
        if not self.use_gks or (self.gks_done and not self.gks_added):
            return
        avg_a = torch.stack([layer.lora_A[n].weight for n in self.gks_names], dim=0).mean(0)
        avg_b = torch.stack([layer.lora_B[n].weight for n in self.gks_names], dim=0).mean(0)
        for n in (self.task_names if not self.gks_done else self.gks_added):
            layer.lora_A[n].weight.data.sub_(avg_a)
            layer.lora_B[n].weight.data.sub_(avg_b)
        self.gks_done = True
        self.gks_added = []

    def _top_right_singular(self, A, B, iters: int = 15, eps: float = 1e-8):
        A32, B32 = A.to(torch.float32), B.to(torch.float32)
        C = B32.T @ B32
        gen = None
        if self.rng_seed is not None:
            gen = torch.Generator(device=A32.device.type)
            gen.manual_seed(int(self.rng_seed))
        v = torch.randn(A32.size(1), dtype=A32.dtype, device=A32.device, generator=gen)
        v = v / (v.norm() + eps)
        for _ in range(iters):
            w = A32.T @ (C @ (A32 @ v))
            v = w / (w.norm() + eps)
        return v

    @torch.no_grad()
    def _build_prototypes(self, layer) -> None:
        if self.prototypes is not None:
            return
        protos = []
        for n in self.task_names:
            A, B = layer.lora_A[n].weight, layer.lora_B[n].weight
            protos.append(self._top_right_singular(A, B).to(dtype=A.dtype, device=A.device))
        self.prototypes = torch.stack(protos, dim=0)

    def delta(self, layer, name, x, result, where=None):
        """The routed mixture of the experts on ``x [..., K]`` -> ``[..., N]`` (module docstring)."""
        x = x.to(layer.lora_A[name].weight.dtype)
        self._gen_know_sub(layer)
        self._build_prototypes(layer)
        tasks = self.task_names
        x = x.to(layer.lora_A[tasks[0]].weight.dtype)
        tok = x.reshape(-1, x.shape[-1])
        protos = self.prototypes
        if protos.device != tok.device or protos.dtype != tok.dtype:  # the model was moved or cast since
            protos = self.prototypes = protos.to(device=tok.device, dtype=tok.dtype)
        t, E = tok.size(0), protos.size(0)
        scales = torch.tensor([layer.scaling[n] for n in tasks], device=tok.device, dtype=tok.dtype)
        sim = torch.abs(tok @ protos.T)
        top_v, idx = torch.topk(sim, self.top_k, dim=1)
        full = tok.new_full((t, E), float("-inf"))
        full.scatter_(1, idx, top_v)
        coeff = torch.softmax(full / self.temperature, dim=1)
        a_stack = torch.stack([layer.lora_A[n].weight for n in tasks], dim=0)
        b_stack = torch.stack([layer.lora_B[n].weight for n in tasks], dim=0)
        z = torch.einsum("tf, erf -> ter", tok, a_stack)
        y = torch.einsum("ter, eor -> teo", z, b_stack) * scales.view(1, -1, 1)
        delta = layer.lora_dropout[name](torch.einsum("te, teo -> to", coeff, y))
        return delta.view(*x.shape[:-1], delta.shape[-1])


def create_arrow_model(base_model, task_specific_adapter_paths: list, arrow_config, general_adapter_paths=None,
                       **adapter_kwargs):
    """PEFT's ``create_arrow_model`` on fastpeft: load the task experts as ``task_0, task_1, ...``
    (and with ``use_gks`` the general adapters as ``gks_0, ...``), check they share rank, shapes
    and target module names, add the ``"arrow_router"`` adapter (``LoraConfig(arrow_config=...,
    target_modules=<those names>, r=<their rank>)``) and make it active. ``arrow_config``: a dict
    or PEFT's ``ArrowConfig``. Returns the ``fastpeft.PeftModel``."""
    from ... import PeftModel
    from ...config import LoraConfig

    if not task_specific_adapter_paths:
        raise ValueError("`task_specific_adapter_paths` should contain at least one adapter path")
    cfg = sub_config(arrow_config)
    model = PeftModel.from_pretrained(base_model, task_specific_adapter_paths[0], adapter_name=f"{TASK_PREFIX}0",
                                      **adapter_kwargs)
    for i, path in enumerate(task_specific_adapter_paths[1:], start=1):
        model.load_adapter(path, adapter_name=f"{TASK_PREFIX}{i}", **adapter_kwargs)
    cfg["task_adapter_names"] = [f"{TASK_PREFIX}{i}" for i in range(len(task_specific_adapter_paths))]
    if cfg.get("use_gks"):
        if not general_adapter_paths:
            raise ValueError("You should provide general LoRA paths if you want to use GenKnowSub.")
        for i, path in enumerate(general_adapter_paths):
            model.load_adapter(path, adapter_name=f"{GKS_PREFIX}{i}", **adapter_kwargs)
        cfg["gks_adapter_names"] = [f"{GKS_PREFIX}{i}" for i in range(len(general_adapter_paths))]
    else:
        cfg["gks_adapter_names"] = []
    modules, r = _common_targets(model, cfg["task_adapter_names"] + cfg["gks_adapter_names"])
    model.add_adapter(ROUTER, LoraConfig(arrow_config=cfg, target_modules=modules, r=r))
    model.set_adapter(ROUTER)
    return model


def _common_targets(model, names: list) -> tuple[list, int]:
    """PEFT's ``check_loaded_lora_compatibility_arrow``: (sorted target module names, rank)."""
    ref = None
    for name in names:
        mods, r, shapes = set(), None, None
        for full, m in model.named_modules():
            if hasattr(m, "lora_A") and name in m.lora_A:
                A, B = m.lora_A[name].weight, m.lora_B[name].weight
                mods.add(full.split(".")[-1])
                r, shapes = A.shape[0], (A.shape, B.shape)
        if ref is None:
            ref = (r, shapes, mods)
        elif r != ref[0]:
            raise ValueError(f"[{name}] rank mismatch: {r} != {ref[0]}")
        elif shapes != ref[1]:
            raise ValueError(f"[{name}] shape mismatch: {shapes} != {ref[1]}")
        elif mods != ref[2]:
            raise ValueError(f"[{name}] target_modules mismatch:\n  this adapter -> {sorted(mods)}\n"
                             f"  reference   -> {sorted(ref[2])}")
    return sorted(ref[2]), int(ref[0])
