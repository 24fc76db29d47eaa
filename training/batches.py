"""Batches for the training loop: (inputs, targets, loss mask) tensors of shape (batch, block_size).

- `ChatBatches`: whole chat examples packed one after another into rows of block_size + 1 tokens and
  padded at the end (pad targets are -1 and never count). Packing instead of one example per row keeps
  short exchanges from wasting most of each row; the loss still covers assistant tokens only.
- `TextBatches`: random windows of a token stream (pretraining), every target counts.

Training rows are drawn from a seeded stream that differs per process under torchrun; validation rows are
fixed (built once, in order), so the val loss is a deterministic function of the weights and early
stopping compares like with like. Under DDP each process evaluates its share of the validation rows.
"""

from __future__ import annotations

import numpy as np
import torch

from training.data import Split


def clip_example(ids: np.ndarray, mask: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `limit` tokens of an example, keeping the whole reply where it fits.

    Too long prompts lose their oldest tokens (as the app's budget drops old turns); a reply longer than
    the window keeps its start and the token before it.
    """
    if len(ids) <= limit:
        return ids, mask
    targets = np.flatnonzero(mask)
    first = int(targets[0]) if len(targets) else len(ids) - limit
    start = max(0, min(len(ids) - limit, first - 1))
    return ids[start:start + limit], mask[start:start + limit]


class ChatBatches:
    def __init__(self, train: Split, val: Split, block_size: int, batch_size: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(train) == 0 or len(val) == 0:
            raise ValueError("both splits need at least one example")
        self.train, self.val = train, val
        self.block_size, self.batch_size, self.pad_id = block_size, batch_size, pad_id
        self.rank, self.world_size = rank, world_size
        self._rng = np.random.default_rng([seed, rank])
        self._order: list[int] = []
        self._val_rows = self._pack(val, range(len(val)))

    @property
    def rows_per_epoch(self) -> int:
        """Rows that one pass over the training examples fills (packing as the train stream packs)."""
        return len(self._pack(self.train, range(len(self.train))))

    @property
    def val_rows(self) -> int:
        return len(self._val_rows)

    def reseed(self, seed: int) -> None:
        """A fresh train stream (used on --resume: continuing, not replaying, the old one)."""
        self._rng = np.random.default_rng([seed, self.rank])
        self._order = []

    def _next_index(self) -> int:
        if not self._order:  # a new epoch in a new random order
            self._order = list(self._rng.permutation(len(self.train)))
        return int(self._order.pop())

    def _pack(self, split: Split, indices) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rows of block_size + 1 tokens from the examples at `indices`, in order."""
        rows, ids, mask = [], [], []
        room = self.block_size + 1
        for i in indices:
            ex_ids, ex_mask = clip_example(*split.example(i), room)
            if sum(map(len, ids)) + len(ex_ids) > room:
                rows.append(self._close(ids, mask))
                ids, mask = [], []
            ids.append(ex_ids)
            mask.append(ex_mask)
        if ids:
            rows.append(self._close(ids, mask))
        return rows

    def _close(self, ids: list, mask: list) -> tuple[np.ndarray, np.ndarray]:
        row_ids = np.full(self.block_size + 1, self.pad_id, dtype=np.int64)
        row_mask = np.zeros(self.block_size + 1, dtype=np.int64)
        flat_ids, flat_mask = np.concatenate(ids), np.concatenate(mask)
        row_ids[:len(flat_ids)] = flat_ids
        row_mask[:len(flat_mask)] = flat_mask
        row_mask[len(flat_mask):] = -1  # padding: not a target at all
        return row_ids, row_mask

    def _train_row(self) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = [], []
        room, used = self.block_size + 1, 0
        while True:
            i = self._next_index()
            ex_ids, ex_mask = clip_example(*self.train.example(i), room)
            if ids and used + len(ex_ids) > room:
                self._order.append(i)  # it opens the next row
                return self._close(ids, mask)
            ids.append(ex_ids)
            mask.append(ex_mask)
            used += len(ex_ids)
            if used >= room:
                return self._close(ids, mask)

    def train_batch(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return to_tensors([self._train_row() for _ in range(self.batch_size)], device)

    def val_batches(self, max_batches: int, device):
        rows = self._val_rows[self.rank::self.world_size]
        for start in range(0, min(len(rows), max_batches * self.batch_size), self.batch_size):
            yield to_tensors(rows[start:start + self.batch_size], device)

    def train_eval_batches(self, max_batches: int, device):
        for _ in range(max_batches):
            yield self.train_batch(device)


class TextBatches:
    def __init__(self, train: Split, val: Split, block_size: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if len(train.tokens) <= block_size + 1 or len(val.tokens) <= block_size + 1:
            raise ValueError("each split needs more than block_size + 1 tokens")
        self.train, self.val = train.tokens, val.tokens
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self._rng = np.random.default_rng([seed, rank])
        # Evenly spaced, non-overlapping where the split allows: a fixed sample of the val text.
        span = len(self.val) - (block_size + 1)
        n_windows = max(1, min(len(self.val) // (block_size + 1), 4096))
        self._val_starts = np.linspace(0, span, n_windows).astype(np.int64)

    def reseed(self, seed: int) -> None:
        self._rng = np.random.default_rng([seed, self.rank])

    def _rows(self, tokens, starts):
        rows = []
        for s in starts:
            ids = np.asarray(tokens[s:s + self.block_size + 1], dtype=np.int64)
            rows.append((ids, np.ones_like(ids)))
        return rows

    def train_batch(self, device):
        starts = self._rng.integers(0, len(self.train) - self.block_size - 1, size=self.batch_size)
        return to_tensors(self._rows(self.train, starts), device)

    def val_batches(self, max_batches: int, device):
        starts = self._val_starts[self.rank::self.world_size][:max_batches * self.batch_size]
        for i in range(0, len(starts), self.batch_size):
            yield to_tensors(self._rows(self.val, starts[i:i + self.batch_size]), device)

    def train_eval_batches(self, max_batches: int, device):
        for _ in range(max_batches):
            yield self.train_batch(device)


def to_tensors(rows, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of (ids, mask) with block_size + 1 tokens -> inputs, targets (-1 where padded), loss mask."""
    ids = torch.from_numpy(np.stack([r[0] for r in rows]))
    mask = torch.from_numpy(np.stack([r[1] for r in rows]))
    x, y, m = ids[:, :-1].contiguous(), ids[:, 1:].clone(), mask[:, 1:].contiguous()
    y[m < 0] = -1
    m = m.clamp(min=0)
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return (x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True),
                m.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device), m.to(device)
