"""1-bit Adam, 0/1 Adam and 1-bit LAMB: optimizers that average their momentum, not their gradients.

Each is a ``torch.optim.Optimizer`` whose state lives in flat fp32 buffers over all its parameters (in
parameter-group order) and which owns a :class:`~.compressed.CompressedAllReduce` over the data-parallel
group. What it needs from the training loop is one answer, :meth:`OneBitOptimizer.needs_averaged_gradients`:
whether the *next* step expects gradients already averaged by a plain all-reduce (the warm-up) or the
rank's own gradients, which it then communicates itself, compressed. The 1-bit strategy
(``strategy.py``) asks before every backward and skips the gradient all-reduce when the answer is no,
so after warm-up the gradients cross the wire exactly once, as signs.

- :class:`OneBitAdam` (Tang et al. 2021): ``freeze_step`` steps of exact AdamW on averaged gradients;
  then the variance is frozen and each step updates the momentum with the local gradient and replaces
  it by its 1-bit average (error feedback on both sides).
- :class:`ZeroOneAdam` (Lu et al. 2022, "0/1 Adam"): no full-precision warm-up at all. Until
  ``var_freeze_step`` every step averages the gradient with the 1-bit all-reduce; the variance is updated
  only on a schedule whose interval doubles every ``var_update_scaler`` updates. After it, the variance is
  frozen and ranks take *local steps*: the momentum is synchronised only every ``k`` steps, ``k``
  doubling every ``local_step_scaler`` steps up to ``local_step_clipper``. A sync replaces the window's
  local updates by their 1-bit average applied to the weights every rank held at the last sync, so
  weights agree exactly after each sync.
- :class:`OneBitLamb` (Li et al. 2021, "1-bit LAMB"): ``freeze_step`` steps of LAMB on averaged
  gradients, during which each tensor's trust ratio is tracked as an exponential average (``coeff_beta``);
  then the variance is frozen, the momentum is averaged in 1 bit, and each tensor's trust ratio is its
  frozen average times a factor: the ratio of the frozen-variance update's norm to that of an update with
  a fresh variance (estimated from the averaged momentum), clamped to ``[factor_min, factor_max]`` and
  moved by at most ``factor_threshold`` (relative) per step, the product clamped to
  ``[min_coeff, max_coeff]``.

Weight decay is decoupled (AdamW, LAMB); moments are bias-corrected (``bias_correction``), the frozen
variance with the correction of the step it froze at.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ... import comm
from .compressed import CompressedAllReduce

__all__ = ["OneBitOptimizer", "OneBitAdam", "ZeroOneAdam", "OneBitLamb", "COMM_BACKENDS"]

#: DeepSpeed's ``comm_backend_name`` values; ds always communicates through ``ds_core.comm`` (the
#: process group's backend), so the name is recorded and checked, not used to pick a transport.
COMM_BACKENDS = ("nccl", "mpi", "compressed", "hccl", "gloo")


def _whole(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() \
            or value < minimum:
        raise ValueError(f"{name} {value!r} must be a whole number >= {minimum}")
    return int(value)


class OneBitOptimizer(torch.optim.Optimizer):
    """Common machinery: the flat layout, the flat state and the compressed all-reduce (module docstring)."""

    #: flat state buffers saved in checkpoints, besides the error buffers
    buffers: tuple[str, ...] = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Any], defaults: dict, group=None, comm_backend_name: str = "nccl",
                 cuda_aware: bool = False) -> None:
        lr, eps, wd = defaults["lr"], defaults["eps"], defaults["weight_decay"]
        for key, value in (("lr", lr), ("eps", eps), ("weight_decay", wd)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} {value!r} must be a finite number >= 0")
        b1, b2 = defaults["betas"]
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas {tuple(defaults['betas'])} must both lie in [0, 1), e.g. (0.9, 0.999)")
        if str(comm_backend_name).lower() not in COMM_BACKENDS:
            raise ValueError(f"comm_backend_name {comm_backend_name!r} is not one of {', '.join(COMM_BACKENDS)}")
        super().__init__(params, defaults)
        self.comm_group = group
        self.comm_backend_name = str(comm_backend_name)
        self.cuda_aware = bool(cuda_aware)
        self.steps = 0
        self._layout: list[tuple[torch.Tensor, int, int]] | None = None  # (param, offset, group index)
        self._segments: list[tuple[int, int]] = []  # per param group: [start, end) in the flat buffers
        self.flat: dict[str, torch.Tensor] = {}
        self.compressor: CompressedAllReduce | None = None

    # -- what the training loop asks ----------------------------------------------------------------
    def set_group(self, group) -> None:
        """The data-parallel group to average over (before the first step)."""
        if self.compressor is not None and group is not self.comm_group:
            raise RuntimeError("set_group after the first step: the error buffers belong to the old group")
        self.comm_group = group

    def needs_averaged_gradients(self) -> bool:
        """True when the next step expects gradients averaged by a plain all-reduce (warm-up)."""
        raise NotImplementedError

    @property
    def phase(self) -> str:
        """``"warmup"`` or ``"compressed"`` (for logs and tests)."""
        return "warmup" if self.needs_averaged_gradients() else "compressed"

    # -- flat layout --------------------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _build(self) -> None:
        if self._layout is not None:
            return
        layout, segments, off = [], [], 0
        for gi, g in enumerate(self.param_groups):
            start = off
            for p in g["params"]:
                layout.append((p, off, gi))
                off += p.numel()
            segments.append((start, off))
        self._layout, self._segments, self.numel = layout, segments, off
        device = layout[0][0].device if layout else torch.device("cpu")
        for name in self.buffers:
            self.flat[name] = torch.zeros(off, dtype=torch.float32, device=device)
        self.compressor = CompressedAllReduce(off, self.comm_group, device)
        # reused every step (fresh large buffers cost page faults every time)
        self._g, self._p, self._u = (torch.empty(off, dtype=torch.float32, device=device) for _ in range(3))
        self._init_extra(device)

    def _init_extra(self, device) -> None:
        """Subclasses: allocate what else they keep."""

    def _flat_grads(self) -> torch.Tensor:
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                 for p, _, _ in self._layout]
        return torch.cat(parts, out=self._g) if parts else self._g

    def _flat_params(self) -> torch.Tensor:
        """The weights as one flat fp32 tensor (a scratch buffer, overwritten by the next call)."""
        parts = [p.detach().reshape(-1).float() for p, _, _ in self._layout]
        return torch.cat(parts, out=self._p) if parts else self._p

    def _write_params(self, flat: torch.Tensor) -> None:
        for p, off, _ in self._layout:
            p.copy_(flat[off:off + p.numel()].view_as(p))

    def _sub_update(self, update: torch.Tensor) -> None:
        """``p -= update`` for every parameter (``update`` is flat, already scaled by the learning rate)."""
        for p, off, _ in self._layout:
            p.sub_(update[off:off + p.numel()].view_as(p).to(p.dtype))

    def _groups(self):
        """(param group, flat slice) pairs."""
        for g, (s, e) in zip(self.param_groups, self._segments):
            yield g, slice(s, e)

    # -- checkpoints ----------------------------------------------------------------------------------
    def flat_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's optimizer state: flat tensors (moments, error buffers, extras) and JSON."""
        self._build()
        tensors = {name: buf for name, buf in self.flat.items()}
        tensors.update({f"comm.{k}": v for k, v in self.compressor.state().items()})
        meta = {"type": type(self).__name__, "steps": self.steps, "numel": self.numel,
                "param_groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                                 for g in self.param_groups], **self._extra_meta()}
        return tensors, meta

    def load_flat_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self._build()
        if meta.get("type") != type(self).__name__ or meta.get("numel") != self.numel:
            raise ValueError(f"optimizer state of {meta.get('type')} over {meta.get('numel')} elements cannot load "
                             f"into {type(self).__name__} over {self.numel}")
        if len(meta["param_groups"]) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(meta['param_groups'])} parameter groups, this run has "
                             f"{len(self.param_groups)}")
        for name, buf in self.flat.items():
            if name not in tensors or tensors[name].shape != buf.shape:
                raise ValueError(f"optimizer state lacks {name!r} of {buf.numel()} elements")
            buf.copy_(tensors[name])
        self.compressor.load_state({k[len("comm."):]: v for k, v in tensors.items() if k.startswith("comm.")})
        for g, saved in zip(self.param_groups, meta["param_groups"]):
            for k, v in saved.items():
                g[k] = tuple(v) if k == "betas" else v
        self.steps = int(meta["steps"])
        self._load_extra_meta(meta)

    def _extra_meta(self) -> dict[str, Any]:
        return {}

    def _load_extra_meta(self, meta: dict[str, Any]) -> None:
        pass

    def _world(self) -> int:
        return comm.get_world_size(self.comm_group) if comm.is_initialized() else 1


class OneBitAdam(OneBitOptimizer):
    """1-bit Adam (module docstring). DeepSpeed's parameters; ``max_grad_norm`` > 0 and ``amsgrad`` are
    refused (clip with the engine's ``gradient_clipping``)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, freeze_step: int = 100000,
                 bias_correction: bool = True, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 eps_inside_sqrt: bool = False, weight_decay: float = 0.0, max_grad_norm: float = 0.0,
                 amsgrad: bool = False, cuda_aware: bool = False, comm_backend_name: str = "nccl",
                 group=None) -> None:
        _refuse_common(amsgrad, max_grad_norm)
        self.freeze_step = _whole("freeze_step", freeze_step, 1)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt)
        super().__init__(params, defaults, group, comm_backend_name, cuda_aware)

    def needs_averaged_gradients(self) -> bool:
        return self.steps + 1 <= self.freeze_step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._build()
        warmup = self.needs_averaged_gradients()
        self.steps += 1
        t = self.steps
        grad = self._flat_grads()
        m, v = self.flat["exp_avg"], self.flat["exp_avg_sq"]
        for g, sl in self._groups():
            b1, b2 = g["betas"]
            m[sl].mul_(b1).add_(grad[sl], alpha=1 - b1)
            if warmup:
                v[sl].mul_(b2).addcmul_(grad[sl], grad[sl], value=1 - b2)
        if not warmup:
            self.compressor(m)
        params = self._flat_params()
        update = self._u
        for g, sl in self._groups():
            b1, b2 = g["betas"]
            tv = min(t, self.freeze_step)
            bc1 = 1 - b1 ** t if g["bias_correction"] else 1.0
            bc2 = 1 - b2 ** tv if g["bias_correction"] else 1.0
            u = _denom(v[sl], bc2, g, out=update[sl])
            torch.div(m[sl], u, out=u).div_(bc1)
            if g["weight_decay"]:
                u.add_(params[sl], alpha=g["weight_decay"])
            u.mul_(g["lr"])
        self._sub_update(update)
        return loss

    def _extra_meta(self):
        return {"freeze_step": self.freeze_step}


class ZeroOneAdam(OneBitOptimizer):
    """0/1 Adam (module docstring). DeepSpeed's parameters and defaults."""

    buffers = ("exp_avg", "exp_avg_sq", "anchor", "accumulated")

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, eps_inside_sqrt: bool = False,
                 weight_decay: float = 0.0, max_grad_norm: float = 0.0, var_freeze_step: int = 100000,
                 var_update_scaler: int = 16, local_step_scaler: int = 32678, local_step_clipper: int = 16,
                 amsgrad: bool = False, cuda_aware: bool = False, comm_backend_name: str = "nccl",
                 group=None) -> None:
        _refuse_common(amsgrad, max_grad_norm)
        self.var_freeze_step = _whole("var_freeze_step", var_freeze_step, 1)
        self.var_update_scaler = _whole("var_update_scaler", var_update_scaler, 1)
        self.local_step_scaler = _whole("local_step_scaler", local_step_scaler, 1)
        self.local_step_clipper = _whole("local_step_clipper", local_step_clipper, 1)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt)
        super().__init__(params, defaults, group, comm_backend_name, cuda_aware)
        self.var_interval = 1  # steps between variance updates
        self.var_updates = 0  # variance updates since the interval last doubled
        self.var_steps = 0  # variance updates so far (its bias correction)
        self.local_interval = 1  # steps between momentum syncs after the variance froze
        self.since_sync = 0  # local steps in the current window
        self.lr_sum = 0.0  # sum of the window's learning rates (first group)

    def needs_averaged_gradients(self) -> bool:
        return False  # every exchange is compressed; no full-precision warm-up

    def is_variance_step(self, t: int) -> bool:
        """Whether step ``t`` (1-based) updates the variance."""
        return t <= self.var_freeze_step and (t - 1) % self.var_interval == 0

    def _init_extra(self, device) -> None:
        self.flat["anchor"].copy_(self._flat_params())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._build()
        self.steps += 1
        t = self.steps
        m, v = self.flat["exp_avg"], self.flat["exp_avg_sq"]
        grad = self._flat_grads()
        if t <= self.var_freeze_step:
            self.compressor(grad)  # averaged gradient, 1 bit
            var_step = self.is_variance_step(t)
            if var_step:
                self.var_steps += 1
                self.var_updates += 1
                if self.var_updates >= self.var_update_scaler:
                    self.var_interval *= 2
                    self.var_updates = 0
            for g, sl in self._groups():
                b1, b2 = g["betas"]
                m[sl].mul_(b1).add_(grad[sl], alpha=1 - b1)
                if var_step:
                    v[sl].mul_(b2).addcmul_(grad[sl], grad[sl], value=1 - b2)
            self._sub_update(self._update(m, self._flat_params(), t))
            self.flat["anchor"].copy_(self._flat_params())
            return loss
        # local steps: momentum from the local gradient; weights move locally until the window ends
        for g, sl in self._groups():
            b1, _ = g["betas"]
            m[sl].mul_(b1).add_(grad[sl], alpha=1 - b1)
        update = self._update(m, self._flat_params(), t)
        self.flat["accumulated"].add_(update)
        self.lr_sum += self.param_groups[0]["lr"]
        self.since_sync += 1
        if self.since_sync >= self.local_interval:
            acc = self.flat["accumulated"]
            self.compressor(acc)  # the window's average update over the ranks, 1 bit
            # the momentum every rank continues from: the window's average direction, rescaled
            if self.lr_sum > 0:
                for g, sl in self._groups():
                    bc1, bc2 = self._corrections(g, t)
                    _denom(v[sl], bc2, g, out=m[sl]).mul_(acc[sl]).mul_(bc1 / self.lr_sum)
            anchor = self.flat["anchor"]
            anchor.sub_(acc)  # the weights every rank held at the last sync, moved by the average
            self._write_params(anchor)
            acc.zero_()
            self.lr_sum = 0.0
            self.since_sync = 0
        else:
            self._sub_update(update)
        past = t - self.var_freeze_step
        if past % self.local_step_scaler == 0:
            self.local_interval = min(self.local_interval * 2, self.local_step_clipper)
        return loss

    def _corrections(self, g, t):
        b1, b2 = g["betas"]
        if not g["bias_correction"]:
            return 1.0, 1.0
        return 1 - b1 ** t, 1 - b2 ** max(self.var_steps, 1)

    def _update(self, m: torch.Tensor, params: torch.Tensor, t: int) -> torch.Tensor:
        """lr × (corrected momentum / denominator + weight decay × weights), flat."""
        v = self.flat["exp_avg_sq"]
        update = self._u
        for g, sl in self._groups():
            bc1, bc2 = self._corrections(g, t)
            u = _denom(v[sl], bc2, g, out=update[sl])
            torch.div(m[sl], u, out=u).div_(bc1)
            if g["weight_decay"]:
                u.add_(params[sl], alpha=g["weight_decay"])
            u.mul_(g["lr"])
        return update

    def _extra_meta(self):
        return {"var_interval": self.var_interval, "var_updates": self.var_updates, "var_steps": self.var_steps,
                "local_interval": self.local_interval, "since_sync": self.since_sync, "lr_sum": self.lr_sum}

    def _load_extra_meta(self, meta):
        for k in ("var_interval", "var_updates", "var_steps", "local_interval", "since_sync"):
            setattr(self, k, int(meta[k]))
        self.lr_sum = float(meta["lr_sum"])

    @property
    def phase(self) -> str:
        if self.steps + 1 <= self.var_freeze_step:
            return "compressed"
        return "local"


class OneBitLamb(OneBitOptimizer):
    """1-bit LAMB (module docstring). DeepSpeed's parameters and defaults."""

    buffers = ("exp_avg", "exp_avg_sq", "exp_avg_sq_fresh", "last_exp_avg")

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, freeze_step: int = 100000,
                 bias_correction: bool = True, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 eps_inside_sqrt: bool = False, weight_decay: float = 0.0, max_grad_norm: float = 0.0,
                 max_coeff: float = 10.0, min_coeff: float = 0.01, amsgrad: bool = False,
                 cuda_aware: bool = False, comm_backend_name: str = "nccl", coeff_beta: float = 0.9,
                 factor_max: float = 4.0, factor_min: float = 0.5, factor_threshold: float = 0.1,
                 group=None) -> None:
        _refuse_common(amsgrad, max_grad_norm)
        self.freeze_step = _whole("freeze_step", freeze_step, 1)
        if not 0.0 <= min_coeff <= max_coeff:
            raise ValueError(f"need 0 <= min_coeff <= max_coeff, got min_coeff {min_coeff}, max_coeff {max_coeff}")
        if not 0.0 <= coeff_beta < 1.0:
            raise ValueError(f"coeff_beta {coeff_beta!r} must lie in [0, 1)")
        if not 0.0 < factor_min <= 1.0 <= factor_max:
            raise ValueError(f"need 0 < factor_min <= 1 <= factor_max, got factor_min {factor_min}, "
                             f"factor_max {factor_max}")
        if not factor_threshold >= 0.0:
            raise ValueError(f"factor_threshold {factor_threshold!r} must be >= 0")
        self.coeff_beta, self.factor_max, self.factor_min = coeff_beta, factor_max, factor_min
        self.factor_threshold = factor_threshold
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt,
                        max_coeff=max_coeff, min_coeff=min_coeff)
        super().__init__(params, defaults, group, comm_backend_name, cuda_aware)

    def needs_averaged_gradients(self) -> bool:
        return self.steps + 1 <= self.freeze_step

    def _init_extra(self, device) -> None:
        count = len(self._layout)
        self.coeff = torch.zeros(count, dtype=torch.float32, device=device)  # EMA of each tensor's trust ratio
        self.factor = torch.ones(count, dtype=torch.float32, device=device)

    def flat_state(self):
        tensors, meta = super().flat_state()
        tensors.update({"lamb_coeff": self.coeff, "lamb_factor": self.factor})
        return tensors, meta

    def load_flat_state(self, tensors, meta):
        super().load_flat_state(tensors, meta)
        self.coeff.copy_(tensors["lamb_coeff"])
        self.factor.copy_(tensors["lamb_factor"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._build()
        warmup = self.needs_averaged_gradients()
        self.steps += 1
        t = self.steps
        grad = self._flat_grads()
        m, v, fresh, last = (self.flat[k] for k in ("exp_avg", "exp_avg_sq", "exp_avg_sq_fresh", "last_exp_avg"))
        if not warmup:
            last.copy_(m)
        for g, sl in self._groups():
            b1, b2 = g["betas"]
            m[sl].mul_(b1).add_(grad[sl], alpha=1 - b1)
            if warmup:
                v[sl].mul_(b2).addcmul_(grad[sl], grad[sl], value=1 - b2)
        if not warmup:
            self.compressor(m)
        params = self._flat_params()
        if warmup:
            fresh.copy_(v)
        else:
            # the averaged gradient the synced momentum implies, for a fresh variance estimate
            for g, sl in self._groups():
                b1, b2 = g["betas"]
                implied = (m[sl] - b1 * last[sl]) / (1 - b1)
                fresh[sl].mul_(b2).addcmul_(implied, implied, value=1 - b2)
        # r = corrected momentum / denominator (+ weight decay), flat; r_fresh likewise with the fresh variance
        update, r_fresh = self._u, self._g  # the gradient is not needed any more
        for g, sl in self._groups():
            b1, b2 = g["betas"]
            bc1 = 1 - b1 ** t if g["bias_correction"] else 1.0
            bc2 = 1 - b2 ** min(t, self.freeze_step) if g["bias_correction"] else 1.0
            for out, var, corr in ((update, v, bc2), (r_fresh, fresh, 1 - b2 ** t if g["bias_correction"] else 1.0)):
                if out is r_fresh and warmup:
                    continue
                d = _denom(var[sl], corr, g, out=out[sl])
                torch.div(m[sl], d, out=d).div_(bc1)
                if g["weight_decay"]:
                    d.add_(params[sl], alpha=g["weight_decay"])
        for i, (p, off, gi) in enumerate(self._layout):
            g = self.param_groups[gi]
            sl = slice(off, off + p.numel())
            r = update[sl]
            if warmup:
                w_norm, r_norm = params[sl].norm(), r.norm()
                trust = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, torch.ones_like(w_norm))
                trust = trust.clamp(g["min_coeff"], g["max_coeff"])
                beta = self.coeff_beta if t > 1 else 0.0
                self.coeff[i] = beta * self.coeff[i] + (1 - beta) * trust
            else:
                ratio = r.norm() / r_fresh[sl].norm().clamp_min(1e-30)
                prev = self.factor[i]
                factor = ratio.clamp(self.factor_min, self.factor_max)
                factor = torch.minimum(torch.maximum(factor, prev * (1 - self.factor_threshold)),
                                       prev * (1 + self.factor_threshold))
                self.factor[i] = factor
                trust = (self.coeff[i] * factor).clamp(g["min_coeff"], g["max_coeff"])
            r.mul_(trust * g["lr"])
        self._sub_update(update)
        return loss

    def _extra_meta(self):
        return {"freeze_step": self.freeze_step}


def _denom(v: torch.Tensor, bc2: float, g: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sqrt(v / bc2) + eps`` (``sqrt(v / bc2 + eps)`` with ``eps_inside_sqrt``), into ``out`` if given."""
    if g["eps_inside_sqrt"]:
        return torch.div(v, bc2, out=out).add_(g["eps"]).sqrt_()
    return torch.sqrt(v, out=out).div_(math.sqrt(bc2)).add_(g["eps"])


def _refuse_common(amsgrad: bool, max_grad_norm: float) -> None:
    if amsgrad:
        raise ValueError("amsgrad true is not supported by the 1-bit optimizers (nor by DeepSpeed's); remove it")
    if max_grad_norm:
        raise ValueError(f"max_grad_norm {max_grad_norm!r} is not supported: clip with the top-level "
                         f"\"gradient_clipping\" instead")
