"""The fused MoE at decode batches, for every expert format, with DeepSeek-R1's routed-expert shapes.

    .venv/bin/python bench/fp4_moe.py [--experts E] [--batches 1,2,4] [--formats bf16,fp8,nvfp4,mxfp4] [--threads N]

On a CUDA GPU, per format (bf16, DeepSeek's block FP8, NVFP4, MXFP4) and batch: the time of
`fused_moe` (alignment, both fused kernels and the per-token sum); the bytes of the weights
and scales of the experts the batch touches over that time, as a share of the GPU's peak
memory bandwidth (a table by device name; a measured device copy is printed beside it); and
the speed-up over the fused kernel on bf16 experts in the same run (the issue's targets: 70%
of the peak at batch 1 for every format, FP8 1.8x and FP4 3x the bf16 speed at batches 1 to
16). For bf16 it also times the per-expert torch loop (`moe_reference`) that dense experts
ran before. Times are medians of triton.testing.do_bench, which flushes L2 between runs.
Each format's weights are built from the same random bf16 weights and freed before the next.

On the CPU, where the Triton kernels only run under the (slow) interpreter, it reports the
engine's CPU backends instead: the per-expert loops of kernels.moe_ref (bf16 weights as they
are, FP8 and FP4 ones dequantized per routed expert). The 256 R1 experts are 22 GB in bf16,
so the CPU run defaults to fewer experts of the same shape and says so.

Routing is the real one (`grouped_topk`: top 8, 8 groups, 4 chosen) on random logits.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from kernels.fp4 import quantize_mxfp4, quantize_nvfp4
from kernels.fp8 import quantize_fp8_block
from kernels.moe_ref import ExpertWeights, grouped_topk, moe_reference, moe_reference_fp4, moe_reference_fp8
from timing import timed  # bench/ is on sys.path when a script there runs

HIDDEN, INTER, EXPERTS, TOP_K, GROUPS, TOPK_GROUP = 7168, 2048, 256, 8, 8, 4  # DeepSeek-R1
BATCHES = (1, 2, 4, 8, 16)
FORMATS = ("bf16", "fp8", "nvfp4", "mxfp4")
CPU_EXPERTS = 16
# Peak HBM bandwidth in TB/s by device-name fragment, most specific first.
PEAK_TBPS = (("H200", 4.8), ("GH200", 4.0), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35),
             ("B200", 8.0), ("A100-SXM4-80GB", 2.039), ("A100", 1.555), ("L40S", 0.864))
QUANTIZE = {"bf16": lambda w, parts: w, "fp8": lambda w, parts: quantize_fp8_block(w, parts=parts),
            "nvfp4": lambda w, parts: quantize_nvfp4(w), "mxfp4": lambda w, parts: quantize_mxfp4(w)}
CPU_BACKENDS = {"bf16": moe_reference, "fp8": moe_reference_fp8, "nvfp4": moe_reference_fp4,
                "mxfp4": moe_reference_fp4}


def build_experts(fmt: str, experts: int, rows: int, cols: int, device: str, seed: int) -> ExpertWeights:
    """Random [E, rows, cols] weights in `fmt`, 8 experts at a time so no fp32 copy of the whole
    stack is ever held; the same values for every format (`seed`). w13 (rows = 2 I) is two
    matrices, gate and up, which FP8 scales on block rows of their own."""
    gen = torch.Generator(device=device).manual_seed(seed)
    parts = [QUANTIZE[fmt]((torch.randn(min(8, experts - start), rows, cols, device=device, generator=gen)
                            / cols ** 0.5).bfloat16(), 2 if rows == 2 * INTER else 1)
             for start in range(0, experts, 8)]
    return concat_experts(parts)


def concat_experts(parts: list[ExpertWeights]) -> ExpertWeights:
    """Stacked weights of a few experts each -> one, their tensors joined along the expert axis."""
    first = parts[0]
    if torch.is_tensor(first):
        return torch.cat(parts)
    names = [f.name for f in dataclasses.fields(first)]
    joined = {n: torch.cat([getattr(p, n) for p in parts]) for n in names if torch.is_tensor(getattr(first, n))}
    if "shape" in names:  # FP4 tensors carry their logical shape
        joined["shape"] = (sum(p.shape[0] for p in parts), *first.shape[1:])
    return dataclasses.replace(first, **joined)


def bytes_per_expert(w: ExpertWeights) -> float:
    """Bytes of values, block scales and global scales of one expert of a stacked weight."""
    tensors = [w] if torch.is_tensor(w) else [getattr(w, f.name) for f in dataclasses.fields(w)
                                              if torch.is_tensor(getattr(w, f.name))]
    return sum(t.numel() * t.element_size() for t in tensors) / tensors[0].shape[0]


def route(batch: int, experts: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(batch, experts, device=device, generator=gen)
    return grouped_topk(logits, torch.zeros(experts, device=device), TOP_K, GROUPS, TOPK_GROUP, True, 2.5)


def peak_tbps(name: str) -> float | None:
    return next((tbps for fragment, tbps in PEAK_TBPS if fragment in name), None)


def copy_tbps() -> float:
    """Measured device-to-device copy: 2 x 1 GiB moved per copy."""
    import triton.testing
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (triton.testing.do_bench(lambda: dst.copy_(src)) * 1e-3) / 1e12


def bench_gpu(batches: list[int], experts: int, formats: list[str]) -> None:
    import triton.testing
    from kernels.triton_fused_moe import fused_moe
    name = torch.cuda.get_device_name()
    peak, copy = peak_tbps(name), copy_tbps()
    peak_note = "table" if peak else "not in the table: using the measured copy"
    peak = peak or copy
    print(f"device: {name}; peak {peak:.2f} TB/s ({peak_note}); measured device copy {copy:.2f} TB/s")
    print(f"shape: hidden {HIDDEN}, moe_intermediate {INTER}, {experts} experts, top {TOP_K} "
          f"({GROUPS} groups, {TOPK_GROUP} chosen); bf16 activations")
    routes = {b: route(b, experts, "cuda", seed=b) for b in batches}
    xs = {b: torch.randn(b, HIDDEN, device="cuda", dtype=torch.bfloat16) for b in batches}
    bf16_us: dict[int, float] = {}
    print(f"{'format':>6} {'batch':>5} {'experts':>7} {'MB':>8} {'fused us':>9} {'TB/s':>6} {'% peak':>7} "
          f"{'x bf16':>7} {'loop us':>8}")
    for fmt in formats:
        w13 = build_experts(fmt, experts, 2 * INTER, HIDDEN, "cuda", seed=1)
        w2 = build_experts(fmt, experts, HIDDEN, INTER, "cuda", seed=2)
        per_expert = bytes_per_expert(w13) + bytes_per_expert(w2)
        for b in batches:
            weights, ids = routes[b]
            us = 1e3 * triton.testing.do_bench(lambda: fused_moe(xs[b], w13, w2, weights, ids))
            loop = (f"{1e3 * triton.testing.do_bench(lambda: moe_reference(xs[b], w13, w2, weights, ids)):>8.1f}"
                    if fmt == "bf16" else f"{'':>8}")
            bf16_us.setdefault(b, us)  # the first format (bf16 unless --formats says otherwise)
            touched = per_expert * ids.unique().numel()
            tbps = touched / (us * 1e-6) / 1e12
            print(f"{fmt:>6} {b:>5} {ids.unique().numel():>7} {touched / 1e6:>8.1f} {us:>9.1f} {tbps:>6.2f} "
                  f"{100 * tbps / peak:>6.1f}% {bf16_us[b] / us:>6.2f}x {loop}")
        del w13, w2
        torch.cuda.empty_cache()


def bench_cpu(batches: list[int], experts: int, formats: list[str]) -> None:
    print("no CUDA GPU present: the Triton kernels run only under the interpreter here, so this "
          "reports the engine's CPU backends (kernels.moe_ref's per-expert loops)")
    if experts < EXPERTS:
        print(f"shape reduced to {experts} experts (of R1's {EXPERTS}; all {EXPERTS} in bf16 are "
              f"{EXPERTS * 3 * HIDDEN * INTER * 2 / 1e9:.1f} GB) of R1's expert shape")
    print(f"shape: hidden {HIDDEN}, moe_intermediate {INTER}, {experts} experts, top {TOP_K} "
          f"({GROUPS} groups, {TOPK_GROUP} chosen); bf16 activations; {torch.get_num_threads()} threads")
    routes = {b: route(b, experts, "cpu", seed=b) for b in batches}
    xs = {b: torch.randn(b, HIDDEN, dtype=torch.bfloat16) for b in batches}
    print(f"{'format':>6} {'batch':>5} {'experts':>7} {'MB':>8} {'ms':>8} {'GB/s':>6}")
    for fmt in formats:
        w13 = build_experts(fmt, experts, 2 * INTER, HIDDEN, "cpu", seed=1)
        w2 = build_experts(fmt, experts, HIDDEN, INTER, "cpu", seed=2)
        per_expert = bytes_per_expert(w13) + bytes_per_expert(w2)
        backend = CPU_BACKENDS[fmt]
        # Freshly allocated multi-GB weights run slowly for the first passes (page faults): settle them.
        timed(lambda: backend(xs[max(batches)], w13, w2, *routes[max(batches)]), 2)
        for b in batches:
            seconds = timed(lambda: backend(xs[b], w13, w2, *routes[b]), 5)
            touched = per_expert * routes[b][1].unique().numel()
            print(f"{fmt:>6} {b:>5} {routes[b][1].unique().numel():>7} {touched / 1e6:>8.0f} {seconds * 1e3:>8.1f} "
                  f"{touched / seconds / 1e9:>6.1f}")
        del w13, w2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, help=f"routed experts (default {EXPERTS} on a GPU, "
                                                     f"{CPU_EXPERTS} on the CPU)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated expert formats, "
                        "bf16 first for the speed-up column")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    formats = args.formats.split(",")
    if unknown := [f for f in formats if f not in FORMATS]:
        parser.error(f"unknown format(s) {', '.join(unknown)} (choose from {', '.join(FORMATS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    with torch.inference_mode():
        if torch.cuda.is_available():
            bench_gpu(batches, args.experts or EXPERTS, formats)
        else:
            bench_cpu(batches, args.experts or CPU_EXPERTS, formats)


if __name__ == "__main__":
    main()
