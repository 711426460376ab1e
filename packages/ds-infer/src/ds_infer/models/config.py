"""One architecture description for every model family we implement, read from a Hugging Face config.

:class:`ArchConfig` is built from a ``config.json`` dict (or a ``transformers`` config object) with
:func:`arch_from_hf`, so loading a ``save_pretrained`` directory needs no ``transformers`` import.
Missing keys take the defaults of the ``transformers`` config class of that ``model_type``; both the
current ``rope_parameters`` spelling and the older ``rope_theta`` + ``rope_scaling`` keys are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ds_core.errors import ConfigError

__all__ = ["ArchConfig", "RopeConfig", "MoEConfig", "arch_from_hf", "read_hf_config", "SUPPORTED_MODEL_TYPES"]

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "gpt2")

# default rope_theta per model_type (the transformers config classes' ``default_theta``)
_THETA = {"mixtral": 1e6}
_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding (Su et al. 2021, RoFormer) and its context-extension variants."""

    theta: float = 10000.0
    type: str = "default"
    dim: int = 0  # rotated channels per head (head_dim × partial_rotary_factor)
    params: dict[str, Any] = field(default_factory=dict)  # factor, low/high_freq_factor, beta_*, ...
    max_position_embeddings: int = 2048


@dataclass(frozen=True)
class MoEConfig:
    """A sparse MLP: ``num_experts`` SwiGLU experts, top-``top_k`` routing per token."""

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool = True
    shared_intermediate_size: int = 0  # Qwen2-MoE's always-on shared expert (0: none)
    shared_gate: bool = False  # its sigmoid gate
    sparse_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense MLP (False)


@dataclass(frozen=True)
class ArchConfig:
    """What our native implementations need to know about a model (see :mod:`ds_infer.models`)."""

    model_type: str
    family: str  # "llama" (RMSNorm, rotary, SwiGLU, optional MoE) or "gpt2" (LayerNorm, learned positions)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    act: str
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope: RopeConfig | None = None
    sliding_windows: tuple[int | None, ...] = ()
    attn_scales: tuple[float, ...] = ()
    moe: MoEConfig | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def with_(self, **changes: Any) -> ArchConfig:
        return replace(self, **changes)


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """``model_dir/config.json`` as a dict, with an error naming the directory when it is missing."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no config.json; a model directory is what "
                          "`save_pretrained(dir)` writes (config.json + *.safetensors)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-save the model with save_pretrained") from exc


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ConfigError(f"model config {type(config).__name__} is neither a dict nor a transformers config; "
                      "pass config.json's content or model.config")


def _rope(d: dict[str, Any], head_dim: int, max_pos: int) -> RopeConfig:
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{d.get('model_type')}: per-layer-type rope_parameters {sorted(params)} are not "
                          "supported; only one rotary scheme for every layer")
    theta = float(params.pop("rope_theta", d.get("rope_theta", _THETA.get(d.get("model_type"), 10000.0))))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "mrope":  # Qwen2-VL's multimodal layout is plain rotary for text-only positions
        rope_type = "default"
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(f"rope type {rope_type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}")
    partial = float(params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0)
    if rope_type in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings",
                          d.get("original_max_position_embeddings", max_pos))
    return RopeConfig(theta=theta, type=rope_type, dim=int(head_dim * partial), params=params,
                      max_position_embeddings=max_pos)


def _eos(d: dict[str, Any]) -> int | list[int] | None:
    eos = d.get("eos_token_id")
    return list(eos) if isinstance(eos, (list, tuple)) else eos


def arch_from_hf(config: Any) -> ArchConfig:
    """Describe a Hugging Face model config (dict or object) as an :class:`ArchConfig`.

    Raises :class:`~ds_core.errors.ConfigError` naming the model type when we have no implementation.
    """
    d = _as_dict(config)
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} has no native implementation in ds_infer; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}. Other models still run through "
                          "init_inference(model) with their own forward (no fused decode path)")
    if model_type == "gpt2":
        return _gpt2(d)
    return _llama_like(d, model_type)


def _gpt2(d: dict[str, Any]) -> ArchConfig:
    hidden = int(d.get("n_embd", d.get("hidden_size", 768)))
    heads = int(d.get("n_head", d.get("num_attention_heads", 12)))
    layers = int(d.get("n_layer", d.get("num_hidden_layers", 12)))
    head_dim = hidden // heads
    scale = head_dim**-0.5 if d.get("scale_attn_weights", True) else 1.0
    by_layer = bool(d.get("scale_attn_by_inverse_layer_idx", False))
    n_inner = d.get("n_inner")
    return ArchConfig(
        model_type="gpt2", family="gpt2",
        vocab_size=int(d.get("vocab_size", 50257)), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        intermediate_size=int(n_inner) if n_inner else 4 * hidden,
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        act=d.get("activation_function", "gelu_new"),
        max_position_embeddings=int(d.get("n_positions", d.get("max_position_embeddings", 1024))),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        qkv_bias=True, o_bias=True, mlp_bias=True,
        sliding_windows=(None,) * layers,
        attn_scales=tuple(scale / (i + 1) if by_layer else scale for i in range(layers)),
        bos_token_id=d.get("bos_token_id", 50256), eos_token_id=_eos(d) if "eos_token_id" in d else 50256,
        pad_token_id=d.get("pad_token_id"), torch_dtype=d.get("torch_dtype", d.get("dtype")), hf_config=d,
    )


def _llama_like(d: dict[str, Any], model_type: str) -> ArchConfig:
    hidden = int(d.get("hidden_size", 4096))
    heads = int(d.get("num_attention_heads", 32))
    layers = int(d.get("num_hidden_layers", 32))
    kv_heads = int(d.get("num_key_value_heads") or heads)
    head_dim = d.get("head_dim")
    if head_dim is None:  # Qwen3's config class defaults to 128; the others derive it
        head_dim = 128 if model_type in ("qwen3", "qwen3_moe") and "head_dim" not in d else hidden // heads
    head_dim = int(head_dim)
    max_pos = int(d.get("max_position_embeddings", 2048))
    if heads % kv_heads:
        raise ConfigError(f"{model_type}: num_attention_heads {heads} is not a multiple of "
                          f"num_key_value_heads {kv_heads}; grouped-query attention needs whole groups")

    # sliding windows: Mistral/Mixtral on every layer; Qwen on the layers its layer_types mark
    window = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        if not d.get("use_sliding_window", False):
            window = None
        layer_types = d.get("layer_types")
        if layer_types is None:
            max_window_layers = int(d.get("max_window_layers", layers))
            layer_types = ["sliding_attention" if window is not None and i >= max_window_layers
                           else "full_attention" for i in range(layers)]
        windows = tuple(int(window) if t == "sliding_attention" and window else None for t in layer_types)
    else:
        windows = (int(window) if window else None,) * layers

    moe = None
    if model_type == "mixtral":
        moe = MoEConfig(num_experts=int(d.get("num_local_experts", d.get("num_experts", 8))), top_k=int(d.get("num_experts_per_tok", 2)),
                        intermediate_size=int(d.get("intermediate_size", 14336)), norm_topk_prob=True,
                        sparse_layers=(True,) * layers)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        experts = int(d.get("num_experts", d.get("num_local_experts", 60 if model_type == "qwen2_moe" else 128)))
        step = int(d.get("decoder_sparse_step", 1))
        only_mlp = set(d.get("mlp_only_layers") or [])
        sparse = tuple(i not in only_mlp and experts > 0 and (i + 1) % step == 0 for i in range(layers))
        shared = int(d.get("shared_expert_intermediate_size", 0)) if model_type == "qwen2_moe" else 0
        moe = MoEConfig(num_experts=experts, top_k=int(d.get("num_experts_per_tok", 4 if model_type == "qwen2_moe" else 8)),
                        intermediate_size=int(d.get("moe_intermediate_size", 1408 if model_type == "qwen2_moe" else 768)),
                        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                        shared_intermediate_size=shared, shared_gate=shared > 0, sparse_layers=sparse)

    # biases as each transformers class builds them: Qwen2 biases q/k/v only, Mistral/Mixtral nothing,
    # Llama/Qwen3 follow attention_bias on all four projections
    attention_bias = bool(d.get("attention_bias", False)) and model_type not in ("mistral", "mixtral")
    if model_type in ("qwen2", "qwen2_moe"):
        qkv_bias, o_bias = bool(d.get("qkv_bias", True)), False
    else:
        qkv_bias = o_bias = attention_bias
    return ArchConfig(
        model_type=model_type, family="llama",
        vocab_size=int(d.get("vocab_size", 32000)), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=int(d.get("intermediate_size", 11008)),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)), act=d.get("hidden_act", "silu"),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias, o_bias=o_bias,
        mlp_bias=bool(d.get("mlp_bias", False)) and model_type == "llama",
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        rope=_rope(d, head_dim, max_pos), sliding_windows=windows,
        attn_scales=(head_dim**-0.5,) * layers, moe=moe,
        bos_token_id=d.get("bos_token_id"), eos_token_id=_eos(d), pad_token_id=d.get("pad_token_id"),
        torch_dtype=d.get("torch_dtype", d.get("dtype")), hf_config=d,
    )
