"""Sharding plans: which module becomes which tensor-parallel layer.

A :class:`TPPlan` maps module names to a :class:`Style` and records the head counts of every
attention module (:class:`AttentionHeads`), which :func:`~ds_parallel.apply.apply_plan` needs to
keep the model's own attention code working on a rank's heads. :func:`find_plan` builds one from, in
order of precedence:

1. user overrides, name patterns to style names (DeepSpeed's ``partition_config`` idea);
2. a Hugging Face model's own plan (``config.base_model_tp_plan`` and the model's ``_tp_plan``), its
   style names translated; a fused projection that plan leaves gathered (Phi-3's
   ``colwise_gather_output`` on ``qkv_proj``) is split per part instead;
3. the module structure: attention modules (separate or fused Q/K/V and an output projection), MLPs
   (up/gate and down projections), the token embedding and the output head — by the names the
   Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2, OPT, Falcon and BLOOM families use, and for plain
   ``nn.Module`` s by the same names or by shape (a module whose linear children feed its last one).

Style names accepted in overrides and Hugging Face plans: ``colwise``, ``rowwise``,
``colwise_gather_output`` (alias ``colwise_rep``, ``gather``), ``rowwise_split_input`` (alias
``rowwise_rep``), ``embedding_rowwise`` (alias ``vocab``), ``packed_colwise`` (a fused gate/up
projection), ``replicated_with_grad_allreduce`` (alias ``partial_grad``: replicated, gradient summed
over the tensor group), ``replicate`` (aliases ``local``, ``skip``, ``sequence_parallel``).
``local_colwise`` / ``local_rowwise`` (older transformers) mean ``colwise`` / ``rowwise``.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field, replace

from torch import nn

from ds_core.errors import ConfigError, closest

from .layers import is_conv1d
from .shards import GroupedQKV, KVHeads, Part, VocabPart

__all__ = ["Style", "AttentionHeads", "TPPlan", "find_plan", "STYLE_NAMES"]

KINDS = ("colwise", "rowwise", "vocab_embedding", "replicate", "partial_grad")


@dataclass(frozen=True)
class Style:
    """What one module becomes.

    ``colwise``: :class:`~ds_parallel.layers.ColumnParallelLinear` with output ``parts`` (empty: one
    even part) and ``gather_output``; ``rowwise``: :class:`~ds_parallel.layers.RowParallelLinear`
    keeping whole ``unit`` s of input (``split_input``: its input arrives replicated);
    ``vocab_embedding``: :class:`~ds_parallel.layers.VocabParallelEmbedding`; ``replicate``: left
    as is; ``partial_grad``: left as is, its parameters' gradients summed over the tensor group.
    """

    kind: str
    parts: tuple = ()
    gather_output: bool = False
    split_input: bool = False
    unit: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"style kind {self.kind!r} is not one of {', '.join(KINDS)}")

    def describe(self) -> str:
        extra = []
        if self.parts:
            extra.append("parts=" + "+".join(f"{type(p).__name__}({p.size})" for p in self.parts))
        if self.gather_output:
            extra.append("gather_output")
        if self.split_input:
            extra.append("split_input")
        if self.unit != 1:
            extra.append(f"unit={self.unit}")
        return self.kind + (f"[{', '.join(extra)}]" if extra else "")


STYLE_NAMES = {
    "colwise": Style("colwise"),
    "local_colwise": Style("colwise"),
    "colwise_gather_output": Style("colwise", gather_output=True),
    "colwise_rep": Style("colwise", gather_output=True),
    "gather": Style("colwise", gather_output=True),
    "rowwise": Style("rowwise"),
    "local_rowwise": Style("rowwise"),
    "rowwise_split_input": Style("rowwise", split_input=True),
    "rowwise_rep": Style("rowwise", split_input=True),
    "embedding_rowwise": Style("vocab_embedding"),
    "vocab": Style("vocab_embedding"),
    "packed_colwise": Style("colwise"),  # parts filled in from the module's size (two halves)
    "replicated_with_grad_allreduce": Style("partial_grad"),
    "partial_grad": Style("partial_grad"),
    "replicate": Style("replicate"),
    "local": Style("replicate"),
    "skip": Style("replicate"),
    "sequence_parallel": Style("replicate"),  # the sequence stays whole on every tensor rank here
}


@dataclass(frozen=True)
class AttentionHeads:
    """Head counts of one attention module (``alibi``: its caller passes per-head ALiBi biases)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    alibi: bool = False


@dataclass
class TPPlan:
    """Module name -> :class:`Style`, plus the attention modules' head counts."""

    styles: dict[str, Style] = field(default_factory=dict)
    attention: dict[str, AttentionHeads] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # module name -> where its style came from

    def describe(self) -> dict:
        return {"styles": {k: v.describe() for k, v in sorted(self.styles.items())},
                "attention": {k: vars(v) for k, v in sorted(self.attention.items())},
                "sources": dict(sorted(self.sources.items()))}

    def __str__(self) -> str:
        return json.dumps(self.describe(), indent=1)


# -- names the supported families use ------------------------------------------------------------

Q_K_V = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("wq", "wk", "wv"),
         ("q_lin", "k_lin", "v_lin"))
FUSED_QKV = ("qkv_proj", "c_attn", "query_key_value", "qkv", "Wqkv", "W_pack", "in_proj")
ATTN_OUT = ("o_proj", "out_proj", "dense", "c_proj", "proj", "wo", "out_lin", "o")
MLP_UP = ("gate_proj", "up_proj", "fc1", "c_fc", "dense_h_to_4h", "w1", "w3", "up", "gate", "fc_in",
          "wi", "wi_0", "wi_1", "lin1")
MLP_FUSED_UP = ("gate_up_proj",)
MLP_DOWN = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "down", "fc_out", "wo", "lin2")
HEAD_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm")
EMBED_NAMES = ("embed_tokens", "wte", "word_embeddings", "tok", "tok_embeddings", "embed", "token_embedding",
               "embed_in")
HEAD_NAMES = ("lm_head", "head", "output", "embed_out")
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads")


def _is_linear(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear) or (m is not None and is_conv1d(m))


def _dims(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    w = m.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(m) else (w.shape[1], w.shape[0])


def _child(module: nn.Module, name: str) -> nn.Module | None:
    return module._modules.get(name)


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config()
        except Exception:  # configs without a text part answer for themselves
            return cfg
    return cfg


def _first_attr(obj, names):
    for n in names:
        value = getattr(obj, n, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


# -- attention -------------------------------------------------------------------------------------

def _heads(name: str, module: nn.Module, cfg, q_size: int | None) -> tuple[int, int, int]:
    """(heads, kv heads, head_dim) of an attention module, from the module, then the model config."""
    h = _first_attr(module, HEAD_ATTRS) or _first_attr(cfg, ("num_attention_heads", "n_head"))
    if cfg is not None and getattr(cfg, "model_type", None) == "falcon":
        kv = (cfg.num_kv_heads if (cfg.new_decoder_architecture or not cfg.multi_query) else 1)
    else:
        kv = _first_attr(module, ("num_key_value_heads", "n_kv_heads", "kv_heads")) \
            or _first_attr(cfg, ("num_key_value_heads",))
        if kv is None and getattr(module, "num_key_value_groups", None) and h:
            kv = h // module.num_key_value_groups
    kv = kv or h
    hd = _first_attr(module, ("head_dim",)) or _first_attr(cfg, ("head_dim",))
    if h is None:
        raise ConfigError(f"attention module {name!r}: cannot find its number of heads (no attribute "
                          f"{'/'.join(HEAD_ATTRS)} and no model config); give the plan explicitly with "
                          f"find_plan(..., overrides=...) or set one of those attributes")
    if hd is None and q_size is not None:
        hd = q_size // h
    return h, kv, hd


def _fused_parts(name: str, fused: nn.Module, module: nn.Module, cfg, h: int, kv: int, hd: int):
    """Output parts of a fused QKV projection, from the family's layout."""
    out = _dims(fused)[1]
    mtype = getattr(cfg, "model_type", None)
    if mtype == "falcon" and cfg.new_decoder_architecture:
        return (GroupedQKV(kv, h // kv, hd, name),)
    if mtype in ("bloom",) or (mtype == "falcon" and not cfg.multi_query):
        # [heads][q, k, v][head_dim]: whole heads (3 * head_dim rows each) per rank
        return (Part(out, 3 * hd, name),)
    if out == (h + 2 * kv) * hd:  # [q | k | v] (GPT-2, Phi-3, Falcon multi-query, plain modules)
        return (Part(h * hd, hd, f"{name} (queries)"), KVHeads(kv, hd, h, f"{name} (keys)"),
                KVHeads(kv, hd, h, f"{name} (values)"))
    raise ConfigError(f"fused projection {name!r} has {out} outputs, which is not (heads {h} + 2 × kv heads "
                      f"{kv}) × head_dim {hd}; give its parts with an override or keep it replicated")


def _attention(name: str, module: nn.Module, cfg, plan: TPPlan) -> bool:
    """Plan an attention module if it has Q/K/V (separate or fused) and an output projection."""
    out_name = next((n for n in ATTN_OUT if _is_linear(_child(module, n))), None)
    if out_name is None:
        return False
    separate = next((names for names in Q_K_V if all(_is_linear(_child(module, n)) for n in names)), None)
    fused = next((n for n in FUSED_QKV if _is_linear(_child(module, n))), None)
    if separate is None and fused is None:
        return False
    prefix = f"{name}." if name else ""
    o_in = _dims(_child(module, out_name))[0]
    q_size = _dims(_child(module, separate[0]))[1] if separate else None
    if fused is not None and q_size is None:
        q_size = o_in
    h, kv, hd = _heads(name, module, cfg, q_size)
    if separate:
        q, k, v = separate
        plan.styles[prefix + q] = Style("colwise", (Part(h * hd, hd, f"{prefix}{q} (query heads)"),))
        for n in (k, v):
            plan.styles[prefix + n] = Style("colwise", (KVHeads(kv, hd, h, f"{prefix}{n} (key/value heads)"),))
    else:
        plan.styles[prefix + fused] = Style("colwise", _fused_parts(prefix + fused, _child(module, fused), module,
                                                                      cfg, h, kv, hd))
    plan.styles[prefix + out_name] = Style("rowwise", unit=hd)
    for norm in HEAD_NORMS:
        if _child(module, norm) is not None and any(p.requires_grad for p in _child(module, norm).parameters()):
            plan.styles[prefix + norm] = Style("partial_grad")
    alibi = bool(getattr(cfg, "alibi", False)) or getattr(cfg, "model_type", None) == "bloom"
    plan.attention[name] = AttentionHeads(h, kv, hd, alibi)
    for key in [prefix + n for n in (separate or (fused,))] + [prefix + out_name]:
        plan.sources[key] = "structure"
    return True


def _mlp(name: str, module: nn.Module, plan: TPPlan) -> bool:
    prefix = f"{name}." if name else ""
    downs = [n for n in MLP_DOWN if _is_linear(_child(module, n))]
    fused = [n for n in MLP_FUSED_UP if _is_linear(_child(module, n))]
    ups = [n for n in MLP_UP if _is_linear(_child(module, n)) and n not in downs]
    if not downs or not (ups or fused):
        return False
    down = downs[0]
    width = _dims(_child(module, down))[0]
    for n in ups:
        if _dims(_child(module, n))[1] != width:
            return False
    for n in fused:
        out = _dims(_child(module, n))[1]
        if out != 2 * width:
            raise ConfigError(f"fused projection {prefix}{n} has {out} outputs, not 2 × {width} (the input of "
                              f"{prefix}{down}); keep it replicated with an override")
        plan.styles[prefix + n] = Style("colwise", (Part(width, 1, f"{prefix}{n} (gate)"),
                                                    Part(width, 1, f"{prefix}{n} (up)")))
    for n in ups:
        plan.styles[prefix + n] = Style("colwise")
    plan.styles[prefix + down] = Style("rowwise")
    for n in ups + fused + [down]:
        plan.sources[prefix + n] = "structure"
    return True


def _by_shape(name: str, module: nn.Module, plan: TPPlan) -> None:
    """Plain modules: linear children that all feed the last one (whose input they match) form a block."""
    linears = [(n, m) for n, m in module._modules.items() if _is_linear(m)]
    if len(linears) < 2:
        return
    prefix = f"{name}." if name else ""
    *firsts, (last, last_m) = linears
    width = _dims(last_m)[0]
    if any(prefix + n in plan.styles for n, _ in linears):
        return
    if not all(_dims(m)[1] == width for _, m in firsts):
        return
    for n, _ in firsts:
        plan.styles[prefix + n] = Style("colwise")
        plan.sources[prefix + n] = "shape"
    plan.styles[prefix + last] = Style("rowwise")
    plan.sources[prefix + last] = "shape"


def _embeddings(model: nn.Module, plan: TPPlan, vocab_parallel_head: bool) -> None:
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    emb = head = None
    if hasattr(model, "get_input_embeddings"):
        try:
            emb = model.get_input_embeddings()
            head = model.get_output_embeddings()
        except (NotImplementedError, AttributeError):
            emb = head = None
    if emb is None:
        emb = next((m for n, m in modules.items() if isinstance(m, nn.Embedding)
                    and n.rsplit(".", 1)[-1] in EMBED_NAMES), None)
    if head is None:
        vocab = emb.weight.shape[0] if emb is not None else None
        head = next((m for n, m in modules.items() if _is_linear(m) and n.rsplit(".", 1)[-1] in HEAD_NAMES
                     and (vocab is None or _dims(m)[1] == vocab)), None)
    if emb is not None and isinstance(emb, nn.Embedding) and id(emb) in names:
        plan.styles[names[id(emb)]] = Style("vocab_embedding")
        plan.sources[names[id(emb)]] = "structure"
    if head is not None and _is_linear(head) and id(head) in names:
        vocab = _dims(head)[1]
        plan.styles[names[id(head)]] = Style("colwise", (VocabPart(vocab, "output head vocabulary"),),
                                             gather_output=not vocab_parallel_head)
        plan.sources[names[id(head)]] = "structure"


# -- Hugging Face plans and overrides -------------------------------------------------------------

def hf_tp_plan(model: nn.Module) -> dict[str, str]:
    """The model's own plan with full module names: ``config.base_model_tp_plan`` under the base model's
    prefix, plus the head model's ``_tp_plan`` (empty when the model has none)."""
    cfg = _text_config(model)
    base = getattr(cfg, "base_model_tp_plan", None) or {}
    out: dict[str, str] = {}
    prefix = getattr(model, "base_model_prefix", "")
    has_base = bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module)
    for key, style in base.items():
        out[f"{prefix}.{key}" if has_base else key] = style
    for key, style in (getattr(model, "_tp_plan", None) or {}).items():
        out.setdefault(key, style)
    return out


def _expand(pattern: str, names: list[str]) -> list[str]:
    """Module names matching a plan key: ``*`` matches any run of characters (a layer index); a key may
    also name a module by its trailing components (``mlp.down_proj`` matches ``model.layers.0.mlp.down_proj``)."""
    hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        hits = [n for n in names if fnmatch.fnmatchcase(n, "*." + pattern)]
    return hits


def _style_of(value, where: str) -> Style:
    if isinstance(value, Style):
        return value
    if isinstance(value, str) and value in STYLE_NAMES:
        return STYLE_NAMES[value]
    raise ConfigError(f"{where}: style {value!r} is not known{closest(str(value), STYLE_NAMES)}; use one of "
                      f"{', '.join(sorted(STYLE_NAMES))}")


def _refine(found: Style | None, given: Style, module: nn.Module) -> Style:
    """A style named in a plan, with the parts structure found (heads, fused parts) kept."""
    if given.kind == "colwise":
        if found is not None and found.kind == "colwise":
            return replace(found, gather_output=given.gather_output)
        if _is_linear(module) and given is STYLE_NAMES.get("packed_colwise"):
            width = _dims(module)[1] // 2
            return Style("colwise", (Part(width, 1, "gate"), Part(width, 1, "up")))
        return given
    if given.kind == "rowwise" and found is not None and found.kind == "rowwise":
        return replace(found, split_input=given.split_input)
    return given


def find_plan(model: nn.Module, overrides: dict | None = None, *, use_hf_plan: bool = True,
              vocab_parallel_head: bool = False, shard_embeddings: bool = True, keep_found: bool = True) -> TPPlan:
    """The sharding plan of ``model`` (see the module docstring for the sources and their order).

    ``overrides``: ``{name pattern: style name or Style}``; a pattern matching no module is an
    error. ``vocab_parallel_head=True`` leaves the output head's logits split over the vocabulary
    (use :func:`~ds_parallel.loss.vocab_parallel_cross_entropy`); the default gathers them so the
    model's own loss works. ``shard_embeddings=False`` keeps the embedding and head replicated.
    ``keep_found=False`` keeps only the modules the overrides name (their heads and parts as found).
    """
    cfg = _text_config(model)
    plan = TPPlan()
    attention_modules: set[str] = set()
    for name, module in model.named_modules():
        if _attention(name, module, cfg, plan):
            attention_modules.add(name)
    for name, module in model.named_modules():
        if name not in attention_modules:
            _mlp(name, module, plan)
    if cfg is None:  # plain modules only: Hugging Face models are covered by names and their own plans
        for name, module in model.named_modules():
            if name not in attention_modules:
                _by_shape(name, module, plan)
    if shard_embeddings:
        _embeddings(model, plan, vocab_parallel_head)
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    if use_hf_plan:
        # Where the structure found a module, its split stands (it knows the heads and fused parts; for
        # the families above it agrees with the model's plan, except that fused projections are split
        # per part rather than gathered); the model's plan adds the modules the structure did not find.
        for key, value in hf_tp_plan(model).items():
            style = _style_of(value, f"the model's tp_plan entry {key!r}")
            for n in _expand(key, names):
                if n not in plan.styles:
                    plan.styles[n] = _refine(None, style, modules[n])
                plan.sources[n] = "hf_tp_plan" if plan.sources.get(n) != "structure" else "hf_tp_plan+structure"
    for pattern, value in (overrides or {}).items():
        style = _style_of(value, f"tp_plan override {pattern!r}")
        hits = _expand(pattern, names)
        if not hits:
            raise ConfigError(f"tp_plan override {pattern!r} names no module of {type(model).__name__}"
                              f"{closest(pattern, names)}; module names look like "
                              f"{', '.join(names[:3])}, ...; '*' matches any layer index")
        for n in hits:
            plan.styles[n] = _refine(plan.styles.get(n), style, modules[n])
            plan.sources[n] = "override"
    if not keep_found:
        plan.styles = {n: s for n, s in plan.styles.items() if plan.sources.get(n) == "override"}
    _drop_replicated(plan)
    return plan


def _drop_replicated(plan: TPPlan) -> None:
    for n in [n for n, s in plan.styles.items() if s.kind == "replicate"]:
        del plan.styles[n]
    live = {n.rsplit(".", 1)[0] if "." in n else "" for n, s in plan.styles.items() if s.kind == "colwise"}
    for att in [a for a in plan.attention if a not in live]:
        del plan.attention[att]  # an attention module kept whole keeps its heads
