"""Qwen2-VL and Qwen2.5-VL.

In transformers 5 the decoder is ``model.language_model``; the processor expands each
``<|image_pad|>`` to the image's merged patch count and returns ``image_grid_thw``; the
model computes its own 3-D (M-RoPE) position ids from ``input_ids`` and ``image_grid_thw``.
"""
from . import register
from .base import ModelAdapter, read_template

QWEN2_VL = register(ModelAdapter(
    family="qwen2_vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    language_model_path="model.language_model",
    multimodal=True,
    fallback_chat_template=read_template("qwen2_vl"),
    auto_class_name="AutoModelForImageTextToText",
))
