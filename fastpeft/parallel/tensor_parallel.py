"""Adapters on base layers sharded by tensor parallelism (``torch.distributed.tensor.parallel``).

A base ``nn.Linear`` ``y = x W^T + b`` (``W [N, K]``) is *column-parallel* when its weight is
a DTensor ``Shard(0)`` over a 1-D device mesh of ``w`` ranks (each rank holds ``N_l`` output
rows, the input is replicated, the output stays sharded on its last dim), and *row-parallel*
with ``Shard(1)`` (each rank holds ``K_l`` input columns and gets its slice of the input; the
partial products are summed by one all-reduce, the bias is added once after it). Either is
recognized as PyTorch's ``parallelize_module`` with ``ColwiseParallel()`` / ``RowwiseParallel()``
leaves it (forward pre/post hooks) or as Transformers' ``tp_plan`` ("colwise" / "rowwise":
a ``forward`` installed on the instance); see :func:`plan_for`. The adapters follow the base:

====================  ==========================  ==========================
tensor                column-parallel             row-parallel
====================  ==========================  ==========================
lora_A ``[r, K]``     replicated                  ``[r, K_l]`` (split inputs)
lora_B ``[N, r]``     ``[N_l, r]`` (split outputs) replicated
lora_B bias, DoRA m   ``[N_l]``                   replicated ``[N]``
IA3 ``[1, K]`` (ff)   replicated                  ``[1, K_l]``
IA3 ``[N, 1]``        ``[N_l, 1]``                replicated
====================  ==========================  ==========================

The adapter parameters are plain tensors holding this rank's shard (so the stacks of
:mod:`fastpeft.nn.bank` and the fused operator work unchanged, on local tensors: no gather of
a weight). The fused route (:func:`run_fused`) calls ``torch.ops.fastpeft.adapter_linear`` on
the local shards; row-parallel, the operator's output is the partial sum of the base *and*
the low-rank path, so the base's one all-reduce serves both (no extra collective).
``state_dict()`` gathers the sharded adapter tensors (PEFT's full format, a collective every
rank must join); loading full tensors (:func:`local_entries`, ``load_state_dict``) slices them.
Every other sharding raises :class:`NotImplementedError` naming it. docs/multi-device.md.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._collectives import all_reduce_sum, reduce_grad
from .sharded_state import AXES, adopt, gather_hook, local_entries, split_hook  # noqa: F401  (adopt, local_entries: the layers')

# Whether any plan was made in this process (load_weights skips its walk otherwise).
ANY = False


def _dtensor_cls():
    """The DTensor class, or None when ``torch.distributed.tensor`` was never imported (then
    no DTensor exists: the check costs nothing in a process without tensor parallelism)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else getattr(mod, "DTensor", None)


def is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t):
    """This rank's local tensor of a DTensor (``t`` itself otherwise)."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(eq=False)
class TPPlan:
    """How one base layer is sharded. ``style``: "colwise" or "rowwise"; ``K``, ``N``: the
    global in / out features; ``local_in``, ``local_out``: this rank's; ``source``: who
    sharded it ("torch" parallelize_module, "transformers" tp_plan); the hooks recognized as
    the style's (``pre``/``post`` hook ids, ``forward``), so a call of the base that runs
    anything else is left to the base."""

    style: str
    mesh: object
    group: object
    rank: int
    world: int
    K: int
    N: int
    local_in: int
    local_out: int
    source: str
    pre: frozenset = field(default_factory=frozenset)
    post: frozenset = field(default_factory=frozenset)
    forward: object = None

    @property
    def sharded_axis(self) -> str:
        return "N" if self.style == "colwise" else "K"

    def axes(self, layer, container: str, pname: str | None, shape) -> tuple:
        if container == "ia3_l":
            return ("1", "K") if layer.is_feedforward else ("N", "1")
        return AXES[(container, pname)]

    def shard_dim(self, layer, container: str, pname: str | None, shape) -> int | None:
        """The dim of an adapter tensor split over the ranks (None: replicated)."""
        ax = self.axes(layer, container, pname, shape)
        return ax.index(self.sharded_axis) if self.sharded_axis in ax else None

    def global_shape(self, layer, container, pname, shape) -> tuple:
        d = self.shard_dim(layer, container, pname, shape)
        full = self.N if self.sharded_axis == "N" else self.K
        return tuple(shape) if d is None else tuple(full if i == d else s for i, s in enumerate(shape))

    def split(self, t: Tensor, dim: int) -> Tensor:
        """This rank's piece of the full tensor ``t`` along ``dim`` (``torch.chunk``'s split,
        as DTensor's ``Shard`` has it: the last ranks may hold less)."""
        parts = torch.chunk(t, self.world, dim)
        if self.rank < len(parts):
            return parts[self.rank].contiguous()
        shape = list(t.shape)
        shape[dim] = 0
        return t.new_empty(shape)

    def gather(self, t: Tensor, dim: int, full: int) -> Tensor:
        """The full tensor from every rank's piece ``t`` (a collective), ``full`` long on ``dim``."""
        from torch.distributed.tensor import DTensor, Shard

        shape = list(t.shape)
        shape[dim] = full
        stride = torch.empty(shape, device="meta").stride()
        d = DTensor.from_local(t.contiguous(), self.mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                               stride=stride)
        return d.full_tensor()


# ----- recognizing the sharding ------------------------------------------------------------------
def _closure(fn) -> dict:
    try:
        return inspect.getclosurevars(fn).nonlocals
    except (TypeError, ValueError):
        return {}


def _torch_style(base: nn.Module):
    """(style, input layouts, output layouts, use_local_output, mesh, pre ids, post ids) of the
    hooks PyTorch's ``ColwiseParallel`` / ``RowwiseParallel`` install (``distribute_module``),
    or None when the base has none of them."""
    from torch.distributed.tensor.parallel import style as S

    kinds = {S.ColwiseParallel._prepare_input_fn: ("colwise", "in"), S.ColwiseParallel._prepare_output_fn: ("colwise", "out"),
             S.RowwiseParallel._prepare_input_fn: ("rowwise", "in"), S.RowwiseParallel._prepare_output_fn: ("rowwise", "out")}
    found: dict = {}
    for where, hooks in (("in", base._forward_pre_hooks), ("out", base._forward_hooks)):
        for hid, hook in hooks.items():
            cv = _closure(hook)
            fn = cv.get("input_fn" if where == "in" else "output_fn")
            kind = kinds.get(getattr(fn, "func", None))
            if kind is not None and kind[1] == where:
                found[where] = (kind[0], fn.args, cv.get("device_mesh"), hid)
    if not found:
        return None
    styles = {v[0] for v in found.values()}
    if len(styles) != 1 or len(found) != 2:
        raise NotImplementedError(f"{type(base).__name__} carries an incomplete or mixed tensor-parallel hook pair "
                                  f"({sorted(found)} of {sorted(styles)}); fastpeft cannot tell its layouts")
    style = styles.pop()
    (_, in_args, mesh, pre), (_, out_args, _, post) = found["in"], found["out"]
    return style, tuple(in_args[0]), tuple(out_args[0]), bool(out_args[1]), mesh, frozenset([pre]), frozenset([post])


def _transformers_style(base: nn.Module):
    """The same for Transformers' tp_plan styles (a ``forward`` set on the instance)."""
    fwd = base.__dict__.get("forward")
    tp = sys.modules.get("transformers.distributed.tensor_parallel")
    if fwd is None or tp is None:
        return None
    cv = _closure(fwd)
    st = cv.get("self")
    if type(st) is tp.ColwiseParallel:
        style = "colwise"
    elif type(st) is tp.RowwiseParallel:
        style = "rowwise"
    elif isinstance(st, tp.TensorParallelLayer):
        raise NotImplementedError(f"{type(base).__name__} is sharded by Transformers' {type(st).__name__}; fastpeft's "
                                  f"adapters support the 'colwise' and 'rowwise' plans only")
    else:
        return None
    return style, (st.input_layouts,), (st.output_layouts,), bool(st.use_local_output), cv.get("mesh"), frozenset(), frozenset()


def _norm(p, ndim: int):
    """A placement with a negative Shard dim made positive (Shard(-1) of a 2-D weight: Shard(1))."""
    from torch.distributed.tensor import Shard

    if isinstance(p, Shard) and p.dim < 0:
        return Shard(p.dim + ndim)
    return p


def plan_for(layer: nn.Module, base: nn.Module) -> TPPlan | None:
    """The :class:`TPPlan` of ``base`` (the base layer ``layer`` wraps), or None when none of
    its parameters is a DTensor. Raises :class:`NotImplementedError` naming what is sharded
    and how, for every case fastpeft does not implement: another adapter type (AdaLoRA,
    embeddings, convolutions, parameter targets, modules_to_save), a quantized or non-Linear
    base, a mesh of several dims, another placement (``Shard`` of another dim, ``Replicate``,
    ``Partial``), a DTensor weight without a tensor-parallel style (FSDP's ``fully_shard``, a
    hand-made ``distribute_tensor``), other layouts (sequence parallel input ``Shard(1)``, a
    gathered or DTensor output)."""
    cls = _dtensor_cls()
    if cls is None:
        return None
    sharded = {n: p for n, p in base._parameters.items() if isinstance(p, cls)}
    if not sharded:
        return None
    what = ", ".join(f"{n}: {tuple(p.placements)} over {p.device_mesh}" for n, p in sharded.items())
    from ..nn._base_kinds import base_kind
    from ..nn.adalora import AdaLoraLinear
    from ..nn.ia3 import IA3Linear
    from ..nn.lora import LoraLinear

    if not isinstance(layer, (LoraLinear, IA3Linear)) or isinstance(layer, AdaLoraLinear):
        raise NotImplementedError(
            f"{type(layer).__name__} on a {type(base).__name__} whose parameters are sharded DTensors ({what}): fastpeft's "
            f"tensor parallelism covers LoRA, DoRA and IA3 on nn.Linear layers sharded column-wise or row-wise")
    if base_kind(base) == "quant" or type(base) is not nn.Linear:
        raise NotImplementedError(f"a sharded {type(base).__name__} base ({what}): fastpeft's tensor parallelism covers "
                                  f"plain nn.Linear bases (not quantized ones, nor subclasses)")
    w = base._parameters.get("weight")
    if not isinstance(w, cls):
        raise NotImplementedError(f"a base whose bias alone is a DTensor ({what}) is not a tensor-parallel sharding")
    mesh = w.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"a base sharded over a {mesh.ndim}-D mesh ({what}): only 1-D tensor-parallel meshes")
    from torch.distributed.tensor import Replicate, Shard

    place = tuple(_norm(p, w.ndim) for p in w.placements)
    style = {(Shard(0),): "colwise", (Shard(1),): "rowwise"}.get(place)
    if style is None:
        raise NotImplementedError(f"base weight placements {tuple(w.placements)} ({what}): fastpeft's adapters follow "
                                  f"Shard(0) (column-parallel) and Shard(1) (row-parallel) weights only")
    found = _torch_style(base) or _transformers_style(base)
    if found is None:
        raise NotImplementedError(
            f"base weight is a DTensor {tuple(w.placements)} but no ColwiseParallel / RowwiseParallel forward is "
            f"installed on the module (FSDP's fully_shard, or distribute_tensor by hand?): not a tensor-parallel "
            f"layer fastpeft can follow")
    hooked, ins, outs, use_local, hmesh, pre, post = found
    if hooked != style:
        raise NotImplementedError(f"{hooked} hooks on a weight sharded {place} (the {style} placement)")
    col = style == "colwise"
    want_in, want_out = ((Replicate(),), (Shard(-1),)) if col else ((Shard(-1),), (Replicate(),))
    if tuple(ins) != want_in or tuple(outs) != want_out or not use_local:
        raise NotImplementedError(
            f"{style} base with input_layouts={tuple(ins)}, output_layouts={tuple(outs)}, use_local_output={use_local}: "
            f"fastpeft implements the default layouts (input {want_in}, output {want_out}, local output) only; "
            f"sequence parallelism and gathered or DTensor outputs are not implemented")
    b = base._parameters.get("bias")
    if b is not None:
        bp = tuple(_norm(p, 1) for p in b.placements) if isinstance(b, cls) else (Replicate(),)
        if bp != ((Shard(0),) if style == "colwise" else (Replicate(),)):
            raise NotImplementedError(f"{style} base with a bias placed {bp}")
    if hmesh is not None and hmesh != mesh:
        raise NotImplementedError("the tensor-parallel hooks and the weight use different device meshes")
    lw = w.to_local()
    N, K = w.shape
    global ANY
    ANY = True
    plan = TPPlan(style, mesh, mesh.get_group(), mesh.get_local_rank(), mesh.size(), K, N, lw.shape[1], lw.shape[0],
                  "transformers" if base.__dict__.get("forward") is not None else "torch", pre, post,
                  base.__dict__.get("forward"))
    layer.register_state_dict_post_hook(gather_hook)
    layer.register_load_state_dict_pre_hook(split_hook)
    return plan


def fusable(layer) -> bool:
    """Whether ``layer`` may replace the call of its sharded base by the fused operator on the
    local shards: a plan, a plain nn.Linear, and no hook on the base besides the style's.
    Raises for a base sharded after the adapter layer was made (its adapters are whole)."""
    plan = getattr(layer, "_tp", None)
    if plan is None:
        if is_dtensor(getattr(layer.base_layer, "weight", None)):
            raise NotImplementedError(f"the base of this {type(layer).__name__} was sharded after the adapter layer was "
                                      f"made: shard the model first (parallelize_module / tp_plan), then add adapters")
        return False
    base = layer.base_layer
    mod = torch.nn.modules.module
    return (type(base) is nn.Linear and set(base._forward_pre_hooks) == plan.pre and set(base._forward_hooks) == plan.post
            and base.__dict__.get("forward") is plan.forward
            and not (mod._global_forward_hooks or mod._global_forward_pre_hooks))


def refuse(layer, what: str) -> None:
    """Raise for an operation fastpeft does not implement on a tensor-parallel layer."""
    if getattr(layer, "_tp", None) is not None:
        raise NotImplementedError(f"{what} on a tensor-parallel ({layer._tp.style}) layer is not implemented")


def _check_input(plan: TPPlan, x: Tensor) -> None:
    if is_dtensor(x):
        raise NotImplementedError(f"a DTensor input ({x.placements}) to a {plan.style} adapter layer: pass the local "
                                  f"tensor (the default use_local_output=True of the previous layer gives one)")
    want = plan.local_in
    if x.shape[-1] != want:
        raise ValueError(f"{plan.style} layer of rank {plan.rank}: input has {x.shape[-1]} features, expected this "
                         f"rank's {want} (of {plan.K})")


# ----- the forwards ------------------------------------------------------------------------------
def run_fused(layer, x2: Tensor, lora_a, lora_bt, slot_scales, token_slots, dora_scale, input_scale,
              output_scale) -> Tensor:
    """``LinearLayerBase._run_fused`` on a sharded base: the operator on this rank's shards.

    ``x2 [M, K_l]`` (row-parallel: this rank's input columns) or ``[M, K]``; the stacks hold
    local shards (``lora_a [S, R, K_l]`` row-parallel, ``lora_bt [S, R, N_l]`` column-parallel);
    DoRA's ``[S, N_l or N]`` scale, IA3's scales likewise. Column-parallel: returns this
    rank's ``[M, N_l]`` (no collective). Row-parallel: the operator's ``[M, N]`` partial sum
    (base and adapters), one all-reduce, then the bias (scaled by IA3's output scale)."""
    plan = layer._tp
    _check_input(plan, x2)
    base = layer.base_layer
    W, b = local(base.weight), local(base.bias)
    op = torch.ops.fastpeft.adapter_linear
    if plan.style == "colwise":
        return op(reduce_grad(x2, plan.group), W, b, lora_a, lora_bt, slot_scales, token_slots, dora_scale, input_scale,
                  output_scale)
    y = op(x2, W, None, lora_a, lora_bt, slot_scales, token_slots, dora_scale, input_scale, output_scale)
    y = all_reduce_sum(y, plan.group)
    if b is not None:
        y = y + (b if output_scale is None else b * output_scale).to(y.dtype)
    return y


def dora_norm(layer, name: str, dtype: torch.dtype) -> Tensor:
    """DoRA's ``||W + s B A||`` per output row on a sharded base: ``[N_l]`` column-parallel
    (local rows are whole rows); row-parallel the rows are split, so the squared norms of the
    local pieces are summed by an all-reduce of ``N`` floats (once per change of the weights:
    the layer caches the DoRA scale)."""
    plan = layer._tp
    W = local(layer.base_layer.weight).to(dtype)
    A, B = layer._a_weight(name).to(dtype), layer._b_weight(name).to(dtype).detach()
    M = W + layer._scale(name) * (B @ A)
    if plan.style == "colwise":
        return torch.linalg.norm(M, dim=1)
    sq = M.detach().float().pow(2).sum(dim=1)
    torch.distributed.all_reduce(sq, group=plan.group)
    return sq.sqrt().to(dtype)


def lora_delta(layer, name: str, x: Tensor, result: Tensor) -> Tensor:
    """``LoraLinear._adapter_delta`` on a sharded base (the unfused route: gradients, dropout,
    lora_bias), to add to ``result`` (the base's output as its hooks give it: ``[.., N_l]``
    column-parallel, the all-reduced ``[.., N]`` row-parallel).

    Column-parallel: ``u = A x`` is computed whole on every rank, its gradient summed over the
    ranks (each rank's ``B_l`` sees only its outputs); ``B_l u`` is this rank's outputs.
    Row-parallel: ``u = sum over ranks of A_l x_l`` (an all-reduce of ``[.., r]``, as PEFT's
    row-parallel ``lora_A``), then the replicated ``B``. DoRA as PEFT computes it, with the
    norm of :func:`dora_norm`. Active dropout on a column-parallel layer raises: each rank
    would draw another mask for the same replicated input."""
    plan = layer._tp
    _check_input(plan, x)
    xl = x.to(layer._a_weight(name).dtype)
    drop = layer.lora_dropout[name]
    if plan.style == "colwise" and layer.training and isinstance(drop, nn.Dropout) and drop.p > 0:
        raise NotImplementedError("lora_dropout > 0 in training mode on a column-parallel layer: the ranks would draw "
                                  "different dropout masks for the same replicated input; use lora_dropout=0 or eval()")
    xd = drop(xl)
    u = layer.lora_A[name](xd)
    u = reduce_grad(u, plan.group) if plan.style == "colwise" else all_reduce_sum(u, plan.group)
    lora = layer.lora_B[name](u)
    s = layer._scale(name)
    if not layer.use_dora.get(name):
        return lora * s
    norm = dora_norm(layer, name, xl.dtype).detach()
    g = (layer.lora_magnitude_vector[name].weight / norm).view(1, -1)
    if isinstance(drop, nn.Identity) or not layer.training:
        b = local(layer.base_layer.bias)
        base_out = result if b is None else result - b
    else:
        base_out = nn.functional.linear(xd, local(layer.base_layer.weight).to(xl.dtype))
        if plan.style == "rowwise":
            base_out = all_reduce_sum(base_out, plan.group)
    return (g - 1) * base_out + g * lora * s
