"""The parity oracle: ReGap's corrections as plain forward hooks, from the unfolded equations.

This module is deliberately independent of ``folding``, ``correction`` and ``rewrite``
(it imports none of them; it shares only the hook plumbing of ``models.hooks``, which holds
no correction math). It reads the directions themselves (rhat, drift, probe anchors
c+/c-, kappa) and applies METHOD section 3 literally, in float64, at every token position
of each block output ``h`` (the residual stream after block l):

    probe band    B_p:   h' = h - alpha0 * d_l
    adaptive band B_a:   z = (h . rhat_l - c-_l) / (c+_l - c-_l)
                         g = sigmoid(kappa_l * (z - tau))
                         h' = h - alpha_max * g * d_l
    fixed mode:          h' = h - alpha_max * d_l           on B_p and B_a
    regap-seq:           h' = h - alpha(x) * d_l            on B_p and B_a, alpha [batch]

where, with ``layer_drift = "increment"`` (the default), d_l stands for the drift added since
the previous corrected layer, d_l - d_{l'} (METHOD section 6).

regap-seq's alpha(x) comes from a probe pass (``reference_sequence_alpha``): the prompt runs
with ``h - alpha0 d_l`` on the probe band, the score is read at l_s = probe_band.end - 1
from the *corrected* output of that block (the same place the calibration measures c+/c-)
at the last prompt token, and ``alpha = alpha_max * sigmoid(kappa_{l_s} (z - tau))``.

Every rule is multiplied by the image mask m [batch, seq] (``image_mask``; METHOD section 6):
``h' = h - alpha * m * d_l`` and so on. Without a mask, m is the export's default everywhere:
1 for ``positions = "all"``, else 0 (no correction at all).

The result is cast back to the block's dtype, so a float32 model sees float32 outputs.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..calibration.directions import Directions
from ..errors import ArtifactError
from ..models.base import ModelAdapter
from ..models.hooks import StopForward, block_hidden, block_hooks, last_token_index, replace_hidden, stopped_forward
from ..options import RegapOptions

__all__ = ["reference_corrections", "reference_sequence_alpha", "reference_plan", "last_token_index"]

Rule = Callable[[torch.Tensor], torch.Tensor]


def _check_shapes(model: nn.Module, adapter: ModelAdapter, directions: Directions) -> nn.ModuleList:
    blocks = adapter.decoder_layers(model)
    if directions.num_layers != len(blocks):
        raise ArtifactError(f"the directions have {directions.num_layers} layers, the model {len(blocks)} blocks",
                            hint="use the directions calibrated on this model")
    hidden = adapter.hidden_size(model)
    if directions.hidden_size != hidden:
        raise ArtifactError(f"the directions have hidden size {directions.hidden_size}, the model {hidden}",
                            hint="use the directions calibrated on this model")
    return blocks


def _subtracted_drift(directions: Directions, opts: RegapOptions) -> dict[int, torch.Tensor]:
    """Per corrected layer (probe band, then adaptive band): d_l, or with
    ``layer_drift = "increment"`` d_l - d_k for k the corrected layer before l."""
    corrected = sorted(set(opts.probe_band.layers()) | set(opts.adaptive_band.layers()))
    out = {}
    for i, layer in enumerate(corrected):
        d = directions.drift[layer].double()
        if opts.layer_drift == "increment" and i > 0:
            d = d - directions.drift[corrected[i - 1]].double()
        out[layer] = d
    return out


def _score(h: torch.Tensor, directions: Directions, layer: int) -> torch.Tensor:
    """z_l(h) = (h . r_l - c-_l) / (c+_l - c-_l), in float64, shape h.shape[:-1]; r_l is the
    gate's read direction (rhat unless the directions carry gate_read)."""
    rhat = directions.read_direction(layer).to(device=h.device, dtype=torch.float64)
    c_pos = float(directions.anchor_probe_harmful[layer])
    c_neg = float(directions.anchor_probe_harmless[layer])
    if c_pos == c_neg:
        raise ArtifactError(f"probe anchors coincide at layer {layer}; the gate is undefined",
                            field="anchor_probe_harmful", hint="calibrate again with more or other records")
    return (h.to(torch.float64) @ rhat - c_neg) / (c_pos - c_neg)


def reference_plan(directions: Directions, options: RegapOptions, *, sequence_alpha: torch.Tensor | None = None,
                   record: dict[int, torch.Tensor] | None = None,
                   image_mask: Callable[[], torch.Tensor | None] | torch.Tensor | None = None) -> dict[int, Rule]:
    """layer -> h -> h' for every corrected layer of ``options.mode`` (unfolded, float64).

    ``record``, when given, receives the gate values g [batch, seq] of every adaptive layer.
    ``image_mask``: m [batch, seq], or a callable returning the current call's m (a decode loop
    changes it at every step); None or a None result: the default everywhere.
    """
    opts = options.resolved(directions.num_layers)
    default = 1.0 if opts.positions == "all" else 0.0
    probe, adaptive = opts.probe_band.layers(), opts.adaptive_band.layers()
    drift = _subtracted_drift(directions, opts)

    def d(layer: int, h: torch.Tensor) -> torch.Tensor:
        return drift[layer].to(device=h.device, dtype=torch.float64)

    def m(h: torch.Tensor) -> torch.Tensor:
        mask = image_mask() if callable(image_mask) else image_mask
        if mask is None:
            return torch.full((1, 1, 1), default, dtype=torch.float64, device=h.device)
        mask = torch.as_tensor(mask).to(device=h.device, dtype=torch.float64)
        if tuple(mask.shape) != tuple(h.shape[:2]):
            raise ValueError(f"image_mask has shape {tuple(mask.shape)} for hidden states {tuple(h.shape)}")
        return mask.unsqueeze(-1)

    def fixed(layer: int, alpha: float) -> Rule:
        return lambda h: (h.to(torch.float64) - alpha * m(h) * d(layer, h)).to(h.dtype)

    def gated(layer: int) -> Rule:
        kappa = opts.gate_sharpness * float(directions.kappa[layer])

        def rule(h: torch.Tensor) -> torch.Tensor:
            g = torch.sigmoid(kappa * (_score(h, directions, layer) - opts.tau))
            if record is not None:
                record[layer] = g.detach().cpu()
            return (h.to(torch.float64) - opts.alpha_max * g.unsqueeze(-1) * m(h) * d(layer, h)).to(h.dtype)
        return rule

    def per_sequence(layer: int, alpha: torch.Tensor) -> Rule:
        def rule(h: torch.Tensor) -> torch.Tensor:
            a = alpha.to(device=h.device, dtype=torch.float64).reshape(-1, 1, 1)
            if a.shape[0] not in (1, h.shape[0]):
                raise ValueError(f"sequence_alpha has {a.shape[0]} values for a batch of {h.shape[0]}")
            return (h.to(torch.float64) - a * m(h) * d(layer, h)).to(h.dtype)
        return rule

    if opts.mode != "regap-seq" and sequence_alpha is not None:
        raise ValueError(f"sequence_alpha is for mode regap-seq, not {opts.mode!r}")
    if opts.mode == "regap":
        plan = {layer: fixed(layer, opts.alpha0) for layer in probe}
        plan.update({layer: gated(layer) for layer in adaptive})
    elif opts.mode == "fixed":
        plan = {layer: fixed(layer, opts.alpha_max) for layer in probe + adaptive}
    else:
        if sequence_alpha is None:
            raise ValueError("mode regap-seq needs sequence_alpha [batch] (see reference_sequence_alpha)")
        alpha = torch.as_tensor(sequence_alpha, dtype=torch.float64).reshape(-1)
        plan = {layer: per_sequence(layer, alpha) for layer in probe + adaptive}
    return plan


@contextlib.contextmanager
def reference_corrections(model: nn.Module, adapter: ModelAdapter, directions: Directions, options: RegapOptions,
                          *, sequence_alpha: torch.Tensor | None = None,
                          record: dict[int, torch.Tensor] | None = None,
                          image_mask: Callable[[], torch.Tensor | None] | torch.Tensor | None = None
                          ) -> Iterator[nn.Module]:
    """Apply ``options.mode``'s corrections with forward hooks on the decoder blocks while inside.

    ``sequence_alpha`` [batch] is required for mode regap-seq and refused otherwise.
    ``record`` (optional dict) collects each adaptive layer's gate [batch, seq] (regap mode).
    ``image_mask``: see ``reference_plan``.
    """
    blocks = _check_shapes(model, adapter, directions)
    plan = reference_plan(directions, options, sequence_alpha=sequence_alpha, record=record, image_mask=image_mask)

    def make_hook(rule: Rule):
        def hook(_module, _inputs, output):
            return replace_hidden(output, rule(block_hidden(output)))
        return hook

    with block_hooks(blocks, {layer: make_hook(rule) for layer, rule in plan.items()}):
        yield model


@torch.no_grad()
def reference_sequence_alpha(model: nn.Module, adapter: ModelAdapter, directions: Directions,
                             options: RegapOptions, inputs: Mapping[str, Any],
                             image_mask: torch.Tensor | None = None) -> torch.Tensor:
    """regap-seq's alpha(x) [batch] (float64) from a probe pass over the prompt ``inputs``.

    The pass applies ``h - alpha0 m d_l`` on the probe band (m: ``image_mask`` [batch, seq], or
    the default), stops after block l_s, and reads z_{l_s} of that block's corrected output at
    each row's last prompt token.
    """
    opts = options.resolved(directions.num_layers)
    blocks = _check_shapes(model, adapter, directions)
    read = opts.read_layer
    captured: dict[str, torch.Tensor] = {}
    default = 1.0 if opts.positions == "all" else 0.0
    drift = _subtracted_drift(directions, opts)

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            h = block_hidden(output)
            m = (torch.full((1, 1, 1), default, dtype=torch.float64) if image_mask is None
                 else torch.as_tensor(image_mask, dtype=torch.float64).unsqueeze(-1)).to(h.device)
            h = (h.to(torch.float64) - opts.alpha0 * m * drift[layer].to(h.device, torch.float64)).to(h.dtype)
            if layer == read:
                captured["h"] = h
                raise StopForward
            return replace_hidden(output, h)
        return hook

    with block_hooks(blocks, {layer: make_hook(layer) for layer in opts.probe_band.layers()}), stopped_forward():
        model(**dict(inputs), use_cache=False)
    if "h" not in captured:
        raise RuntimeError(f"the probe pass never reached block {read}")
    h = captured["h"]
    index = last_token_index(inputs.get("attention_mask"), h.shape[0], h.shape[1]).to(h.device)
    last = h[torch.arange(h.shape[0], device=h.device), index]
    z = _score(last, directions, read)
    kappa = opts.gate_sharpness * float(directions.kappa[read])
    return (opts.alpha_max * torch.sigmoid(kappa * (z - opts.tau))).cpu()
