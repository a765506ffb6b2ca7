"""A task whose memory grows with sequence length, and two of its sequences are far longer than the rest.

Random windows of the first probes miss the two long sequences (they come last in the probes'
seeded order), so a probe that trains random windows finds a wall that a window holding one of
them breaks. With ``sample_size`` the trials train the longest samples first, and the wall holds.
"""

from __future__ import annotations

import numpy as np

from autobatch import TorchTask

N_TRAIN = 4096
N_VAL = 64
SHORT = (4, 16)  # most sequences: 4..16 tokens
LONG = 2048  # two sequences: this many tokens
VOCAB = 64
WIDTH = 64
HIDDEN = 1024


def long_indices(n_train: int = N_TRAIN, seed: int = 0) -> np.ndarray:
    """The two training samples the probes' seeded sample stream reaches last in its first epoch."""
    return np.random.default_rng(seed).permutation(n_train)[-2:]


def seed_meeting_a_long_sequence_first(n_train: int = N_TRAIN, within: int = 8) -> int:
    """A seed whose first epoch holds a long sequence among its first ``within`` samples.

    An epoch at the probes' own seed meets the long sequences last, in the short last window
    (4096 less whole windows); how short depends on the wall, and a last window of a few samples
    fits even when padded to a long sequence. From this seed the long sequence lands in the first
    micro-batch, a full one at any wall.
    """
    long = set(long_indices(n_train).tolist())
    for seed in range(1, 10_000):
        if long.intersection(np.random.default_rng(seed).permutation(n_train)[:within].tolist()):
            return seed
    raise AssertionError("no seed meets a long sequence first")


def _sequences(count: int, seed: int, long_at=()) -> list:
    import torch

    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        length = LONG if index in set(long_at) else int(rng.integers(*SHORT))
        tokens = torch.as_tensor(rng.integers(1, VOCAB, size=length), dtype=torch.long)
        samples.append((tokens, int(tokens[0] % 2)))  # the class: the first token's parity
    return samples


def pad_collate(samples):
    import torch

    longest = max(len(tokens) for tokens, _ in samples)
    batch = torch.zeros(len(samples), longest, dtype=torch.long)
    for row, (tokens, _) in enumerate(samples):
        batch[row, : len(tokens)] = tokens
    return batch, torch.as_tensor([label for _, label in samples])


def model():
    import torch
    from torch import nn

    class TokenMLP(nn.Module):
        """Per-token MLP blocks: activation memory ∝ micro-batch × the longest sequence in it."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, WIDTH, padding_idx=0)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH)) for _ in range(2)
            )
            self.head = nn.Linear(WIDTH, 2)

        def forward(self, tokens):
            mask = (tokens != 0).unsqueeze(-1).float()
            hidden = self.embed(tokens)
            for block in self.blocks:
                hidden = hidden + block(hidden)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.head(pooled)

    torch.manual_seed(0)
    return TokenMLP()


def _task(sample_size) -> TorchTask:
    return TorchTask(
        model=model,
        train_data=_sequences(N_TRAIN, seed=1, long_at=long_indices()),
        val_data=_sequences(N_VAL, seed=2),
        collate_fn=pad_collate,
        base_batch_size=8,
        base_learning_rate=1e-3,
        sample_size=sample_size,
        name="long-tail-sequences",
    )


def _tokens(sample) -> int:
    return len(sample[0])


def sized():
    """The task with ``sample_size``: every trial trains the longest sequences first."""
    return _task(_tokens)


def unsized():
    """The same task without it: ``(tokens, label)`` samples give no size to detect."""
    return _task(None)
