"""The one decode loop: pick a token per row, feed it back, stop at EOS or the token budget.

Every caller that generates (the ONNX Runtime runtime, ``validate``'s PyTorch and ONNX Runtime
traces, ``evaluate``'s PyTorch engine) runs this loop; what differs between them is only how one
step is computed, which the caller passes as ``step``. Numpy only (no torch), so the runtime
stays torch-free.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# tokens [batch] -> next logits [batch, vocab]
Step = Callable[[np.ndarray], np.ndarray]
# logits [batch, vocab] -> tokens [batch]
Select = Callable[[np.ndarray], np.ndarray]


def greedy(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits).argmax(axis=-1)


def decode(first_logits: np.ndarray, step: Step, *, max_new_tokens: int, eos: Sequence[int] = (),
           pad: int = 0, select: Select = greedy) -> np.ndarray:
    """New tokens [batch, n <= max_new_tokens] after a prefill whose last-position logits are
    ``first_logits`` [batch, vocab].

    A row that produced an EOS token keeps getting ``pad`` (its later tokens are not fed to the
    model differently: every row is stepped until all rows are done, as batched generation
    does). The loop stops when every row is done or after ``max_new_tokens`` tokens; the last
    token is never fed back (nothing would read its logits). ``eos=()`` never stops early."""
    logits = first_logits
    batch = np.asarray(logits).shape[0]
    unfinished = np.ones(batch, dtype=bool)
    eos = list(eos)
    new: list[np.ndarray] = []
    for index in range(max_new_tokens):
        tokens = np.where(unfinished, np.asarray(select(logits)).astype(np.int64), pad)
        new.append(tokens)
        if eos:
            unfinished &= ~np.isin(tokens, eos)
        if not unfinished.any() or index == max_new_tokens - 1:
            break
        logits = step(tokens)
    return np.stack(new, axis=1) if new else np.zeros((batch, 0), dtype=np.int64)


def extend_attention(attention_mask: np.ndarray) -> np.ndarray:
    """The attention mask of the next call: one more attended column per row."""
    mask = np.asarray(attention_mask)
    return np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
