"""``ds_zero.Init``: partition parameters while the model is built, so it never exists whole on a rank.

A model too large for one device cannot be built and then partitioned. Inside ``with Init():`` the
``__init__`` of every ``torch.nn.Module`` subclass is wrapped: when a module finishes constructing, its
own parameters are broadcast from rank 0 (so every rank agrees, whatever its seed), each rank keeps
its shard (the stage-3 layout of ``stage3.py``, Rajbhandari et al. 2020, section 5.3) and the
parameter's data becomes an empty tensor (``param.ds_shape`` keeps the real shape), as in DeepSpeed's
``deepspeed.zero.Init``. Peak memory is then one module's parameters, not the model's.

Initialisation code run after construction through ``module.apply(fn)`` (the usual ``self.apply(
self._init_weights)``) still works: inside the context ``apply`` gathers each module's parameters
around ``fn`` and re-shards rank 0's result (DeepSpeed's ``override_module_apply``). Any other access
to a parameter outside its module needs :class:`~ds_zero.gathered.GatheredParameters`.

The engine adopts these shards when ``zero_optimization.stage`` is 3 (the data-parallel group must
be the one given here, the world by default); at stages 0-2 such a model is a config error.
"""

from __future__ import annotations

import functools

import torch

from ds_core import comm
from ds_core.errors import ConfigError

from .gathered import GatheredParameters
from .partition import padded_numel
from .stage3 import ShardedParameter

__all__ = ["Init", "is_zero_init_parameter"]


def is_zero_init_parameter(p: torch.Tensor) -> bool:
    """True when ``p`` is partitioned by stage 3 (built under :class:`Init` or adopted by an engine)."""
    return getattr(p, "ds_shard", None) is not None


def _subclasses(cls: type) -> set[type]:
    out, todo = set(), [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.add(sub)
                todo.append(sub)
    return out


class Init:
    """``with ds_zero.Init(): model = MyModel()`` — see the module docstring.

    ``data_parallel_group``: the group parameters are partitioned over (default: the world).
    ``dtype``: cast parameters to this dtype before partitioning. ``config_dict_or_path``/``config``:
    a ds/DeepSpeed config; given one whose ``zero_optimization.stage`` is not 3 it is an error.
    ``remote_device``: ``None`` or ``"cpu"`` (keep the shards in host memory).
    """

    def __init__(self, module: torch.nn.Module | None = None, data_parallel_group=None, mem_efficient_linear=True,
                 remote_device: str | None = None, pin_memory: bool = False, config_dict_or_path=None,
                 config=None, enabled: bool = True, dtype: torch.dtype | None = None, mpu=None) -> None:
        cfg = config_dict_or_path if config_dict_or_path is not None else config
        if isinstance(cfg, dict):
            stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
            if stage != 3:
                raise ConfigError(f"ds_zero.Init partitions parameters for ZeRO stage 3, but the config's "
                                  f"zero_optimization.stage is {stage}; set it to 3 or build the model "
                                  f"without Init")
        if remote_device not in (None, "cpu", "none"):
            raise ConfigError(f"ds_zero.Init remote_device {remote_device!r} is not supported; use None "
                              f"(the accelerator) or 'cpu'")
        self.group = data_parallel_group
        self.dtype = dtype
        self.enabled = enabled
        self.remote_device = remote_device
        self.saved: dict[type, object] = {}
        if module is not None and enabled:  # DeepSpeed also accepts an already-built module
            self._partition_tree(module)

    # -- partitioning ------------------------------------------------------------------------------
    def _partition_tree(self, module: torch.nn.Module) -> None:
        for m in module.modules():
            self._partition(m)

    def _partition(self, module: torch.nn.Module) -> None:
        world, rank = comm.get_world_size(self.group), comm.get_rank(self.group)
        for name, p in module._parameters.items():
            if p is None or is_zero_init_parameter(p):
                continue
            with torch.no_grad():
                if self.dtype is not None and p.is_floating_point():
                    p.data = p.data.to(self.dtype)
                if self.remote_device == "cpu":
                    p.data = p.data.cpu()
                if world > 1:
                    data = p.data.contiguous()
                    src = 0 if self.group is None else torch.distributed.get_global_rank(self.group, 0)
                    comm.broadcast(data, src=src, group=self.group)
                    p.data = data
            part = padded_numel(p.numel(), world) // world
            shard = torch.zeros(part, dtype=p.dtype, device=p.device)
            s = ShardedParameter(p, f"{type(module).__name__}.{name}", world, rank, shard, False, self.group)
            p.ds_shape = s.shape
            s.release()

    # -- the context -------------------------------------------------------------------------------
    def _wrap(self, cls: type) -> None:
        if "__init__" not in cls.__dict__ or cls in self.saved:
            return
        original = cls.__dict__["__init__"]
        ctx = self

        @functools.wraps(original)
        def __init__(module, *args, **kwargs):
            original(module, *args, **kwargs)
            ctx._partition(module)

        self.saved[cls] = original
        cls.__init__ = __init__

    def __enter__(self):
        if not self.enabled:
            return self
        for cls in _subclasses(torch.nn.Module):
            self._wrap(cls)
        ctx = self
        self._old_subclass_hook = torch.nn.Module.__dict__.get("__init_subclass__")

        @classmethod
        def __init_subclass__(cls, **kwargs):
            super(torch.nn.Module, cls).__init_subclass__(**kwargs)
            ctx._wrap(cls)

        torch.nn.Module.__init_subclass__ = __init_subclass__
        self._old_apply = torch.nn.Module.apply

        def apply(module, fn):
            for child in module.children():
                child.apply(fn)
            with GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0,
                                    _any_rank_may_modify=True):
                fn(module)
            return module

        torch.nn.Module.apply = apply
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        for cls, original in self.saved.items():
            cls.__init__ = original
        self.saved = {}
        if self._old_subclass_hook is None:
            del torch.nn.Module.__init_subclass__
        else:
            torch.nn.Module.__init_subclass__ = self._old_subclass_hook
        torch.nn.Module.apply = self._old_apply
