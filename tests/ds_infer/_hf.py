"""Tiny random Hugging Face models built from configs (no downloads), shared by the ds_infer tests."""

from __future__ import annotations

import torch

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, num_attention_heads=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", COMMON),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(COMMON, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(COMMON, sliding_window=7)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                  n_positions=256, bos_token_id=0, eos_token_id=0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(COMMON, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(COMMON, num_experts=4, num_experts_per_tok=2,
                                                                 moe_intermediate_size=32,
                                                                 shared_expert_intermediate_size=48)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(COMMON, head_dim=16, num_experts=4,
                                                                 num_experts_per_tok=2, moe_intermediate_size=32,
                                                                 norm_topk_prob=True)),
}


def make(name: str, seed: int = 0, init_std: float = 0.2, **overrides):
    """A random ``name`` model in eval mode; a wide init so next-token logits are far from ties."""
    import transformers

    config_cls, model_cls, kwargs = SPECS[name]
    config = getattr(transformers, config_cls)(**{**kwargs, "initializer_range": init_std, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


def prompts(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
