"""AdaLoRA training as PEFT's ``AdaLoraModel``: the orthogonal regularisation added to the loss,
the rank allocator (``update_and_allocate``) and resizing layers to a rank pattern.

``model`` here is the user model holding fastpeft's adapter layers (``PeftModel.base_model.model``);
its adapters' configs are ``model.peft_config`` (:func:`fastpeft.tuner._configs`). The AdaLoRA
layers (:class:`fastpeft.nn.AdaLoraLinear`, ``AdaLoraConv2d``) hold PEFT's parameters, named as in PEFT::

    <path>.lora_A.<adapter>  [r, K]   right singular vectors (conv: K = C_in * kh * kw)
    <path>.lora_E.<adapter>  [r, 1]   singular values (the allocator zeroes pruned ones)
    <path>.lora_B.<adapter>  [N, r]   left singular vectors
    <path>.ranknum.<adapter> [1]      the scaling divisor (not trained, not saved)

so ``model.named_parameters()`` yields PEFT's names in PEFT's order, and every sum below is taken
in PEFT's order: losses and masks equal PEFT's to float precision.

The trainable adapter is PEFT's ``trainable_adapter_name``: the model's first adapter, when it
was added with ``inference_mode=False`` (recorded by the layers when added, so a later change of
the config's flag does not move it). A model whose first adapter was added for inference has
none, and both entry points raise AttributeError, as PEFT does (its attribute is missing).

The allocator (:class:`RankAllocator`) is kept on the model (attribute ``_fastpeft_adalora``;
it holds no reference to the model, so copies and pickles of the model carry their own). PEFT
creates it with the model; here it is created by the first ``update_and_allocate`` call, from
what PEFT's would have been at creation (every layer at ``init_r``): the same state and results.
"""
from __future__ import annotations

import torch
from torch import nn

from . import tuner

__all__ = [
    "RankAllocator",
    "add_orthogonal_regularization",
    "rank_allocator",
    "resize_modules_by_rank_pattern",
    "trainable_adapter_name",
    "update_and_allocate",
]

_STATE_ATTR = "_fastpeft_adalora"


def _adalora_layers(model: nn.Module) -> list:
    """The AdaLoRA layers (any kind: :class:`fastpeft.nn.AdaLoraLinear`, ``AdaLoraConv2d``):
    adapter layers holding ``lora_E``. They record ``inference_mode`` per adapter, and have
    ``resize_adapter`` and a ``bank`` to mark stale."""
    return [m for m in tuner.adapter_layers(model) if isinstance(getattr(m, "lora_E", None), nn.ParameterDict)]


def trainable_adapter_name(model: nn.Module) -> str:
    """PEFT's ``AdaLoraModel.trainable_adapter_name``: the first adapter of ``model`` if it was
    added for training. Raises ValueError when several AdaLoRA adapters were added for training
    (PEFT refuses to add the second one), AttributeError when the first was not."""
    configs = tuner._configs(model)
    recorded: dict = {}
    for layer in _adalora_layers(model):
        for name, inference in layer.inference_mode.items():
            recorded.setdefault(name, inference)
    trainable = [n for n, c in configs.items() if tuner._method(c) == "adalora"
                 and not recorded.get(n, getattr(c, "inference_mode", False))]
    if len(trainable) > 1:
        raise ValueError(
            "AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set inference_mode to "
            f"True for all adapters except the one you want to train (trainable: {trainable})."
        )
    first = next(iter(configs), None)
    if first is None or first not in trainable:
        raise AttributeError(
            f"the model has no trainable AdaLoRA adapter (its first adapter {first!r} was added for inference or is "
            "not AdaLoRA): PEFT's AdaLoraModel then has no 'trainable_adapter_name'; load it with is_trainable=True"
        )
    return first


# ----- the orthogonal regularisation ------------------------------------------------------------
def add_orthogonal_regularization(model: nn.Module, outputs):
    """PEFT's ``AdaLoraModel.forward`` after the model's forward: when ``outputs.loss`` is a
    tensor, ``outputs.loss += orth_reg_weight * mean_p ||C_p - I||_F`` over the parameters ``p``
    whose name holds ``lora_A`` or ``lora_B`` and the trainable adapter's name (PEFT's substring
    test), with ``C = A @ A.T`` [r, r] for ``lora_A`` and ``C = B.T @ B`` [r, r] for ``lora_B``.
    In place on the loss, as PEFT. ``orth_reg_weight < 0`` raises ValueError. ``outputs``
    without a tensor ``loss`` (a tuple, no labels) is returned unchanged."""
    loss = getattr(outputs, "loss", None)
    if loss is None or not isinstance(loss, torch.Tensor):
        return outputs
    name = trainable_adapter_name(model)
    orth_reg_weight = tuner._configs(model)[name].orth_reg_weight
    if orth_reg_weight < 0:
        raise ValueError("orth_reg_weight should be greater than or equal to 0. ")
    regu_loss = 0
    num_param = 0
    for n, p in model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and name in n:
            para_cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))
            eye.requires_grad = False
            num_param += 1
            regu_loss += torch.norm(para_cov - eye, p="fro")
    regu_loss = regu_loss / num_param if num_param > 0 else 0
    outputs.loss += orth_reg_weight * regu_loss
    return outputs


# ----- the rank allocator -----------------------------------------------------------------------
class RankAllocator:
    """PEFT's ``RankAllocator`` (paper: https://openreview.net/pdf?id=lq62uWRJjiY) for the
    adapter ``adapter_name`` of ``model``; ``model`` is passed to every call, not kept.

    State: ``ipt`` / ``exp_avg_ipt`` / ``exp_avg_unc`` (param name -> tensor of the param's
    shape): the sensitivity ``|p * grad|``, its EMA (``beta1``) and the EMA (``beta2``) of its
    deviation from that; ``init_bgt`` (the total rank at creation: ``init_r`` per layer) and
    ``target_bgt`` (``target_r`` per layer); ``name_set``: the layers, as ``<path>.%s.<adapter>``.
    """

    def __init__(self, model: nn.Module, peft_config, adapter_name: str):
        self.peft_config = peft_config
        self.adapter_name = adapter_name
        self.beta1 = peft_config.beta1
        self.beta2 = peft_config.beta2
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):  # PEFT asserts this
            raise ValueError(f"AdaLoRA needs 0 < beta1, beta2 < 1, got {self.beta1!r}, {self.beta2!r}")
        self.reset_ipt()
        self._set_budget_scheduler(model)

    def set_total_step(self, total_step: int) -> None:
        self.peft_config.total_step = total_step

    def reset_ipt(self) -> None:
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    def _set_budget_scheduler(self, model: nn.Module) -> None:
        # PEFT sums lora_A.size(0) when the model is created, when every layer has init_r (a
        # loaded adapter is resized afterwards): the same as init_r per layer, whenever made
        suffix = f".lora_A.{self.adapter_name}"
        names = {n.replace("lora_A", "%s") for n, _ in model.named_parameters() if n.endswith(suffix)}
        self.name_set = sorted(names)
        self.init_bgt = self.peft_config.init_r * len(self.name_set)
        self.target_bgt = self.peft_config.target_r * len(self.name_set)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_ind)`` at ``step``: ``init_bgt`` while ``step <= tinit``, then a cubic
        decrease to ``target_bgt`` at ``total_step - tfinal`` (masking every ``deltaT`` steps),
        then ``target_bgt`` (always masking)."""
        tinit, tfinal, total_step = self.peft_config.tinit, self.peft_config.tfinal, self.peft_config.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total_step - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % self.peft_config.deltaT == 0

    def update_ipt(self, model: nn.Module) -> None:
        """Update the sensitivity EMAs of every parameter whose name holds ``lora_`` and the
        adapter's name (PEFT's substring test) from its ``.grad`` (call after backward)."""
        for n, p in model.named_parameters():
            if "lora_" in n and self.adapter_name in n:
                if n not in self.ipt:
                    self.ipt[n] = torch.zeros_like(p)
                    self.exp_avg_ipt[n] = torch.zeros_like(p)
                    self.exp_avg_unc[n] = torch.zeros_like(p)
                with torch.no_grad():
                    self.ipt[n] = (p * p.grad).abs().detach()
                    self.exp_avg_ipt[n] = self.beta1 * self.exp_avg_ipt[n] + (1 - self.beta1) * self.ipt[n]
                    self.exp_avg_unc[n] = (
                        self.beta2 * self.exp_avg_unc[n] + (1 - self.beta2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs()
                    )

    def _element_score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    @staticmethod
    def _combine_ipt(ipt_E: torch.Tensor, ipt_AB: torch.Tensor) -> torch.Tensor:
        """[r] triplet scores: ``ipt_E`` [r, 1] plus the row sums of ``ipt_AB`` [r, 2]."""
        ipt_AB = ipt_AB.sum(dim=1, keepdim=False)
        return ipt_E.view(-1) + ipt_AB.view(-1)

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict:
        """Zero (in place) the ``lora_E`` entries of the ``init_bgt - budget`` lowest-scoring
        triplets over all layers (ties at the threshold are pruned too, as PEFT's ``<=``).
        Triplet score of rank i: score(E_i) + mean_k score(A_ik) + mean_n score(B_ni).
        Returns the rank pattern ``{"<path>.lora_E.<adapter>": [kept: bool] * r}``."""
        value_ipt, vector_ipt, triplet_ipt = {}, {}, {}
        a_key, b_key, e_key = (f"{c}.{self.adapter_name}" for c in ("lora_A", "lora_B", "lora_E"))
        for n, _ in model.named_parameters():
            if a_key in n:
                comb_ipt = torch.mean(self._element_score(n), dim=1, keepdim=True)
                vector_ipt.setdefault(n.replace("lora_A", "%s"), []).append(comb_ipt)
            if b_key in n:
                comb_ipt = torch.mean(self._element_score(n), dim=0, keepdim=False).view(-1, 1)
                vector_ipt.setdefault(n.replace("lora_B", "%s"), []).append(comb_ipt)
            if e_key in n:
                value_ipt[n.replace("lora_E", "%s")] = self._element_score(n)
        all_score = []
        for name_m, vectors in vector_ipt.items():
            sum_ipt = self._combine_ipt(value_ipt[name_m], torch.cat(vectors, dim=1))
            triplet_ipt[name_m % "lora_E"] = sum_ipt.view(-1, 1)
            all_score.append(sum_ipt.view(-1))
        mask_threshold = torch.kthvalue(torch.cat(all_score), k=self.init_bgt - budget)[0].item()
        rank_pattern = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if e_key in n:
                    p.masked_fill_(triplet_ipt[n] <= mask_threshold, 0.0)
                    rank_pattern[n] = (~(triplet_ipt[n] <= mask_threshold)).view(-1).tolist()
        _mark_stale(model)
        return rank_pattern

    def update_and_allocate(self, model: nn.Module, global_step: int, force_mask: bool = False):
        """One step: the EMAs (before ``total_step - tfinal``), then masking to the step's
        budget when the schedule (or ``force_mask``) says so. Returns ``(budget, rank_pattern
        or None)``."""
        if global_step < self.peft_config.total_step - self.peft_config.tfinal:
            self.update_ipt(model)
        budget, mask_ind = self.budget_schedule(global_step)
        rank_pattern = self.mask_to_budget(model, budget) if mask_ind or force_mask else None
        return budget, rank_pattern

    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict) -> None:
        """Zero (in place) the ``lora_E`` entries that ``rank_pattern`` marks False; its keys
        may hold the adapter name (as made) or not (as saved)."""
        truncated = self.adapter_name not in next(iter(rank_pattern.keys()))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"lora_E.{self.adapter_name}" in n:
                    key = n if not truncated else n.replace(f".{self.adapter_name}", "")
                    mask = torch.Tensor(rank_pattern[key]).unsqueeze(-1).to(p.device)
                    p.masked_fill_(~mask.bool(), 0.0)
        _mark_stale(model)


def _mark_stale(model: nn.Module) -> None:
    """lora_E changed in place: the banks' copies of ``A * E`` are rebuilt at the next fused
    forward (they also watch the parameters' versions; this makes it explicit)."""
    for layer in _adalora_layers(model):
        layer.bank.mark_stale()


def rank_allocator(model: nn.Module) -> RankAllocator:
    """The model's allocator (PEFT's ``AdaLoraModel.rankallocator``), made on first use for its
    trainable adapter (again if that adapter changed, e.g. deleted and another added)."""
    name = trainable_adapter_name(model)
    config = tuner._configs(model)[name]
    alloc = model.__dict__.get(_STATE_ATTR)
    if alloc is None or alloc.adapter_name != name or alloc.peft_config is not config:
        alloc = RankAllocator(model, config, name)
        model.__dict__[_STATE_ATTR] = alloc
    return alloc


def update_and_allocate(model: nn.Module, global_step: int) -> None:
    """PEFT's ``AdaLoraModel.update_and_allocate``: call every step after ``loss.backward()``
    and before ``zero_grad()``. Before ``total_step - tfinal``: update the importance EMAs and,
    when the schedule says so, mask to the budget (``config.rank_pattern`` = the pattern); at
    ``total_step - tfinal``: the final mask to ``target_r`` per layer on average, stored as
    ``config.rank_pattern`` (keys ``"<path>.lora_E.<adapter>"``), and the EMAs reset; after it:
    mask with the stored pattern every step. Layers keep ``init_r`` rows (PEFT does not resize
    while training; saving keeps only the pattern's ranks, loading builds the smaller layers)."""
    alloc = rank_allocator(model)
    config = tuner._configs(model)[alloc.adapter_name]
    final = config.total_step - config.tfinal
    if global_step < final:
        _, rank_pattern = alloc.update_and_allocate(model, global_step)
        if rank_pattern:
            config.rank_pattern = rank_pattern
    elif global_step == final:
        _, rank_pattern = alloc.update_and_allocate(model, global_step, force_mask=True)
        config.rank_pattern = rank_pattern
        alloc.reset_ipt()
    else:
        alloc.mask_using_rank_pattern(model, config.rank_pattern)


# ----- resizing ---------------------------------------------------------------------------------
def resize_modules_by_rank_pattern(model: nn.Module, rank_pattern: dict, adapter_name: str) -> None:
    """PEFT's ``AdaLoraModel.resize_modules_by_rank_pattern``: shrink each layer named in
    ``rank_pattern`` (keys ``"<path>.lora_E[.<adapter>]"``, values bool lists or tensors) to its
    kept ranks (:meth:`fastpeft.nn.AdaLoraLinear.resize_adapter`: ``ranknum`` stays, a layer
    with no rank left gets zero-size tensors and ``ranknum`` 0). The parameters are new objects:
    an optimizer made before no longer updates them (why PEFT does not resize while training)."""
    for name, rank_idx in rank_pattern.items():
        if isinstance(rank_idx, torch.Tensor):
            rank_idx = rank_idx.view(-1)
        elif not isinstance(rank_idx, list):
            raise TypeError("Unexpected type of rank_idx")
        parts = name.split(".")
        key = ".".join(parts[:-2]) if adapter_name in name else ".".join(parts[:-1])
        model.get_submodule(key).resize_adapter(adapter_name, rank_idx)
