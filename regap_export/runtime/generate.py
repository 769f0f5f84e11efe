"""Text generation on ONNX Runtime with a KV cache (greedy or sampling), regap-seq's two passes.

Batches are left-padded (as ``ModelAdapter.encode`` makes them). Position ids follow
transformers, per the export's scheme (``regap_export.models.positions``): ``cumsum(attention_mask)
- 1`` with padding positions set to 1, or Qwen2-VL's 3-D M-RoPE positions.

The correction acts on rows that hold an image, at the positions the export's options say
(``regap_export.method.modality``). Graphs with the modality channel (contract 5, multimodal)
find those rows themselves; ``correct=False`` then feeds the embeddings with the channel
cleared, which runs the uncorrected model exactly. Other graphs get ``regap_image_mask`` on
every call (zeros for ``correct=False``).

A chat continues with the cache: pass the previous result's ``cache`` as ``past`` and the
whole conversation so far as ``input_ids`` (the previous prompt and reply, then the new turn);
only the tokens the cache does not hold are fed, in one call, as every client does.

regap-seq (graph input ``regap_alpha``): unless ``regap_alpha`` is given,
  1. probe pass over the prompt with ``regap_alpha = alpha0`` (options), reading
     ``regap_score`` z at the last prompt token;
  2. ``alpha(x) = alpha_max * sigmoid(kappa (z - tau))`` (``folding.sequence_alpha``);
  3. prefill and decode with that alpha.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..method import folding
from ..errors import RegapError
from ..method.modality import call_masks, clear_image_flags
# Text position ids [batch, seq] (exports whose ``position_ids`` scheme is ``text``).
from ..models.positions import check_prompt
from ..models.positions import text_positions as position_ids_from_mask  # noqa: F401  (public name)
from ..options import RegapOptions
from .decode import decode, extend_attention
from .session import OrtSessions


@dataclass
class GenerationResult:
    sequences: np.ndarray            # [batch, prompt + new] prompt ids followed by the new tokens
    new_tokens: np.ndarray           # [batch, new] (pad_token_id after a row's EOS)
    regap_alpha: np.ndarray | None   # [batch] the strength used (regap-seq graphs)
    regap_score: np.ndarray | None   # [batch] the probe pass's z at the last prompt token
    first_logits: np.ndarray | None = None  # [batch, vocab] logits of the first generated token
    cache: list[Any] | None = None   # present.* after the last token fed: sequences[:, :-1] (continue a chat)


def regap_options(sessions: OrtSessions) -> RegapOptions:
    data = sessions.config.get("options")
    return RegapOptions() if data is None else RegapOptions.from_json(json.dumps(data))


def sequence_alpha(sessions: OrtSessions, score: np.ndarray) -> np.ndarray:
    """alpha(x) = alpha_max * sigmoid(kappa (z - tau)) for the probe scores z [batch]."""
    spec = sessions.config.get("readout")
    if spec is None:
        raise RegapError("this graph has no regap_score readout; pass regap_alpha explicitly")
    alpha = folding.sequence_alpha(score, float(spec["kappa"]), regap_options(sessions))
    return alpha.astype(np.float32)


def probe_score(sessions: OrtSessions, main: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray, alpha0: float | None = None,
                regap_image_mask: np.ndarray | None = None) -> np.ndarray:
    """regap-seq's first pass: z at the last prompt token, with the band at strength alpha0."""
    if not (sessions.has_regap_alpha and sessions.has_regap_score):
        raise RegapError("probe_score needs a regap-seq graph with regap_alpha and regap_score")
    batch = attention_mask.shape[0]
    a0 = regap_options(sessions).alpha0 if alpha0 is None else float(alpha0)
    out = sessions.run_decoder(main, attention_mask, position_ids, sessions.empty_past(batch),
                               regap_alpha=np.full(batch, a0, dtype=np.float32), regap_image_mask=regap_image_mask)
    return out.regap_score[:, -1].astype(np.float32)


def correction_masks(sessions: OrtSessions, input_ids: np.ndarray, *, correct: bool = True,
                     prompt_length: int | None = None, past_ids: np.ndarray | None = None,
                     images: bool = True) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(prompt mask [batch, seq], decode-step mask [batch, 1]) for this export, or (None, None)
    for a graph that takes no ``regap_image_mask``. ``correct=False``: zeros (the uncorrected
    model). ``past_ids``: the tokens the cache this call continues holds. ``images=False`` (no
    pixel inputs given in this conversation): no row holds an image, whatever ids it holds, as
    the graphs see it (image rows are the rows given image features)."""
    if not sessions.has_image_mask:
        return None, None
    return call_masks(sessions.correction_positions, input_ids, sessions.image_token_id, correct=correct,
                      prompt_length=prompt_length, past_ids=past_ids, images=images)


def _select(logits: np.ndarray, rng: np.random.Generator | None, do_sample: bool, temperature: float,
            top_k: int, top_p: float) -> np.ndarray:
    logits = logits.astype(np.float32)
    if not do_sample:
        return logits.argmax(axis=-1)
    if temperature <= 0:
        raise RegapError(f"temperature must be positive, got {temperature}", field="temperature",
                         hint="sample with a temperature > 0, or decode greedily (do_sample=False)")
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1)
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        cum = np.cumsum(probs, axis=-1)
        drop_sorted = (cum - probs) > top_p
        drop_sorted[:, 0] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits = np.where(drop, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    u = rng.random((probs.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)


def generate(sessions: OrtSessions, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *,
             pixel_values: np.ndarray | None = None, max_new_tokens: int = 32, regap_alpha: Any = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, correct: bool = True, past: Sequence[Any] | None = None,
             **pixel_extras: Any) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens for a left-padded batch.

    ``pixel_values`` (+ family extras such as ``pixel_attention_mask``, ``image_grid_thw``,
    ``mm_token_type_ids``) as the processor returns them, for multimodal exports.
    ``regap_alpha`` (float or [batch]) fixes the regap-seq strength and skips the probe pass.
    ``eos_token_id`` / ``pad_token_id`` default to the exported config's; pass
    ``eos_token_id=[]`` to never stop early. ``correct=False`` runs the same graphs with the
    correction switched off (image mask 0): the uncorrected model. ``past``: a previous
    result's ``cache``, which ``input_ids`` (the whole conversation) continues: the tokens after
    it are fed in one call (the images of ``pixel_values`` belong to those tokens).
    """
    input_ids, mask = check_prompt(input_ids, attention_mask)
    batch = input_ids.shape[0]
    if not mask[:, -1].all():
        raise RegapError("generate needs left-padded batches (every row's last token must be attended)")
    held = 0 if past is None else _cache_length(sessions, past, batch)
    if held >= input_ids.shape[1]:
        raise RegapError(f"the cache holds {held} tokens; input_ids ({input_ids.shape[1]}) must continue it",
                         hint="pass the whole conversation: the previous prompt and reply, then the new turn")
    eos = (sessions.config.get("eos_token_id") or []) if eos_token_id is None else eos_token_id
    eos = [eos] if isinstance(eos, (int, np.integer)) else list(eos)
    pad = pad_token_id if pad_token_id is not None else sessions.config.get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    rng = np.random.default_rng(seed) if do_sample else None

    positions = sessions.positions
    position_ids = positions.prefill(input_ids, mask, **pixel_extras)[..., held:]
    new_ids = input_ids[:, held:]
    if sessions.multimodal:
        main = sessions.prompt_embeds(new_ids, pixel_values=pixel_values, **pixel_extras)
    else:
        if pixel_values is not None:
            raise RegapError("this export is a text model: it takes no image")
        main = new_ids

    if sessions.image_channel and not correct:
        main = clear_image_flags(main)
    image_mask, step_image_mask = correction_masks(sessions, new_ids, correct=correct,
                                                   past_ids=input_ids[:, :held] if held else None,
                                                   images=pixel_values is not None or held > 0)
    alpha = score = None
    if sessions.has_regap_alpha:
        if held:
            raise RegapError("a regap-seq graph's strength comes from a probe pass over one prompt; it does not "
                             "continue a cache", hint="generate each turn from the whole conversation, without past")
        if regap_alpha is None:
            score = probe_score(sessions, main, mask, position_ids, regap_image_mask=image_mask)
            alpha = sequence_alpha(sessions, score)
        else:
            alpha = np.broadcast_to(np.asarray(regap_alpha, dtype=np.float32), (batch,)).copy()
    elif regap_alpha is not None:
        raise RegapError("this graph takes no regap_alpha (it was not exported in regap-seq mode)")

    out = sessions.run_decoder(main, mask, position_ids, sessions.empty_past(batch) if past is None else list(past),
                               regap_alpha=alpha, regap_image_mask=image_mask)
    first_logits = np.asarray(out.logits[:, -1, :], dtype=np.float32)

    def step(tokens: np.ndarray) -> np.ndarray:
        nonlocal out, mask, position_ids
        mask = extend_attention(mask)
        position_ids = positions.next(position_ids)
        step_ids = tokens[:, None]
        main = sessions.embed(step_ids) if sessions.multimodal else step_ids
        out = sessions.run_decoder(main, mask, position_ids, out.presents, regap_alpha=alpha,
                                   regap_image_mask=step_image_mask)
        return out.logits[:, -1, :]

    new_tokens = decode(out.logits[:, -1, :], step, max_new_tokens=max_new_tokens, eos=eos, pad=pad,
                        select=lambda logits: _select(logits, rng, do_sample, temperature, top_k, top_p))
    return GenerationResult(sequences=np.concatenate([input_ids, new_tokens], axis=1), new_tokens=new_tokens,
                            regap_alpha=alpha, regap_score=score, first_logits=first_logits, cache=out.presents)


def _cache_length(sessions: OrtSessions, past: Sequence[Any], batch: int) -> int:
    if len(past) != 2 * sessions.num_layers:
        raise RegapError(f"past holds {len(past)} tensors; this graph's cache has {2 * sessions.num_layers}",
                         hint="pass GenerationResult.cache of the same export")
    first = past[0]
    shape = tuple(first.shape) if isinstance(first, np.ndarray) else tuple(first.shape())  # numpy or OrtValue
    if shape[0] != batch:
        raise RegapError(f"past is for a batch of {shape[0]}, input_ids for {batch}")
    return int(shape[2])
