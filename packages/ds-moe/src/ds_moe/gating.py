"""Top-k gating: which experts each token goes to, with what weight, and which assignments are kept.

- Top-1 is the Switch Transformer router (Fedus et al. 2021, section 2.1): softmax over expert logits,
  each token goes to its argmax expert, weighted by that probability.
- Top-2 is GShard's (Lepikhin et al. 2020, Algorithm 1): the second expert is the best of the rest
  (optionally sampled with Gumbel noise, ``top2_2nd_expert_sampling``), and the two weights are
  renormalised to sum to one over the kept assignments.
- Top-k generalises top-2 (weights renormalised over the kept choices).

Capacity (Switch eq. 3): each expert takes at most ``ceil(k · tokens / experts · capacity_factor)``
assignments (at least ``min_capacity``). First choices have priority over second choices (GShard);
within a choice rank, tokens are taken in order, or in a random order when ``use_rts`` (random token
selection, DeepSpeed-MoE, Rajbhandari et al. 2022), so dropping does not favour the start of the batch.
With ``drop_tokens=False`` nothing is dropped (dropless).

The load-balancing loss is Switch eq. 4 / GShard's ``l_aux``: ``E · Σ_e f_e · P_e`` with ``f_e`` the
fraction of tokens whose first choice is ``e`` and ``P_e`` the mean router probability of ``e``; it is
1 when routing is uniform.

The result is a :class:`Routing` whose kept assignments are already sorted by expert, so dispatch is
one gather and each expert sees one contiguous slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ds_core.errors import ConfigError

__all__ = ["TopKGate", "Routing", "capacity", "route", "NOISY_GATE_POLICIES", "gumbel_noise"]

NOISY_GATE_POLICIES = (None, "Jitter", "RSample")
JITTER_EPS = 1e-2


def capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int, k: int = 1) -> int:
    """Assignments one expert may take: ``max(ceil(k · tokens / experts · factor), min_capacity)``."""
    return max(math.ceil(k * num_tokens / num_experts * capacity_factor), min_capacity)


def gumbel_noise(shape, device) -> torch.Tensor:
    """Gumbel(0, 1) samples: adding them to logits and taking the argmax samples from the softmax."""
    u = torch.rand(shape, device=device).clamp_(1e-20, 1 - 1e-7)
    return -torch.log(-torch.log(u))


@dataclass
class Routing:
    """Kept assignments sorted by expert, plus the statistics the layer returns.

    ``token[i]`` goes to ``expert[i]`` with ``weight[i]``; ``counts[e]`` assignments of expert ``e``
    are kept (so the slices are contiguous); ``exp_counts[e]`` were routed there before dropping.
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor
    exp_counts: torch.Tensor
    l_aux: torch.Tensor
    capacity: int | None
    routed: int

    @property
    def dropped(self) -> int:
        """Assignments dropped for lack of capacity."""
        return self.routed - int(self.token.numel())


def route(logits: torch.Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool = True,
          use_rts: bool = True, noisy_gate_policy: str | None = None, second_expert_sampling: bool = False,
          used_token: torch.Tensor | None = None) -> Routing:
    """Route ``logits`` (tokens × experts) to the top ``k`` experts; see the module docstring."""
    tokens, experts = logits.shape
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    # Selection may use noisy logits (RSample, GShard's sampled 2nd expert); weights never do.
    select = logits + gumbel_noise(logits.shape, logits.device) if noisy_gate_policy == "RSample" else logits
    first = select.argmax(dim=-1)
    if k == 1:
        choice = first[:, None]
    else:
        rest = logits + gumbel_noise(logits.shape, logits.device) if second_expert_sampling else select
        rest = rest.scatter(1, first[:, None], float("-inf"))
        choice = torch.cat([first[:, None], rest.topk(k - 1, dim=-1).indices], dim=1)

    used = torch.ones(tokens, device=logits.device) if used_token is None else used_token.reshape(-1).float()
    me = (probs * used[:, None]).sum(0) / used.sum().clamp(min=1)
    ce = torch.bincount(first, weights=used, minlength=experts) / used.sum().clamp(min=1)
    l_aux = (me * ce).sum() * experts

    # Priority order: slot-major (all first choices first), tokens in order or shuffled (RTS).
    order = torch.randperm(tokens, device=logits.device) if (use_rts and drop_tokens) else torch.arange(
        tokens, device=logits.device)
    tok = order.repeat(k)
    slot = torch.arange(k, device=logits.device).repeat_interleave(tokens)
    exp = choice[tok, slot]
    live = used[tok] > 0
    tok, slot, exp = tok[live], slot[live], exp[live]
    exp_counts = torch.bincount(exp, minlength=experts)
    sorted_exp, idx = torch.sort(exp, stable=True)
    tok, slot = tok[idx], slot[idx]
    starts = torch.cumsum(exp_counts, 0) - exp_counts
    cap = None
    if drop_tokens:
        cap = capacity(tokens, experts, capacity_factor, min_capacity, k)
        keep = torch.arange(sorted_exp.numel(), device=logits.device) - starts[sorted_exp] < cap
        tok, slot, sorted_exp = tok[keep], slot[keep], sorted_exp[keep]
    counts = torch.bincount(sorted_exp, minlength=experts)

    gate = probs[tok, choice[tok, slot]]
    if k > 1:  # renormalise over each token's kept choices (GShard)
        denom = torch.zeros(tokens, device=logits.device, dtype=gate.dtype).index_add(0, tok, gate)
        gate = gate / denom[tok].clamp(min=torch.finfo(gate.dtype).eps)
    return Routing(token=tok, expert=sorted_exp, weight=gate, counts=counts, exp_counts=exp_counts,
                   l_aux=l_aux, capacity=cap, routed=int(exp.numel()))


class TopKGate(nn.Module):
    """The router: a bias-free linear map to expert logits (kept in fp32), then :func:`route`."""

    def __init__(self, hidden_size: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 4, noisy_gate_policy: str | None = None,
                 drop_tokens: bool = True, use_rts: bool = True, top2_2nd_expert_sampling: bool = True) -> None:
        super().__init__()
        if not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ConfigError(f"k={k!r} must be an integer in [1, num_experts={num_experts}]: a token "
                              f"cannot go to more experts than exist; lower k or add experts")
        for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if not value > 0:
                raise ConfigError(f"{name}={value!r} must be > 0 (capacity = ceil(k · tokens / experts · "
                                  f"factor)); use 1.0, or drop_tokens=False for no capacity limit")
        if not isinstance(min_capacity, int) or min_capacity < 0:
            raise ConfigError(f"min_capacity={min_capacity!r} must be an integer >= 0")
        if noisy_gate_policy not in NOISY_GATE_POLICIES:
            raise ConfigError(f"noisy_gate_policy={noisy_gate_policy!r} is not one of "
                              f"{NOISY_GATE_POLICIES}; use None, 'Jitter' or 'RSample'")
        self.wg = nn.Linear(hidden_size, num_experts, bias=False).float()
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.noisy_gate_policy = noisy_gate_policy
        self.drop_tokens = drop_tokens
        self.use_rts = use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling

    def forward(self, x: torch.Tensor, used_token: torch.Tensor | None = None) -> Routing:
        x = x.float()
        if self.training and self.noisy_gate_policy == "Jitter":  # multiplicative jitter (Switch, 2.2)
            x = x * torch.empty_like(x).uniform_(1 - JITTER_EPS, 1 + JITTER_EPS)
        logits = F.linear(x, self.wg.weight.float())
        return route(logits, self.k, self.capacity_factor if self.training else self.eval_capacity_factor,
                     self.min_capacity, self.drop_tokens, self.use_rts,
                     self.noisy_gate_policy if self.training else None,
                     self.training and self.top2_2nd_expert_sampling, used_token)
