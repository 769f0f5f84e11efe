"""A tiny, seeded Idefics3 (SmolVLM layout) built offline, for tests.

``build_tiny_idefics3()`` returns ``(model, processor)``: an fp32
``Idefics3ForConditionalGeneration`` in eval mode (text: hidden 64, 4 Llama layers, 4
heads, 2 KV heads; vision: hidden 32, 2 layers, 32 px images in 8 px patches, pixel
shuffle 2 -> 4 image tokens per image) and an ``Idefics3Processor`` built with the same
helpers as the embedded SmolVLM (SmolLM2 tokenizer + Idefics3 tokens, SmolVLM chat
template, images squared to 32 px with no tiling). The vocabulary is ``len(tokenizer)``.
"""
from __future__ import annotations

from typing import Any

import torch

from regap_export.models.embedded import (
    build_idefics3_model,
    build_idefics3_processor,
    build_idefics3_tokenizer,
    image_seq_len_for,
    load_embedded_tokenizer,
)

TEXT_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
VISION_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "image_size": 32, "patch_size": 8}
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = image_seq_len_for(VISION_CONFIG["image_size"], VISION_CONFIG["patch_size"], SCALE_FACTOR)


def build_tiny_idefics3(*, layers: int = TEXT_CONFIG["num_hidden_layers"],
                        intermediate: int = TEXT_CONFIG["intermediate_size"]) -> tuple[torch.nn.Module, Any]:
    tok = build_idefics3_tokenizer(load_embedded_tokenizer())
    tok.padding_side = "left"
    processor = build_idefics3_processor(tok, image_size=VISION_CONFIG["image_size"], image_seq_len=IMAGE_SEQ_LEN)
    text_config = dict(TEXT_CONFIG, num_hidden_layers=layers, intermediate_size=intermediate, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    model = build_idefics3_model(text_config, VISION_CONFIG, scale_factor=SCALE_FACTOR, tokenizer=tok, seed=0)
    return model.float().eval(), processor
