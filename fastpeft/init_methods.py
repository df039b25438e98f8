"""Converting a trained PiSSA / OLoRA adapter into a plain LoRA adapter on the original base
weights: the computation behind PEFT's ``save_pretrained(...,
path_initial_model_for_weight_conversion=...)`` (``LoraModel.subtract_mutated_init`` and the
config PEFT writes next to it). The initializations themselves are in
:mod:`fastpeft.nn.lora_init`.

PiSSA / OLoRA replace the base weight W by the residual ``W_res = W - s B0 A0`` (``A0``, ``B0``:
the adapter right after its initialization, ``s``: its scaling). After training the model computes
``W_res + s B A = W + s (B A - B0 A0)``, which is the plain LoRA adapter
``A' = [A ; A0]`` (rank 2r, rows stacked) and ``B' = [B | -B0]`` (columns side by side) with the
same scaling (``r`` and ``lora_alpha`` both doubled, or ``lora_alpha * sqrt(2)`` with rsLoRA), on
the original W.
"""
from __future__ import annotations

import copy

import torch


def convert_to_plain_lora(trained: dict, initial: dict, config) -> tuple[dict, object]:
    """``(state_dict, config)`` of the plain LoRA adapter equal to a trained PiSSA / OLoRA one.

    ``trained``, ``initial``: the adapter's weights (PEFT file format, the same keys) after
    training and right after its initialization; ``config``: its LoraConfig (not changed). Keys:
    ``lora_A.weight [r, K] -> cat([A, A0], 0) [2r, K]``, ``lora_B.weight [N, r] ->
    cat([B, -B0], 1) [N, 2r]``, ``lora_embedding_A / _B`` alike (an embedding's init has A0 = 0,
    so its delta is unchanged); other keys (modules_to_save copies) are kept as they are (PEFT
    drops them). The config: ``init_lora_weights=True``, ``r`` / ``rank_pattern`` doubled,
    ``lora_alpha`` / ``alpha_pattern`` doubled (``* sqrt(2)`` with rsLoRA), as PEFT writes it.

    Raises ValueError for DoRA magnitudes or LoRA biases (the delta does not split that way),
    for a key of ``trained`` missing from ``initial``, and for rsLoRA with rank / alpha patterns
    (PEFT refuses it too)."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("converting to plain LoRA is not supported when using `rank_pattern` or `alpha_pattern` "
                         "at the same time as `use_rslora=True` (as in PEFT)")
    out = {}
    for key, t in trained.items():
        if "lora_magnitude_vector" in key or (".lora_B." in key and key.endswith(".bias")):
            raise ValueError(f"{key!r}: a DoRA magnitude or a LoRA bias cannot be converted to plain LoRA")
        is_a = ".lora_A." in key or ".lora_embedding_A" in key
        is_b = ".lora_B." in key or ".lora_embedding_B" in key
        if not (is_a or is_b):
            out[key] = t
            continue
        if key not in initial:
            raise ValueError(f"{key!r} is not in the initial adapter's state dict")
        init = initial[key].to(device=t.device, dtype=t.dtype)
        out[key] = torch.cat([t, init], dim=0) if is_a else torch.cat([t, -init], dim=1)
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha = config.lora_alpha * 2 ** 0.5 if config.use_rslora else config.lora_alpha * 2
    if config.rank_pattern:
        config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    if config.alpha_pattern:
        config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return out, config
