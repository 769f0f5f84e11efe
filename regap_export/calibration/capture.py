"""Batched activation capture at the read position (METHOD "Notation").

Hooks read each needed block's output at the last prompt token (or the mean over the
template's post-instruction tokens); the forward pass stops right after the deepest
block needed, so capturing early layers costs only those layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ActivationError
from ..method.modality import INPUT_NAME as IMAGE_MASK, mask_function
from ..models.hooks import StopForward, block_hidden, block_hooks, stopped_forward
from ..data.records import check_context
from ..io.progress import progress_bar
from ..models.base import tokenizer_of
from .stats import ActivationStats


@dataclass(frozen=True)
class CaptureRequest:
    """One model input to read: a rendered prompt, and an image for multimodal inputs."""

    id: str
    class_key: str
    pair: str | None
    prompt: str
    image: Any | None = None
    source: str | None = None  # where the record came from (file, line), for error messages
    line: int | None = None


def requests_for(records: Sequence[Any], adapter, processor) -> list[CaptureRequest]:
    """Render each calibration record into its chat prompt (image records with an image slot)."""
    out = []
    for record in records:
        has_image = record.modality == "image"
        prompt = adapter.render_prompt(processor, record.prompt_text, with_image=has_image)
        out.append(CaptureRequest(record.id, record.class_key, record.pair, prompt,
                                  record.open_image() if has_image else None, record.source, record.line))
    return out


@torch.no_grad()
def capture(model: nn.Module, adapter, processor, requests: Sequence[CaptureRequest], *,
            layers: Sequence[int] | None = None, read_tokens: int = 1, batch_size: int = 8,
            description: str = "capture", show_progress: bool = True,
            correction_positions: str | None = None, correction_off: bool = False,
            extra_inputs=None) -> ActivationStats:
    """Read block outputs for every request; rows are float64 [N, len(layers), H].

    ``read_tokens`` = 1 reads the last prompt token; k > 1 averages the last k tokens
    (the post-instruction span). Batches are left-padded, so the read span is the tail.
    ``correction_positions``: with correction layers inserted, feed each batch the image mask
    of these positions (``regap_export.method.modality``), as the exported runtimes do;
    ``correction_off``: feed zero masks instead (the inserted corrections do nothing).
    ``extra_inputs``: batch inputs -> more keyword inputs (regap-seq's per-sequence alpha).
    """
    image_mask = None
    if correction_positions is not None or correction_off:
        image_mask = mask_function(None if correction_off else correction_positions,
                                   adapter.image_token_id(model.config))
    blocks = adapter.decoder_layers(model)
    wanted = list(range(len(blocks))) if layers is None else sorted(set(layers))
    deepest = wanted[-1]
    buffer: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            buffer[layer] = block_hidden(output)[:, -read_tokens:, :].to(torch.float64).mean(dim=1).cpu()
            if layer == deepest:
                raise StopForward
        return hook

    limit = adapter.context_length(model.config)
    check_context(zip(requests, _text_lengths(processor, requests)), limit, what="tokens (text alone)")
    device = next(model.parameters()).device
    rows = torch.empty((len(requests), len(wanted), adapter.hidden_size(model)), dtype=torch.float64)
    # Text and image inputs cannot share a processor call; keep file order inside each.
    groups = [[i for i, r in enumerate(requests) if r.image is None],
              [i for i, r in enumerate(requests) if r.image is not None]]
    batches = [group[s:s + batch_size] for group in groups for s in range(0, len(group), batch_size)]
    with block_hooks(blocks, {layer: make_hook(layer) for layer in wanted}):
        for batch in progress_bar(batches, description=description, total_items=len(requests),
                                  enabled=show_progress):
            items = [requests[i] for i in batch]
            images = None if items[0].image is None else [r.image for r in items]
            inputs = adapter.encode(processor, [r.prompt for r in items], images)
            check_context(zip(items, inputs["attention_mask"].sum(dim=1).tolist()), limit)
            if image_mask is not None:
                inputs[IMAGE_MASK] = torch.from_numpy(image_mask(inputs["input_ids"].numpy()))
            if extra_inputs is not None:
                inputs.update(extra_inputs(inputs))
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            buffer.clear()
            with stopped_forward():
                model(**inputs, use_cache=False)
            for column, layer in enumerate(wanted):
                values = buffer[layer]
                bad = ~torch.isfinite(values).all(dim=-1)
                if bool(bad.any()):
                    culprit = items[int(bad.nonzero()[0])].id
                    raise ActivationError(
                        f"non-finite activations at layer {layer} for record {culprit!r}",
                        hint="the model overflows on this input; try --dtype float32 or check the weights",
                    )
                rows[batch, column] = values
    return ActivationStats([r.id for r in requests], [r.class_key for r in requests],
                           [r.pair for r in requests], rows)


def _text_lengths(processor: Any, requests: Sequence[CaptureRequest]) -> list[int]:
    """Tokens of each request's rendered prompt without its image expansion: a lower bound
    checked before any forward pass (each batch is checked exactly once encoded)."""
    if not requests:
        return []
    return [len(ids) for ids in tokenizer_of(processor)([r.prompt for r in requests], add_special_tokens=False)["input_ids"]]
