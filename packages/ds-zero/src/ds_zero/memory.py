"""Memory accounting: bytes per rank for parameters, gradients and optimizer state, formula and measured.

The ZeRO paper (Rajbhandari et al. 2020, section 3.1 and figure 1) counts, for Ψ parameters trained
with mixed-precision Adam on N data-parallel ranks, 2Ψ bytes of fp16 parameters, 2Ψ of fp16
gradients and KΨ of optimizer state with K = 12 (fp32 master weights, momentum and variance):

    stage 0:  2Ψ + 2Ψ + KΨ          stage 1 (P_os):   2Ψ + 2Ψ + KΨ/N
    stage 2 (P_os+g): 2Ψ + (2+K)Ψ/N stage 3 (P_os+g+p): (2+2+K)Ψ/N

:func:`estimate_memory` returns those figures (``paper``) beside the ones this implementation
allocates (``ds``), which differ in one place: gradients are reduced and accumulated in fp32, so
they cost 4Ψ at stages 0-1 and 4Ψ/N at stage 2 (plus the bucket being reduced, not counted). In
fp32 training the parameters are 4 bytes and, without offload, the master weights are the model's
own parameters, so K = 8 (the two Adam moments). With CPU offload the K·Ψ/N optimizer bytes (and
an fp32 copy of the gradient partition) are in host memory instead of on the device.

:func:`memory_report` measures the tensors an engine actually holds, deduplicating shared storage.
"""

from __future__ import annotations

import math

import torch

__all__ = ["estimate_memory", "memory_report", "format_memory_table", "OPTIMIZER_STATE_ELEMENTS"]

#: fp32 optimizer-state tensors per parameter element, by optimizer (moments and accumulators).
OPTIMIZER_STATE_ELEMENTS = {"adam": 2, "adamw": 2, "lamb": 2, "lion": 1, "sgd": 1, "adagrad": 1}

_PARAM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def estimate_memory(num_params: int, world_size: int, stage: int, precision: str = "bf16",
                    optimizer: str = "adam", offload: bool = False) -> dict:
    """Bytes per rank for ``num_params`` parameters: ``{"ds": {...}, "paper": {...}, "formula": str}``.

    Each of ``ds``/``paper`` holds ``params``, ``gradients``, ``optimizer_states``, ``total`` (device
    bytes) and ``host`` (bytes in host memory with CPU offload). ``optimizer`` picks the number of
    state tensors (Adam: 2); ``paper`` always uses the paper's mixed-precision Adam (K = 12).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage {stage} must be 0, 1, 2 or 3")
    if world_size < 1 or num_params < 0:
        raise ValueError(f"world_size {world_size} must be >= 1 and num_params {num_params} >= 0")
    psi, n = num_params, world_size
    part = math.ceil(psi / n)
    b = _PARAM_BYTES[precision]
    moments = OPTIMIZER_STATE_ELEMENTS[optimizer.lower()] * 4
    k = moments + (0 if precision == "fp32" and not offload else 4)  # + fp32 master unless aliased
    opt_elems = psi if stage == 0 else part
    grads = 4 * (part if stage >= 2 else psi)
    host = 0
    optimizer_states = k * opt_elems
    if offload and stage >= 1:
        host = optimizer_states + 4 * part  # masters + moments + the fp32 gradient partition
        optimizer_states = 0
    ds = {"params": b * (part if stage == 3 else psi), "gradients": grads, "optimizer_states": optimizer_states,
          "host": host}
    ds["total"] = ds["params"] + ds["gradients"] + ds["optimizer_states"]
    pk = 12
    paper = {"params": 2 * psi / (n if stage == 3 else 1), "gradients": 2 * psi / (n if stage >= 2 else 1),
             "optimizer_states": pk * psi / (n if stage >= 1 else 1), "host": 0}
    paper["total"] = paper["params"] + paper["gradients"] + paper["optimizer_states"]
    formula = {0: "2Ψ + 2Ψ + 12Ψ", 1: "2Ψ + 2Ψ + 12Ψ/N", 2: "2Ψ + (2Ψ + 12Ψ)/N", 3: "(2Ψ + 2Ψ + 12Ψ)/N"}[stage]
    return {"ds": ds, "paper": {k_: int(v) for k_, v in paper.items()}, "formula": formula}


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for entry in optimizer.state.values() for v in entry.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0]


def memory_report(engine) -> dict:
    """Measured bytes on this rank: ``params``, ``gradients``, ``optimizer_states``, ``host``, ``total``.

    Works for ZeRO engines (stages 1-3) and the engine's default (stage 0). Optimizer state counts fp32
    master weights (when they are not the model's own parameters) and every per-element state tensor;
    it is measured after the first step, when optimizers have created their state. With CPU offload
    the optimizer state and the host gradient copy are reported under ``host``.
    """
    opt = engine.optimizer
    parts = getattr(opt, "parts", None)
    if parts is not None:  # ZeRO
        params = _nbytes(g.flat for g in parts.groups)
        # stage 3: parameters kept whole (persistence threshold) are full copies besides their shards
        params += _nbytes(s.param.data for g in parts.groups for s in getattr(g, "sharded", ()) if s.persistent)
        grads = opt.reducer.buffer_bytes()
        masters = [] if opt.aliased else list(opt.masters)
        state = _nbytes(masters + _state_tensors(opt.optimizer))
        host = 0
        if opt.offload:  # masters, state and the gradient partition's host copy
            host, state = state + _nbytes([m.grad for m in opt.masters]), 0
        stage = opt.stage
    else:  # the engine's default wrapper: replicated state
        params = _nbytes(p for p in engine.module.parameters())
        grads = _nbytes([opt.grads.buffer])
        masters = [opt.flat_master] if opt.precision.has_masters else []
        state = _nbytes(masters + _state_tensors(opt.optimizer))
        host, stage = 0, 0
    return {"stage": stage, "world_size": engine.dp_world_size, "precision": engine.precision,
            "num_params": sum(p.numel() for g in engine.param_groups for p in g["params"]),
            "params": params, "gradients": grads, "optimizer_states": state, "host": host,
            "total": params + grads + state}


def format_memory_table(rows: list[dict]) -> str:
    """A table of measured reports next to :func:`estimate_memory`'s ``ds`` and ``paper`` figures."""
    head = (f"{'stage':>5} {'N':>3} {'prec':>5} | {'params':>10} {'grads':>10} {'optim':>10} {'host':>10} "
            f"{'total':>10} | {'formula (ds)':>12} {'paper':>10}  paper formula")
    lines = [head, "-" * len(head)]
    for r in rows:
        est = estimate_memory(r["num_params"], r["world_size"], r["stage"], r["precision"],
                              offload=r["host"] > 0)
        lines.append(f"{r['stage']:>5} {r['world_size']:>3} {r['precision']:>5} | {r['params']:>10,} "
                     f"{r['gradients']:>10,} {r['optimizer_states']:>10,} {r['host']:>10,} {r['total']:>10,} | "
                     f"{est['ds']['total']:>12,} {est['paper']['total']:>10,}  {est['formula']}")
    return "\n".join(lines)
