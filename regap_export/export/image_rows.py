"""The modality channel inside the exported graphs (ONNX contract 5; ``regap_export.method.modality``).

Multimodal graphs with image-only positions widen the embedding by one channel:
``embed_tokens.onnx`` returns ``[.., hidden + 1]`` with 0 in the last channel,
``vision_encoder.onnx`` returns its features with 1 there, and the decoder takes
``inputs_embeds`` ``[.., hidden + 1]``: channel ``hidden`` says which rows are image rows, at
any precision. The decoder gives the model ``inputs_embeds[.., :hidden]`` (nothing else is
copied) and builds the image mask of ``modality.call_mask`` from the channel:

- the running "row holds an image" flag of each position is the flag of the cache this call
  continues OR an image row at or before it in this call;
- ``last+generated``: m = the flag at the last position of the call, 0 elsewhere;
  ``image``: m = the flag everywhere.

Across calls the flag rides in the KV cache: layer 0's keys carry one more channel
(``head_dim + 1``) holding each position's flag (``FlaggedKeyLayer``). Layer 0's attention
pads its queries with a zero channel (``flagged_attention``), so q . k is unchanged (0 x flag
= 0) and nothing slices or copies the cache; a call reads the flag of the last past position
only (O(1)). Every client feeds ``present.*`` back as ``past_key_values.*`` and builds the first,
empty past from the graph's own input shapes, so the channel reaches the next call unseen.
Traced by torch.onnx into plain Slice / Greater / CumSum / Concat / Pad nodes.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from ..method.modality import FLAG_THRESHOLD


def with_image_channel(features: torch.Tensor, value: float) -> torch.Tensor:
    """``features`` [.., hidden] -> [.., hidden + 1] with ``value`` (0: text, 1: image) in the last channel."""
    return torch.cat([features, torch.full_like(features[..., :1], value)], dim=-1)


def split_channel(embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's embeddings [.., hidden], bool image rows [batch, seq]) of ``inputs_embeds`` [.., hidden + 1]."""
    return embeds[..., :-1], embeds[..., -1] > FLAG_THRESHOLD


def past_flag(past_key: torch.Tensor) -> torch.Tensor:
    """bool [batch, 1]: the cache holds an image, read from the flag channel of its last position
    (``past_key`` [batch, heads, past, head_dim + 1]; an empty past (prefill) reads False).
    A slice of at most one element per row, summed so that an empty one gives 0."""
    last = past_key[:, :1, -1:, -1:]                                  # [batch, 1, 0 or 1, 1]
    return last.to(torch.float32).sum(dim=(2, 3)) > FLAG_THRESHOLD     # [batch, 1]


def call_flags(image_rows: torch.Tensor, past_holds: torch.Tensor, positions: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 mask [batch, seq], bool flags [batch, seq]) of one call: the graph's form of
    ``modality.call_mask`` (one call, its last column the call's end)."""
    held = (image_rows.to(torch.int64).cumsum(dim=1) > 0) | past_holds
    if positions == "last+generated":
        seq = image_rows.shape[1]
        last = torch.arange(seq, device=image_rows.device) == seq - 1
        covered = held & last[None, :]
    elif positions == "image":
        covered = held
    else:
        raise ValueError(f"positions {positions!r} needs no modality channel")
    return covered.to(torch.float32), held


class FlaggedKeyLayer(DynamicLayer):
    """Layer 0's cache entry: a transformers ``DynamicLayer`` holding the past (whose keys carry
    the flag channel already) whose new keys get the flags of this call's positions
    (``flags`` bool [batch, seq]) as one more channel before they are appended. Built per call
    by the decoder wrapper."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, flags: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.flags = flags

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch, heads, seq, _ = key_states.shape
        flag = self.flags.to(key_states.dtype)[:, None, :, None].expand(batch, heads, seq, 1)
        return super().update(torch.cat([key_states, flag], dim=-1), value_states, *args, **kwargs)


def flagged(base: Callable) -> Callable:
    """An attention function that, given keys one channel wider than the queries (layer 0 of a
    flagged cache), pads the queries with a zero channel; otherwise ``base`` as it is. The
    modules pass their ``scaling`` explicitly, so the wider dot product keeps 1/sqrt(head_dim)."""
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if key.shape[-1] == query.shape[-1] + 1:
            query = torch.nn.functional.pad(query, (0, 1))
        return base(module, query, key, value, attention_mask, *args, **kwargs)
    attention.regap_flagged = True
    return attention


@contextlib.contextmanager
def flagged_attention(model: nn.Module) -> Iterator[None]:
    """While inside, every attention implementation the model's attention modules name (in
    transformers' ``AttentionInterface`` registry, ``ALL_ATTENTION_FUNCTIONS``) pads its queries
    for a flagged key cache (``flagged``). "eager", which the registry does not hold, is
    registered as the modelling file's own ``eager_attention_forward``. Restored on exit; not
    thread-safe (the registry is global), like the export around it."""
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    saved = dict(mapping)
    try:
        for module in model.modules():
            config = getattr(module, "config", None)
            name = getattr(config, "_attn_implementation", None)
            if name is None or not hasattr(module, "scaling"):
                continue
            current = mapping.get(name)
            if current is not None and getattr(current, "regap_flagged", False):
                continue
            if current is None:
                current = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
                if current is None:
                    raise RuntimeError(f"{type(module).__name__}: attention {name!r} is neither registered nor the "
                                       "modelling file's eager_attention_forward")
            mapping[name] = flagged(current)
        yield
    finally:
        mapping.clear()
        mapping.update(saved)
