"""The default optimizer wrapper: master weights, loss-scale handling, clipping, then the step.

It wraps any ``torch.optim.Optimizer`` built over the fp32 parameters it exposes (the model's own in
fp32; flat master copies in bf16/fp16) and is what the engine calls at a gradient-accumulation
boundary. ZeRO replaces it through the ``optimizer_wrapper`` component.

Fused steps: an optimizer whose class lists ``"grad_scale"`` and ``"copy_to"`` in
``fused_step_args`` (ds-ops' CPU optimizers do) is handed the unscale x clip coefficient and the
model-dtype parameters to write, and does both inside its one pass over memory; any other optimizer
gets the gradients multiplied first and the parameters copied after, with the same numbers.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import comm
from .precision import FlatGradients, LossScaler

__all__ = ["MixedPrecisionOptimizer", "fuses", "copy_target"]


def fuses(optimizer, *args: str) -> bool:
    """True when ``optimizer.step`` takes every keyword in ``args`` (its class's ``fused_step_args``)."""
    return set(args) <= set(getattr(type(optimizer), "fused_step_args", ()))


def copy_target(model_tensor: torch.Tensor | None, master: torch.Tensor) -> torch.Tensor | None:
    """``model_tensor`` flattened when a fused step can write ``master``'s new values into it (bf16/fp16,
    contiguous, same device and size), else None (the caller copies after the step)."""
    ok = (model_tensor is not None and model_tensor.dtype in (torch.bfloat16, torch.float16)
          and model_tensor.is_contiguous() and model_tensor.device == master.device
          and model_tensor.numel() == master.numel())
    return model_tensor.data.view(-1) if ok else None


class MixedPrecisionOptimizer:
    def __init__(self, params: list[torch.nn.Parameter], grads: FlatGradients, precision: str,
                 scaler: LossScaler | None = None, clip: float = 0.0, group=None,
                 shard_groups: dict | None = None) -> None:
        self.model_params = params
        self.grads = grads
        self.precision = precision
        self.scaler = scaler
        self.clip = clip
        self.group = group
        self.shard_groups = shard_groups or {}  # axis -> group, for tagged (e.g. expert) parameters
        self.optimizer: torch.optim.Optimizer | None = None
        self.global_grad_norm: float | None = None
        self.skipped_steps = 0
        self._fused_copies: set[int] = set()
        if precision == "fp32":
            self.masters = {id(p): p for p in params}
        else:
            self.flat_master = torch.empty(grads.numel, dtype=torch.float32, device=grads.buffer.device)
            self.masters = {}
            for p, off in zip(grads.params, grads.offsets):
                master = self.flat_master[off:off + p.numel()].view_as(p)
                master.copy_(p.detach().float())
                master = torch.nn.Parameter(master)
                master.grad = grads.view_of(p)
                self.masters[id(p)] = master

    def master_of(self, p: torch.Tensor) -> torch.Tensor:
        return self.masters[id(p)]

    def param_groups_for_optimizer(self, groups: list[dict]) -> list[dict]:
        """Translate param groups over model parameters into groups over the fp32 masters."""
        return [{**g, "params": [self.master_of(p) for p in g["params"]]} for g in groups]

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler else 1.0

    def _overflow(self) -> bool:
        # Agreed over the whole world: ranks holding different experts or stages skip together.
        flag = torch.tensor([0.0 if torch.isfinite(self.grads.buffer).all() else 1.0])
        if comm.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _grad_norm(self) -> float:
        """Global L2 norm; squared norms of sharded segments are summed over their shard axis."""
        buf = self.grads.buffer
        segments = getattr(self.grads, "segments", None) or []
        if len(segments) <= 1 and (not segments or segments[0][1] is None):
            return float(torch.linalg.vector_norm(buf))
        total = 0.0
        for _, shard, start, end in segments:
            sq = torch.linalg.vector_norm(buf[start:end]).pow(2).reshape(1)
            if shard is not None and comm.get_world_size(self.shard_groups.get(shard)) > 1:
                dist.all_reduce(sq, group=self.shard_groups[shard])
            total += float(sq)
        return math.sqrt(total)

    def step(self) -> bool:
        """Unscale, check overflow, clip, step and copy back. Returns False if the step was skipped."""
        buf = self.grads.buffer
        fused = fuses(self.optimizer, "grad_scale", "copy_to")
        inv = 1.0
        if self.scaler is not None:
            if self._overflow():
                self.scaler.update(True)
                self.skipped_steps += 1
                self.global_grad_norm = float("inf")
                return False
            inv = 1.0 / self.scaler.scale
            if not fused:
                buf.mul_(inv)
        norm = self._grad_norm() * (inv if fused else 1.0)
        self.global_grad_norm = norm
        clip = 1.0
        if self.clip > 0 and math.isfinite(norm):
            coef = self.clip / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
            if coef < 1:
                clip = coef
        if fused:
            self.optimizer.step(grad_scale=inv * clip, copy_to=self._copy_targets())
        else:
            if clip != 1.0:
                buf.mul_(clip)
            self.optimizer.step()
        if self.precision != "fp32":
            with torch.no_grad():
                for p in self.grads.params:
                    if id(p) not in self._fused_copies:
                        p.copy_(self.masters[id(p)])
        if self.scaler is not None:
            self.scaler.update(False)
        return True

    def _copy_targets(self) -> list[list[torch.Tensor | None]] | None:
        """Per optimizer group, the model parameter each master's new value is written into (bf16/fp16,
        contiguous, same device) or None where a separate copy is needed; records which were fused."""
        self._fused_copies = set()
        if self.precision == "fp32":
            return None
        by_master = {id(self.masters[id(p)]): p for p in self.grads.params}
        targets = []
        for group in self.optimizer.param_groups:
            row = []
            for m in group["params"]:
                p = by_master.get(id(m))
                row.append(copy_target(p, m))
                if row[-1] is not None:
                    self._fused_copies.add(id(p))
            targets.append(row)
        return targets

    def zero_grad(self) -> None:
        self.grads.zero()

    # The engine checkpoints these.
    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    @property
    def param_groups(self):
        return self.optimizer.param_groups
