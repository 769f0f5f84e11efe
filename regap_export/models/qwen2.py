"""Qwen2 / Qwen2.5 and Qwen3 text models (ChatML)."""
from . import register
from .base import ModelAdapter, read_template

QWEN2 = register(ModelAdapter(
    family="qwen2",
    model_types=("qwen2",),
    language_model_path="model",
    fallback_chat_template=read_template("qwen2"),
))

QWEN3 = register(ModelAdapter(
    family="qwen3",
    model_types=("qwen3",),
    language_model_path="model",
    fallback_chat_template=read_template("qwen3"),
))
