"""Batches of (input, target) windows from memory-mapped shards: shuffled, rank-sharded and resumable.

The shards are read as one token stream cut into non-overlapping windows of ``seq_len + 1`` tokens (a
window may straddle two shards). Each epoch visits the windows in a permutation drawn from ``(seed,
epoch)`` with NumPy's PCG64, so the order is a pure function of the seed: the same on every machine, and
a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalevec.data.common import DataError
from scalevec.data.shards import read_shard

Batch = tuple[torch.Tensor, torch.Tensor]


class TokenStream:
    """The concatenation of shards (memory-mapped), addressed by window index."""

    def __init__(self, files: Sequence[str | Path], seq_len: int, vocab_size: int | None = None) -> None:
        if not files:
            raise DataError("no token shards given")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.files = [Path(f) for f in files]
        self.shards = [read_shard(f) for f in self.files]
        self.offsets = np.cumsum([0, *map(len, self.shards)], dtype=np.int64)  # shard k covers [o[k], o[k+1])
        self.window = seq_len + 1
        self.n_tokens = int(self.offsets[-1])
        self.n_windows = self.n_tokens // self.window
        self.vocab_size = vocab_size

    def describe(self) -> str:
        more = f" and {len(self.files) - 1} more" if len(self.files) > 1 else ""
        return f"{self.files[0]}{more} ({self.n_tokens} tokens)"

    def gather(self, windows: np.ndarray) -> Batch:
        """Windows by index -> (x, y) int64 tensors of shape (len(windows), seq_len)."""
        starts = windows.astype(np.int64) * self.window
        out = np.empty((len(windows), self.window), dtype=np.int64)
        for row, start in enumerate(starts):
            k = int(np.searchsorted(self.offsets, start, side="right")) - 1
            local, filled = int(start - self.offsets[k]), 0
            while filled < self.window:  # more than one step only when the window crosses a shard boundary
                take = min(self.window - filled, len(self.shards[k]) - local)
                out[row, filled : filled + take] = self.shards[k][local : local + take]
                filled, k, local = filled + take, k + 1, 0
        if self.vocab_size is not None and out.max(initial=0) >= self.vocab_size:
            self._reject(out, starts)
        return torch.from_numpy(np.ascontiguousarray(out[:, :-1])), torch.from_numpy(
            np.ascontiguousarray(out[:, 1:])
        )

    def _reject(self, out: np.ndarray, starts: np.ndarray) -> None:
        row, col = np.argwhere(out >= self.vocab_size)[0]
        position = int(starts[row]) + int(col)
        k = int(np.searchsorted(self.offsets, position, side="right")) - 1
        raise DataError(
            f"{self.files[k]}: token id {out[row, col]} at position {position - self.offsets[k]} "
            f"is out of range for vocab_size {self.vocab_size}"
        )


class TokenLoader:
    """Shuffled training batches; rank ``r`` of ``world_size`` takes global batch slots r, r + world_size, ...

    Every rank runs the same number of steps per epoch (the remainder windows are skipped that epoch) so
    data-parallel ranks stay in lockstep, and the ranks' windows within an epoch are disjoint.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}"
            )
        self.stream = TokenStream(files, seq_len, vocab_size)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = self.stream.n_windows // batch_size // world_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{self.stream.describe()}: too little data for one step: {self.stream.n_windows} windows "
                f"of seq_len+1={seq_len + 1} tokens, but batch_size*world_size={batch_size * world_size} "
                "are needed"
            )
        self.epoch, self.cursor = 0, 0  # cursor: batches this rank already took in this epoch
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def next_batch(self) -> Batch:
        if self.cursor == self.steps_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
        slot = self.cursor * self.world_size + self.rank
        windows = self._permutation()[slot * self.batch_size : (slot + 1) * self.batch_size]
        self.cursor += 1
        return self.stream.gather(windows)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position (identical on every rank) plus the layout it is valid for."""
        return {"epoch": self.epoch, "cursor": self.cursor, **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {k: state.get(k) for k in self._layout()}
        if saved != self._layout():
            raise DataError(
                f"loader state was saved for {saved}, which differs from this loader's {self._layout()}"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def _layout(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "n_windows": self.stream.n_windows,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
        }

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
            self._perm, self._perm_epoch = rng.permutation(self.stream.n_windows), self.epoch
        return self._perm


def eval_batches(
    files: Sequence[str | Path], batch_size: int, seq_len: int, max_tokens: int, vocab_size: int | None = None
) -> list[Batch]:
    """A fixed held-out set: the first windows of the stream, about ``max_tokens`` input tokens, in order.

    The same on every rank and in every run. Batches are all full (the count is rounded down to a multiple
    of ``batch_size``) so a plain mean of batch losses is the mean over sequences; if even one full batch
    does not fit, the single batch is smaller.
    """
    stream = TokenStream(files, seq_len, vocab_size)
    if stream.n_windows == 0:
        raise DataError(f"{stream.describe()}: shorter than one window of seq_len+1={seq_len + 1} tokens")
    n = min(stream.n_windows, max(1, max_tokens // seq_len))
    if n >= batch_size:
        n -= n % batch_size
    return [stream.gather(np.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
