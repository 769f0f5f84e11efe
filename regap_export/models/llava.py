"""LLaVA 1.5 (``llava``) and LLaVA-NeXT / v1.6 (``llava_next``).

In transformers 5 both are ``*ForConditionalGeneration`` wrapping ``model`` (a
``LlavaModel`` / ``LlavaNextModel``) whose ``language_model`` is the bare decoder.
The processors expand each ``<image>`` into the right number of image tokens (for
LLaVA-NeXT from the image's size, which they also return as ``image_sizes``).
"""
from . import register
from .base import ModelAdapter, read_template

LLAVA = register(ModelAdapter(
    family="llava",
    model_types=("llava",),
    language_model_path="model.language_model",
    multimodal=True,
    fallback_chat_template=read_template("llava"),
    auto_class_name="AutoModelForImageTextToText",
))

LLAVA_NEXT = register(ModelAdapter(
    family="llava_next",
    model_types=("llava_next",),
    language_model_path="model.language_model",
    multimodal=True,
    fallback_chat_template=read_template("llava_next"),
    auto_class_name="AutoModelForImageTextToText",
))
