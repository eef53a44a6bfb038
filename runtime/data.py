"""A deterministic synthetic token corpus with learnable structure, and rank-sharded batches of it.

The corpus is a seeded sequence of "phrases": vocab_size // 16 fixed random token strings of
PHRASE_TOKENS tokens each, drawn with Zipf-like frequencies (weight 1/rank). Inside a phrase the next
token follows from the previous ones, so a small model's loss falls quickly from ln(V) towards the
entropy of the phrase choice spread over the phrase (about 0.3 nats/token for V = 8192); at phrase
boundaries it cannot. Everything comes from torch.Generator seeds: the same arguments give the same tensors
on every run and every machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ztune.errors import UserError

PHRASE_TOKENS = 16
VOCAB_PER_PHRASE = 16  # one distinct phrase per 16 vocabulary entries
_EPOCH_SEED_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs do not collide for small values


def synthetic_corpus(*, vocab_size: int, num_tokens: int, seed: int) -> torch.Tensor:
    """`num_tokens` token ids in [0, vocab_size), int64, 1-D."""
    if vocab_size < 2 or num_tokens < 1:
        raise UserError(f"synthetic corpus needs vocab_size >= 2 and num_tokens >= 1, got {vocab_size}, {num_tokens}")
    gen = torch.Generator().manual_seed(seed)
    num_phrases = max(8, vocab_size // VOCAB_PER_PHRASE)
    phrases = torch.randint(0, vocab_size, (num_phrases, PHRASE_TOKENS), generator=gen)
    weights = 1.0 / torch.arange(1, num_phrases + 1, dtype=torch.float64)
    num_draws = -(-num_tokens // PHRASE_TOKENS)
    picks = torch.multinomial(weights, num_draws, replacement=True, generator=gen)
    return phrases[picks].reshape(-1)[:num_tokens].clone()


def batches(
    corpus: torch.Tensor,
    *,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    steps: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (input_ids, labels), each (batch_size, seq_len) int64, for this rank; forever, or `steps` times.

    The corpus is cut into non-overlapping windows of seq_len tokens. Each epoch visits them in a seeded
    random order (a new permutation per epoch, the tail that does not fill a global batch is dropped). Step
    t's global batch is the next batch_size * world_size windows; rank r gets rows [r*batch_size,
    (r+1)*batch_size). So the ranks' batches stacked in rank order equal the single-process batch of size
    batch_size * world_size with the same seed, step for step (what parity tests compare against).
    labels equal input_ids: the model shifts them (Hugging Face convention).
    """
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")
    if batch_size < 1 or seq_len < 1:
        raise UserError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    global_batch = batch_size * world_size
    num_windows = corpus.numel() // seq_len
    steps_per_epoch = num_windows // global_batch
    if steps_per_epoch == 0:
        raise UserError(
            f"corpus of {corpus.numel()} tokens holds {num_windows} windows of {seq_len}, fewer than one global "
            f"batch of {global_batch}: make the corpus larger"
        )
    windows = corpus[: num_windows * seq_len].view(num_windows, seq_len)
    step = 0
    epoch = 0
    while steps is None or step < steps:
        gen = torch.Generator().manual_seed(seed * _EPOCH_SEED_STRIDE + epoch)
        order = torch.randperm(num_windows, generator=gen)
        for i in range(steps_per_epoch):
            if steps is not None and step >= steps:
                return
            rows = order[i * global_batch + rank * batch_size : i * global_batch + (rank + 1) * batch_size]
            input_ids = windows[rows]
            yield input_ids, input_ids.clone()
            step += 1
        epoch += 1
