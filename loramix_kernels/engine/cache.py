"""Paged KV cache: every layer's K and V in one ``[L, num_blocks, block_size, Hkv, D]`` tensor each,
a free list of physical blocks, and per-request block tables."""

from __future__ import annotations

import math
import mmap

import torch


def shared_zeros(shape, dtype) -> torch.Tensor:
    """A zero CPU tensor in anonymous shared memory (``mmap``, MAP_SHARED): a process forked after
    its creation reads and writes the same memory (unlike torch's ``share_memory_()`` it needs no
    /dev/shm space)."""
    n = math.prod(shape)
    buf = mmap.mmap(-1, max(1, n * torch.empty((), dtype=dtype).element_size()))
    return torch.frombuffer(buf, dtype=dtype, count=n).view(shape)


class PagedKVCache:
    """K/V pages for ``num_layers`` layers and the block tables of up to ``max_batch`` requests.

    ``k[l]`` / ``v[l]`` are layer ``l``'s ``[num_blocks, block_size, Hkv, D]`` caches (the layout of
    :func:`~loramix_kernels.tree_attention`). ``block_table[b]`` maps request ``b``'s logical block
    ``i`` (positions ``i * block_size ..``) to a physical block; unused entries are ``-1``.
    ``lens[b]`` (host ints) is the number of committed (cached, verified) positions of request b.
    Blocks are taken from the free list on demand (:meth:`reserve`) and returned by :meth:`free`.
    ``shared=True`` (CPU) puts ``k`` / ``v`` in anonymous shared memory, for a forked worker
    process (the engine's draft worker) to read and write.
    """

    def __init__(self, num_layers, num_kv_heads, head_dim, *, num_blocks, block_size, max_batch,
                 max_blocks_per_seq, dtype=torch.float32, device="cpu", shared=False):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        if shared and torch.device(device).type == "cpu":
            self.k, self.v = shared_zeros(shape, dtype), shared_zeros(shape, dtype)
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_table = torch.full((max_batch, max_blocks_per_seq), -1, dtype=torch.int32,
                                      device=device)
        self._table_host = [[] for _ in range(max_batch)]
        self.lens = [0] * max_batch
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def alloc_blocks(self, n: int) -> list[int]:
        """Take ``n`` physical blocks from the free list (raises when the pool is exhausted)."""
        if n > len(self._free):
            raise RuntimeError(f"PagedKVCache: out of blocks (need {n}, {len(self._free)} free of "
                               f"{self.num_blocks}); raise num_blocks")
        return [self._free.pop() for _ in range(n)]

    def free_blocks(self, blocks) -> None:
        self._free.extend(int(b) for b in blocks)

    def reserve(self, b: int, length: int) -> None:
        """Make request ``b``'s table cover positions ``[0, length)``."""
        need = -(-length // self.block_size)
        have = self._table_host[b]
        if need > self.max_blocks_per_seq:
            raise RuntimeError(f"PagedKVCache: request {b} needs {need} blocks, the table holds "
                               f"{self.max_blocks_per_seq}; raise max_len")
        if need > len(have):
            new = self.alloc_blocks(need - len(have))
            self.block_table[b, len(have):need] = torch.tensor(new, dtype=torch.int32)
            have.extend(new)

    def free(self, b: int) -> None:
        """Release request ``b``: its blocks go back to the free list, its table is cleared."""
        self.free_blocks(self._table_host[b])
        self._table_host[b] = []
        self.block_table[b].fill_(-1)
        self.lens[b] = 0

    def table_blocks(self, b: int) -> list[int]:
        return list(self._table_host[b])

    def slots(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot ids ``block * block_size + offset`` of ``positions [R, N]`` under ``table [R, *]``."""
        pos = positions.long()
        blk = torch.gather(table.long(), 1, pos // self.block_size)
        return (blk * self.block_size + pos % self.block_size).reshape(-1)

    def flat(self, layers: slice = slice(None)):
        """Views ``[L', num_blocks * block_size, Hkv, D]`` of K and V (slot-indexed)."""
        L, nb, bs, h, d = self.k.shape
        return (self.k[layers].view(-1, nb * bs, h, d), self.v[layers].view(-1, nb * bs, h, d))
