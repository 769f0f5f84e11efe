"""Mistral text models."""
from . import register
from .base import ModelAdapter, read_template

MISTRAL = register(ModelAdapter(
    family="mistral",
    model_types=("mistral",),
    language_model_path="model",
    fallback_chat_template=read_template("mistral"),
))
