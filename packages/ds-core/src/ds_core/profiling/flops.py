"""A flops profiler: per-module parameters, MACs and forward latency, and the run's TFLOPs and MFU.

FLOPs are counted by PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` (the operator-level
counts of matmuls, convolutions and attention, attributed to the module hierarchy); a MAC is two FLOPs
(one multiply, one add), as in DeepSpeed's profiler. Latency is each module's forward wall time from
forward pre/post hooks (the accelerator synchronized at each, so nested times are honest; the profiled
forward is therefore slower than the others). Parameters are counted once per module, with its children.

``get_model_profile(model, args=..., kwargs=...)`` profiles one forward of any module, like DeepSpeed's
function of that name; the engine runs :class:`FlopsProfiler` on the forward of step ``profile_step``
when the config's ``flops_profiler.enabled`` is true, prints the table on rank 0 (or writes it to
``output_file``), and from then on reports TFLOPs (per rank) and MFU in the log line.

Training FLOPs per step are estimated from the profiled forward as
``forward × (3 + recompute_fwd_factor) × micro-batches per step``: backward costs about twice the
forward (a gradient for the input and one for the weights per matmul; Kaplan et al. 2020, "Scaling
Laws for Neural Language Models", sec. 2.1), and activation checkpointing recomputes a fraction
``recompute_fwd_factor`` of the forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError

__all__ = ["FlopsProfilerConfig", "ModuleProfile", "ModelProfile", "FlopsProfiler", "get_model_profile",
           "format_profile", "peak_tflops", "PEAK_TFLOPS"]


class FlopsProfilerConfig(BaseModel):
    """DeepSpeed's ``flops_profiler`` section, with DeepSpeed's defaults."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="Profile one forward and report TFLOPs/MFU from then on.")
    recompute_fwd_factor: float = Field(0.0, ge=0.0, description="Fraction of the forward recomputed in "
                                        "backward (activation checkpointing): 1.0 = all of it.")
    profile_step: int = Field(1, ge=1, description="Optimizer step whose (first) forward is profiled.")
    module_depth: int = Field(-1, description="Deepest module level in the table; -1 = all.")
    top_modules: int = Field(1, ge=1, description="Modules listed per depth in the summary, by MACs.")
    detailed: bool = Field(True, description="Print the per-module table (else the summary only).")
    output_file: str | None = Field(None, description="Write the profile there instead of stdout.")

    @classmethod
    def from_raw(cls, section: Any) -> FlopsProfilerConfig:
        if section is None:
            return cls()
        if not isinstance(section, dict):
            raise ConfigError(f"flops_profiler must be a JSON object, got {section!r}; e.g. "
                              f'{{"enabled": true, "profile_step": 2}}')
        clean = {k: v for k, v in section.items() if not k.startswith("_")}
        try:
            return cls.model_validate(clean)
        except Exception as exc:  # pydantic's message names the key and the rule
            raise ConfigError(f"flops_profiler: {exc}") from None


#: Dense peak TFLOPs per device for 16-bit matmuls (vendor data sheets), for MFU. ``DS_PEAK_TFLOPS``
#: overrides; an unknown device has no MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "A10G": 125.0, "L4": 121.0, "V100": 125.0, "MI300X": 1307.0, "MI250X": 383.0}


def peak_tflops(device: torch.device | None = None) -> float | None:
    """The device's dense 16-bit peak, from ``DS_PEAK_TFLOPS`` or the name table; None when unknown."""
    import os

    override = os.environ.get("DS_PEAK_TFLOPS")
    if override:
        try:
            return float(override)
        except ValueError:
            raise ConfigError(f"DS_PEAK_TFLOPS={override!r} is not a number; set it to the device's peak "
                              f"TFLOPs, e.g. 989") from None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, value in PEAK_TFLOPS.items():
        if key in name.replace(" ", ""):
            return value
    return None


@dataclass
class ModuleProfile:
    name: str
    kind: str
    depth: int
    params: int
    flops: int = 0
    latency: float = 0.0  #: seconds, this module's forward with its children

    @property
    def macs(self) -> int:
        return self.flops // 2


@dataclass
class ModelProfile:
    """One profiled forward: the modules in definition order (the root first, named ``""``)."""

    modules: list[ModuleProfile] = field(default_factory=list)
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return self.modules[0].flops if self.modules else 0

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def params(self) -> int:
        return self.modules[0].params if self.modules else 0

    @property
    def latency(self) -> float:
        return self.modules[0].latency if self.modules else 0.0


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type != "cpu":
        torch.get_device_module(device.type).synchronize()


class FlopsProfiler:
    """Profile the forwards run inside ``with FlopsProfiler(model) as prof:``; ``prof.profile`` after."""

    def __init__(self, model: torch.nn.Module, device: torch.device | None = None) -> None:
        self.model, self.device = model, device
        self.profile: ModelProfile | None = None
        self._handles: list = []
        self._start: dict[str, float] = {}
        self._latency: dict[str, float] = {}

    def __enter__(self) -> FlopsProfiler:
        from torch.utils.flop_counter import FlopCounterMode

        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name), always_call=True))
        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()
        return self

    def _pre(self, name: str):
        def hook(module, args):
            _sync(self.device)
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            _sync(self.device)
            if name in self._start:
                self._latency[name] = self._latency.get(name, 0.0) + time.perf_counter() - self._start.pop(name)
        return hook

    def __exit__(self, *exc) -> None:
        self._counter.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        counts = self._counter.get_flop_counts()
        root = type(self.model).__name__
        # FlopCounterMode names the root module by its class and children "Root.child.grandchild"
        flops_of = {}
        for key, ops in counts.items():
            name = "" if key == root else key[len(root) + 1:] if key.startswith(root + ".") else key
            flops_of[name] = int(sum(ops.values()))
        modules = []
        for name, module in self.model.named_modules():
            depth = 0 if not name else name.count(".") + 1
            params = sum(p.numel() for p in module.parameters())
            modules.append(ModuleProfile(name, type(module).__name__, depth, params, flops_of.get(name, 0),
                                         self._latency.get(name, 0.0)))
        # a container never called itself (ModuleList, ModuleDict) holds what its children did
        called = set(self._latency)
        for m in sorted(modules, key=lambda m: -m.depth):
            if m.name in called:
                continue
            prefix = m.name + "." if m.name else ""
            kids = [k for k in modules if k.depth == m.depth + 1 and k.name.startswith(prefix)]
            m.flops = m.flops or sum(k.flops for k in kids)
            m.latency = sum(k.latency for k in kids)
        by_op = {str(op): int(v) for op, v in counts.get(root, counts.get("Global", {})).items()}
        self.profile = ModelProfile(modules, by_op)


def get_model_profile(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None,
                      print_profile: bool = True, module_depth: int = -1, top_modules: int = 1,
                      detailed: bool = True, output_file: str | None = None) -> tuple[int, int, int]:
    """Profile one forward of ``model(*args, **kwargs)`` (no gradient); returns ``(flops, macs, params)``
    like DeepSpeed's ``get_model_profile(..., as_string=False)``; prints (or writes) the table."""
    device = next((p.device for p in model.parameters()), None)
    with torch.no_grad(), FlopsProfiler(model, device) as prof:
        model(*args, **(kwargs or {}))
    profile = prof.profile
    if print_profile:
        text = format_profile(profile, module_depth=module_depth, top_modules=top_modules, detailed=detailed)
        _emit(text, output_file)
    return profile.flops, profile.macs, profile.params


def _emit(text: str, output_file: str | None) -> None:
    if output_file:
        with open(output_file, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text, flush=True)


def _num(value: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def format_profile(profile: ModelProfile, module_depth: int = -1, top_modules: int = 1, detailed: bool = True,
                   step: int | None = None, step_seconds: float | None = None, train_flops: float | None = None,
                   peak: float | None = None) -> str:
    """The profile as text: a summary, the top modules per depth by MACs, and the per-module table."""
    lines = ["-------------------------- ds flops profiler --------------------------"]
    if step is not None:
        lines.append(f"profile step:                  {step}")
    lines += [f"params:                        {_num(profile.params)}",
              f"fwd MACs:                      {_num(profile.macs, 'MACs')}",
              f"fwd FLOPs:                     {_num(profile.flops, 'FLOPs')}",
              f"fwd latency:                   {profile.latency * 1e3:.2f} ms",
              f"fwd FLOPS:                     {_num(profile.flops / profile.latency, 'FLOPS') if profile.latency else '-'}"]
    if train_flops is not None and step_seconds:
        achieved = train_flops / step_seconds
        lines.append(f"train FLOPs per step (rank):   {_num(train_flops, 'FLOPs')}")
        lines.append(f"step latency:                  {step_seconds * 1e3:.2f} ms")
        lines.append(f"train FLOPS (rank):            {_num(achieved, 'FLOPS')}")
        if peak:
            lines.append(f"MFU:                           {achieved / (peak * 1e12):.2%} of {peak:g} TFLOPS")
    deepest = max((m.depth for m in profile.modules), default=0)
    depths = range(deepest + 1) if module_depth < 0 else range(min(deepest, module_depth) + 1)
    lines.append(f"top {top_modules} module(s) by MACs per depth:")
    for d in depths:
        at = sorted((m for m in profile.modules if m.depth == d), key=lambda m: -m.flops)[:top_modules]
        lines.append(f"  depth {d}: " + ", ".join(f"{m.name or '(model)'} ({m.kind}) {_num(m.macs, 'MACs')}"
                                                  for m in at))
    if detailed:
        total_f, total_t = profile.flops or 1, profile.latency or 1.0
        lines.append(f"{'module':<40} {'params':>10} {'MACs':>12} {'% MACs':>7} {'latency':>11} {'% time':>7}")
        for m in profile.modules:
            if 0 <= module_depth < m.depth:
                continue
            name = ("  " * m.depth + (m.name.rsplit('.', 1)[-1] if m.name else "(model)") + f" ({m.kind})")[:40]
            lines.append(f"{name:<40} {_num(m.params):>10} {_num(m.macs):>12} {m.flops / total_f:>7.1%} "
                         f"{m.latency * 1e3:>8.2f} ms {m.latency / total_t:>7.1%}")
    lines.append("-" * 71)
    return "\n".join(lines)
