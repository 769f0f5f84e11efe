"""Tiny, seeded models for every supported family, built offline from configs.

``build_tiny(family)`` returns ``(model, processor)``: a randomly initialised fp32 model
in eval mode (``torch.manual_seed(0)``; hidden 64, 4 decoder layers, 4 heads, 2 KV heads,
tiny vision towers) and its tokenizer (text families) or processor (multimodal families).
Tokenizers are copies of the embedded SmolLM2 tokenizer with the family's special tokens
and chat template (the family's fallback template) added; vocab sizes follow
``len(tokenizer)``. ``save_tiny(family, folder)`` writes both so that
``from_pretrained(folder)`` works offline.

The SmolLM2 tokenizer is the library's (``load_embedded_tokenizer``: parsed from the GGUF
once and kept in the model cache, so later runs start in well under a second).
"""
from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any, Callable

import torch
from transformers.utils import is_torchvision_available

from regap_export.models import adapter_for_config
from regap_export.models.base import read_template
from regap_export.models.embedded import load_embedded_tokenizer
from regap_export.models.qwen2_vl import image_only_processor

TINY_FAMILIES: list[str] = [
    "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text",
    "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3",
]

# Shared text-decoder geometry.
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 64, 4, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
# Vision towers: CLIP for LLaVA (32 px images, 8 px patches -> 16 image tokens);
# Qwen-VL: 4 px patches merged 2x2, images resized to at most 32x32 px.
CLIP_IMAGE, CLIP_PATCH = 32, 8
QWEN_PATCH, QWEN_MERGE = 4, 2


# -- tokenizers ----------------------------------------------------------------------
def _tokenizer(template: str, *, bos: str | None, eos: str, pad: str,
               extra: tuple[str, ...] = (), add_bos: bool = False) -> Any:
    """A copy of the base tokenizer with a family's special tokens and chat template."""
    tok = copy.deepcopy(load_embedded_tokenizer())
    specials = [t for t in (bos, eos, pad, *extra) if t is not None]
    tok.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    tok.bos_token = bos
    tok.eos_token = eos
    tok.pad_token = pad
    tok.chat_template = read_template(template)
    if add_bos:  # Llama-2 / Mistral style tokenizers prepend BOS themselves.
        tok.add_bos_token = True
    tok.padding_side = "left"
    return tok


def _ids(tok: Any) -> dict[str, Any]:
    return {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


# The decoder depth and MLP width of the model being built (``build_tiny(..., layers=, intermediate=)``).
_shape = {"layers": LAYERS, "intermediate": INTERMEDIATE}


def _text_dims(**extra: Any) -> dict[str, Any]:
    return {"hidden_size": HIDDEN, "intermediate_size": _shape["intermediate"], "num_hidden_layers": _shape["layers"],
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "max_position_embeddings": 4096, **extra}


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    return model.float().eval()


# -- text families -------------------------------------------------------------------
def _causal_lm(config_cls_name: str, tok: Any, **extra: Any):
    import transformers

    config = getattr(transformers, config_cls_name)(**_text_dims(**extra), **_ids(tok))
    torch.manual_seed(0)
    return _finish(transformers.AutoModelForCausalLM.from_config(config)), tok


def _llama():
    tok = _tokenizer("llama", bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
                     extra=("<|start_header_id|>", "<|end_header_id|>"))
    return _causal_lm("LlamaConfig", tok, tie_word_embeddings=True)


def _qwen2():
    tok = _tokenizer("qwen2", bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra=("<|im_start|>",))
    return _causal_lm("Qwen2Config", tok, tie_word_embeddings=True)


def _qwen3():
    tok = _tokenizer("qwen3", bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                     extra=("<|im_start|>", "<think>", "</think>"))
    return _causal_lm("Qwen3Config", tok, tie_word_embeddings=True)


def _mistral_tokenizer(template: str, extra: tuple[str, ...] = ()) -> Any:
    return _tokenizer(template, bos="<s>", eos="</s>", pad="<pad>", extra=("[INST]", "[/INST]", *extra))


def _mistral():
    return _causal_lm("MistralConfig", _mistral_tokenizer("mistral"), sliding_window=None)


def _gemma_tokenizer() -> Any:
    return _tokenizer("gemma", bos="<bos>", eos="<eos>", pad="<pad>", extra=("<start_of_turn>", "<end_of_turn>"))


def _gemma2():
    return _causal_lm("Gemma2Config", _gemma_tokenizer(), sliding_window=16, query_pre_attn_scalar=HEAD_DIM)


def _gemma3_text():
    return _causal_lm("Gemma3TextConfig", _gemma_tokenizer(), sliding_window=16, query_pre_attn_scalar=HEAD_DIM)


# -- LLaVA ---------------------------------------------------------------------------
def _clip_vision() -> dict[str, Any]:
    return {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": CLIP_IMAGE,
            "patch_size": CLIP_PATCH, "projection_dim": 32}


def _clip_image_kwargs() -> dict[str, Any]:
    return {"size": {"shortest_edge": CLIP_IMAGE}, "crop_size": {"height": CLIP_IMAGE, "width": CLIP_IMAGE}}


def _llava():
    import transformers as T

    tok = _tokenizer("llava", bos="<s>", eos="</s>", pad="<pad>", extra=("<image>",), add_bos=True)
    config = T.LlavaConfig(
        vision_config=_clip_vision(),
        text_config={"model_type": "llama", **_text_dims(), **_ids(tok)},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(CLIP_IMAGE // CLIP_PATCH) ** 2,
        pad_token_id=tok.pad_token_id,
    )
    processor = T.LlavaProcessor(
        image_processor=T.CLIPImageProcessorPil(**_clip_image_kwargs()), tokenizer=tok,
        patch_size=CLIP_PATCH, vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1, chat_template=read_template("llava"), image_token="<image>",
    )
    torch.manual_seed(0)
    return _finish(T.LlavaForConditionalGeneration(config)), processor


def _llava_next():
    import transformers as T

    tok = _mistral_tokenizer("llava_next", extra=("<image>",))
    tok.add_bos_token = True
    pinpoints = [[CLIP_IMAGE, 2 * CLIP_IMAGE], [2 * CLIP_IMAGE, CLIP_IMAGE], [2 * CLIP_IMAGE, 2 * CLIP_IMAGE]]
    config = T.LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config={"model_type": "mistral", **_text_dims(sliding_window=None), **_ids(tok)},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=(CLIP_IMAGE // CLIP_PATCH) ** 2,
        pad_token_id=tok.pad_token_id,
    )
    image_processor = T.LlavaNextImageProcessorPil(**_clip_image_kwargs(), image_grid_pinpoints=pinpoints)
    processor = T.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok,
        patch_size=CLIP_PATCH, vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1, chat_template=read_template("llava_next"), image_token="<image>",
    )
    torch.manual_seed(0)
    return _finish(T.LlavaNextForConditionalGeneration(config)), processor


# -- Qwen2-VL / Qwen2.5-VL -----------------------------------------------------------
QWEN_VL_TOKENS = ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>")


def _qwen_vl(config_cls: str, processor_cls: str, vision: dict[str, Any]):
    import transformers as T

    tok = _tokenizer("qwen2_vl", bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra=QWEN_VL_TOKENS)
    half = HEAD_DIM // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # [16, 24, 24] scaled down
    token_ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = getattr(T, config_cls)(
        vision_config=vision,
        text_config={**_text_dims(), **_ids(tok),
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope}},
        tie_word_embeddings=True, **token_ids,
    )
    factor = QWEN_PATCH * QWEN_MERGE
    # Images are resized to multiples of 8 px, between 16x16 and 32x32 pixels in area.
    sizes = {"patch_size": QWEN_PATCH, "merge_size": QWEN_MERGE, "temporal_patch_size": 2,
             "size": {"shortest_edge": (2 * factor) ** 2, "longest_edge": (4 * factor) ** 2}}
    image_processor = T.Qwen2VLImageProcessorPil(**sizes)
    if is_torchvision_available():  # transformers 5 builds a video processor only with torchvision
        video_processor = T.Qwen2VLVideoProcessor(**sizes)
        processor = getattr(T, processor_cls)(image_processor=image_processor, tokenizer=tok,
                                              video_processor=video_processor, chat_template=read_template("qwen2_vl"))
    else:
        processor = image_only_processor(processor_cls, image_processor, tok, read_template("qwen2_vl"))
    torch.manual_seed(0)
    return _finish(T.AutoModelForImageTextToText.from_config(config)), processor


def _qwen2_vl():
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": HIDDEN, "num_heads": 2, "mlp_ratio": 2,
              "patch_size": QWEN_PATCH, "spatial_merge_size": QWEN_MERGE, "temporal_patch_size": 2}
    return _qwen_vl("Qwen2VLConfig", "Qwen2VLProcessor", vision)


def _qwen2_5_vl():
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": HIDDEN,
              "patch_size": QWEN_PATCH, "spatial_merge_size": QWEN_MERGE, "temporal_patch_size": 2,
              "window_size": 2 * QWEN_PATCH * QWEN_MERGE, "fullatt_block_indexes": [1]}
    return _qwen_vl("Qwen2_5_VLConfig", "Qwen2_5_VLProcessor", vision)


# -- Idefics3 / SmolVLM (built elsewhere) --------------------------------------------
def _idefics3():
    # tests/tiny_idefics3.py, imported as a sibling of this module (package or top level).
    name = f"{__package__}.tiny_idefics3" if __package__ else "tiny_idefics3"
    return importlib.import_module(name).build_tiny_idefics3(layers=_shape["layers"], intermediate=_shape["intermediate"])


_BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral,
    "gemma2": _gemma2, "gemma3_text": _gemma3_text,
    "llava": _llava, "llava_next": _llava_next, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl,
    "idefics3": _idefics3,
}
assert list(_BUILDERS) == TINY_FAMILIES


def build_tiny(family: str, *, layers: int = LAYERS, intermediate: int = INTERMEDIATE) -> tuple[torch.nn.Module, Any]:
    """A fresh tiny ``(model, processor_or_tokenizer)`` for ``family`` (same weights every call),
    with ``layers`` decoder blocks of MLP width ``intermediate``."""
    try:
        builder = _BUILDERS[family]
    except KeyError:
        raise KeyError(f"no tiny model for {family!r}; known: {', '.join(TINY_FAMILIES)}") from None
    _shape.update(layers=layers, intermediate=intermediate)
    try:
        return builder()
    finally:
        _shape.update(layers=LAYERS, intermediate=INTERMEDIATE)


def save_tiny(family: str, folder: str | Path, built: tuple[torch.nn.Module, Any] | None = None, *,
              layers: int = LAYERS) -> Path:
    """Save the tiny model for ``family`` (with its processor) to ``folder``; returns ``folder``.

    ``built`` is an already built ``build_tiny(family)`` result to save instead of a new one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, processor = built if built is not None else build_tiny(family, layers=layers)
    model.save_pretrained(folder)
    adapter_for_config(model.config).save_processor(processor, folder)
    return folder
