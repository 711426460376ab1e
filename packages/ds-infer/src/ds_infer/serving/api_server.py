"""The OpenAI-compatible HTTP server: FastAPI routes over the :class:`AsyncEngine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).

Robustness rules, each answered without touching the requests already running:

- malformed body, unknown model, a bad field value, a prompt too long for the context: 400 with
  OpenAI's error body, ``param`` naming the field;
- a wrong or missing API key (when the server has one): 401;
- admission queue full: 429 with ``Retry-After`` (seconds);
- the client goes away: the request is aborted and its KV blocks freed before the next forward;
- a request older than ``request_timeout``: aborted; 408 (or an error event when streaming);
- a forward that fails (a bug, out of memory): the requests in flight get 500 (or an error event),
  their blocks are freed, and the server goes on serving.

This module needs the ``serve`` extra (``pip install 'ds-infer[serve]'``: FastAPI and uvicorn).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestFailedError
from .metrics import ServerMetrics
from .outputs import SequenceUpdate
from .protocol import ChatCompletionRequest, CompletionRequest, error_body, now, random_id
from .sampling_params import RequestError
from .tokenizer import render_chat

__all__ = ["build_app", "ServerHandle", "start_server", "free_port"]

log = logging.getLogger("ds_infer.serving")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.type, self.headers = status, param, type, headers


@dataclass
class _Choice:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None


@dataclass
class _Sub:
    """One prompt of a request, as one engine request."""

    request_id: str
    prompt_ids: list[int]
    prompt_text: str | None
    stream: Any = None
    choices: list[_Choice] = field(default_factory=list)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None):
    return JSONResponse(data, status_code=status, headers=headers)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(engine: AsyncEngine, *, model_name: str, api_key: str | None = None,
              metrics: ServerMetrics | None = None, chat_template: str | None = None):  # fmt: skip
    """The FastAPI application serving ``engine`` under ``model_name``."""
    app = FastAPI(title="ds serve", docs_url=None, redoc_url=None)
    metrics = metrics or ServerMetrics()
    llm = engine.engine
    tokenizer = llm.tokenizer
    created = now()
    timeout = llm.config.request_timeout

    @app.exception_handler(HTTPError)
    async def _http_error(request, exc: HTTPError):
        return _json(error_body(str(exc), type=exc.type, param=exc.param, code=exc.status), exc.status, exc.headers)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                            type="authentication_error")  # fmt: skip

    async def parse(request: Request, model_cls):
        from pydantic import ValidationError

        raw = await request.body()
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise HTTPError(400, f"the request body is not valid JSON ({exc})", param="body") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "the request body must be a JSON object", param="body")
        try:
            body = model_cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = [str(p) for p in err["loc"]] or ["body"]
            raise HTTPError(400, f"{'.'.join(loc)}: {err['msg']}", param=loc[0]) from None
        if body.model != model_name:
            raise HTTPError(400, f"model {body.model!r} is not served here; this server serves {model_name!r} "
                                 "(GET /v1/models)", param="model")  # fmt: skip
        return body

    def params_of(body):
        try:
            return body.sampling_params()
        except RequestError as exc:
            raise HTTPError(400, str(exc), param=exc.field) from None

    def checked(prompt_ids: list[int], params, field: str) -> None:
        try:
            llm.check_prompt(prompt_ids, params, field)
        except RequestError as exc:
            raise HTTPError(400, str(exc), param=exc.field) from None

    def retry_after() -> int:
        rate = metrics.finish_rate()
        waiting = len(llm.scheduler.waiting)
        return 1 if rate <= 0 else max(1, min(60, math.ceil(waiting / rate)))

    engine.retry_after = lambda waiting: retry_after()

    def submit(subs: list[_Sub], params, arrival: float) -> None:
        try:
            for sub in subs:
                sub.stream = engine.submit(sub.request_id, sub.prompt_ids, params, arrival)
                sub.choices = [_Choice() for _ in range(params.n)]
        except QueueFullError as exc:
            for sub in subs:
                if sub.stream is not None:
                    engine.abort(sub.request_id)
            metrics.on_reject("queue_full")
            raise HTTPError(429, f"the server is at capacity: {exc}", type="rate_limit_error",
                            headers={"Retry-After": str(exc.retry_after)}) from None
        except EngineDeadError as exc:
            raise HTTPError(503, str(exc), type="server_error") from None

    async def merged(subs: list[_Sub]) -> AsyncIterator[tuple[int, SequenceUpdate]]:
        """Updates of every sub-request, as they come; aborts all when left early."""
        if len(subs) == 1:
            async for update in engine.updates(subs[0].request_id, subs[0].stream):
                yield 0, update
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, sub: _Sub) -> None:
            try:
                async for update in engine.updates(sub.request_id, sub.stream):
                    await queue.put((i, update))
            except BaseException as exc:
                await queue.put((i, exc))
                raise
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, sub)) for i, sub in enumerate(subs)]
        open_subs = len(subs)
        try:
            while open_subs:
                i, item = await queue.get()
                if item is None:
                    open_subs -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            for sub in subs:
                engine.abort(sub.request_id)

    async def until_disconnect(request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def collect(request: Request, subs: list[_Sub]) -> None:
        """Run the sub-requests to the end, or abort them if the client disconnects first."""

        async def consume():
            async for i, update in merged(subs):
                choice = subs[i].choices[update.index]
                choice.text += update.text_delta
                choice.tokens = update.num_output_tokens
                if update.finish_reason is not None:
                    choice.finish_reason = update.finish_reason

        work = asyncio.create_task(consume())
        gone = asyncio.create_task(until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()  # the generator's cleanup aborts every sub-request
                try:
                    await work
                except asyncio.CancelledError:
                    pass
            gone.cancel()
        if work.cancelled():
            return
        exc = work.exception()
        if isinstance(exc, EngineDeadError):
            raise HTTPError(503, str(exc), type="server_error")
        if isinstance(exc, RequestFailedError):
            raise HTTPError(500, str(exc), type="server_error")
        if exc is not None:
            raise exc

    def timeout_error() -> HTTPError:
        return HTTPError(408, f"the request took longer than the server's request_timeout of {timeout} s and was "
                              "aborted", type="timeout_error")  # fmt: skip

    def usage(subs: list[_Sub]) -> dict[str, int]:
        prompt = sum(len(s.prompt_ids) for s in subs)
        completion = sum(c.tokens for s in subs for c in s.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # --- routes ---------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not engine.alive:
            return _json({"status": "dead", "error": repr(engine.error)}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "ds", "max_model_len": llm.max_model_len}]}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body = await parse(request, CompletionRequest)
        params = params_of(body)
        try:
            prompts = body.prompts()
        except RequestError as exc:
            raise HTTPError(400, str(exc), param=exc.field) from None
        rid = random_id("cmpl")
        subs = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
                text = prompt
            elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                ids, text = prompt, None
            else:
                raise HTTPError(400, "prompt must be a string, a list of strings, a list of token ids, or a "
                                     "list of such lists", param="prompt")  # fmt: skip
            checked(ids, params, "prompt")
            subs.append(_Sub(f"{rid}-{i}", ids, text))
        submit(subs, params, time.monotonic())

        def echo(sub: _Sub) -> str:
            if not body.echo:
                return ""
            return sub.prompt_text if sub.prompt_text is not None else tokenizer.decode(sub.prompt_ids)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events():
                base = {"id": rid, "object": "text_completion", "created": now(), "model": model_name}
                echoed = set()
                try:
                    async for i, update in merged(subs):
                        sub = subs[i]
                        choice = sub.choices[update.index]
                        choice.tokens = update.num_output_tokens
                        if update.finish_reason == "timeout":
                            err = timeout_error()
                            yield _sse(error_body(str(err), type=err.type, code=408))
                            return
                        text = update.text_delta
                        if (i, update.index) not in echoed:
                            echoed.add((i, update.index))
                            text = echo(sub) + text
                        if not text and update.finish_reason is None:
                            continue
                        reason = update.finish_reason
                        yield _sse({**base, "choices": [{"index": i * params.n + update.index, "text": text,
                                                         "logprobs": None, "finish_reason": reason,
                                                         "stop_reason": update.stop_reason}]})  # fmt: skip
                    if include_usage:
                        yield _sse({**base, "choices": [], "usage": usage(subs)})
                    yield "data: [DONE]\n\n"
                except (EngineDeadError, RequestFailedError) as exc:
                    yield _sse(error_body(str(exc), type="server_error", code=500))

            return StreamingResponse(events(), media_type="text/event-stream")

        await collect(request, subs)
        if any(c.finish_reason == "timeout" for s in subs for c in s.choices):
            raise timeout_error()
        choices = [{"index": i * params.n + j, "text": echo(sub) + c.text, "logprobs": None,
                    "finish_reason": c.finish_reason}
                   for i, sub in enumerate(subs) for j, c in enumerate(sub.choices)]  # fmt: skip
        return {"id": rid, "object": "text_completion", "created": now(), "model": model_name,
                "choices": choices, "usage": usage(subs)}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await parse(request, ChatCompletionRequest)
        params = params_of(body)
        try:
            text = render_chat(tokenizer, body.template_messages(), add_generation_prompt=body.add_generation_prompt,
                               chat_template=chat_template, **(body.chat_template_kwargs or {}))  # fmt: skip
        except RequestError as exc:
            raise HTTPError(400, str(exc), param=exc.field) from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        checked(ids, params, "messages")
        rid = random_id("chatcmpl")
        subs = [_Sub(rid, ids, text)]
        submit(subs, params, time.monotonic())

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events():
                base = {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": model_name}
                started = set()
                try:
                    async for _, update in merged(subs):
                        subs[0].choices[update.index].tokens = update.num_output_tokens
                        if update.finish_reason == "timeout":
                            err = timeout_error()
                            yield _sse(error_body(str(err), type=err.type, code=408))
                            return
                        if update.index not in started:
                            started.add(update.index)
                            yield _sse({**base, "choices": [{"index": update.index, "logprobs": None,
                                                             "delta": {"role": "assistant", "content": ""},
                                                             "finish_reason": None}]})  # fmt: skip
                        if update.text_delta:
                            yield _sse({**base, "choices": [{"index": update.index, "logprobs": None,
                                                             "delta": {"content": update.text_delta},
                                                             "finish_reason": None}]})  # fmt: skip
                        if update.finish_reason is not None:
                            yield _sse({**base, "choices": [{"index": update.index, "logprobs": None, "delta": {},
                                                             "finish_reason": update.finish_reason,
                                                             "stop_reason": update.stop_reason}]})  # fmt: skip
                    if include_usage:
                        yield _sse({**base, "choices": [], "usage": usage(subs)})
                    yield "data: [DONE]\n\n"
                except (EngineDeadError, RequestFailedError) as exc:
                    yield _sse(error_body(str(exc), type="server_error", code=500))

            return StreamingResponse(events(), media_type="text/event-stream")

        await collect(request, subs)
        if any(c.finish_reason == "timeout" for c in subs[0].choices):
            raise timeout_error()
        choices = [{"index": j, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason} for j, c in enumerate(subs[0].choices)]
        return {"id": rid, "object": "chat.completion", "created": now(), "model": model_name, "choices": choices,
                "usage": usage(subs)}  # fmt: skip

    app.state.engine = engine
    app.state.metrics = metrics
    return app


# --- running it -----------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerHandle:
    """A server running on a background thread (tests, benchmarks, notebooks); ``stop()`` ends it."""

    def __init__(self, server, thread: threading.Thread, engine: AsyncEngine, host: str, port: int) -> None:
        self.server, self.thread, self.engine = server, thread, engine
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.engine.shutdown(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(llm_engine, *, model_name: str, host: str = "127.0.0.1", port: int | None = None,
                 api_key: str | None = None, chat_template: str | None = None,
                 log_level: str = "warning") -> ServerHandle:  # fmt: skip
    """Serve an :class:`~ds_infer.serving.engine.LLMEngine` on a background thread; returns once it listens."""
    import uvicorn

    metrics = llm_engine.observer if isinstance(llm_engine.observer, ServerMetrics) else ServerMetrics()
    llm_engine.observer = metrics
    engine = AsyncEngine(llm_engine, max_queue_size=llm_engine.config.max_queue_size)
    engine.start()
    app = build_app(engine, model_name=model_name, api_key=api_key, metrics=metrics, chat_template=chat_template)
    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="ds-serve-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            engine.shutdown()
            raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.01)
    return ServerHandle(server, thread, engine, host, port)
