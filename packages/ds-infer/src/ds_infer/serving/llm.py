"""``ds_infer.LLM``: offline batched generation with the serving engine, in vLLM's shape.

    from ds_infer import LLM, SamplingParams

    llm = LLM("path/to/model")                      # a save_pretrained directory with its tokenizer
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)

Every prompt is queued at once and the engine runs them with continuous batching over the paged KV
cache; outputs come back in prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from .config import ServingConfig
from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .tokenizer import load_tokenizer, render_chat

__all__ = ["LLM"]

Prompt = str | list[int] | dict[str, Any]


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_engine(model: str | Path, *, tokenizer: str | Path | None = None, tensor_parallel_size: int = 1,
                 dtype: Any = None, quant: Any = None, device: Any = None, trust_remote_code: bool = False,
                 config: ServingConfig | None = None, observer=None) -> LLMEngine:  # fmt: skip
    """Load the model and tokenizer of ``model`` (a directory) and build an engine around them."""
    from ..models import load_model

    config = config or ServingConfig()
    tok = load_tokenizer(model, tokenizer, trust_remote_code=trust_remote_code)
    if tensor_parallel_size > 1:
        from .distributed import build_distributed_engine

        return build_distributed_engine(model, tok, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                                        quant=quant, device=device, config=config, observer=observer)
    net = load_model(model, dtype=dtype, quant=quant, device=device or default_device())
    return LLMEngine(net, tok, config, model_dir=model, observer=observer)


class LLM:
    """A model ready to generate: ``LLM(model_dir, tensor_parallel_size=1, dtype=None, quant=None, **options)``.

    ``options`` are :class:`~ds_infer.serving.config.ServingConfig` fields (``max_num_tokens``,
    ``kv_memory``, ``enable_prefix_caching``, ...).
    """

    def __init__(self, model: str | Path, *, tokenizer: str | Path | None = None, tensor_parallel_size: int = 1,
                 dtype: Any = None, quant: Any = None, device: Any = None, trust_remote_code: bool = False,
                 **options: Any) -> None:  # fmt: skip
        self.config = ServingConfig.build(**options)
        engine = build_engine(model, tokenizer=tokenizer, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                              quant=quant, device=device, trust_remote_code=trust_remote_code, config=self.config)
        # on a worker rank of a launched tensor-parallel run there is no engine, only a follower
        self.engine = engine if isinstance(engine, LLMEngine) else None
        self._follower = None if self.engine is not None else engine
        self._tokenizer = engine.tokenizer

    def get_tokenizer(self):
        return self._tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:  # fmt: skip
        """Generate for every prompt (text, token ids, or ``{"prompt_token_ids": [...]}`` / ``{"prompt": ...}``).

        In a launched tensor-parallel run every rank calls this; rank 0's prompts are the ones run and
        every rank returns rank 0's outputs.
        """
        if self._follower is not None:
            return self._follower.follow_batch()
        if isinstance(prompts, str | dict) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts; give one, or one each")
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                if isinstance(prompt, dict):
                    prompt = prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else prompt["prompt"]
                ids.append(engine.add_request(None, prompt, p))
            while engine.has_unfinished():
                engine.step()
        except BaseException:
            for rid in ids:
                engine.abort(rid)
                engine.release(rid)
            raise
        outputs = [engine.release(rid) for rid in ids]
        end_batch = getattr(engine.executor, "end_batch", None)
        if end_batch is not None:
            end_batch(outputs)
        return outputs

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, *, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:  # fmt: skip
        """Generate replies to one conversation or a list of them, through the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self._tokenizer
        prompts = []
        for conv in conversations:
            text = render_chat(tok, conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template)
            prompts.append(tok(text, add_special_tokens=False)["input_ids"])
        return self.generate(prompts, sampling_params)

    def close(self) -> None:
        """Stop tensor-parallel workers (a no-op for a single process). In a launched tensor-parallel
        run every rank calls it: rank 0 tells the others to stop, they return once told."""
        if self._follower is not None:
            self._follower.serve_forever()
            return
        close = getattr(self.engine.executor, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
