"""Gemma 2 and Gemma 3 (text-only checkpoints, ``gemma3_text``). Gemma has no system role."""
from . import register
from .base import ModelAdapter, read_template

GEMMA = register(ModelAdapter(
    family="gemma",
    model_types=("gemma2", "gemma3_text"),
    language_model_path="model",
    fallback_chat_template=read_template("gemma"),
    supports_system_role=False,
))
