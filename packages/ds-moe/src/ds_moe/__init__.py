"""ds-moe: mixture of experts (Switch top-1, GShard top-2, top-k) with expert parallelism.

``MoE`` is DeepSpeed's layer: build it inside a model (after ``ds_core.init_distributed()`` when
``ep_size > 1``), add its ``l_aux`` to the loss, and train with ``ds_core.initialize``. Expert
parameters carry ds-core parameter tags, so the engine (and ZeRO 1/2) reduce, clip and checkpoint them
per expert group without any config section.
"""

from __future__ import annotations

from .exchange import all_to_all
from .experts import Experts
from .gating import Routing, TopKGate, capacity, route
from .layer import MoE
from .param_groups import (
    is_moe_param,
    split_params_grads_into_shared_and_expert_params,
    split_params_into_different_moe_groups_for_optimizer,
)

__version__ = "0.0.1"

__all__ = ["MoE", "TopKGate", "Routing", "Experts", "route", "capacity", "all_to_all", "is_moe_param",
           "split_params_into_different_moe_groups_for_optimizer",
           "split_params_grads_into_shared_and_expert_params"]
