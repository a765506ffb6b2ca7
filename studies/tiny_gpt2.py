"""tiny-gpt2: a small GPT-2 from ``transformers``, trained as its users train it.

The model is ``GPT2LMHeadModel`` built from a ``GPT2Config`` (2 layers, 64-wide, a 256-token
vocabulary, 128 positions) with random weights: nothing is downloaded. The data is token
sequences of 16 to 128 tokens drawn from a fixed random Markov chain in which each token has
four likely successors, so a model that learns the transitions gets well below the uniform
loss, log(256) ≈ 5.5 nats (the chain's entropy is about 1.1 nats a token). A sample is a dict
``{"input_ids": 1-D tensor}``; :func:`pad_collate` pads each batch to its longest sequence and
adds the attention mask and the labels (-100 on padding), and the loss is the model's own
``outputs.loss`` (a mean over the batch's tokens). AdamW with weight decay, as in Hugging Face's
``Trainer``. Memory grows with the longest sequence of a batch, which autobatch finds from the
dict samples without being told.

Nothing here imports torch or transformers until a model, a batch or a sample is made.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from autobatch.tasks.torch_task import TorchTask

VOCAB_SIZE = 256
PAD_ID = 0  # also BOS/EOS: inside the vocabulary, so transformers has no out-of-range ids to warn about
MIN_LENGTH, MAX_LENGTH = 16, 128
TRAIN_SAMPLES = 2048
VAL_SAMPLES = 256
SUCCESSORS = 4
#: how likely each token's four successors are: about 1.1 nats of entropy a token
SUCCESSOR_PROBABILITIES = np.array([0.55, 0.25, 0.15, 0.05])
WEIGHT_DECAY = 0.01


def tiny_gpt2() -> TorchTask:
    train, val = token_sequences()
    return TorchTask(
        model=gpt2_model,
        train_data=SequenceDataset(train),
        val_data=SequenceDataset(val),
        collate_fn=pad_collate,
        optimizer=adamw,
        base_batch_size=16,
        base_learning_rate=2e-3,
        name="tiny-gpt2",
        description=(
            f"GPT-2 (transformers) 2 layers, n_embd 64, vocab {VOCAB_SIZE}, random weights, on Markov-chain "
            f"token sequences of {MIN_LENGTH}-{MAX_LENGTH} tokens; padding collator, outputs.loss, "
            f"AdamW (weight decay {WEIGHT_DECAY})"
        ),
    )


def gpt2_model() -> Any:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()  # no notices about generation configs or cache defaults
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=MAX_LENGTH,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=PAD_ID,
        eos_token_id=PAD_ID,
        pad_token_id=PAD_ID,
        use_cache=False,  # training: no key/value cache to keep
    )
    return GPT2LMHeadModel(config)


def adamw(parameters: Any, lr: float) -> Any:
    """AdamW with weight decay: a named function, so the task's optimizer is a plain ``(params, lr)`` callable."""
    import torch

    return torch.optim.AdamW(parameters, lr=lr, weight_decay=WEIGHT_DECAY)


def pad_collate(samples: list[dict]) -> dict:
    """Pad a batch to its longest sequence: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    import torch

    longest = max(len(sample["input_ids"]) for sample in samples)
    input_ids = torch.full((len(samples), longest), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, sample in enumerate(samples):
        length = len(sample["input_ids"])
        input_ids[row, :length] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class SequenceDataset:
    """A map-style dataset (PyTorch's ``__len__``/``__getitem__`` protocol) of ``{"input_ids": tensor}``.

    Not a ``torch.utils.data.Dataset`` subclass only so that this module imports no torch: a
    ``DataLoader`` and autobatch read it the same way.
    """

    def __init__(self, sequences: list[np.ndarray]) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict:
        import torch

        return {"input_ids": torch.from_numpy(self.sequences[index])}


@lru_cache(maxsize=1)
def token_sequences(seed: int = 1234) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, val): sequences of a BOS token then a walk on the chain, lengths uniform in 16..128."""
    rng = np.random.default_rng(seed)
    tokens = np.arange(1, VOCAB_SIZE)  # every token but the padding/BOS one
    # successors[t]: the four tokens that may follow token t, most likely first.
    successors = np.stack([rng.choice(tokens, size=SUCCESSORS, replace=False) for _ in range(VOCAB_SIZE)])
    sequences = []
    for length in rng.integers(MIN_LENGTH, MAX_LENGTH + 1, size=TRAIN_SAMPLES + VAL_SAMPLES):
        sequence = np.empty(length, dtype=np.int64)
        sequence[0] = PAD_ID
        sequence[1] = rng.choice(tokens)
        choices = rng.choice(SUCCESSORS, size=length - 2, p=SUCCESSOR_PROBABILITIES)
        for position in range(2, length):
            sequence[position] = successors[sequence[position - 1], choices[position - 2]]
        sequences.append(sequence)
    return sequences[:TRAIN_SAMPLES], sequences[TRAIN_SAMPLES:]
