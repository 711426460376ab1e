"""The serving engine: requests in, a scheduled ragged forward per step, tokens and text out.

:class:`LLMEngine` ties the pieces together — the block manager and scheduler (who runs, with which
blocks), the model runner (one forward over the paged KV cache), the sampler (each request's own
parameters) and the detokenizer (text, stop strings). It is synchronous and single-threaded:
``add_request`` / ``abort`` / ``step`` are called by one thread (the offline :class:`~ds_infer.LLM`
loop, or the server's engine thread). Each ``step`` returns what every touched choice gained.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ds_core.errors import ConfigError

from .block_manager import BlockManager
from .config import ServingConfig
from .kv_cache import PagedKVCache
from .outputs import CompletionOutput, RequestOutput, SequenceUpdate
from .runner import ModelRunner, StepPlan
from .sampler import Sampler
from .sampling_params import RequestError, SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence, SequenceStatus
from .tokenizer import IncrementalDetokenizer

__all__ = ["LLMEngine", "EngineObserver", "plan_kv_cache"]

_CPU_KV_DEFAULT = 1 << 30


class EngineObserver:
    """Hooks the engine calls from its thread (the server's metrics implement them); all optional."""

    def on_step(self, num_tokens: int, num_sampled: int, seconds: float) -> None: ...
    def on_first_token(self, seq: Sequence, ttft: float) -> None: ...
    def on_token(self, seq: Sequence, itl: float) -> None: ...
    def on_finish(self, seq: Sequence, e2e: float) -> None: ...


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]


def plan_kv_cache(spec, config: ServingConfig, max_position: int) -> tuple[int, int]:
    """``(num_blocks, max_model_len)`` for a model whose per-rank KV is described by ``spec``."""
    bytes_per_block = spec.bytes_per_token() * config.block_size
    max_len = config.max_model_len or max_position
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    else:
        budget = config.kv_memory
        if budget is None:
            if spec.device.type == "cuda":  # free memory after loading, less room for activations
                free, total = torch.cuda.mem_get_info(spec.device)
                budget = max(free - max(1 << 30, total // 10), 0)
            else:  # enough for every running request at full length, at most 1 GiB
                budget = min(_CPU_KV_DEFAULT, config.max_num_seqs * max_len * spec.bytes_per_token())
        num_blocks = budget // bytes_per_block
    capacity = num_blocks * config.block_size
    if num_blocks < 1:
        raise ConfigError(f"kv_memory={config.kv_memory} bytes holds no KV block ({bytes_per_block} bytes each "
                          f"for this model at block_size={config.block_size}); raise kv_memory")
    if config.max_model_len is not None and config.max_model_len > capacity:
        raise ConfigError(f"max_model_len={config.max_model_len} tokens does not fit the KV cache, which holds "
                          f"{capacity} tokens ({num_blocks} blocks of {config.block_size}); raise kv_memory or "
                          "lower max_model_len (one request must always fit, or the engine could stall)")
    if config.max_model_len is not None and config.max_model_len > max_position:
        raise ConfigError(f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings "
                          f"{max_position}; lower it")
    return num_blocks, min(max_len, capacity)


def _eos_ids(model_dir: str | Path | None, tokenizer, arch) -> tuple[int, ...]:
    ids: list[int] = []

    def extend(value):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list | tuple):
            ids.extend(v for v in value if isinstance(v, int))

    extend(getattr(tokenizer, "eos_token_id", None))
    extend(getattr(arch, "eos_token_id", None))
    if model_dir is not None:
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            try:
                extend(json.loads(gen.read_text()).get("eos_token_id"))
            except ValueError:
                pass
    return tuple(dict.fromkeys(ids))


class LLMEngine:
    """Continuous-batching generation over a paged KV cache (see the module docstring)."""

    def __init__(self, model, tokenizer, config: ServingConfig | None = None, *, model_dir: str | Path | None = None,
                 executor=None, clock=time.monotonic, observer: EngineObserver | None = None) -> None:  # fmt: skip
        self.config = config = config or ServingConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.clock = clock
        self.observer = observer or EngineObserver()
        arch = model.arch
        self.vocab_size = arch.vocab_size
        spec = model.kv_spec()
        num_blocks, self.max_model_len = plan_kv_cache(spec, config, arch.max_position_embeddings)
        self.block_manager = BlockManager(num_blocks, config.block_size, watermark=config.watermark,
                                          enable_prefix_caching=config.enable_prefix_caching)  # fmt: skip
        bytes_per_block = spec.bytes_per_token() * config.block_size
        self.scheduler = Scheduler(self.block_manager, max_num_tokens=config.max_num_tokens,
                                   max_num_seqs=config.max_num_seqs, preemption_mode=config.preemption_mode,
                                   swap_capacity_blocks=config.swap_space // bytes_per_block)  # fmt: skip
        use_op = config.attention_backend == "ds_ops" or (
            config.attention_backend == "auto" and spec.device.type == "cuda" and _has_op())
        if executor is None:
            cache = PagedKVCache(spec.num_layers, num_blocks, config.block_size, spec.num_kv_heads, spec.head_dim,
                                 spec.dtype, spec.device)  # fmt: skip
            executor = ModelRunner(model, cache, use_op=use_op)
        self.executor = executor
        self.sampler = Sampler(config.seed)
        self.eos_token_ids = _eos_ids(model_dir, tokenizer, arch)
        self.requests: dict[str, _Request] = {}
        self._drop_swapped: list[int] = []
        self._ids = itertools.count()
        self.num_steps = 0

    # --- requests -------------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("prompt", "this engine has no tokenizer; pass token ids instead of text")
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def check_prompt(self, token_ids: list[int], params: SamplingParams, field: str = "prompt") -> int:
        """Validate a prompt against the context; returns the output budget (max_tokens capped)."""
        n = len(token_ids)
        if n == 0:
            raise RequestError(field, f"{field} is empty; give at least one token")
        if n >= self.max_model_len:
            raise RequestError(field, f"{field} has {n} tokens but the context holds {self.max_model_len} "
                                      "(prompt + output); shorten the prompt")  # fmt: skip
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(field, f"{field} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        room = self.max_model_len - n
        if params.max_tokens is not None and params.max_tokens > room:
            raise RequestError("max_tokens", f"max_tokens={params.max_tokens} + {n} prompt tokens exceed the "
                                             f"context of {self.max_model_len} tokens; ask for at most {room}")
        return room if params.max_tokens is None else params.max_tokens

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    *, arrival_time: float | None = None, timeout: float | None = None) -> str:  # fmt: skip
        """Queue a request (text or token ids); ``n > 1`` queues that many choices. Returns its id."""
        params = params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise RequestError("request_id", f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = self.check_prompt(token_ids, params)
        now = self.clock() if arrival_time is None else arrival_time
        timeout = self.config.request_timeout if timeout is None else timeout
        deadline = None if timeout is None else now + timeout
        seqs = []
        for i in range(params.n):
            p = params.for_choice(i) if params.n > 1 else params
            seq = Sequence(request_id, token_ids, p, arrival_time=now, eos_token_ids=self.eos_token_ids,
                           deadline=deadline, index=i, max_tokens=max_tokens)  # fmt: skip
            if p.seed is not None:
                seq.generator = torch.Generator().manual_seed(p.seed)
            if self.tokenizer is not None:
                seq.detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=p.skip_special_tokens,
                                                   stop=p.stop_strings,
                                                   include_stop_str_in_output=p.include_stop_str_in_output)
            seqs.append(seq)
        self.requests[request_id] = _Request(request_id, text, token_ids, seqs)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str, reason: str = "abort") -> list[SequenceUpdate]:
        """Stop a request now: its blocks are freed before the next forward. Unknown ids are ignored."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        return [self._finish(seq, reason) for seq in req.seqs if not seq.is_finished]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def output(self, request_id: str) -> RequestOutput:
        req = self.requests[request_id]
        outs = []
        for seq in req.seqs:
            text = seq.detok.text if seq.detok is not None else ""
            outs.append(CompletionOutput(seq.index, text, seq.output_token_ids, seq.finish_reason, seq.stop_reason))
        cached = req.seqs[0].num_prefix_hit_tokens
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, cached)

    def release(self, request_id: str) -> RequestOutput | None:
        """The final output of a finished request, forgetting it (the server calls this once done)."""
        if request_id not in self.requests:
            return None
        out = self.output(request_id)
        if out.finished:
            del self.requests[request_id]
        return out

    # --- the step -------------------------------------------------------------------------------

    def _expire(self) -> list[SequenceUpdate]:
        now = self.clock()
        sched = self.scheduler
        late = [s for s in (*sched.running, *sched.waiting, *sched.swapped) if s.deadline is not None and now >= s.deadline]
        return [self._finish(seq, "timeout") for seq in late]

    def _plan(self, out: SchedulerOutput) -> tuple[StepPlan, list[Sequence]]:
        plan = StepPlan()
        plan.drop_swapped, self._drop_swapped = self._drop_swapped, []
        plan.swap_out = [(seq.seq_id, blocks) for seq, blocks in out.swap_out]
        plan.swap_in = [(seq.seq_id, blocks) for seq, blocks in out.swap_in]
        sampled = []
        row = 0
        for seq, n in out.scheduled:
            start = seq.num_computed_tokens
            plan.input_ids.extend(seq.token_ids[start:start + n])
            plan.chunks.append((list(seq.block_ids), start, n))
            row += n
            if start + n == seq.num_tokens:  # reaches the end of what is known: sample the next token
                plan.sample_rows.append(row - 1)
                sampled.append(seq)
        return plan, sampled

    def step(self) -> list[SequenceUpdate]:
        """One scheduled forward; returns what every choice that moved (or ended) gained."""
        updates = self._expire()
        out = self.scheduler.schedule()
        if out.is_empty and not out.swap_out and not out.swap_in:
            return updates
        start = time.perf_counter()
        plan, sampled = self._plan(out)
        logits = self.executor.execute(plan)
        tokens = self.sampler(logits, sampled) if sampled else []
        now = self.clock()
        for seq, n in out.scheduled:
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
        for seq, token in zip(sampled, tokens):
            updates.append(self._append(seq, token, now))
        self.num_steps += 1
        self.observer.on_step(out.num_tokens, len(sampled), time.perf_counter() - start)
        return updates

    def _append(self, seq: Sequence, token: int, now: float) -> SequenceUpdate:
        seq.append_token(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.observer.on_first_token(seq, now - seq.arrival_time)
        else:
            self.observer.on_token(seq, now - seq.last_token_time)
        seq.last_token_time = now
        p = seq.params
        reason = stop = None
        past_min = seq.num_output_tokens >= p.min_tokens
        if past_min and not p.ignore_eos and token in seq.eos_token_ids:
            reason = "stop"
        elif past_min and token in p.stop_token_ids:
            reason, stop = "stop", token
        elif seq.detok is not None and seq.detok.add(token, check_stop=past_min):
            reason, stop = "stop", seq.detok.stop_reason
        if reason is None and (seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            seq.stop_reason = stop
            return self._finish(seq, reason, new_tokens=[token])
        return self._update(seq, [token])

    def _update(self, seq: Sequence, new_tokens: list[int]) -> SequenceUpdate:
        delta = ""
        if seq.detok is not None:
            end = seq.detok.safe_length(seq.is_finished)
            delta = seq.detok.text[seq.text_sent:end]
            seq.text_sent = max(seq.text_sent, end)
        return SequenceUpdate(seq.request_id, seq.index, delta, new_tokens, seq.finish_reason, seq.stop_reason,
                              seq.num_prompt_tokens, seq.num_output_tokens, seq.num_prefix_hit_tokens)  # fmt: skip

    def _finish(self, seq: Sequence, reason: str, new_tokens: list[int] | None = None) -> SequenceUpdate:
        if seq.status is SequenceStatus.SWAPPED:
            self._drop_swapped.append(seq.seq_id)
        self.scheduler.finish(seq, reason)
        if seq.detok is not None:
            seq.detok.finish()  # flushes a held-back partial character unless a stop string cut the text
        self.observer.on_finish(seq, self.clock() - seq.arrival_time)
        return self._update(seq, new_tokens or [])

    def reset_prefix_cache(self) -> int:
        """Drop the cached blocks no request uses (e.g. between benchmark rounds); call it from the
        thread that steps the engine. Returns the number of blocks dropped."""
        return self.block_manager.reset_prefix_cache()

    # --- introspection --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        bm, sched = self.block_manager, self.scheduler
        return {
            "waiting": sched.num_waiting,
            "running": sched.num_running,
            "swapped": sched.num_swapped,
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_usage": bm.usage,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "preemptions": sched.num_preemptions,
            "steps": self.num_steps,
        }


def _has_op() -> bool:
    from ds_core.ops import has_op

    return has_op("paged_attention")
