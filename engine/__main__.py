"""Command line: `python -m engine demo-model|generate ...`.

Bad input (not a checkpoint, an inconsistent config, a tensor of the wrong shape, a
truncated file) prints one `error:` line and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from engine.model import CheckpointError, ModelConfig
from engine.model.fp4_experts import ExpertQuantization

EXIT_BAD_INPUT = 2
CPU_KV_CACHE_GIB = 1.0  # --kv-cache-memory's default on the CPU
GPU_MEMORY_UTILIZATION = 0.9  # --gpu-memory-utilization's default


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
    _parallel_args(gen)
    _serve_args(sub.add_parser("serve", help="serve the model over gRPC"))
    from engine.plan import add_plan_arguments
    add_plan_arguments(sub.add_parser("plan", help="will a layout fit? weights, KV cache and collectives per rank"))
    return p


def _parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (one process per rank; torch.distributed: NCCL on GPUs, gloo on CPUs)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split attention heads, dense MLPs and the vocabulary over N ranks")
    g.add_argument("--data-parallel-size", type=int, default=1, metavar="M",
                   help="M data-parallel attention groups, each with its own batch and KV cache")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="whole routed experts per rank, over all N x M ranks (default: every expert split)")
    g.add_argument("--moe-dispatch", default="auto", metavar="{auto,allgather,alltoall}",
                   help="how tokens reach other ranks' experts (auto: alltoall with expert parallelism)")
    g.add_argument("--nnodes", type=int, default=1, help="nodes the ranks are spread over (one command per node)")
    g.add_argument("--node-rank", type=int, default=0, help="this node's index; node 0 serves gRPC")
    g.add_argument("--master-addr", default="127.0.0.1", help="node 0's address, where the ranks meet")
    g.add_argument("--master-port", type=int, default=29500)
    g.add_argument("--collective-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a collective that takes longer (a rank died or hung) stops the engine")
    g.add_argument("--rendezvous-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long the ranks wait for each other at start")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--served-model-name", default="", help="the model name clients see (default: the directory name)")
    p.add_argument("--max-model-len", type=int, default=0, help="context length (default: the model's, capped by the cache)")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                   help=f"KV cache per rank in GiB; when given it wins over --gpu-memory-utilization "
                        f"(default on CUDA: sized by it; on the CPU: {CPU_KV_CACHE_GIB:g} GiB)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help=f"CUDA only: the share of each GPU's memory the engine may take (default "
                        f"{GPU_MEMORY_UTILIZATION:g}); after loading, a step at the largest batch "
                        f"(--max-num-batched-tokens over --max-num-seqs) is profiled and the KV cache gets what "
                        f"is left of F. Not on the CPU, whose memory other processes and ranks share: there "
                        f"--kv-cache-memory sizes the cache")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests before RESOURCE_EXHAUSTED")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    # No argparse `choices`: an unknown value is bad input like any other (one error line, exit 2).
    p.add_argument("--kv-cache-dtype", default="auto", metavar="{auto,fp8_e4m3}",
                   help="the latent KV cache: the model dtype, or FP8 e4m3 with a per-tensor scale (half bf16's bytes)")
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
    _parallel_args(p)


def _quantization_arg(p: argparse.ArgumentParser) -> None:
    # No argparse `choices`: an unknown value is bad input like any other (one error line, exit 2).
    p.add_argument("--quantization", default=None, metavar="{nvfp4,mxfp4}",
                   help="quantize the routed experts to FP4 at load (an NVFP4 checkpoint needs none)")


def _demo_model(args: argparse.Namespace) -> None:
    from engine.demo import build_demo_model
    print(f"demo model written to {build_demo_model(args.out)}")


def _generate(args: argparse.Namespace) -> int | None:
    from engine.offline import GenerateJob, generate_on_rank, print_generation
    from engine.tokenizer import Tokenizer

    if args.max_tokens < 1:
        raise CheckpointError("--max-tokens must be at least 1")
    parallel = _parallel_config(args)
    job = GenerateJob(str(args.model), [], args.max_tokens, args.temperature, args.seed, -1, args.dtype, args.device,
                      args.quantization, args.moe_dispatch)
    # one process: the weights load first, so that a bad checkpoint is what the error names
    model = None if parallel.parallel else job.load()
    try:
        tok = Tokenizer.from_dir(args.model)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    if args.chat:
        prompt = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = [tok.bos_id] + tok.encode(args.prompt)
    job = replace(job, prompt=prompt, eos_id=tok.eos_id)
    if parallel.parallel:  # every rank runs the generation in step; rank 0 prints it
        from engine.distributed.launch import run_node
        ExpertQuantization.parse(args.quantization)
        ModelConfig.from_dir(args.model)  # a bad checkpoint is named before any rank starts
        return run_node(parallel, generate_on_rank, (job, parallel))
    print_generation(tok, prompt, job.run(model))


def _parallel_config(args: argparse.Namespace):
    """The layout from the flags, or from torchrun's environment when torchrun started us."""
    from engine.distributed import ParallelConfig

    env = os.environ
    torchrun = all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
    try:
        layout = dict(tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
                      enable_expert_parallel=args.enable_expert_parallel,
                      collective_timeout=args.collective_timeout, rendezvous_timeout=args.rendezvous_timeout)
        if not torchrun:
            return ParallelConfig(**layout, nnodes=args.nnodes, node_rank=args.node_rank,
                                  master_addr=args.master_addr, master_port=args.master_port)
        world, local = int(env["WORLD_SIZE"]), int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        cfg = ParallelConfig(**layout, nnodes=max(1, world // local), node_rank=int(env["RANK"]) // local,
                             master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]), torchrun=True)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if cfg.world_size != world:
        raise CheckpointError(f"--tensor-parallel-size x --data-parallel-size ({cfg.world_size}) must equal "
                              f"torchrun's world size ({world})")
    return cfg


def _check_devices(parallel, device: str) -> None:
    """More ranks on a node than it has GPUs is bad input (on the CPU ranks share the cores)."""
    if device != "cuda":
        return
    import torch
    have = torch.cuda.device_count()
    if parallel.ranks_per_node > have:
        raise CheckpointError(f"--tensor-parallel-size x --data-parallel-size / --nnodes asks for "
                              f"{parallel.ranks_per_node} GPUs on this node, which has {have}")


def _kv_cache_memory(args: argparse.Namespace, device: str) -> tuple[float | None, float]:
    """(--kv-cache-memory in GiB, or None to size the cache from the utilization; the utilization)."""
    utilization = GPU_MEMORY_UTILIZATION if args.gpu_memory_utilization is None else args.gpu_memory_utilization
    if not 0 < utilization <= 1:
        raise CheckpointError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    if args.kv_cache_memory is not None or device == "cuda":
        return args.kv_cache_memory, utilization
    if args.gpu_memory_utilization is not None:
        raise CheckpointError("--gpu-memory-utilization sizes the KV cache from a GPU's memory; "
                              "on the CPU give --kv-cache-memory GIB")
    return CPU_KV_CACHE_GIB, utilization


def _check_plan(args: argparse.Namespace, parallel, device: str) -> None:
    """Refuses, before anything is loaded, a layout whose weights and KV cache cannot fit a
    device (engine.plan, the numbers `python -m engine plan` prints). Without --kv-cache-memory
    the cache is what the weights leave of the utilization, and must hold --max-model-len
    (without it, one block: the engine then serves the context that its cache holds)."""
    import torch

    from engine.distributed.launch import device_memory_gib
    from engine.loader import resolve_dtype
    from engine.plan import Layout, plan_layout

    cfg = ModelConfig.from_dir(args.model)
    dtype = resolve_dtype(args.dtype, cfg, torch.device(device))
    kv_gib, utilization = _kv_cache_memory(args, device)
    if kv_gib is None:
        context = args.max_model_len or max(1, min(args.block_size, cfg.max_position_embeddings))
    else:  # the context the engine serves: --max-model-len, else the model's capped by the cache
        value_bytes = 1 if args.kv_cache_dtype == "fp8_e4m3" else dtype.itemsize
        kv_tokens = int(kv_gib * 2**30) // (cfg.num_hidden_layers * cfg.kv_cache_dim * value_bytes)
        context = args.max_model_len or max(1, min(cfg.max_position_embeddings, kv_tokens))
    layout = Layout(parallel.tensor_parallel_size, parallel.data_parallel_size, parallel.enable_expert_parallel)
    plan = plan_layout(cfg, layout, device_memory_gib(device, parallel.ranks_per_node),
                       utilization=utilization, dtype=str(dtype).removeprefix("torch."),
                       quantization=args.quantization, max_model_len=context, kv_cache_gib=kv_gib,
                       kv_cache_dtype=args.kv_cache_dtype, device=device)
    if not plan.fits:
        raise CheckpointError(f"this layout does not fit: {plan.reason}")


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from engine.async_engine import EngineStartError
    from engine.engine_process import ServeConfig
    from engine.server import serve
    from engine.tokenizer import Tokenizer
    from moeserve.obs.logs import configure_logging
    from moeserve.obs.tracing import setup_tracing

    configure_logging("INFO", args.log_format)
    ModelConfig.from_dir(args.model)  # a bad checkpoint fails here, before the engine process starts
    parallel = _parallel_config(args)
    device = _device(args.device)
    _check_devices(parallel, device)
    _check_plan(args, parallel, device)
    kv_gib, utilization = _kv_cache_memory(args, device)
    try:
        cfg = ServeConfig(str(args.model), args.host, args.port, args.dtype, device,
                          args.served_model_name, args.max_model_len, kv_gib, args.max_num_seqs,
                          args.max_num_batched_tokens, args.max_waiting, args.block_size,
                          str(args.chat_template) if args.chat_template else None, not args.no_prefix_caching,
                          args.quantization, args.metrics_port, drain_timeout=args.drain_timeout,
                          log_format=args.log_format, enforce_eager=args.enforce_eager, parallel=parallel,
                          moe_dispatch=args.moe_dispatch, gpu_memory_utilization=utilization,
                          kv_cache_dtype=args.kv_cache_dtype)
        if not parallel.is_head_node or (parallel.torchrun and int(os.environ["RANK"]) != 0):
            return _serve_other_ranks(cfg)
        tokenizer = Tokenizer.from_dir(args.model, args.chat_template)
        setup_tracing("moeserve-engine", os.environ)  # off unless OTEL_* configures it
        return asyncio.run(serve(cfg, tokenizer))
    except (ValueError, FileNotFoundError, EngineStartError) as exc:
        raise CheckpointError(str(exc)) from None


def _serve_other_ranks(cfg) -> int:
    """A node other than the head (or, under torchrun, a rank other than 0): runs this
    node's ranks, which follow rank 0, until they stop; non-zero when one fails."""
    from engine.distributed.launch import run_node
    from engine.engine_process import node_rank_main

    if cfg.parallel.torchrun:
        node_rank_main(int(os.environ["RANK"]), cfg)
        return 0
    print(f"engine node {cfg.parallel.node_rank} running ranks {cfg.parallel.node_ranks().start}.."
          f"{cfg.parallel.node_ranks().stop - 1} of {cfg.parallel.world_size}", flush=True)
    return run_node(cfg.parallel, node_rank_main, (cfg,))


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _plan(args: argparse.Namespace) -> int:
    from engine.plan import run_plan
    return run_plan(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = {"demo-model": _demo_model, "generate": _generate, "serve": _serve, "plan": _plan}[args.command](args)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
