"""Released stage-3 parameters are never computed with: touched, they are gathered where that is safe, else
the touch fails with the parameter's name.

Under ZeRO stage 3 (Rajbhandari et al. 2020, section 5.3) a parameter is whole only while the module
that owns it runs; the rest of the time ``param.data`` is a placeholder of the right shape, dtype and
device that holds no values. The module hooks (``gather.py``) gather a module's *own* parameters, but
code also reads parameters outside their module's forward: ``nn.MultiheadAttention`` passes
``out_proj.weight`` to ``F.multi_head_attention_forward`` without calling ``out_proj``; a parent reads
a child's weight; a model ties its head to ``self.embed.weight``; Hugging Face's ``save_pretrained``
reads every parameter through ``state_dict()``. Silently computing with a placeholder there gives
NaN or wrong numbers, so every partitioned parameter becomes a :class:`ZeroParameter`: the same
``Parameter`` object (optimizers, tied modules and hooks keep it), with a ``__torch_function__``
that inspects each operation touching it. Metadata (``shape``, ``dtype``, ``device``, ``grad``,
``requires_grad``, hooks...) is always available. An operation that needs the values of a
released parameter goes to ``ds_shard.on_access(shard)``, set by whoever manages the shard:

- an engine's coordinator (``gather.py``), while a step runs (from the root module's forward to the
  end of its backward): the parameter is gathered now — a collective, safe because every rank runs
  the same forward — and registered as an *external parameter* of the innermost module running, so
  from the next step on that module's forward gathers it with its own parameters (DeepSpeed detects
  external parameters the same way; :func:`register_external_parameter` declares one up front);
- :class:`~ds_zero.init_context.Init`, for a model it built that no engine has adopted yet (model
  surgery such as weight initialisation, ``resize_token_embeddings`` or loading weights, which every
  rank runs alike, like the construction itself): the parameter is gathered, the operation runs on
  the full tensor, and this rank's shard is then refreshed from the result (*borrowed*, see
  :func:`lend`);
- anything else — no engine step running, or no manager — raises :class:`ReleasedParameterError`
  naming the parameter, the operation and the fixes.

Tensors derived from a released parameter outside any of these (``param.detach()`` in
``state_dict()``, ``param.data``) are a :class:`ReleasedTensor`: right metadata, and any operation on
it raises :class:`ReleasedParameterError` naming the parameter. So ``state_dict()`` of a ZeRO-3 model
still lists every name (checkpoint code keeps the ones it needs), while saving it with Hugging Face's
``save_pretrained`` or ``torch.save`` raises instead of writing NaN.

[Note: raw data] The machinery itself (gathers, releases, saved-tensor hooks) reads and writes
``param.data`` through :func:`raw_data` / :func:`set_raw_data`, which bypass ``__torch_function__``:
the policy above is for model code, and a gather that assigns the full tensor must not be mistaken for
a user replacing the parameter.
"""

from __future__ import annotations

import torch

from ds_core.errors import DSError

__all__ = ["ReleasedParameterError", "ReleasedTensor", "ZeroParameter", "make_zero_parameter", "placeholder", "raw_data",
           "set_raw_data", "register_external_parameter", "unregister_external_parameter", "lend",
           "settle", "settle_unused"]

_Disabled = torch._C.DisableTorchFunctionSubclass
_GETSET = type(torch.Tensor.shape)  # the type of a tensor attribute's descriptor (getset_descriptor)

# attribute getters that return (a view of) the values; every other getter reads metadata only
_VALUE_GETTERS = frozenset({"data", "T", "mT", "H", "mH", "real", "imag"})
# methods that read metadata only (or register hooks): they never need the values
_METADATA = frozenset(getattr(torch.Tensor, name) for name in (
    "size", "dim", "ndimension", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
    "is_contiguous", "get_device", "stride", "storage_offset", "__hash__", "__len__", "requires_grad_",
    "register_hook", "register_post_accumulate_grad_hook", "retain_grad", "is_shared", "is_pinned",
    "_is_view", "is_inference", "has_names", "__dir__", "is_signed", "data_ptr", "untyped_storage",
    "__sizeof__") if hasattr(torch.Tensor, name)) | {torch._has_compatible_shallow_copy_type}
_CONVERSIONS = frozenset(getattr(torch.Tensor, name) for name in (
    "to", "cpu", "cuda", "float", "double", "half", "bfloat16", "type_as"))
_REPR = frozenset((torch.Tensor.__repr__, torch.Tensor.__str__, torch.Tensor.__format__))


class ReleasedParameterError(DSError, RuntimeError):
    """A released (partitioned) ZeRO stage-3 parameter was used where its full value is not available."""


def _fixes(owned: bool) -> str:
    if owned:
        return ("read or change it inside `with ds_zero.GatheredParameters(params, modifier_rank=...)` (a "
                "collective: run it on every rank); for the full weights use ds_zero.gathered_state_dict(engine) "
                "or save with engine.save_checkpoint / stage3_gather_16bit_weights_on_model_save; code in a "
                "module's forward may read any parameter (it is gathered there); change the model's shapes "
                "(e.g. resize_token_embeddings) before ds_core.initialize")
    return ("read or change it inside `with ds_zero.GatheredParameters(params, modifier_rank=0)` on every rank, "
            "or let a ZeRO stage-3 engine adopt the model (ds_core.initialize) and use it in the forward")


def released_error(s, what: str) -> ReleasedParameterError:
    owned = getattr(s, "owner", None) is not None
    state = ("outside a forward or backward of its engine's model" if owned
             else "and no ZeRO stage-3 engine or ds_zero.Init manages it now")
    return ReleasedParameterError(
        f"ZeRO stage 3: parameter {s.name} (shape {list(s.shape)}, partitioned over {s.world} rank(s); this "
        f"rank holds only its shard) is released and was used by {what} {state}; its full value is not here. "
        f"To fix: {_fixes(owned)}")


def _op_name(func) -> str:
    owner = getattr(func, "__self__", None)
    if isinstance(owner, _GETSET):
        return f"reading .{owner.__name__}" if func.__name__ == "__get__" else f"assigning .{owner.__name__}"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None)
    return f"`{module}.{name}`" if module and not name.startswith("Tensor.") else f"`{name}`"


def placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A released parameter's raw data: one NaN expanded to ``shape`` (no storage beyond one element;
    model code never sees it — it gets a gather, a :class:`ReleasedTensor` or an error)."""
    return torch.full((), float("nan"), dtype=dtype, device=device).expand(shape)


# -- raw access (see [Note: raw data]) ------------------------------------------------------------------
def raw_data(p: torch.Tensor) -> torch.Tensor:
    """``p.data`` without the released-parameter policy."""
    with _Disabled():
        return p.data


def set_raw_data(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p.data = value`` without the released-parameter policy."""
    with _Disabled():
        p.data = value


# -- the placeholder handed out for derived tensors ------------------------------------------------------
class ReleasedTensor(torch.Tensor):
    """What ``param.data`` / ``param.detach()`` of a released parameter return where it cannot be gathered:
    the parameter's shape, dtype and device, no values; any operation raises naming the parameter."""

    @staticmethod
    def __new__(cls, shard):
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(shard.shape), dtype=shard.dtype, device=shard.device,
                                                requires_grad=False)
        t.ds_released = shard
        return t

    def __init__(self, shard) -> None:
        super().__init__()

    def __repr__(self, *, tensor_contents=None) -> str:
        s = self.ds_released
        return f"ReleasedTensor(parameter {s.name}, shape={list(s.shape)}, dtype={s.dtype}: released)"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        owner = getattr(func, "__self__", None)
        if func in _METADATA or (isinstance(owner, _GETSET) and owner.__name__ not in _VALUE_GETTERS) or func in _REPR:
            with _Disabled():
                return func(*args, **(kwargs or {}))
        if func is torch.Tensor.detach:
            return args[0]
        raise released_error(_released_in(args, kwargs, cls), _op_name(func))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise released_error(_released_in(args, kwargs, cls), f"`{func}`")


def _released_in(args, kwargs, cls):
    for a in _tensors(args, kwargs):
        if isinstance(a, cls):
            return a.ds_released
    raise AssertionError("no released tensor among the arguments")


def _tensors(args, kwargs):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, torch.Tensor))
    if kwargs:
        for a in kwargs.values():
            if isinstance(a, torch.Tensor):
                yield a
            elif isinstance(a, (list, tuple)):
                yield from (b for b in a if isinstance(b, torch.Tensor))


# -- the parameter class --------------------------------------------------------------------------------
class ZeroParameter(torch.nn.Parameter):
    """A ZeRO stage-3 partitioned parameter (see the module docstring). Made by :func:`make_zero_parameter`
    from an existing ``Parameter`` (its class is swapped; the object, its id and its hooks stay)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if _borrowed:
            settle_unused()
        owner = getattr(func, "__self__", None)
        if isinstance(owner, _GETSET):
            if owner.__name__ == "data":
                s = getattr(args[0], "ds_shard", None)
                if s is not None and func.__name__ == "__set__":
                    return _assign(s, args[0], args[1])
                if s is not None and func.__name__ == "__get__" and not s.gathered:
                    return _values_of(s, "reading .data")
            elif owner.__name__ in _VALUE_GETTERS:
                _need(args, kwargs, func)
            with _Disabled():
                return func(*args, **kwargs)
        if func in _METADATA:
            with _Disabled():
                return func(*args, **kwargs)
        released = [a for a in _tensors(args, kwargs) if isinstance(a, ZeroParameter) and _is_released(a)]
        if not released:
            with _Disabled():
                return func(*args, **kwargs)
        p = released[0]
        if func in _REPR:
            s = p.ds_shard
            return (f"ZeroParameter({s.name}, shape={list(s.shape)}, dtype={s.dtype}: released, partitioned over "
                    f"{s.world} rank(s); gather it with ds_zero.GatheredParameters to see its values)")
        if func in _CONVERSIONS and len(released) == 1 and args and args[0] is p:
            return _convert(p, func, args[1:], kwargs)
        if func is torch.Tensor.detach and len(args) == 1:
            return _values_of(p.ds_shard, "`Tensor.detach` (e.g. state_dict())").detach()
        for q in released:
            _gather_or_raise(q.ds_shard, _op_name(func))
        with _Disabled():
            out = func(*args, **kwargs)
        for q in released:
            _after(q.ds_shard, out)
        return out

    def __reduce_ex__(self, proto):
        s = getattr(self, "ds_shard", None)
        if s is not None and not s.gathered:
            raise released_error(s, "pickling (torch.save / copy)")
        return torch.nn.Parameter.__reduce_ex__(self, proto)

    def __deepcopy__(self, memo):
        """A plain ``Parameter`` holding the full value (gathered as for any other use)."""
        if id(self) in memo:
            return memo[id(self)]
        with torch.no_grad():
            full = self.data.clone()
        result = torch.nn.Parameter(full, self.requires_grad)
        memo[id(self)] = result
        return result


_classes: dict[type, type] = {torch.nn.Parameter: ZeroParameter}


def make_zero_parameter(p: torch.nn.Parameter) -> None:
    """Turn ``p`` (with ``p.ds_shard`` set) into a :class:`ZeroParameter` in place."""
    cls = type(p)
    if issubclass(cls, ZeroParameter):
        return
    if cls not in _classes:  # a Parameter subclass of the model's own: keep it under ours
        _classes[cls] = type(f"Zero{cls.__name__}", (ZeroParameter, cls), {})
    p.__class__ = _classes[cls]


def _is_released(p) -> bool:
    s = getattr(p, "ds_shard", None)
    return s is not None and not s.gathered


def _need(args, kwargs, func) -> None:
    for a in _tensors(args, kwargs):
        if isinstance(a, ZeroParameter) and _is_released(a):
            _gather_or_raise(a.ds_shard, _op_name(func))


def _gather_or_raise(s, what: str) -> None:
    on_access = getattr(s, "on_access", None)
    if on_access is None or not on_access(s):
        raise released_error(s, what)


def _values_of(s, what: str) -> torch.Tensor:
    """The full data of released ``s`` if it can be gathered now (borrowed: settled once unused), else
    a :class:`ReleasedTensor`."""
    on_access = getattr(s, "on_access", None)
    if on_access is None or not on_access(s):
        return ReleasedTensor(s)
    return raw_data(s.param)


def _after(s, out) -> None:
    """After an operation on borrowed ``s``: settle it now unless the result shares its storage."""
    if id(s) not in _borrowed or not s.gathered:
        return
    ptr = raw_data(s.param).untyped_storage().data_ptr()
    outs = out if isinstance(out, (list, tuple)) else (out,)
    for t in outs:
        if isinstance(t, torch.Tensor) and t is not s.param and t.untyped_storage().data_ptr() == ptr:
            return  # a view escaped: settle when it is gone (settle_unused)
    settle(s)


def _assign(s, p, value) -> None:
    """``p.data = value`` by model code."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"parameter {s.name}: .data must be a tensor, got {type(value).__name__}")
    if value is p or (isinstance(value, ReleasedTensor) and value.ds_released is s):
        return  # Module._apply of a no-op conversion, or `p.data = p.data` of a released parameter
    same = tuple(value.shape) == tuple(s.shape) and value.dtype == s.dtype
    if s.gathered and same:  # inside a gather: the new value is published or settled like an in-place change
        set_raw_data(p, value)
        return
    on_assign = getattr(s, "on_assign", None)
    if on_assign is not None and on_assign(s, value):
        return
    if same:
        raise released_error(s, "assigning .data (a new full value)")
    raise ReleasedParameterError(
        f"ZeRO stage 3: parameter {s.name} (shape {list(s.shape)}, {s.dtype}) is partitioned by an engine and "
        f"cannot take a value of shape {list(value.shape)} ({value.dtype}): its partitions, gradients and "
        f"optimizer state have the old shape. Change the model (e.g. resize_token_embeddings) before "
        f"ds_core.initialize, or under ds_zero.Init before any engine adopts it")


def _convert(p, func, args, kwargs):
    """``p.to(...)`` / ``p.float()``... of a released parameter: a no-op when nothing changes (as in
    ``Module.to`` of a model already there); else convert the shard, if no engine owns it."""
    s = p.ds_shard
    if func is torch.Tensor.to:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    elif func is torch.Tensor.type_as:
        device, dtype = args[0].device, args[0].dtype
    else:
        device = torch.device("cpu") if func is torch.Tensor.cpu else (
            torch.device("cuda", torch.cuda.current_device()) if func is torch.Tensor.cuda and not args else
            torch.device(args[0]) if func is torch.Tensor.cuda else None)
        dtype = {torch.Tensor.float: torch.float32, torch.Tensor.double: torch.float64,
                 torch.Tensor.half: torch.float16, torch.Tensor.bfloat16: torch.bfloat16}.get(func)
    device = torch.device(device) if device is not None else s.device
    if device.type != "cpu" and device.index is None and device.type == s.device.type:
        device = s.device
    dtype = dtype or s.dtype
    if device == s.device and dtype == s.dtype:
        return p
    if getattr(s, "owner", None) is not None or getattr(s, "swap", None) is not None:
        raise ReleasedParameterError(
            f"ZeRO stage 3: parameter {s.name} is partitioned ({s.dtype} on {s.device}) and cannot be converted "
            f"to {dtype} on {device} now; the engine places and casts its shards (its precision config and "
            f"accelerator decide), so convert the model before ds_core.initialize")
    with torch.no_grad():
        s.shard = s.shard.to(device=device if s.shard.device == s.device else s.shard.device, dtype=dtype)
    s.dtype, s.device = dtype, device
    return placeholder(s.shape, dtype, device)


# -- external parameters --------------------------------------------------------------------------------
def register_external_parameter(module: torch.nn.Module, parameter: torch.nn.Parameter) -> None:
    """Declare that ``module``'s forward uses ``parameter``, which another module owns: under stage 3 it
    is gathered with ``module``'s own parameters (DeepSpeed's ``deepspeed.zero.register_external_parameter``).

    Not needed for correctness — a parameter touched in a forward is gathered and registered on first
    use — but it saves that first on-demand gather. Works before or after an engine adopts the model.
    """
    if not isinstance(parameter, torch.nn.Parameter):
        raise TypeError(f"register_external_parameter: expected a torch.nn.Parameter, got {type(parameter).__name__}")
    external = module.__dict__.setdefault("_ds_external_params", {})
    external[id(parameter)] = parameter
    s = getattr(parameter, "ds_shard", None)
    coordinator = getattr(getattr(s, "owner", None), "coordinator", None)
    if coordinator is not None:
        coordinator.register_external(module, s)


def unregister_external_parameter(module: torch.nn.Module, parameter: torch.nn.Parameter) -> None:
    """Undo :func:`register_external_parameter` (a no-op when it was not registered)."""
    module.__dict__.get("_ds_external_params", {}).pop(id(parameter), None)
    s = getattr(parameter, "ds_shard", None)
    coordinator = getattr(getattr(s, "owner", None), "coordinator", None)
    if coordinator is not None:
        coordinator.unregister_external(module, s)


# -- borrowing (pre-adoption gathers on access) ------------------------------------------------------------
_borrowed: dict[int, object] = {}  # id(shard) -> shard gathered on access, to settle


def _use_count(s) -> int:
    return torch._C._storage_Use_Count(raw_data(s.param).untyped_storage()._cdata)


def lend(s) -> None:
    """``s`` was just gathered for model code (no engine owns it): it is *borrowed* until :func:`settle`.

    [Note: borrowing] Settling is local — this rank copies its slice of the full tensor back into its
    shard and releases — so it needs no collective and may happen at any time on any rank: right after
    the operation, or once no view of the full tensor is left (checked by storage use count before the
    next operation on a partitioned parameter, at ``Init`` boundaries and when an engine adopts the
    model). Every rank ran the same operation on the same gathered values, so the shards stay consistent;
    an operation drawing random numbers gives each shard its own rank's draw, equal to a single-process
    build when every rank is seeded alike.
    """
    s.borrow_base = _use_count(s)
    _borrowed[id(s)] = s


def settle(s) -> None:
    """Write this rank's slice of borrowed ``s``'s full tensor into its shard and release it."""
    _borrowed.pop(id(s), None)
    s.borrow_base = None
    if not s.gathered:
        return
    with torch.no_grad():
        full = raw_data(s.param).reshape(-1)
        lo = min(s.numel, s.rank * s.part)
        hi = min(s.numel, lo + s.part)
        shard = s.shard
        if full.dtype != shard.dtype or full.device != shard.device:
            full = full.to(device=shard.device, dtype=shard.dtype)
        if not torch.equal(shard[:hi - lo], full[lo:hi]):
            shard[:hi - lo].copy_(full[lo:hi])
    if s.users == 0:
        s.release()


def settle_unused() -> None:
    """Settle every borrowed parameter no view refers to any more."""
    for s in list(_borrowed.values()):
        if not s.gathered:
            _borrowed.pop(id(s), None)
        elif s.users == 0 and _use_count(s) <= s.borrow_base:
            settle(s)


def settle_all() -> None:
    """Settle every borrowed parameter (at ``Init`` boundaries and adoption)."""
    for s in list(_borrowed.values()):
        settle(s)
