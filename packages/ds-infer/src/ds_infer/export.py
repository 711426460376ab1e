"""Writing a native model back out as a Hugging Face ``save_pretrained`` directory.

``save_pretrained(model, out_dir)`` writes ``config.json`` and ``model.safetensors`` with the names
and layouts ``transformers`` uses (fused q/k/v and gate/up split back into their projections,
GPT-2's ``Conv1D`` weights transposed, MoE experts one tensor each), so the directory loads with
``load_model``, ``ds serve`` or ``AutoModelForCausalLM.from_pretrained``. ds' own GPT (the example's
model) is exactly a GPT-2 with exact GELU, and is written as one.

Only a whole (``tp = 1``), unquantized, in-memory model can be written: a quantized one would need
the ds-quant writer of ds-compress.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from ds_core.errors import ConfigError

from .models.base import CausalLM
from .models.layers import DENSE_LINEARS, SparseMoE

__all__ = ["save_pretrained", "hf_config", "save_byte_tokenizer"]


def hf_config(model: CausalLM) -> dict[str, Any]:
    """The ``config.json`` of ``model``: its own Hugging Face config, or GPT-2's for ds' GPT."""
    a = model.arch
    if a.hf_config:
        config = dict(a.hf_config)
    else:  # ds_core.testing.models.GPT: a GPT-2 with exact GELU and tied embeddings
        config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": a.vocab_size,
                  "n_embd": a.hidden_size, "n_layer": a.num_layers, "n_head": a.num_heads,
                  "n_positions": a.max_position_embeddings, "n_inner": a.intermediate_size,
                  "activation_function": a.act, "layer_norm_epsilon": a.norm_eps, "tie_word_embeddings": True,
                  "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": None,
                  "eos_token_id": None}
    config["torch_dtype"] = config["dtype"] = str(model.dtype).removeprefix("torch.")
    return config


def _dense(module: nn.Module, what: str) -> Tensor:
    if type(module) not in DENSE_LINEARS:
        raise ConfigError(f"save_pretrained: {what} is a {type(module).__name__}; only dense (unquantized) models "
                          "can be written as a Hugging Face directory")
    return module.weight.detach()


def _llama_tensors(model: CausalLM) -> dict[str, Tensor]:
    a = model.arch
    out: dict[str, Tensor] = {"model.embed_tokens.weight": model.model.embed_tokens.weight,
                              "model.norm.weight": model.model.norm.weight}
    d = a.head_dim
    split = [a.num_heads * d, a.num_kv_heads * d, a.num_kv_heads * d]
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        out[f"{p}.input_layernorm.weight"] = layer.input_layernorm.weight
        out[f"{p}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        for name, w in zip(("q_proj", "k_proj", "v_proj"), _dense(attn.qkv_proj, f"{p} qkv").split(split)):
            out[f"{p}.self_attn.{name}.weight"] = w
        if attn.qkv_proj.bias is not None:
            for name, b in zip(("q_proj", "k_proj", "v_proj"), attn.qkv_proj.bias.split(split)):
                out[f"{p}.self_attn.{name}.bias"] = b
        out[f"{p}.self_attn.o_proj.weight"] = _dense(attn.o_proj, f"{p} o_proj")
        if attn.o_proj.bias is not None:
            out[f"{p}.self_attn.o_proj.bias"] = attn.o_proj.bias
        if attn.q_norm is not None:
            out[f"{p}.self_attn.q_norm.weight"] = attn.q_norm.weight
            out[f"{p}.self_attn.k_norm.weight"] = attn.k_norm.weight
        mlp = layer.mlp
        if isinstance(mlp, SparseMoE):
            mixtral = a.model_type == "mixtral"
            base = f"{p}.block_sparse_moe" if mixtral else f"{p}.mlp"
            out[f"{base}.gate.weight"] = mlp.gate.weight
            names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
            for e in range(mlp.num_experts):
                gate, up = mlp.gate_up[e].chunk(2)
                out[f"{base}.experts.{e}.{names[0]}.weight"] = gate
                out[f"{base}.experts.{e}.{names[1]}.weight"] = up
                out[f"{base}.experts.{e}.{names[2]}.weight"] = mlp.down[e]
            if mlp.shared_expert is not None:
                _gated(out, mlp.shared_expert, f"{p}.mlp.shared_expert")
                if mlp.shared_expert_gate is not None:
                    out[f"{p}.mlp.shared_expert_gate.weight"] = mlp.shared_expert_gate.weight
        else:
            _gated(out, mlp, f"{p}.mlp")
    if not a.tie_word_embeddings:
        out["lm_head.weight"] = _dense(model.lm_head, "lm_head")
    return out


def _gated(out: dict[str, Tensor], mlp: nn.Module, p: str) -> None:
    gate, up = _dense(mlp.gate_up_proj, f"{p} gate_up").chunk(2)
    out[f"{p}.gate_proj.weight"], out[f"{p}.up_proj.weight"] = gate, up
    out[f"{p}.down_proj.weight"] = _dense(mlp.down_proj, f"{p} down_proj")
    if mlp.gate_up_proj.bias is not None:
        gb, ub = mlp.gate_up_proj.bias.chunk(2)
        out[f"{p}.gate_proj.bias"], out[f"{p}.up_proj.bias"] = gb, ub
        out[f"{p}.down_proj.bias"] = mlp.down_proj.bias


def _gpt2_tensors(model: CausalLM) -> dict[str, Tensor]:
    t = model.transformer
    out = {"transformer.wte.weight": t.wte.weight, "transformer.wpe.weight": t.wpe.weight,
           "transformer.ln_f.weight": t.ln_f.weight, "transformer.ln_f.bias": t.ln_f.bias}
    for i, block in enumerate(t.h):
        p = f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            out[f"{p}.{ln}.weight"] = getattr(block, ln).weight
            out[f"{p}.{ln}.bias"] = getattr(block, ln).bias
        for src, dst in ((block.attn.qkv_proj, "attn.c_attn"), (block.attn.o_proj, "attn.c_proj"),
                         (block.mlp.c_fc, "mlp.c_fc"), (block.mlp.c_proj, "mlp.c_proj")):
            out[f"{p}.{dst}.weight"] = _dense(src, f"{p}.{dst}").t()  # Conv1D stores [in, out]
            out[f"{p}.{dst}.bias"] = src.bias
    if not model.arch.tie_word_embeddings:
        out["lm_head.weight"] = _dense(model.lm_head, "lm_head")
    return out


def save_pretrained(model: Any, out_dir: str | Path) -> Path:
    """Write ``model`` (a native model or an :class:`~ds_infer.InferenceEngine` holding one) as a
    Hugging Face directory; returns its path."""
    model = getattr(model, "module", model)
    if not isinstance(model, CausalLM):
        raise ConfigError(f"save_pretrained writes ds_infer's native models; got {type(model).__name__} (a "
                          "transformers model has its own save_pretrained)")
    if model.par.size > 1:
        raise ConfigError("save_pretrained: this model is split over tensor-parallel ranks; write it from a tp=1 "
                          "engine (each rank holds only its slices)")
    if getattr(model, "offload", None) is not None:
        raise ConfigError("save_pretrained: this model's layers are streamed (ZeRO-Inference); write it from an "
                          "engine without zero offload")
    tensors = _gpt2_tensors(model) if model.arch.family == "gpt2" else _llama_tensors(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model), indent=2, default=str) + "\n")
    return out



def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (printable Latin-1 bytes stand for themselves, the
    others take the code points from 256 on), so a byte-level BPE can hold raw bytes."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def save_byte_tokenizer(out_dir: str | Path) -> Path:
    """Write a tokenizer whose token ids are the UTF-8 bytes (ids 0-255): the tokenizer of a byte-level
    model such as the example's GPT, so ``ds serve`` and ``AutoTokenizer`` can use its directory.
    Needs ``tokenizers`` and ``transformers`` (``pip install ds-infer[hf]``)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError as exc:
        raise ConfigError(f"save_byte_tokenizer needs tokenizers and transformers ({exc}); "
                          "pip install 'ds-infer[hf]'") from exc
    chars = _byte_chars()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    out = Path(out_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)
    return out
