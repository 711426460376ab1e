"""``ds serve MODEL_DIR``: an OpenAI-compatible server for a model directory.

    pip install 'ds-infer[serve]'
    ds serve ./my-model --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "my-model", "prompt": "Hello", "max_tokens": 16}'

``--tp N`` starts N - 1 worker processes for tensor parallelism (rank 0 serves HTTP); under a
launcher that already started N ranks (``RANK``/``WORLD_SIZE`` set), each rank joins instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from .config import ServingConfig

    fields = ServingConfig.model_fields

    def about(name: str) -> str:
        return (fields[name].description or "").replace("%", "%%")

    p = argparse.ArgumentParser(prog="ds serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_DIR", help="a save_pretrained directory (config.json, *.safetensors, "
                                                     "tokenizer files)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel ranks (default 1)")
    p.add_argument("--api-key", default=os.environ.get("DS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DS_API_KEY, else none)")
    p.add_argument("--served-model-name", help="the model name clients send (default: the directory's name)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: MODEL_DIR)")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template replacing the tokenizer's")
    p.add_argument("--dtype", help="compute dtype: float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--quant", help="quantize weights on load: int8, int4")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-num-tokens", type=int, help=about("max_num_tokens"))
    p.add_argument("--max-num-seqs", type=int, help=about("max_num_seqs"))
    p.add_argument("--kv-memory", metavar="M", help=about("kv_memory"))
    p.add_argument("--num-kv-blocks", type=int, help=about("num_kv_blocks"))
    p.add_argument("--block-size", type=int, help=about("block_size"))
    p.add_argument("--max-model-len", type=int, help=about("max_model_len"))
    p.add_argument("--max-queue-size", type=int, help=about("max_queue_size"))
    p.add_argument("--request-timeout", type=float, help=about("request_timeout"))
    p.add_argument("--preemption-mode", choices=["recompute", "swap"], help=about("preemption_mode"))
    p.add_argument("--swap-space", metavar="M", help=about("swap_space"))
    p.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    p.add_argument("--attention-backend", choices=["auto", "torch", "ds_ops"], help=about("attention_backend"))
    p.add_argument("--seed", type=int, help=about("seed"))
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(args) -> dict:
    keys = ["max_num_tokens", "max_num_seqs", "kv_memory", "num_kv_blocks", "block_size", "max_model_len",
            "max_queue_size", "request_timeout", "preemption_mode", "swap_space", "attention_backend", "seed"]
    options = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    return options


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        print("ds serve: needs FastAPI and uvicorn: pip install 'ds-infer[serve]'", file=sys.stderr)
        return 2
    from .api_server import build_app
    from .async_engine import AsyncEngine
    from .config import ServingConfig
    from .engine import LLMEngine
    from .llm import build_engine
    from .metrics import ServerMetrics

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        print(f"ds serve: {model_dir} is not a directory; give a save_pretrained model directory", file=sys.stderr)
        return 2
    config = ServingConfig.build(**config_from_args(args))
    if args.tp > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ds_core.comm import init_distributed

        init_distributed()  # launched: every rank runs `ds serve`; rank 0 serves HTTP
    chat_template = Path(args.chat_template).read_text() if args.chat_template else None
    metrics = ServerMetrics()
    engine = build_engine(model_dir, tokenizer=args.tokenizer, tensor_parallel_size=args.tp, dtype=args.dtype,
                          quant=args.quant, device=args.device, config=config, observer=metrics)
    if not isinstance(engine, LLMEngine):  # a worker rank
        engine.serve_forever()
        return 0
    name = args.served_model_name or model_dir.resolve().name
    async_engine = AsyncEngine(engine, max_queue_size=config.max_queue_size)
    async_engine.start()
    app = build_app(async_engine, model_name=name, api_key=args.api_key, metrics=metrics, chat_template=chat_template)
    bm = engine.block_manager
    print(f"ds serve: {name} on http://{args.host}:{args.port}/v1 — KV cache {bm.num_blocks} blocks x "
          f"{bm.block_size} tokens, max_model_len {engine.max_model_len}, tp {args.tp}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="off")
    finally:
        async_engine.shutdown()
    return 0
