"""``ds_zero.Init``: partition parameters while the model is built, so it never exists whole on a rank.

A model too large for one device cannot be built and then partitioned. Inside ``with Init():`` the
``__init__`` of every ``torch.nn.Module`` subclass is wrapped: when a module finishes constructing, its
own parameters are broadcast from rank 0 (so every rank agrees, whatever its seed), each rank keeps
its shard (the stage-3 layout of ``stage3.py``, Rajbhandari et al. 2020, section 5.3) and the
parameter's data becomes an empty tensor (``param.ds_shape`` keeps the real shape), as in DeepSpeed's
``deepspeed.zero.Init``. Peak memory is then one module's parameters, not the model's.

Initialisation code run after construction through ``module.apply(fn)`` (the usual ``self.apply(
self._init_weights)``) still works: inside the context ``apply`` gathers each module's parameters
around ``fn`` and re-shards rank 0's result (DeepSpeed's ``override_module_apply``). Any other code
that touches a partitioned parameter before an engine adopts the model — Hugging Face's
``post_init`` weight initialisation (``smart_apply``, not ``apply``), ``resize_token_embeddings``,
tying, ``load_state_dict``, ``state_dict`` — *borrows* it (``released.py``): the parameter is
gathered, the operation runs on the full tensor and this rank's shard is refreshed from the result.
That gather is a collective, so until an engine adopts the model every rank must run the same code on
it, as they did to build it. Assigning ``param.data`` a tensor of another shape (what
``resize_token_embeddings`` does) partitions the new value afresh. Released parameters keep their
shape (``param.shape``, ``param.ds_shape``), so code that reads shapes works unchanged.

``remote_device="nvme"`` (ZeRO-Infinity) writes each shard to a swap file under the config's
``zero_optimization.offload_param.nvme_path`` as soon as the module is built, so the shards are not
in memory either; ``remote_device="cpu"`` keeps them in host memory.

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
from .released import lend, raw_data, set_raw_data, settle_all, settle_unused
from .stage3 import ShardedParameter, gather_shards

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


def _zero_section(cfg) -> dict | None:
    """The ``zero_optimization`` section of a config dict, JSON string or JSON file path (None: no config)."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        from ds_core.config.loader import read_config

        cfg, _ = read_config(cfg)
    return cfg.get("zero_optimization") or {}


class Init:
    """``with ds_zero.Init(): model = MyModel()`` — see the module docstring.

    ``data_parallel_group``: the group parameters are partitioned over (default: the world).
    ``dtype``: cast parameters to this dtype before partitioning. ``config_dict_or_path``/``config``:
    a ds/DeepSpeed config (a dict, a JSON string or the path of a JSON file); given one whose
    ``zero_optimization.stage`` is not 3 it is an error. ``remote_device``: ``None`` (the parameters'
    device), ``"cpu"`` (host memory) or ``"nvme"`` (swap files under the config's
    ``offload_param.nvme_path``; ``None`` takes ``offload_param.device`` from the config).
    ``pin_memory``: page-lock host shards where the accelerator has pinned memory.
    """

    def __init__(self, module: torch.nn.Module | None = None, data_parallel_group=None, mem_efficient_linear=True,
                 remote_device: str | None = None, pin_memory: bool = False, config_dict_or_path=None,
                 config=None, enabled: bool = True, dtype: torch.dtype | None = None, mpu=None) -> None:
        zero = _zero_section(config_dict_or_path if config_dict_or_path is not None else config)
        offload = None
        if zero is not None:
            from .config import ZeroConfig

            stage = zero.get("stage", 0)
            if stage != 3:
                raise ConfigError(f"ds_zero.Init partitions parameters for ZeRO stage 3, but the config's "
                                  f"zero_optimization.stage is {stage}; set it to 3 or build the model "
                                  f"without Init")
            try:
                offload = ZeroConfig.model_validate(zero).offload_param
            except ValueError as exc:  # pydantic's ValidationError: the config's own message, as a ConfigError
                errors = getattr(exc, "errors", lambda: [])()
                raise ConfigError("; ".join(str(e.get("msg", e)) for e in errors) or str(exc)) from None
            if remote_device is None and offload.device != "none":
                remote_device = offload.device
        if remote_device not in (None, "cpu", "none", "nvme"):
            raise ConfigError(f"ds_zero.Init remote_device {remote_device!r} is not supported; use None "
                              f"(the accelerator), 'cpu' or 'nvme'")
        self.swap = None
        if remote_device == "nvme":
            if offload is None:
                raise ConfigError("ds_zero.Init(remote_device='nvme') needs config_dict_or_path with "
                                  "zero_optimization.offload_param.nvme_path (the directory for the swap files); "
                                  "pass the training config, e.g. {'zero_optimization': {'stage': 3, "
                                  "'offload_param': {'device': 'nvme', 'nvme_path': '/local_nvme'}}}")
            from .config import check_nvme_path
            from .swap import SwapStore
            from .swap_params import ShardSwapper

            try:
                check_nvme_path("offload_param", offload.nvme_path)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            store = SwapStore(offload.nvme_path, comm.get_rank(), "init-param", "offload_param")
            self.swap = ShardSwapper(store, offload.buffer_count, offload.buffer_size)
        self.group = data_parallel_group
        self.dtype = dtype
        self.enabled = enabled
        self.remote_device = remote_device
        self.pin = pin_memory
        self.saved: dict[type, object] = {}
        if module is not None and enabled:  # DeepSpeed also accepts an already-built module
            self._partition_tree(module)

    # -- partitioning ------------------------------------------------------------------------------
    def _partition_tree(self, module: torch.nn.Module) -> None:
        for m in module.modules():
            self._partition(m)

    def _partition(self, module: torch.nn.Module) -> None:
        settle_unused()
        for name, p in module._parameters.items():
            if p is not None and not is_zero_init_parameter(p):
                self._shard(p, f"{type(module).__name__}.{name}")
        # name the shards after their place in the tree built so far (the root's names at the end)
        for qual, p in module.named_parameters():
            s = p.ds_shard if is_zero_init_parameter(p) else None
            if s is not None and s.owner is None:
                s.name = qual

    def _shard(self, p: torch.nn.Parameter, name: str) -> None:
        """Broadcast ``p``'s value from rank 0, keep this rank's shard, release the rest."""
        world, rank = comm.get_world_size(self.group), comm.get_rank(self.group)
        with torch.no_grad():
            data = raw_data(p)
            if self.dtype is not None and data.is_floating_point():
                data = data.to(self.dtype)
            if self.remote_device in ("cpu", "nvme"):
                data = data.cpu()
            if world > 1:
                data = data.contiguous()
                src = 0 if self.group is None else torch.distributed.get_global_rank(self.group, 0)
                comm.broadcast(data, src=src, group=self.group)
            set_raw_data(p, data)
        part = padded_numel(p.numel(), world) // world
        pin = self.pin and p.device.type == "cpu" and torch.accelerator.is_available()
        shard = torch.zeros(part, dtype=p.dtype, device=p.device, pin_memory=pin)
        if self.swap is None:
            s = ShardedParameter(p, name, world, rank, shard, False, self.group)
        else:
            file = self.swap.add_group(part, p.dtype)
            s = ShardedParameter(p, name, world, rank, shard, False, self.group, swap=self.swap, swap_file=file)
            self.swap.check(s)
            self.swap.write_out(s).wait()  # the shard lives in the file from here on
            s._data = None
        s.on_access = self._borrow
        s.on_assign = self._reassign
        p.ds_shape = s.shape
        s.release()

    @staticmethod
    def _borrow(s: ShardedParameter) -> bool:
        """Model code touched released ``s`` before any engine adopted it: gather it (a collective, every
        rank runs the same code) and lend it (``released.lend``: its shard is refreshed afterwards)."""
        gather_shards([s], s.group, tag=f"{s.name} (used outside a forward)")
        lend(s)
        return True

    def _reassign(self, s: ShardedParameter, value: torch.Tensor) -> bool:
        """``param.data = value`` of another shape or of a released parameter: partition ``value`` anew."""
        p = s.param
        settle_all()
        if value is not p and isinstance(value, torch.nn.Parameter):
            value = value.data
        with torch.no_grad():
            set_raw_data(p, raw_data(value).detach() if isinstance(value, torch.Tensor) else value)
        del p.ds_shard
        self._shard(p, s.name)
        return True

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
        settle_all()
        for cls, original in self.saved.items():
            cls.__init__ = original
        self.saved = {}
        if self._old_subclass_hook is None:
            del torch.nn.Module.__init_subclass__
        else:
            torch.nn.Module.__init_subclass__ = self._old_subclass_hook
        torch.nn.Module.apply = self._old_apply
