"""Idefics3 / SmolVLM (``model_type`` "idefics3").

Layout in transformers 5 (``Idefics3ForConditionalGeneration``)::

    model.vision_model        SigLIP-style vision tower
    model.connector           pixel shuffle + linear projection into the LM embedding space
    model.text_model          the Llama decoder (``layers``, ``norm``, ``embed_tokens``)
    lm_head                   (tied to ``model.text_model.embed_tokens`` in SmolVLM)

The processor wants images nested per sample (``[[img], [img], ...]``): with a flat list it
regroups images by counting ``<image>`` in each prompt, which breaks as soon as a batch
mixes prompts with and without images. One ``<image>`` in the prompt expands to
``<fake_token_around_image><global-img><image>*image_seq_len<fake_token_around_image>``
(plus per-tile blocks when the image processor splits large images).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from . import register
from .base import ModelAdapter

# SmolVLM's chat format: a single ``<|im_start|>`` at the very start, "User:" / "Assistant:"
# turns closed by ``<end_of_utterance>``; no space after the colon when the turn opens with
# an image. Also accepts plain-string content (text-only messages).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}"
    "{{ ': ' + message['content'] }}"
    "{% else %}"
    "{% if message['content'] and message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class Idefics3Adapter(ModelAdapter):
    def images_argument(self, images: Sequence[Any]) -> Any:
        # One image per prompt, nested per sample.
        return [[image] for image in images]


IDEFICS3 = register(Idefics3Adapter(
    family="idefics3",
    model_types=("idefics3",),
    language_model_path="model.text_model",
    multimodal=True,
    fallback_chat_template=SMOLVLM_CHAT_TEMPLATE,
    auto_class_name="AutoModelForImageTextToText",
))
