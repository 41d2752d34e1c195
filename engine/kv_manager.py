"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, each sequence's block
list, and prefix caching by content hash. No tensors here: block ids index the cache
tensor the model owns.

Prefix caching (as in vLLM's automatic prefix caching): a full block is named by the hash
of its tokens chained with the hash of the block before it, so equal hashes mean equal
prefixes. Freed blocks keep their hash and sit in an LRU free queue; a later prompt that
starts with the same blocks takes them back instead of recomputing. A free block is only
overwritten (and forgets its hash) when the pool needs it for new tokens.

Thread-safety: none; the engine loop is the only caller.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from engine.sequence import Sequence


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("I", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Reference-counted blocks; ref 0 blocks wait in LRU order, oldest evicted first."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take_cached(self, h: bytes) -> int | None:
        block = self.by_hash.get(h)
        if block is None:
            return None
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1
        return block

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hash_of[block]
        if old is not None:  # evict: the block's old content is about to be overwritten
            del self.by_hash[old]
            self.hash_of[block] = None
        self.ref[block] = 1
        return block

    def release(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free[block] = None

    def register(self, block: int, h: bytes) -> None:
        if h not in self.by_hash and self.hash_of[block] is None:
            self.hash_of[block] = h
            self.by_hash[h] = block


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.prefix_caching = enable_prefix_caching
        self.blocks: dict[str, list[int]] = {}
        self.hashes: dict[str, list[bytes]] = {}  # hashes of each sequence's full, computed blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq: Sequence) -> list[int]:
        return self.blocks.get(seq.seq_id, [])

    def allocate_prefix(self, seq: Sequence) -> int:
        """Attaches the cached blocks that start seq's tokens; returns how many tokens they
        hold. At least one token is always left to compute, so the step yields logits."""
        blocks, hashes = self.blocks.setdefault(seq.seq_id, []), self.hashes.setdefault(seq.seq_id, [])
        assert not blocks, "prefix lookup is only for a sequence without blocks"
        if not self.prefix_caching:
            return 0
        parent, limit = b"", (seq.num_tokens - 1) // self.block_size
        for i in range(limit):
            h = block_hash(parent, seq.token_ids(i * self.block_size, (i + 1) * self.block_size))
            block = self.pool.take_cached(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        return len(blocks) * self.block_size

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Makes room for seq's next num_new_tokens; False (and no change) if the pool is short."""
        blocks = self.blocks.setdefault(seq.seq_id, [])
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(blocks)
        if need > self.pool.num_free:
            return False
        blocks.extend(self.pool.allocate() for _ in range(need))
        return True

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Names seq's newly full, computed blocks so later prompts can share them."""
        if not self.prefix_caching:
            return
        blocks, hashes = self.blocks[seq.seq_id], self.hashes.setdefault(seq.seq_id, [])
        full = min(seq.num_computed_tokens // self.block_size, len(blocks))
        parent = hashes[-1] if hashes else b""
        for i in range(len(hashes), full):
            parent = block_hash(parent, seq.token_ids(i * self.block_size, (i + 1) * self.block_size))
            hashes.append(parent)
            self.pool.register(blocks[i], parent)

    def free(self, seq: Sequence) -> None:
        """Returns seq's blocks; the last blocks go first in line for eviction, since
        prefixes are more often shared than tails."""
        for block in reversed(self.blocks.pop(seq.seq_id, [])):
            self.pool.release(block)
        self.hashes.pop(seq.seq_id, None)
