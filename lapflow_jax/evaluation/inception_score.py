"""Inception Score as ADM's evaluator computes it, streamed over rows in any order.

ADM (guided-diffusion evaluations/evaluator.py, after improved-GAN's inception_score): softmax of
the Inception logits without their bias (`inception.embed`'s "logits"), the samples cut in index
order into splits of 5,000 (the last one smaller when N is not a multiple), per split
exp(mean_i KL(p_i || mean_j p_j)), and the mean over the splits (not the std). 50,000 samples
are 10 splits.

Per split only the count, sum_i sum_c p_ic log p_ic and sum_i p_i are kept, since
  sum_i KL(p_i || q) = sum_i sum_c p_ic log p_ic - sum_c (sum_i p_ic) log q_c,   q = sum_i p_i / n,
so the rows can arrive in any order and pieces (memory: one vector of 1008 per split). The
probabilities come from a float64 log-softmax (ADM: float32 softmax, then float32 logs).

API:
  InceptionScore(num_samples, split_size=5000): .add(indices [n], logits [n, C]); .result() -> float
  inception_score(logits [N, C], split_size=5000) -> float
"""

from __future__ import annotations

import numpy as np
import scipy.special

SPLIT_SIZE = 5000  # ADM: compute_inception_score(split_size=5000)


class InceptionScore:
    """ADM's Inception Score of samples 0 .. num_samples - 1, fed as (indices, logits) pieces."""

    def __init__(self, num_samples: int, split_size: int = SPLIT_SIZE):
        if num_samples < 1 or split_size < 1:
            raise ValueError(f"InceptionScore: need num_samples >= 1 and split_size >= 1, got {num_samples}, "
                             f"{split_size}")
        self.num_samples, self.split_size = int(num_samples), int(split_size)
        self.num_splits = -(-self.num_samples // self.split_size)
        self.count = np.zeros((self.num_splits,), np.int64)
        self.entropy_sum = np.zeros((self.num_splits,), np.float64)   # sum_i sum_c p log p
        self.prob_sum: np.ndarray | None = None                       # [splits, C] sum_i p_i

    def add(self, indices, logits) -> None:
        """indices [n] in [0, num_samples) (each once over all calls); logits [n, C]."""
        indices = np.asarray(indices, np.int64)
        logits = np.asarray(logits, np.float64)
        if logits.ndim != 2 or indices.shape != (logits.shape[0],):
            raise ValueError(f"InceptionScore: indices [n] and logits [n, C], got {indices.shape} and {logits.shape}")
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise ValueError(f"InceptionScore: indices must lie in [0, {self.num_samples})")
        if self.prob_sum is None:
            self.prob_sum = np.zeros((self.num_splits, logits.shape[1]), np.float64)
        log_p = scipy.special.log_softmax(logits, axis=1)
        p = np.exp(log_p)
        split = indices // self.split_size
        np.add.at(self.count, split, 1)
        np.add.at(self.entropy_sum, split, (p * log_p).sum(axis=1))
        np.add.at(self.prob_sum, split, p)

    def result(self) -> float:
        if int(self.count.sum()) != self.num_samples:
            raise ValueError(f"InceptionScore: got {int(self.count.sum())} rows of {self.num_samples}")
        q = self.prob_sum / self.count[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = np.where(self.prob_sum > 0, self.prob_sum * np.log(q), 0.0).sum(axis=1)
        mean_kl = (self.entropy_sum - cross) / self.count
        return float(np.mean(np.exp(mean_kl)))


def inception_score(logits, split_size: int = SPLIT_SIZE) -> float:
    """ADM's Inception Score of logits [N, C] (rows in sample order)."""
    logits = np.asarray(logits)
    score = InceptionScore(len(logits), split_size)
    score.add(np.arange(len(logits)), logits)
    return score.result()
