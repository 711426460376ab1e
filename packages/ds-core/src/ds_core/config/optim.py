"""The parameters of each optimizer and schedule the config can name, checked at parse time.

The optimizer and scheduler builders construct the objects; these schemas say which ``params`` each
accepts, with what defaults and types, so a typo'd name, a wrong type or a missing
``total_num_steps`` is reported by :func:`~ds_core.config.parse_config` — before any process group
exists — and the builders apply the very same rules (they import them from here).

DeepSpeed names that ds does not implement are refused by feature (1-bit Adam, Muon, ...), and any
other ``torch.optim`` class name — which DeepSpeed would import — with the way to use it anyway:
pass the optimizer or scheduler object to ``initialize``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, closest
from .sections import OPTIMIZERS, SCHEDULERS
from .values import finite_number

__all__ = [
    "OPTIMIZERS", "SCHEDULERS", "OPTIMIZER_DEFAULTS", "SCHEDULER_PARAMS", "REQUIRED", "WARMUP_TYPES",
    "optimizer_name", "resolve_optimizer_params", "check_optimizer_value", "check_optimizer",
    "scheduler_name", "scheduler_params", "check_scheduler",
]

AUTO = "auto"
WARMUP_TYPES = ("log", "linear")
#: Marks a scheduler parameter without a default (the builder's convention: ``inspect.Parameter.empty``).
REQUIRED = inspect.Parameter.empty

_ADAM_KEYS: dict[str, Any] = {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
    "bias_correction": True, "adam_w_mode": True, "torch_adam": False, "maximize": False,
    "foreach": None, "fused": None,
}

_ONEBIT_KEYS: dict[str, Any] = {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "bias_correction": True,
    "eps_inside_sqrt": False, "max_grad_norm": 0.0, "amsgrad": False, "cuda_aware": False,
    "comm_backend_name": "nccl",
}

#: Accepted ``params`` keys of each optimizer (lower-case name) and the value used when a key is
#: absent or ``"auto"``. ``foreach``/``fused`` of None mean "let the factory pick".
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": dict(_ADAM_KEYS),
    "adamw": dict(_ADAM_KEYS),
    "sgd": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
            "maximize": False, "foreach": None, "fused": None},
    "adagrad": {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0,
                "eps": 1e-10, "maximize": False, "foreach": None, "fused": None},
    "lamb": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "bias_correction": True,
             "eps_inside_sqrt": False, "max_grad_norm": 0.0, "max_coeff": 10.0, "min_coeff": 0.01,
             "amsgrad": False},
    "lion": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0},
    # 1-bit optimizers (ds_core.optim.onebit): DeepSpeed's params and defaults
    "onebitadam": {**_ONEBIT_KEYS, "freeze_step": 100000},
    "zerooneadam": {**_ONEBIT_KEYS, "var_freeze_step": 100000, "var_update_scaler": 16,
                    "local_step_scaler": 32678, "local_step_clipper": 16},
    "onebitlamb": {**_ONEBIT_KEYS, "freeze_step": 100000, "max_coeff": 10.0, "min_coeff": 0.01,
                   "coeff_beta": 0.9, "factor_max": 4.0, "factor_min": 0.5, "factor_threshold": 0.1},
}
ONEBIT_INT_KEYS = ("freeze_step", "var_freeze_step", "var_update_scaler", "local_step_scaler", "local_step_clipper")

_CANONICAL = {name.lower(): name for name in OPTIMIZERS}
_BOOL_KEYS = {"amsgrad", "bias_correction", "adam_w_mode", "torch_adam", "maximize", "nesterov",
              "eps_inside_sqrt", "cuda_aware"}
_NONNEGATIVE_KEYS = {"lr", "eps", "weight_decay", "momentum", "dampening", "lr_decay",
                     "initial_accumulator_value", "max_grad_norm", "max_coeff", "min_coeff", "coeff_beta",
                     "factor_max", "factor_min", "factor_threshold"}

# DeepSpeed optimizers ds does not implement: the feature, and the closest one ds has.
_DEEPSPEED_ONLY = {
    "muadam": ("muP Adam (MuAdam)", "Adam"),
    "muadamw": ("muP AdamW (MuAdamW)", "AdamW"),
    "musgd": ("muP SGD (MuSGD)", "SGD"),
    "muon": ("the Muon optimizer", "AdamW"),
}


def _torch_name(kind: str, name: str) -> bool:
    """True when ``name`` is a class DeepSpeed would import from torch (torch imported lazily)."""
    import torch

    where = torch.optim if kind == "optimizer" else torch.optim.lr_scheduler
    return isinstance(getattr(where, str(name), None), type)


def optimizer_name(type_name: Any, label: str = "optimizer.type") -> str:
    """The lower-case name of a supported optimizer; otherwise a ConfigError naming what to do."""
    name = str(type_name).strip().lower()
    if name in _CANONICAL:
        return name
    if name in _DEEPSPEED_ONLY:
        feature, alternative = _DEEPSPEED_ONLY[name]
        raise ConfigError(f"{label} {type_name!r} asks for {feature}, which ds does not support yet; the "
                          f"closest is {alternative!r}, or pass your own optimizer object to initialize()")
    if _torch_name("optimizer", str(type_name).strip()):
        raise ConfigError(f"{label} {type_name!r} is not supported from the config: it is a torch.optim class ds "
                          f"does not build yet; build it yourself and pass optimizer=torch.optim.{str(type_name).strip()}"
                          f"(model.parameters(), ...) to initialize(), or use one of {', '.join(OPTIMIZERS)}")
    raise ConfigError(f"{label} {type_name!r} is not supported{closest(str(type_name).strip(), OPTIMIZERS)}; "
                      f"choose one of "
                      f"{', '.join(OPTIMIZERS)} (any case), or pass your own optimizer object to initialize()")


def _number(owner: str, key: str, value: Any) -> float:
    return finite_number(f"optimizer {owner}", key, value)


def check_optimizer_value(display: str, key: str, value: Any) -> Any:
    """One ``params`` value of optimizer ``display``, checked and normalised."""
    if key in ("foreach", "fused"):
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"optimizer {display}: {key} {value!r} must be true, false or null")
        return value
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise ConfigError(f"optimizer {display}: {key} {value!r} must be true or false")
        return value
    if key == "betas":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"optimizer {display}: betas {value!r} must be two numbers, e.g. [0.9, 0.999]")
        betas = tuple(_number(display, key, b) for b in value)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"optimizer {display}: betas {list(value)!r} must both lie in [0, 1), "
                              "e.g. [0.9, 0.999]")
        return betas
    if key == "comm_backend_name":
        from ..optim.onebit.optimizers import COMM_BACKENDS

        if str(value).lower() not in COMM_BACKENDS:
            raise ConfigError(f"optimizer {display}: comm_backend_name {value!r} is not one of "
                              f"{', '.join(COMM_BACKENDS)} (ds communicates through the process group's backend "
                              f"whichever is named)")
        return str(value)
    number = _number(display, key, value)
    if key in ONEBIT_INT_KEYS:
        minimum = 1
        if isinstance(value, bool) or not float(number).is_integer() or number < minimum:
            what = ("the number of full-precision warm-up steps before compression starts"
                    if key == "freeze_step" else "a whole number of steps")
            raise ConfigError(f"optimizer {display}: {key} {value!r} must be a whole number >= {minimum} ({what})")
        return int(number)
    if key in _NONNEGATIVE_KEYS and number < 0:
        raise ConfigError(f"optimizer {display}: {key} {value!r} must be >= 0")
    return number


def resolve_optimizer_params(display: str, name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with the config's values ("auto" = default), each checked and normalised."""
    defaults = OPTIMIZER_DEFAULTS[name]
    values = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            hint = ("; DeepSpeed refuses it too: clip with the top-level \"gradient_clipping\" instead"
                    if key == "max_grad_norm" else "")
            raise ConfigError(f"optimizer {display}: unknown param {key!r}{closest(key, defaults)}; "
                              f"{display} accepts {', '.join(sorted(defaults))}{hint}")
        if isinstance(value, str) and value.strip().lower() == AUTO:
            continue
        values[key] = check_optimizer_value(display, key, value)
    return values


def check_optimizer(type_name: Any, params: Mapping[str, Any]) -> None:
    """Parse-time check of an ``optimizer`` section (what ``build_optimizer`` would refuse)."""
    name = optimizer_name(type_name)
    display = _CANONICAL[name]
    values = resolve_optimizer_params(display, name, params)
    if name in ("adam", "adamw") and not values["bias_correction"]:
        raise ConfigError(f"optimizer {display}: bias_correction false (Adam without moment bias correction, as "
                          "BERT pre-training used) is not supported yet: torch.optim.Adam always corrects the bias; "
                          "remove bias_correction (or set it to true), or use Lamb, which takes it")
    if name == "lamb" and values["amsgrad"]:
        raise ConfigError("optimizer Lamb: amsgrad true is not supported (nor by DeepSpeed's FusedLamb); "
                          "remove amsgrad or set it to false")
    if name == "lamb" and not 0.0 <= values["min_coeff"] <= values["max_coeff"]:
        raise ConfigError(f"optimizer Lamb: need 0 <= min_coeff <= max_coeff, got min_coeff {values['min_coeff']}, "
                          f"max_coeff {values['max_coeff']}; the trust ratio is clamped to [min_coeff, max_coeff]")
    if name in ("onebitadam", "zerooneadam", "onebitlamb"):
        if values["amsgrad"]:
            raise ConfigError(f"optimizer {display}: amsgrad true is not supported (nor by DeepSpeed); remove it")
        if values["max_grad_norm"]:
            raise ConfigError(f"optimizer {display}: max_grad_norm {values['max_grad_norm']} is not supported; clip "
                              f"with the top-level \"gradient_clipping\" instead")
    if name == "onebitlamb":
        if not 0.0 <= values["min_coeff"] <= values["max_coeff"]:
            raise ConfigError(f"optimizer {display}: need 0 <= min_coeff <= max_coeff, got {values['min_coeff']}, "
                              f"{values['max_coeff']}")
        if not values["coeff_beta"] < 1.0:
            raise ConfigError(f"optimizer {display}: coeff_beta {values['coeff_beta']} must lie in [0, 1)")
        if not 0.0 < values["factor_min"] <= 1.0 <= values["factor_max"]:
            raise ConfigError(f"optimizer {display}: need 0 < factor_min <= 1 <= factor_max, got factor_min "
                              f"{values['factor_min']}, factor_max {values['factor_max']}")
    if name == "sgd" and values["nesterov"] and (values["momentum"] <= 0 or values["dampening"] != 0):
        raise ConfigError("optimizer SGD: nesterov true needs momentum > 0 and dampening 0 (torch.optim.SGD's "
                          "rule); set momentum, or remove nesterov")


# -- schedules -----------------------------------------------------------------------------------

# Each param: (kind, default). Kinds: "lr" (a number >= 0, or one per param group), "lr?" (the same
# or null), "int>=N", "int?>=N" (or null), "ratio" (a number in [0, 1]), "number", "bool", "warmup".
_ITERATION = ("int>=-1", -1)
_WARMUP = {"warmup_min_lr": ("lr", 0.0), "warmup_max_lr": ("lr?", None), "warmup_num_steps": ("int>=0", 1000),
           "warmup_type": ("warmup", "log")}
SCHEDULER_PARAMS: dict[str, dict[str, tuple[str, Any]]] = {
    "WarmupLR": {**_WARMUP, "last_batch_iteration": _ITERATION},
    "WarmupDecayLR": {"total_num_steps": ("int>=1", REQUIRED), **_WARMUP, "last_batch_iteration": _ITERATION},
    "WarmupCosineLR": {"total_num_steps": ("int>=1", REQUIRED), "warmup_min_ratio": ("ratio", 0.0),
                       "warmup_num_steps": ("int>=0", 1000), "cos_min_ratio": ("ratio", 0.0001),
                       "warmup_type": ("warmup", "log"), "last_batch_iteration": _ITERATION},
    "OneCycle": {"cycle_min_lr": ("lr", REQUIRED), "cycle_max_lr": ("lr", REQUIRED),
                 "decay_lr_rate": ("number", 0.0), "cycle_first_step_size": ("int>=1", 2000),
                 "cycle_second_step_size": ("int?>=0", None), "cycle_first_stair_count": ("int>=0", 0),
                 "cycle_second_stair_count": ("int?>=0", None), "decay_step_size": ("int>=0", 0),
                 "cycle_momentum": ("bool", True), "cycle_min_mom": ("number", 0.8),
                 "cycle_max_mom": ("number", 0.9), "decay_mom_rate": ("number", 0.0),
                 "last_batch_iteration": _ITERATION},
    "LRRangeTest": {"lr_range_test_min_lr": ("lr", 1e-3), "lr_range_test_step_size": ("int>=1", 2000),
                    "lr_range_test_step_rate": ("number", 1.0), "lr_range_test_staircase": ("bool", False),
                    "last_batch_iteration": _ITERATION},
}
_REQUIRED_HINTS = {"total_num_steps": "the number of optimizer steps the run will take",
                   "cycle_min_lr": "the lr at the start and end of the cycle",
                   "cycle_max_lr": "the lr at the peak of the cycle"}


def scheduler_name(type_name: Any) -> str:
    """``type_name`` if it names a supported schedule; DeepSpeed matches schedule names exactly, so does this."""
    name = str(type_name).strip()
    if name in SCHEDULERS:
        return name
    if _torch_name("scheduler", name):
        raise ConfigError(f"scheduler.type {type_name!r} is a torch.optim.lr_scheduler class that ds does not "
                          f"build from the config yet; build it yourself and pass lr_scheduler=... to "
                          f"initialize(), or use one of {', '.join(SCHEDULERS)}")
    raise ConfigError(f"scheduler.type {type_name!r} is not supported{closest(name, SCHEDULERS)}; choose one of "
                      f"{', '.join(SCHEDULERS)}, or pass your own scheduler object to initialize()")


def scheduler_params(type_name: Any) -> dict[str, Any]:
    """Accepted params of a schedule and their defaults (:data:`REQUIRED`: no default)."""
    return {key: default for key, (_, default) in SCHEDULER_PARAMS[scheduler_name(type_name)].items()}


def _check_schedule_value(owner: str, key: str, kind: str, value: Any) -> None:
    where = f"scheduler {owner}: {key} {value!r}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return
    if kind == "warmup":
        if value not in WARMUP_TYPES:
            raise ConfigError(f"{where} is not one of {', '.join(WARMUP_TYPES)}; use 'log' (DeepSpeed's default) "
                              "or 'linear'")
        return
    if kind.endswith("?") or "?" in kind:
        if value is None:
            return
        kind = kind.replace("?", "")
    if kind == "lr":
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise ConfigError(f"{where} must be a number, or a list with one number per param group")
        for item in items:
            if finite_number(f"scheduler {owner}", key, item) < 0:
                raise ConfigError(f"{where} must be >= 0 (a learning rate)")
        return
    number = finite_number(f"scheduler {owner}", key, value)
    if kind == "ratio" and not 0.0 <= number <= 1.0:
        raise ConfigError(f"{where} must lie in [0, 1] (a fraction of the optimizer's lr)")
    if kind.startswith("int>="):
        minimum = int(kind[len("int>="):])
        if isinstance(value, bool) or not math.isfinite(number) or not number.is_integer() or number < minimum:
            raise ConfigError(f"{where} must be a whole number >= {minimum}")


def check_scheduler(type_name: Any, params: Mapping[str, Any], auto: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Parse-time check of a ``scheduler`` section; returns the params a builder passes on.

    ``"auto"`` takes the value in ``auto`` when given (a trainer resolves it), else the default; a
    required param that is missing or left to an unresolved ``"auto"`` is an error, since no number
    can stand in for it.
    """
    name = scheduler_name(type_name)
    schema = SCHEDULER_PARAMS[name]
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        if key not in schema:
            raise ConfigError(f"scheduler {name}: unknown param {key!r}{closest(key, schema)}; "
                              f"{name} accepts {', '.join(schema)}")
        if isinstance(value, str) and value.strip().lower() == AUTO:
            if auto is None or key not in auto:
                continue
            value = auto[key]
        _check_schedule_value(name, key, schema[key][0], value)
        kwargs[key] = value
    missing = [key for key, (_, default) in schema.items() if default is REQUIRED and key not in kwargs]
    if missing:
        what = "; ".join(f"{key} ({_REQUIRED_HINTS.get(key, 'required')})" for key in missing)
        left_auto = [key for key in missing if str(params.get(key, "")).strip().lower() == AUTO]
        note = (f"{', '.join(left_auto)} is 'auto' but nothing resolved it: pass the trainer's values to "
                f"ds_core.config.resolve_auto(), or write the number" if left_auto else "set it in scheduler.params")
        raise ConfigError(f"scheduler {name} needs {what}: {note}")
    return kwargs
