"""Command line: `python -m engine demo-model|generate ...`.

Bad input (not a checkpoint, an inconsistent config, a tensor of the wrong shape, a
truncated file) prints one `error:` line and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.model import CheckpointError

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description="moeserve engine")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo-model", help="write the small random-weight demo checkpoint")
    demo.add_argument("--out", type=Path, required=True, help="directory to write")
    gen = sub.add_parser("generate", help="generate a continuation offline")
    gen.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    gen.add_argument("--device", default="cpu")
    _quantization_arg(gen)
    _serve_args(sub.add_parser("serve", help="serve the model over gRPC"))
    return p


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--served-model-name", default="", help="the model name clients see (default: the directory name)")
    p.add_argument("--max-model-len", type=int, default=0, help="context length (default: the model's, capped by the cache)")
    p.add_argument("--kv-cache-memory", type=float, default=1.0, metavar="GIB", help="KV cache size in GiB")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests before RESOURCE_EXHAUSTED")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--chat-template", type=Path, help="a Jinja chat template file replacing the checkpoint's")
    p.add_argument("--no-prefix-caching", action="store_true")
    _quantization_arg(p)
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; 0 picks a free port)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps eagerly (no CUDA graphs; they are recorded by default on CUDA)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long requests in flight may run on before they are aborted")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: one JSON object per line, with the request id")


def _quantization_arg(p: argparse.ArgumentParser) -> None:
    # No argparse `choices`: an unknown value is bad input like any other (one error line, exit 2).
    p.add_argument("--quantization", default=None, metavar="{nvfp4,mxfp4}",
                   help="quantize the routed experts to FP4 at load (an NVFP4 checkpoint needs none)")


def _demo_model(args: argparse.Namespace) -> None:
    from engine.demo import build_demo_model
    print(f"demo model written to {build_demo_model(args.out)}")


def _generate(args: argparse.Namespace) -> None:
    from engine.loader import load_model
    from engine.offline import generate
    from engine.tokenizer import Tokenizer

    if args.max_tokens < 1:
        raise CheckpointError("--max-tokens must be at least 1")
    model = load_model(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization)
    try:
        tok = Tokenizer.from_dir(args.model)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    if args.chat:
        prompt = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = [tok.bos_id] + tok.encode(args.prompt)
    result = generate(model, prompt, args.max_tokens, args.temperature, args.seed, frozenset({tok.eos_id}))
    print(tok.decode(result.token_ids, skip_special_tokens=True))
    print(f"[{len(prompt)} prompt tokens, {len(result.token_ids)} generated; prefill "
          f"{len(prompt) / result.prefill_seconds:.1f} tok/s, decode {result.decode_tokens_per_second:.1f} tok/s]",
          file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from engine.async_engine import EngineStartError
    from engine.engine_process import ServeConfig
    from engine.model import ModelConfig
    from engine.server import serve
    from engine.tokenizer import Tokenizer
    from moeserve.obs.logs import configure_logging
    from moeserve.obs.tracing import setup_tracing

    configure_logging("INFO", args.log_format)
    ModelConfig.from_dir(args.model)  # a bad checkpoint fails here, before the engine process starts
    try:
        cfg = ServeConfig(str(args.model), args.host, args.port, args.dtype, _device(args.device),
                          args.served_model_name, args.max_model_len, args.kv_cache_memory, args.max_num_seqs,
                          args.max_num_batched_tokens, args.max_waiting, args.block_size,
                          str(args.chat_template) if args.chat_template else None, not args.no_prefix_caching,
                          args.quantization, args.metrics_port, drain_timeout=args.drain_timeout,
                          log_format=args.log_format, enforce_eager=args.enforce_eager)
        tokenizer = Tokenizer.from_dir(args.model, args.chat_template)
        setup_tracing("moeserve-engine", os.environ)  # off unless OTEL_* configures it
        return asyncio.run(serve(cfg, tokenizer))
    except (ValueError, FileNotFoundError, EngineStartError) as exc:
        raise CheckpointError(str(exc)) from None


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = {"demo-model": _demo_model, "generate": _generate, "serve": _serve}[args.command](args)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
