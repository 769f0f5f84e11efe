"""transformers 4.x spellings of a transformers-5 ``config.json`` (the corrected folder's).

transformers 5 writes the rotary embedding only as ``rope_parameters``; transformers 4.x
never reads that key and silently falls back to its class defaults for ``rope_theta`` /
``rope_scaling`` (for SmolLM2: 10000 instead of 100000, a different model). ``v4_keys``
adds, beside transformers 5's keys, the keys transformers 4.57 reads for the same values,
in the top-level config and in every nested ``*_config`` (text_config, vision_config):

- flat ``rope_parameters`` {rope_type, rope_theta, ...} (llama, qwen2, qwen3, mistral,
  gemma2, the LLaVA / Idefics3 text configs, Qwen2-VL's text config with mrope_section):
  ``rope_theta`` = rope_parameters.rope_theta; ``rope_scaling`` = rope_parameters without
  rope_theta (``null`` for plain default RoPE, which is what 4.x assumes without the key;
  Qwen2-VL keeps {"rope_type": "default", "mrope_section": [...]}, which 4.x reads as is);
  ``partial_rotary_factor`` copied to the top level when present.
- Gemma 3's per-layer-type ``rope_parameters`` {full_attention, sliding_attention}:
  ``rope_theta`` / ``rope_scaling`` from full_attention, ``rope_local_base_freq`` from
  sliding_attention (4.x runs local layers with default RoPE, so sliding_attention must be
  of type default).
- Qwen2-VL / Qwen2.5-VL vision configs (``rope_type`` "axial"): 4.x has no key and always
  uses theta 10000; any other value cannot be expressed.

- composite configs (a nested ``text_config``): ``text_config.tie_word_embeddings`` =
  the top-level value. transformers 5 ties the LM head by the top-level key, 4.x by the
  decoder's text config (Qwen2-VL / Qwen2.5-VL's text config defaults to untied there, so
  4.x would leave a randomly initialised ``lm_head``).

transformers 5's values are the source of truth: the v4 keys are (over)written from them.
What cannot be expressed in 4.x keys is returned as a reason, and so are the families
whose weights or modeling code 4.57 reads differently whatever the config says:

- llava, llava_next: transformers 5 saves the CLIP vision tower as
  ``model.vision_tower.embeddings...``; 4.x expects ``model.vision_tower.vision_model...``
  and silently initialises a random vision tower.
- idefics3: transformers 5 computes the vision tower's position buckets differently
  (``torch.clamp(h * (1 / n))`` against 4.x's ``h / n * (1 - 1e-6)``), so image
  features differ.

``transformers4_compat`` returns the config with the v4 keys, the lowest transformers
version that reads the same model (``MIN_TRANSFORMERS_V4``, the 4.x release the tests load
under, or ``"5.0.0"``), and the reason when it is 5.0.0. The corrected folder records both
in its ``regap`` section and its ``modeling_regap.py`` refuses to load under an older
transformers (``ValueError`` with that reason).
"""
from __future__ import annotations

import copy
from typing import Any

MIN_TRANSFORMERS_V4 = "4.57.0"
MIN_TRANSFORMERS_V5 = "5.0.0"
V4_DEFAULT_VISION_THETA = 10000.0
# Families transformers 4.57 reads differently whatever config.json says (see above).
V4_UNREADABLE: dict[str, str] = {
    "llava": "transformers 4.x expects the vision tower's weights under other names "
             "(model.vision_tower.vision_model.*) and would initialise it randomly",
    "llava_next": "transformers 4.x expects the vision tower's weights under other names "
                  "(model.vision_tower.vision_model.*) and would initialise it randomly",
    "idefics3": "transformers 4.x computes the vision tower's position ids differently, so image features differ",
}
_GEMMA3_LAYER_TYPES = {"full_attention", "sliding_attention"}


def _is_flat(rope: dict[str, Any]) -> bool:
    return "rope_theta" in rope or "rope_type" in rope


def _scaling(rope: dict[str, Any]) -> dict[str, Any] | None:
    rest = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if set(rest) <= {"rope_type", "type"} and rest.get("rope_type", rest.get("type", "default")) == "default":
        return None
    return rest


def _one(config: dict[str, Any], where: str, problems: list[str]) -> None:
    rope = config.get("rope_parameters")
    if rope is None:
        return
    if not isinstance(rope, dict):
        problems.append(f"{where}rope_parameters is not an object")
        return
    if _is_flat(rope):
        if rope.get("rope_type") == "axial":  # Qwen-VL vision towers: 4.x hard-codes theta
            theta = float(rope.get("rope_theta", V4_DEFAULT_VISION_THETA))
            if theta != V4_DEFAULT_VISION_THETA:
                problems.append(f"{where}rope_parameters.rope_theta is {theta:g}; transformers 4.x always uses "
                                f"{V4_DEFAULT_VISION_THETA:g} for this vision tower")
            return
        if "rope_theta" not in rope:
            problems.append(f"{where}rope_parameters has no rope_theta")
            return
        config["rope_theta"] = rope["rope_theta"]
        config["rope_scaling"] = _scaling(rope)
        if "partial_rotary_factor" in rope:
            config["partial_rotary_factor"] = rope["partial_rotary_factor"]
        return
    if set(rope) == _GEMMA3_LAYER_TYPES and str(config.get("model_type", "")).startswith("gemma3"):
        full, local = rope["full_attention"], rope["sliding_attention"]
        if not (isinstance(full, dict) and isinstance(local, dict) and "rope_theta" in full and "rope_theta" in local):
            problems.append(f"{where}rope_parameters.full_attention / sliding_attention need rope_theta")
            return
        if _scaling(local) is not None:
            problems.append(f"{where}rope_parameters.sliding_attention is {local.get('rope_type')!r} RoPE; "
                            "transformers 4.x runs local layers with default RoPE")
            return
        config["rope_theta"] = full["rope_theta"]
        config["rope_scaling"] = _scaling(full)
        config["rope_local_base_freq"] = local["rope_theta"]
        return
    problems.append(f"{where}rope_parameters per layer type ({', '.join(sorted(rope))}) has no transformers 4.x "
                    "spelling")


def v4_keys(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``config`` (a config.json object, not changed) with transformers 4.x's keys added, and
    the settings 4.x cannot read (empty when 4.57 reads the same model)."""
    out = copy.deepcopy(config)
    problems: list[str] = []
    _one(out, "", problems)
    for key, value in out.items():
        if key.endswith("_config") and isinstance(value, dict):
            _one(value, f"{key}.", problems)
    text = out.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in out:
        text["tie_word_embeddings"] = out["tie_word_embeddings"]
    return out, problems


def transformers4_compat(config: dict[str, Any]) -> tuple[dict[str, Any], str, str | None]:
    """(``config`` with the v4 keys, the lowest transformers version that reads the same model,
    why transformers 4.x cannot (None when it can))."""
    out, problems = v4_keys(config)
    reason = V4_UNREADABLE.get(str(config.get("model_type")))
    if reason is None and problems:
        reason = "; ".join(problems)
    return out, (MIN_TRANSFORMERS_V5 if reason else MIN_TRANSFORMERS_V4), reason


__all__ = ["v4_keys", "transformers4_compat", "MIN_TRANSFORMERS_V4", "MIN_TRANSFORMERS_V5", "V4_UNREADABLE"]
