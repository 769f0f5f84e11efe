"""tune's proxy: each candidate's refusal log-odds at the first reply token, without generating.

With ``positions`` last+generated (the default) the correction acts on an image prompt's last
token only, so the keys and values of every other prompt position are the uncorrected model's,
the same for every candidate. Each image record is therefore prefilled once, uncorrected, up to
its last prompt token; a candidate then costs one token's forward over that cache (the cache is
put back after each, ``models.base.cache_kept``). The same one-token forward gives the probe
pass's block outputs at the last token, where calibrate reads them, so the gate of every probe
setting is fitted from the same prefills. Text records need no pass at all: the correction
leaves a prompt without an image exactly unchanged, so text replies are the same under every
candidate. Candidates that correct every image position (``positions`` image) run the whole
prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..method.folding import LayerCorrection
from ..method.modality import INPUT_NAME as IMAGE_MASK
from ..method.modality import prompt_mask
from ..method.rewrite import corrected
from ..models.base import cache_kept, cache_of, with_cache
from ..models.hooks import StopForward, block_hidden, block_hooks, stopped_forward
from .evaluate import Batch, torch_inputs

LAST = "last+generated"


@dataclass
class PrefixBatch:
    """A batch of image records prefilled without the correction up to their last prompt token."""

    batch: Batch
    inputs: dict[str, torch.Tensor]          # the whole prompt's model inputs
    last: dict[str, torch.Tensor]            # the last token's: input_ids, attention_mask, position_ids
    cache: Any = field(repr=False, default=None)

    @property
    def records(self) -> list:
        return self.batch.records

    def __len__(self) -> int:
        return len(self.batch.records)


def position_scheme_of(loaded) -> Any:
    from ..models.positions import position_config, position_scheme

    return position_scheme(position_config(loaded.adapter.family, loaded.model.config))


@torch.no_grad()
def prefill(loaded, scheme, batch: Batch, *, with_cache_prefix: bool = True) -> PrefixBatch:
    """One uncorrected forward of every prompt token but the last (left-padded batches: the
    last column is each row's last token)."""
    ids = batch.ids
    mask = batch.inputs["attention_mask"].astype(np.int64)
    inputs = torch_inputs(scheme, batch, ids, mask)
    last = {"input_ids": inputs["input_ids"][:, -1:], "attention_mask": inputs["attention_mask"],
            "position_ids": inputs["position_ids"][..., -1:]}
    cache = None
    if with_cache_prefix:
        prefix = dict(inputs, input_ids=inputs["input_ids"][:, :-1], attention_mask=inputs["attention_mask"][:, :-1],
                      position_ids=inputs["position_ids"][..., :-1])
        cache = cache_of(loaded.model(**prefix, use_cache=True))
    return PrefixBatch(batch, inputs, last, cache)


@torch.no_grad()
def last_token(loaded, prefixed: PrefixBatch, corrections: Sequence[LayerCorrection], *, positions: str = LAST,
               alpha: np.ndarray | None = None, read_layers: Sequence[int] = (), stop_after: int | None = None
               ) -> tuple[np.ndarray | None, dict[int, torch.Tensor]]:
    """The last prompt token's next-token logits [batch, vocab] (float32) with ``corrections`` in
    place, acting where ``positions`` says (every row is an image row), and its block outputs at
    ``read_layers`` ({layer: [batch, H] float64}). ``stop_after``: end the forward after that
    block (no logits). ``alpha``: regap-seq's strength per row."""
    model, adapter = loaded.model, loaded.adapter
    read = set(read_layers) | ({stop_after} if stop_after is not None else set())
    states: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(_module, _args, output):
            states[layer] = block_hidden(output)[:, -1].to(torch.float64).cpu()
            if layer == stop_after:
                raise StopForward
        return hook

    extra: dict[str, Any] = {}
    if alpha is not None:
        extra["regap_alpha"] = torch.as_tensor(np.asarray(alpha, dtype=np.float32))
    logits = None
    with corrected(model, adapter, corrections, mask_default=0.0):
        blocks = adapter.decoder_layers(model)
        with block_hooks(blocks, {layer: hook_for(layer) for layer in read}), stopped_forward():
            if positions == LAST:
                rows = prefixed.last["input_ids"].shape[0]
                with cache_kept(prefixed.cache):
                    out = model(**prefixed.last, **with_cache(model, prefixed.cache), use_cache=True,
                                **{IMAGE_MASK: torch.ones((rows, 1), dtype=torch.float32)}, **extra)
            else:
                image_token = adapter.image_token_id(model.config)
                mask = prompt_mask(positions, prefixed.inputs["input_ids"].numpy(), image_token)
                out = model(**prefixed.inputs, use_cache=False, **{IMAGE_MASK: torch.from_numpy(mask)}, **extra)
            logits = out.logits[:, -1].float().numpy()
    return logits, states
