"""Adapters on sharded base layers: tensor parallelism (:mod:`.tensor_parallel`) and the
collectives and communication counter it uses (:mod:`._collectives`). docs/multi-device.md."""
from ._collectives import CommCounter, all_reduce_sum, reduce_grad
from .tensor_parallel import TPPlan, plan_for

__all__ = ["CommCounter", "TPPlan", "all_reduce_sum", "plan_for", "reduce_grad"]
