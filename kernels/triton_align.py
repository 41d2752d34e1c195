"""Token-to-expert alignment for the fused MoE GEMM (vLLM/SGLang `moe_align_block_size`).

The grouped GEMM walks blocks of BLOCK_M (token, slot) pairs that all go to one expert.
This module lays the T*K routed slots out that way: slot indices t*K + k sorted by expert
(stably, so in slot order within an expert), each expert's run padded to a multiple of
BLOCK_M with the sentinel T*K, and the expert of every block. Experts with no tokens get
no blocks. The torch reference is the spec; the Triton version is three small kernels
(per-chunk histograms, one program for the prefix sums and block experts, a per-chunk
scatter) plus a torch `full` that pre-fills the sentinel, and gives identical output.

Legend: T = tokens, K = experts per token, E = experts, P = padded length (see
`max_padded_slots`), B = P / BLOCK_M blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

CHUNK = 128  # slots per program in the histogram and scatter kernels (the scatter holds CHUNK^2 compares)


class BlockAlignment(NamedTuple):
    """Routed slots grouped by expert in blocks of `block_m`.

    sorted_token_ids int32 [P]: slot indices t*K + k, expert by expert, each expert's run
    padded with T*K to a multiple of block_m; entries from num_tokens_post_padded on are T*K.
    expert_ids int32 [B]: the expert of each block; -1 for blocks from
    num_tokens_post_padded / block_m on.
    num_tokens_post_padded int32 [1]: the used length of sorted_token_ids (on the device,
    so a CUDA graph can replay with a different routing).
    """

    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    block_m: int


def max_padded_slots(num_slots: int, num_experts: int, block_m: int) -> int:
    """P: an upper bound on the padded length, known from shapes alone (no device sync).

    At most min(E, T*K) experts are routed to and each pads by at most block_m - 1.
    """
    bound = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


def moe_align_block_size_ref(ids: torch.Tensor, num_experts: int, block_m: int) -> BlockAlignment:
    """Torch reference. ids [T, K] int (expert ids in [0, E)) -> BlockAlignment."""
    flat = ids.flatten().long()
    slots, device = flat.numel(), ids.device
    padded_len = max_padded_slots(slots, num_experts, block_m)
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = padded.cumsum(0) - padded  # [E]: where each expert's run begins
    order = torch.argsort(flat, stable=True)  # slots, expert by expert
    by_expert = flat[order]
    rank = torch.arange(slots, device=device) - (counts.cumsum(0) - counts)[by_expert]
    sorted_ids = torch.full((padded_len,), slots, dtype=torch.int32, device=device)
    sorted_ids[starts[by_expert] + rank] = order.int()
    total = int(padded.sum())
    expert_ids = torch.full((padded_len // block_m,), -1, dtype=torch.int32, device=device)
    expert_ids[:total // block_m] = torch.arange(num_experts, device=device).repeat_interleave(padded // block_m).int()
    return BlockAlignment(sorted_ids, expert_ids, torch.tensor([total], dtype=torch.int32, device=device), block_m)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_slots, num_experts,
                  CHUNK: tl.constexpr, E_P2: tl.constexpr):
    """counts[c, e] = how many of chunk c's slots go to expert e. counts int32 [C, E]."""
    c = tl.program_id(0)
    slot = c * CHUNK + tl.arange(0, CHUNK)
    # slots past the end count in bin E_P2 >= E, which is not stored (histogram's mask needs triton 3.3)
    expert = tl.load(ids_ptr + slot, mask=slot < num_slots, other=E_P2).to(tl.int32)
    counts = tl.histogram(expert, 2 * E_P2)
    e = tl.arange(0, 2 * E_P2)
    tl.store(counts_ptr + c * num_experts + e, counts, mask=e < num_experts)


@triton.jit
def _offsets_kernel(counts_ptr, chunk_base_ptr, expert_start_ptr, expert_ids_ptr, total_ptr,
                    num_chunks, num_experts, num_blocks,
                    BLOCK_M: tl.constexpr, E_P2: tl.constexpr, BLOCKS: tl.constexpr):
    """One program: prefix sums over chunks and experts, and the expert of each block.

    chunk_base int32 [C, E]: slots of expert e in chunks before c. expert_start int32 [E]:
    where expert e's padded run begins. expert_ids int32 [B]. total int32 [1].
    """
    e = tl.arange(0, E_P2)
    e_ok = e < num_experts
    running = tl.zeros((E_P2,), dtype=tl.int32)
    for c in range(num_chunks):
        tl.store(chunk_base_ptr + c * num_experts + e, running, mask=e_ok)
        running += tl.load(counts_ptr + c * num_experts + e, mask=e_ok, other=0)
    padded = (running + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(expert_start_ptr + e, ends - padded, mask=e_ok)
    total = tl.sum(padded, axis=0)
    tl.store(total_ptr, total)
    ends = tl.where(e_ok, ends, total)  # padding experts end at the total: they own no block
    for b0 in range(0, num_blocks, BLOCKS):
        block = b0 + tl.arange(0, BLOCKS)
        start = block * BLOCK_M
        expert = tl.sum((ends[None, :] <= start[:, None]).to(tl.int32), axis=1)  # experts ending before it
        expert = tl.where(start < total, expert, -1)
        tl.store(expert_ids_ptr + block, expert, mask=block < num_blocks)


@triton.jit
def _scatter_kernel(ids_ptr, chunk_base_ptr, expert_start_ptr, sorted_ptr, num_slots, num_experts,
                    CHUNK: tl.constexpr):
    """sorted[expert_start[e] + chunk_base[c, e] + rank] = slot, rank = earlier slots of e in chunk c."""
    c = tl.program_id(0)
    i = tl.arange(0, CHUNK)
    slot = c * CHUNK + i
    ok = slot < num_slots
    expert = tl.load(ids_ptr + slot, mask=ok, other=-1).to(tl.int32)
    same_before = (expert[:, None] == expert[None, :]) & (i[None, :] < i[:, None])
    rank = tl.sum(same_before.to(tl.int32), axis=1)
    e = tl.where(ok, expert, 0)
    base = tl.load(expert_start_ptr + e, mask=ok, other=0) + tl.load(chunk_base_ptr + c * num_experts + e,
                                                                        mask=ok, other=0)
    tl.store(sorted_ptr + base + rank, slot, mask=ok)


def moe_align_block_size(ids: torch.Tensor, num_experts: int, block_m: int) -> BlockAlignment:
    """Triton version of `moe_align_block_size_ref`, same output.

    ids [T, K] int32/int64 expert ids in [0, E) (not checked: that would sync the device);
    block_m a power of two. Returns BlockAlignment.
    """
    flat = ids.reshape(-1).contiguous()
    slots, device = flat.numel(), ids.device
    if slots == 0:
        return moe_align_block_size_ref(ids, num_experts, block_m)
    padded_len = max_padded_slots(slots, num_experts, block_m)
    num_chunks, num_blocks = triton.cdiv(slots, CHUNK), padded_len // block_m
    e_p2 = triton.next_power_of_2(num_experts)
    counts = torch.empty((num_chunks, num_experts), dtype=torch.int32, device=device)
    chunk_base = torch.empty_like(counts)
    expert_start = torch.empty(num_experts, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    sorted_ids = torch.full((padded_len,), slots, dtype=torch.int32, device=device)
    _count_kernel[(num_chunks,)](flat, counts, slots, num_experts, CHUNK=CHUNK, E_P2=e_p2)
    _offsets_kernel[(1,)](counts, chunk_base, expert_start, expert_ids, total, num_chunks, num_experts,
                          num_blocks, BLOCK_M=block_m, E_P2=e_p2, BLOCKS=64)
    _scatter_kernel[(num_chunks,)](flat, chunk_base, expert_start, sorted_ids, slots, num_experts, CHUNK=CHUNK)
    return BlockAlignment(sorted_ids, expert_ids, total, block_m)
