"""Llama (2, 3.x) text models."""
from . import register
from .base import ModelAdapter, read_template

LLAMA = register(ModelAdapter(
    family="llama",
    model_types=("llama",),
    language_model_path="model",
    fallback_chat_template=read_template("llama"),
))
