"""Stepping training state kept below fp32: 16-bit master weights, gradients and optimizer state.

``bf16.bf16_master_weights_and_grads`` (``fp16.fp16_master_weights_and_grads``) makes the 16-bit model
weights the masters and keeps their gradients in 16 bits; ``bf16.bf16_optimizer_states`` keeps the
optimizer state (Adam's ``exp_avg`` / ``exp_avg_sq``) in bf16; ``data_types.grad_accum_dtype`` sets the
dtype of the gradient accumulation buffers. Strategies allocate their tensors in the dtypes of the
run's :class:`~ds_core.engine.precision.Precision` and hand them to :class:`LowPrecisionStepper`.

[Note: stand-ins] Any torch optimizer (the config's or the client's) is built over fp32 *stand-ins*,
one per master tensor, that hold no memory between steps (a zero-stride view of one element). At the
step, a chunk of at most ``CHUNK_NUMEL`` elements at a time (a larger tensor in slices of that size,
when the optimizer is elementwise), each stand-in receives the master's value
and the gradient × coefficient in fp32 and its state is widened to fp32; the optimizer steps that
chunk alone; the new weight is rounded into the master's dtype and the state narrowed back into
``state_dtype``. Between steps only the low-precision tensors exist, and the fp32 working set is one
chunk. The optimizer's own state dict (saved in checkpoints) holds the state in ``state_dtype``, and
loading casts it to that dtype (torch casts state to its parameter's dtype: the stand-in's).

[Note: rounding] A bf16 weight keeps 8 significant bits: at ``w = 1`` an update smaller than 2**-9
(0.002) is lost entirely under round-to-nearest, and Adam's updates are about ``lr`` in size, so late
in training (small learning rates, or weights larger than ~1) most updates vanish and training stalls.
Stochastic rounding (Gupta et al. 2015, "Deep Learning with Limited Numerical Precision"; Zamirai et
al. 2020, "Revisiting BFloat16 Training") rounds to the upper neighbour with probability equal to the
fraction of the gap the exact value covers, so every weight follows the exact update in expectation,
at no memory cost. Kahan-compensated summation is more exact per step but keeps a 16-bit
compensation buffer for every parameter (2 more bytes each, a third of what bf16 masters save), so
stochastic rounding is what ds does; ``rounding="nearest"`` exists to measure the difference.

[Note: rounding streams] The random numbers of a step come from a generator seeded with (the config's
``seed``, the stream, the step, the group, the tensor): runs are reproducible and a resumed run draws
what the uninterrupted one would have (the step count is kept in the optimizer's parameter groups, so
it is saved and loaded with the optimizer state). Replicated masters (stage 0) use one stream on every
rank so the replicas stay identical; ZeRO partitions use one stream per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["LowPrecisionStepper", "stochastic_round", "round_to", "CHUNK_NUMEL", "ROUNDING_STEP_KEY", "ELEMENTWISE"]

#: elements stepped in fp32 at once: bounds the fp32 working set of a step (weights, gradients, state)
CHUNK_NUMEL = 1 << 24
#: the parameter-group key holding the number of rounding steps taken (saved with the optimizer)
ROUNDING_STEP_KEY = "ds_rounding_step"
_MASK = (1 << 63) - 1
#: optimizers whose update of an element depends on that element only: large tensors are stepped in slices
ELEMENTWISE = ("Adam", "AdamW", "SGD", "Adagrad", "Lion", "DSCPUAdam", "DSCPUAdagrad", "DSCPULion")


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (fp32) rounded into ``dtype`` stochastically: to one of its two neighbours in ``dtype``, the
    upper one with probability (x - lower) / (upper - lower), so the expected result is ``x``."""
    near = x.to(dtype)
    back = near.float()
    diff = x - back
    toward = torch.where(diff >= 0, torch.tensor(float("inf"), dtype=dtype, device=x.device),
                         torch.tensor(float("-inf"), dtype=dtype, device=x.device))
    other = torch.nextafter(near, toward)
    gap = other.float() - back
    prob = torch.where(torch.isfinite(gap) & (gap != 0), diff / gap, torch.zeros((), device=x.device))
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(u < prob, other, near)


def round_to(x: torch.Tensor, dtype: torch.dtype, rounding: str, generator: torch.Generator | None = None):
    """``x`` in ``dtype``: stochastically (``rounding="stochastic"``) or to nearest even."""
    if x.dtype == dtype:
        return x
    if rounding == "stochastic" and dtype in (torch.bfloat16, torch.float16):
        return stochastic_round(x, dtype, generator)
    return x.to(dtype)


def _seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & _MASK)) * 0x100000001B3 + 0x7F4A7C15) & _MASK
    return h


def _stand_in(master: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=master.device).expand(master.shape)


class LowPrecisionStepper:
    """Drives ``optimizer`` (built by ``make_optimizer`` over stand-ins, see the module notes) for masters of
    any dtype with gradients of any dtype.

    ``groups``: parameter groups whose ``params`` are the masters (the tensors the new values go into);
    ``grads``: per group, the gradient tensor of each master (buffer views, read at the step);
    ``stream``: the rounding stream (equal on ranks holding the same masters).
    """

    def __init__(self, groups: Sequence[dict], grads: Sequence[Sequence[torch.Tensor]],
                 make_optimizer: Callable[[list[dict], str], torch.optim.Optimizer], device_type: str,
                 precision, stream: int = 0) -> None:
        self.precision = precision
        self.state_dtype = precision.state_dtype
        self.rounding = precision.rounding
        self.stream = stream
        self.masters = [list(g["params"]) for g in groups]
        self.grads = [list(g) for g in grads]
        self.stand_ins = [[torch.nn.Parameter(_stand_in(m, self.state_dtype), requires_grad=m.requires_grad)
                           for m in ms] for ms in self.masters]
        self._idle = {id(s): s.data for ss in self.stand_ins for s in ss}
        built = [{**g, "params": ss} for g, ss in zip(groups, self.stand_ins)]
        self.optimizer = make_optimizer(built, device_type)
        for group in self.optimizer.param_groups:
            group.setdefault(ROUNDING_STEP_KEY, 0)

    def step(self, coef: float) -> None:
        """One optimizer step of every master with its gradient × ``coef``."""
        opt = self.optimizer
        groups = opt.param_groups
        try:
            for gi, group in enumerate(groups):
                n = int(group.get(ROUNDING_STEP_KEY, 0)) + 1
                params = group["params"]
                index = {id(s): i for i, s in enumerate(self.stand_ins[gi])}
                chunk: list[int] = []
                size = 0
                for s in params:
                    i = index[id(s)]
                    if s.numel() > CHUNK_NUMEL and self._sliceable(gi, i):
                        if chunk:
                            self._step_chunk(gi, group, chunk, coef, n)
                            chunk, size = [], 0
                        self._step_sliced(gi, group, i, coef, n)
                        continue
                    chunk.append(i)
                    size += s.numel()
                    if size >= CHUNK_NUMEL:
                        self._step_chunk(gi, group, chunk, coef, n)
                        chunk, size = [], 0
                if chunk:
                    self._step_chunk(gi, group, chunk, coef, n)
                group[ROUNDING_STEP_KEY] = n
        finally:
            opt.param_groups = groups

    @torch.no_grad()
    def _step_chunk(self, gi: int, group: dict, chunk: list[int], coef: float, n: int) -> None:
        opt = self.optimizer
        stand_ins = [self.stand_ins[gi][i] for i in chunk]
        for i, s in zip(chunk, stand_ins):
            master, grad = self.masters[gi][i], self.grads[gi][i]
            s.data = master.detach().float()  # the master itself when fp32: stepped in place
            g = grad.float()
            s.grad = g * coef if coef != 1.0 else (g.clone() if g is grad else g)
            state = opt.state.get(s)
            if state:
                for k, v in state.items():
                    if k != "step" and torch.is_tensor(v) and v.is_floating_point() and v.dtype != torch.float32:
                        state[k] = v.float()
        params = group["params"]
        try:
            group["params"] = stand_ins
            opt.param_groups = [group]
            opt.step()
        finally:
            group["params"] = params
        masters = [self.masters[gi][i] for i in chunk]
        low = [k for k, m in enumerate(masters) if m.dtype != torch.float32]
        if low:
            # one rounding pass over the chunk (one generator, seeded by its first tensor: see the notes)
            gen = None
            if self.rounding == "stochastic":
                gen = torch.Generator(device=masters[low[0]].device)
                gen.manual_seed(_seed(self.precision.seed, self.stream, n, gi, chunk[low[0]]))
            by_dtype: dict[torch.dtype, list[int]] = {}
            for k in low:
                by_dtype.setdefault(masters[k].dtype, []).append(k)
            for dtype, ks in by_dtype.items():
                flat = torch.cat([stand_ins[k].data.reshape(-1) for k in ks])
                rounded = round_to(flat, dtype, self.rounding, gen)
                for k, piece in zip(ks, rounded.split([masters[k].numel() for k in ks])):
                    masters[k].copy_(piece.view_as(masters[k]))
        for s in stand_ins:
            state = opt.state.get(s)
            if state and self.state_dtype != torch.float32:
                for k, v in state.items():
                    if k != "step" and torch.is_tensor(v) and v.is_floating_point() and v.shape == s.shape:
                        state[k] = v.to(self.state_dtype)
            s.data = self._idle[id(s)]
            s.grad = None

    def _sliceable(self, gi: int, i: int) -> bool:
        """A tensor larger than a chunk is stepped in slices when the optimizer is elementwise (a slice's
        update depends on that slice only: not LAMB's per-tensor trust ratio) and its tensors are
        contiguous."""
        return (type(self.optimizer).__name__ in ELEMENTWISE and self.masters[gi][i].is_contiguous()
                and self.grads[gi][i].is_contiguous())

    @torch.no_grad()
    def _step_sliced(self, gi: int, group: dict, i: int, coef: float, n: int) -> None:
        """Step one large tensor ``CHUNK_NUMEL`` elements at a time (a ZeRO partition, an embedding): its
        state stays one entry of full size in ``state_dtype``; each slice is widened, stepped, written back.
        [Note: slices] every slice starts from the same scalar state (``step``), so after the last one
        the scalars are what one step over the whole tensor would have left."""
        opt, s = self.optimizer, self.stand_ins[gi][i]
        master, grad = self.masters[gi][i], self.grads[gi][i]
        flat_m, flat_g = master.view(-1), grad.view(-1)
        full = opt.state.get(s) or None
        shaped = [k for k, v in full.items() if k != "step" and torch.is_tensor(v) and v.is_floating_point()
                  and v.shape == master.shape] if full else []
        scalars = {k: v for k, v in full.items() if k not in shaped} if full else {}
        pieces: dict[str, list[torch.Tensor]] = {}
        params = group["params"]
        try:
            group["params"] = [s]
            opt.param_groups = [group]
            for lo in range(0, flat_m.numel(), CHUNK_NUMEL):
                hi = min(lo + CHUNK_NUMEL, flat_m.numel())
                s.data = flat_m[lo:hi].float()  # a view when fp32: stepped in place
                g = flat_g[lo:hi].float()
                s.grad = g * coef if coef != 1.0 else (g.clone() if grad.dtype == torch.float32 else g)
                if full:
                    work = {k: v.view(-1)[lo:hi].float() for k, v in full.items() if k in shaped}
                    work.update({k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()})
                    opt.state[s] = work
                else:
                    opt.state.pop(s, None)
                opt.step()
                work = opt.state[s]
                if master.dtype != torch.float32:
                    gen = None
                    if self.rounding == "stochastic":
                        gen = torch.Generator(device=master.device)
                        gen.manual_seed(_seed(self.precision.seed, self.stream, n, gi, i, lo + 1))
                    flat_m[lo:hi].copy_(round_to(s.data, master.dtype, self.rounding, gen))
                if full:
                    for k in shaped:
                        full[k].view(-1)[lo:hi].copy_(work[k])
                else:
                    for k, v in work.items():
                        if k != "step" and torch.is_tensor(v) and v.is_floating_point() and v.shape == s.shape:
                            pieces.setdefault(k, []).append(v.to(self.state_dtype))
                last = {k: v for k, v in work.items() if k not in shaped and k not in pieces}
        finally:
            group["params"] = params
        if full:
            full.update(last)
            opt.state[s] = full
        else:
            opt.state[s] = {**last, **{k: torch.cat(v).view_as(master) for k, v in pieces.items()}}
        s.data = self._idle[id(s)]
        s.grad = None

    def state_bytes(self) -> int:
        """Bytes of optimizer state held between steps."""
        return sum(v.numel() * v.element_size() for st in self.optimizer.state.values() for v in st.values()
                   if torch.is_tensor(v))
