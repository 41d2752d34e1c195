"""The fused FP4 MoE at decode batches, with DeepSeek-R1's routed-expert shapes.

    .venv/bin/python bench/fp4_moe.py [--experts E] [--batches 1,2,4] [--threads N]

On a CUDA GPU, per batch: the time of `fused_moe_fp4` (alignment, both fused kernels and
the per-token sum) with NVFP4 weights, the bytes of the FP4 weights and scales of the
experts the batch touches over that time as a share of the GPU's peak memory bandwidth
(a table by device name; a measured device copy is printed beside it), and the speed-up
over the bf16 grouped GEMM, `moe_reference` on the same weights dequantized to bf16,
measured in the same run. Times are medians of triton.testing.do_bench, which flushes L2
between runs.

On the CPU, where the Triton kernels only run under the (slow) interpreter, it reports the
references' speed: `moe_reference` on bf16 weights, and `fused_moe_fp4_reference` (which
dequantizes every expert on each call, then runs the same loop). The 256 R1 experts are 22
GB in bf16, so the CPU run defaults to fewer experts of the same shape and says so.

Routing is the real one (`grouped_topk`: top 8, 8 groups, 4 chosen) on random logits.
"""

from __future__ import annotations

import argparse

import torch

from kernels.fp4 import NVFP4Tensor, dequantize_nvfp4, quantize_nvfp4
from kernels.moe_ref import grouped_topk, moe_reference
from timing import timed  # bench/ is on sys.path when a script there runs

HIDDEN, INTER, EXPERTS, TOP_K, GROUPS, TOPK_GROUP = 7168, 2048, 256, 8, 8, 4  # DeepSeek-R1
BATCHES = (1, 2, 4, 8, 16, 32, 64)
CPU_EXPERTS = 16
# Peak HBM bandwidth in TB/s by device-name fragment, most specific first.
PEAK_TBPS = (("H200", 4.8), ("GH200", 4.0), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35),
             ("B200", 8.0), ("A100-SXM4-80GB", 2.039), ("A100", 1.555), ("L40S", 0.864))


def build_experts(experts: int, rows: int, cols: int, device: str) -> tuple[NVFP4Tensor, torch.Tensor]:
    """Random [E, rows, cols] weights as NVFP4 and as their bf16 dequantization, a few experts
    at a time so no fp32 copy of the whole stack is ever held."""
    packed, scale, global_scale, dense = [], [], [], []
    for start in range(0, experts, 8):
        n = min(8, experts - start)
        q = quantize_nvfp4(torch.randn(n, rows, cols, device=device) / cols ** 0.5)
        packed.append(q.packed), scale.append(q.scale), global_scale.append(q.global_scale)
        dense.append(dequantize_nvfp4(q, torch.bfloat16))
    w = NVFP4Tensor(torch.cat(packed), torch.cat(scale), torch.cat(global_scale), (experts, rows, cols))
    return w, torch.cat(dense)


def route(batch: int, experts: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(batch, experts, device=device, generator=gen)
    return grouped_topk(logits, torch.zeros(experts, device=device), TOP_K, GROUPS, TOPK_GROUP, True, 2.5)


def touched_bytes(w13: NVFP4Tensor, w2: NVFP4Tensor, ids: torch.Tensor) -> int:
    """Bytes of packed weights, block scales and global scales of the experts in ids."""
    per_expert = sum(t.packed[0].numel() + t.scale[0].numel() + 4 for t in (w13, w2))
    return per_expert * ids.unique().numel()


def peak_tbps(name: str) -> float | None:
    return next((tbps for fragment, tbps in PEAK_TBPS if fragment in name), None)


def copy_tbps() -> float:
    """Measured device-to-device copy: 2 x 1 GiB moved per copy."""
    import triton.testing
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (triton.testing.do_bench(lambda: dst.copy_(src)) * 1e-3) / 1e12


def bench_gpu(batches: list[int], experts: int) -> None:
    import triton.testing
    from kernels.triton_fused_moe import fused_moe_fp4
    name = torch.cuda.get_device_name()
    peak, copy = peak_tbps(name), copy_tbps()
    peak_note = "table" if peak else "not in the table: using the measured copy"
    peak = peak or copy
    print(f"device: {name}; peak {peak:.2f} TB/s ({peak_note}); measured device copy {copy:.2f} TB/s")
    print(f"shape: hidden {HIDDEN}, moe_intermediate {INTER}, {experts} experts, top {TOP_K} "
          f"({GROUPS} groups, {TOPK_GROUP} chosen); NVFP4 weights, bf16 activations")
    w13, w13_bf16 = build_experts(experts, 2 * INTER, HIDDEN, "cuda")
    w2, w2_bf16 = build_experts(experts, HIDDEN, INTER, "cuda")
    print(f"{'batch':>5} {'experts':>7} {'fp4 MB':>8} {'fused us':>9} {'TB/s':>6} {'% peak':>7} "
          f"{'bf16 us':>9} {'speed-up':>8}")
    for batch in batches:
        weights, ids = route(batch, experts, "cuda", seed=batch)
        x = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16)
        fused_ms = triton.testing.do_bench(lambda: fused_moe_fp4(x, w13, w2, weights, ids))
        bf16_ms = triton.testing.do_bench(lambda: moe_reference(x, w13_bf16, w2_bf16, weights, ids))
        nbytes = touched_bytes(w13, w2, ids)
        tbps = nbytes / (fused_ms * 1e-3) / 1e12
        print(f"{batch:>5} {ids.unique().numel():>7} {nbytes / 1e6:>8.1f} {fused_ms * 1e3:>9.1f} {tbps:>6.2f} "
              f"{100 * tbps / peak:>6.1f}% {bf16_ms * 1e3:>9.1f} {bf16_ms / fused_ms:>7.2f}x")


def bench_cpu(batches: list[int], experts: int) -> None:
    print("no CUDA GPU present: the Triton kernels run only under the interpreter here, so this "
          "reports the torch references' speed")
    if experts < EXPERTS:
        print(f"shape reduced to {experts} experts (of R1's {EXPERTS}; all {EXPERTS} in bf16 are "
              f"{EXPERTS * 3 * HIDDEN * INTER * 2 / 1e9:.1f} GB) of R1's expert shape")
    print(f"shape: hidden {HIDDEN}, moe_intermediate {INTER}, {experts} experts, top {TOP_K} "
          f"({GROUPS} groups, {TOPK_GROUP} chosen); bf16 activations; {torch.get_num_threads()} threads")
    w13, w13_bf16 = build_experts(experts, 2 * INTER, HIDDEN, "cpu")
    w2, w2_bf16 = build_experts(experts, HIDDEN, INTER, "cpu")
    from kernels.triton_fused_moe import fused_moe_fp4_reference
    # Freshly allocated multi-GB weights run slowly for the first few passes (page faults and
    # the kernel's huge-page work, measured 10x); settle them before timing anything.
    weights, ids = route(max(batches), experts, "cpu", seed=0)
    timed(lambda: moe_reference(torch.randn(max(batches), HIDDEN, dtype=torch.bfloat16), w13_bf16, w2_bf16,
                                weights, ids), 3)
    # All bf16 timings first: the FP4 reference's multi-GB temporaries upset later timings.
    routes = {batch: route(batch, experts, "cpu", seed=batch) for batch in batches}
    xs = {batch: torch.randn(batch, HIDDEN, dtype=torch.bfloat16) for batch in batches}
    bf16_s = {b: timed(lambda: moe_reference(xs[b], w13_bf16, w2_bf16, *routes[b]), 9) for b in batches}
    fp4_s = {b: timed(lambda: fused_moe_fp4_reference(xs[b], w13, w2, *routes[b]), 1) for b in batches}
    print(f"{'batch':>5} {'experts':>7} {'bf16 MB':>8} {'bf16 ref ms':>11} {'GB/s':>6} {'fp4 ref ms':>10}")
    for batch in batches:
        touched = routes[batch][1].unique().numel()
        nbytes = touched * 3 * HIDDEN * INTER * 2
        print(f"{batch:>5} {touched:>7} {nbytes / 1e6:>8.0f} {bf16_s[batch] * 1e3:>11.1f} "
              f"{nbytes / bf16_s[batch] / 1e9:>6.1f} {fp4_s[batch] * 1e3:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, help=f"routed experts (default {EXPERTS} on a GPU, "
                                                     f"{CPU_EXPERTS} on the CPU)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    with torch.inference_mode():
        if torch.cuda.is_available():
            bench_gpu(batches, args.experts or EXPERTS)
        else:
            bench_cpu(batches, args.experts or CPU_EXPERTS)


if __name__ == "__main__":
    main()
