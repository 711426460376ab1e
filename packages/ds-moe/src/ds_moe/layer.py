"""``MoE``: the DeepSpeed-compatible mixture-of-experts layer (gate, dispatch, experts, combine).

A forward pass over tokens ``x`` (any leading shape, last dim ``hidden_size``):

1. the gate (``gating.py``) picks up to ``k`` experts per token and returns the kept assignments
   already sorted by expert;
2. dispatch gathers those tokens into one tensor grouped by expert; with ``ep_size > 1`` the experts
   are sharded over the ``expert`` axis (experts ``r·E/ep .. (r+1)·E/ep - 1`` on expert rank ``r``), the
   per-expert counts are exchanged and the tokens sent with one uneven ``all_to_all_single``
   (``exchange.py``), and regrouped by local expert;
3. each local expert runs once on its contiguous slice (``experts.py``);
4. the results travel back by the reverse all-to-all and are summed into their tokens weighted by the
   gate (``index_add``).

Only kept tokens are sent: with a capacity factor ≥ 1 this moves fewer bytes than DeepSpeed's padded
``experts × capacity`` buffers, at the price of one small all-to-all of counts. Dropped tokens get a
zero output (the residual connection around the layer carries them), as in Switch and DeepSpeed.

``use_residual=True`` is PR-MoE's residual MoE (DeepSpeed-MoE, Rajbhandari et al. 2022, section 4.1):
a dense copy of the expert runs on every token and a learned two-way softmax coefficient mixes it
with the MoE output.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ds_core import comm
from ds_core.comm import Topology
from ds_core.errors import ConfigError

from .exchange import all_to_all, exchange_counts
from .experts import Experts
from .gating import Routing, TopKGate

__all__ = ["MoE"]


def _check_layout(num_experts: int, ep_size: int) -> int:
    """The process world size after checking ``num_experts`` and ``ep_size`` against it."""
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ConfigError(f"num_experts={num_experts!r} must be a positive integer")
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ConfigError(f"ep_size={ep_size!r} must be a positive integer")
    if num_experts % ep_size:
        raise ConfigError(f"num_experts {num_experts} is not divisible by ep_size {ep_size}: every expert "
                          f"rank holds num_experts / ep_size experts; pick an ep_size that divides "
                          f"{num_experts}")
    world = comm.get_world_size()
    if ep_size > 1 and not comm.is_initialized():
        raise ConfigError(f"ep_size={ep_size} needs a process group: call ds_core.init_distributed() "
                          f"before building the MoE layer (or use ep_size=1)")
    if ep_size > world or world % ep_size:
        raise ConfigError(f"ep_size {ep_size} does not divide the world size {world}: experts are "
                          f"sharded over ep_size data-parallel ranks; launch a multiple of {ep_size} ranks "
                          f"or use an ep_size that divides {world}")
    return world


class MoE(nn.Module):
    """Mixture of experts with DeepSpeed's constructor; ``forward`` returns ``(output, l_aux, exp_counts)``.

    ``exp_counts`` (CPU, int64, one per global expert) counts the assignments routed to each expert on
    this rank before capacity dropping; ``last_routing`` keeps the last :class:`~ds_moe.gating.Routing`.

    ``topology`` (a :class:`ds_core.comm.Topology` with ``expert=ep_size``) places the experts; without
    it the layer assumes the default layout (``Topology(world, expert=ep_size)``: experts on consecutive
    data ranks), asks ``ds_core.initialize`` for an ``expert`` axis of that size (``ds_axes``) and is
    given the run's topology there (``use_topology``), which must place this rank alike.
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: str | None = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, topology: Topology | None = None) -> None:
        super().__init__()
        if enable_expert_tensor_parallelism:
            raise ConfigError("enable_expert_tensor_parallelism=True is not supported by ds-moe: experts are "
                              "sharded over the expert axis only; set it to False")
        if use_tutel:
            raise ConfigError("use_tutel=True is not supported (Tutel kernels are not bundled); set it to False")
        world = _check_layout(num_experts, ep_size)
        self.gate = TopKGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                             noisy_gate_policy, drop_tokens, use_rts, top2_2nd_expert_sampling)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.k = k
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        if topology is not None:
            topology.check_world(world, "MoE")
            if topology.size("expert") != ep_size:
                raise ConfigError(f"MoE(ep_size={ep_size}) was given {topology!r}, whose expert axis has "
                                  f"{topology.size('expert')} ranks; pass a topology with expert={ep_size}")
        self.ds_topology = topology
        self.ds_axes = {"expert": ep_size}
        self.ep_rank = self._layout(topology).coordinates(comm.get_rank())["expert"]
        self.experts = Experts(expert, self.num_local_experts, self.ep_rank * self.num_local_experts)
        for p in self.experts.parameters():
            p.group_name = self.expert_group_name
        self.use_residual = use_residual
        if use_residual:
            self.mlp = copy.deepcopy(expert)
            self.coefficient = nn.Linear(hidden_size, 2)
        self.last_routing: Routing | None = None

    def _layout(self, topology: Topology | None) -> Topology:
        return topology if topology is not None else Topology(comm.get_world_size(), expert=self.ep_size)

    def use_topology(self, topology: Topology) -> None:
        """Take the run's topology (``ds_core.initialize`` calls this); it must place this rank's experts
        where the layer put them."""
        if topology is self.ds_topology:
            return
        rank = topology.coordinates(comm.get_rank())["expert"]
        if rank != self.ep_rank:
            raise ConfigError(f"this MoE layer holds the experts of expert rank {self.ep_rank} (the layout it was "
                              f"built with) but the run's {topology!r} puts this rank at expert rank {rank}; "
                              f"build the layer with MoE(..., topology=) the topology you pass to initialize")
        self.ds_topology = topology

    def _expert_group(self):
        if self.ds_topology is None:  # used before (or without) initialize: the layout it was built for
            self.ds_topology = self._layout(None)
        return self.ds_topology.group("expert")

    def _run_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Tokens grouped by global expert (``counts`` per expert) -> expert outputs in the same order."""
        if self.ep_size == 1:
            return self.experts(x, counts.tolist())
        group = self._expert_group()
        ep, local = self.ep_size, self.num_local_experts
        send = counts.reshape(ep, local)
        recv = exchange_counts(send, group)                      # [source rank, local expert]
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        received = all_to_all(x, out_splits, in_splits, group)   # source-major, then local expert
        # regroup by local expert (stable in the source rank) so each expert gets one slice
        owner = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(recv.reshape(-1))
        perm = torch.argsort(owner, stable=True)
        out = self.experts(received[perm], recv.sum(0).tolist())
        back = out[torch.argsort(perm)]
        return all_to_all(back, in_splits, out_splits, group)

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None):
        shape = hidden_states.shape
        if shape[-1] != self.hidden_size:
            raise ConfigError(f"MoE input has last dimension {shape[-1]}, the layer was built with "
                              f"hidden_size={self.hidden_size}; reshape the input or rebuild the layer")
        x = hidden_states.reshape(-1, self.hidden_size)
        routing = self.gate(x, used_token)
        self.last_routing = routing
        expert_out = self._run_experts(x[routing.token], routing.counts)
        weighted = expert_out * routing.weight.to(expert_out.dtype)[:, None]
        out = torch.zeros_like(x).index_add(0, routing.token, weighted.to(x.dtype))
        if self.use_residual:
            coef = torch.softmax(self.coefficient(x), dim=-1)
            out = out * coef[:, 0:1] + self.mlp(x) * coef[:, 1:2]
        return out.reshape(shape), routing.l_aux, routing.exp_counts.detach().cpu()
