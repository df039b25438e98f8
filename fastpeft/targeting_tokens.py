"""Where ``trainable_token_indices`` puts trainable-token wrappers (PEFT's
``set_additional_trainable_modules``, the part for LoRA's ``trainable_token_indices``).

- a list of ids: the model's input embedding (``get_input_embeddings()``; the module named
  ``embed_tokens`` when the model has none);
- a dict ``{name: ids}``: every module whose path ends with ``name`` (PEFT's plain ``endswith``,
  over ``named_modules(remove_duplicate=False)``); a name that matches nothing raises.

Weight tying, as PEFT: when the model's config has ``tie_word_embeddings`` and declares tied
weights, the modules whose weight is the input embedding's (the LM head) get a *tied* wrapper
that uses the input embedding's rows (:class:`fastpeft.nn.trainable_tokens.TrainableTokensWrapper`).
A dict naming the input embedding and a tied layer with equal ids ties them the same way; with
different ids each gets its own rows and nothing is tied.

Refused (model unchanged, the caller rolls back): the same module also in ``modules_to_save``,
LoRA (or modules_to_save) on a module that gets trainable tokens or on a tied output layer,
independent tokens on a layer another adapter tied to the embedding (and the reverse).
"""
from __future__ import annotations

from torch import nn

from .nn.base import AdapterLayer
from .nn.trainable_tokens import TrainableTokensWrapper, check_token_indices

__all__ = ["inject_trainable_tokens"]


def _parent(model: nn.Module, path: str):
    if "." in path:
        head, child = path.rsplit(".", 1)
        return model.get_submodule(head), child
    return model, path


def _walk(model: nn.Module):
    """``(path, module)`` of every module under every name (shared modules repeated), not
    entering adapter layers (their base and adapter containers are theirs)."""
    def rec(m, prefix):
        for name, child in m._modules.items():
            if child is None:
                continue
            path = f"{prefix}{name}"
            yield path, child
            if not isinstance(child, AdapterLayer):
                yield from rec(child, path + ".")

    yield from rec(model, "")


def _input_embedding(model: nn.Module):
    """``(path, module)`` of the input embedding, or ``(None, None)``."""
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        return None, None
    try:
        emb = get()
    except (NotImplementedError, AttributeError):
        return None, None
    for path, m in _walk(model):
        if m is emb:
            return path, m
    return None, None


def _base_weight(m: nn.Module):
    base = m.get_base_layer() if isinstance(m, AdapterLayer) else m
    w = base._parameters.get("weight") if isinstance(base, nn.Module) else None
    return w


def _ties(model: nn.Module) -> bool:
    """PEFT's condition: ``tie_word_embeddings`` in the model's config and tied weights declared."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)
    return bool(values.get("tie_word_embeddings", False)) and bool(getattr(model, "_tied_weights_keys", None))


def _tied_paths(model: nn.Module, emb_path: str | None) -> list[str]:
    """Paths of the modules (other than the input embedding) whose weight is the input embedding's."""
    if emb_path is None:
        return []
    w = _base_weight(model.get_submodule(emb_path))
    if w is None:
        return []
    return sorted({p for p, m in _walk(model) if p != emb_path and _base_weight(m) is w})


def _matches(model: nn.Module, key: str) -> list[str]:
    return list(dict.fromkeys(p for p, _ in _walk(model) if p.endswith(key)))


def _wrap(model, path, adapter_name, ids, created, source=None) -> TrainableTokensWrapper:
    """Add ``adapter_name`` to the wrapper at ``path`` (made first when the module is plain)."""
    module = model.get_submodule(path)
    if isinstance(module, TrainableTokensWrapper):
        if (module.tied_source is None) != (source is None) or (source is not None and module.tied_source is not source):
            raise ValueError(
                f"trainable_token_indices: module {path!r} already holds trainable tokens "
                + ("tied to the input embedding (weight tying) by another adapter; give it the embedding's ids or "
                   "leave it out" if source is None else "of its own from another adapter, so it cannot be tied to "
                   "the input embedding now")
                + "; fastpeft does not mix tied and independent token rows on one layer")
    elif isinstance(module, AdapterLayer):
        what = "a tied output layer" if source is not None else "modules"
        raise TypeError(f"trainable_token_indices cannot be applied to {what} of type {type(module).__name__} "
                        f"(module {path!r}): fastpeft, like PEFT for the input embedding, does not combine LoRA or "
                        "modules_to_save with trainable tokens on one module")
    else:
        wrapper = TrainableTokensWrapper(module, source=source)
        parent, child = _parent(model, path)
        setattr(parent, child, wrapper)
        created.append((parent, child, module))
        module = wrapper
    if source is None:
        module.add_adapter(adapter_name, token_indices=ids)
    else:
        module.add_adapter(adapter_name)
    return module


def inject_trainable_tokens(model: nn.Module, config, adapter_name: str, save_paths, created: list) -> list[str]:
    """Add ``config.trainable_token_indices`` of adapter ``adapter_name`` to ``model``: wrappers
    made are appended to ``created`` as ``(parent, child name, original)`` for the caller's
    rollback. ``save_paths``: this config's modules_to_save paths (must not overlap). Returns the
    paths that got the adapter's tokens (tied ones last)."""
    spec = getattr(config, "trainable_token_indices", None)
    if spec is None:
        return []
    emb_path, _ = _input_embedding(model)
    if isinstance(spec, dict):
        targets = {str(k): check_token_indices(v, k) for k, v in spec.items()}
        if not targets:
            raise ValueError("trainable_token_indices is an empty dict; give {module name: [token ids]}")
    else:
        key = emb_path or "embed_tokens"
        targets = {key: check_token_indices(spec, key)}
    save_paths = list(save_paths or [])
    for key in targets:
        if key in (getattr(config, "modules_to_save", None) or []) or any(p.endswith(key) for p in save_paths):
            raise ValueError(
                "The embedding layer is already marked to be trained fully, either specify "
                f'`modules_to_save=[..., "{key}", ...]` or `trainable_tokens={{\'{key}\': x}}` but not both.')
    for p in save_paths:
        if isinstance(model.get_submodule(p), TrainableTokensWrapper):
            raise ValueError(f"modules_to_save {p!r} holds trainable tokens of another adapter; fastpeft does not "
                             "wrap a trainable-tokens layer in modules_to_save (PEFT refuses adapter layers there)")

    tie = _ties(model)
    tied = _tied_paths(model, emb_path) if tie else []
    skip, mismatch = set(), False
    if len(targets) > 1 and tie:  # PEFT: several named layers that are tied to each other
        tied_keys = [k for k in targets if (emb_path or "").endswith(k)
                     or any(t.endswith(k) or k in t.split(".") for t in tied)]
        if len(tied_keys) >= 2:
            first = targets[tied_keys[0]]
            mismatch = not all(targets[k] == first for k in tied_keys[1:])
            if not mismatch:
                skip = set(tied_keys) & set(tied)

    done: list[str] = []
    source = None
    for key, ids in targets.items():
        if key in skip:
            continue
        paths = _matches(model, key)
        if not paths:
            raise ValueError(f"Target modules {{{key!r}}} not found in the base model. Please check the target "
                             "modules and try again.")
        for path in paths:
            wrapper = _wrap(model, path, adapter_name, ids, created)
            done.append(path)
            if path == emb_path:
                source = wrapper
    if tie and not mismatch and source is not None:
        for path in tied:
            if path in save_paths:
                raise ValueError(f"modules_to_save {path!r} is tied to the input embedding, whose trainable tokens it "
                                 "would share; fastpeft does not combine the two (PEFT nests them)")
            if path not in done:
                _wrap(model, path, adapter_name, None, created, source=source)
                done.append(path)
    return done
