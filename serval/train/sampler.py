"""Seeded, length-bucketed batches that resume from (epoch, batches done)."""

from __future__ import annotations

import numpy as np

from serval.train.augment import seeded_rng


class BucketBatchSampler:
    """Seeded, length-bucketed global batches, sharded over ranks and accumulation steps.

    Per epoch: shuffle (or, with `weights`, draw len(lengths) clips with replacement), sort by length within buckets of `bucket_batches` batches, cut into global
    batches, shuffle the batches. The state to resume is (epoch, batches done), nothing more.
    """

    def __init__(
        self,
        lengths,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        bucket_batches: int = 50,
        weights=None,
    ):
        self.lengths = np.asarray(lengths, dtype=np.float64)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.bucket = batch_size * bucket_batches

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        rng = seeded_rng(self.seed, epoch, 2)
        if self.weights is not None:  # balanced: n draws with replacement, by the clips' weights
            order = rng.choice(n, size=n, replace=True, p=self.weights / self.weights.sum())
        else:
            order = rng.permutation(n) if self.shuffle else np.arange(n)
        ordered = []
        for s in range(0, n, self.bucket):
            chunk = order[s : s + self.bucket]
            ordered.extend(chunk[np.argsort(self.lengths[chunk], kind="stable")].tolist())
        out = [ordered[s : s + self.batch_size] for s in range(0, n, self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def __len__(self) -> int:
        n = (
            len(self.lengths) // self.batch_size
            if self.drop_last
            else -(-len(self.lengths) // self.batch_size)
        )
        return n

    @staticmethod
    def shard(batch: list[int], rank: int, world: int, accum: int) -> list[list[int]]:
        """This rank's micro-batches of a global batch: contiguous pieces, piece a*world + rank."""
        pieces = np.array_split(np.asarray(batch), world * accum)
        return [pieces[a * world + rank].tolist() for a in range(accum)]
