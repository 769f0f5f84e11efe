"""Qwen2-VL and Qwen2.5-VL.

In transformers 5 the decoder is ``model.language_model``; the processor expands each
``<|image_pad|>`` to the image's merged patch count and returns ``image_grid_thw`` and
``mm_token_type_ids``, from which the model computes its own 3-D (M-RoPE) position ids.

transformers 5 builds these processors only with a video processor, and video processors
need torchvision. regap-export feeds images only, so without torchvision the processor
is built with no video processor (``image_only_processor``) and saved without one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from . import register
from .base import ModelAdapter, read_template

_PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def image_only_processor(processor_class: str, image_processor: Any, tokenizer: Any,
                         chat_template: str | None = None) -> Any:
    """A Qwen2-VL-family processor without a video processor (videos unsupported)."""
    import transformers
    from transformers import ProcessorMixin

    cls = getattr(transformers, processor_class)
    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self: Any, name: str, arg: Any) -> Any:
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lenient):
        return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                   chat_template=chat_template)


@dataclass(frozen=True)
class Qwen2VLAdapter(ModelAdapter):
    def load_processor(self, path: str | Path, **kwargs: Any) -> Any:
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            return super().load_processor(path, **kwargs)
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        path = Path(path)
        model_type = AutoConfig.from_pretrained(str(path), **kwargs).model_type
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(str(path), **kwargs)
        return image_only_processor(_PROCESSOR_CLASSES[model_type], image_processor, tokenizer,
                                    _saved_chat_template(path) or tokenizer.chat_template)

    def save_processor(self, processor: Any, path: str | Path) -> None:
        if getattr(processor, "video_processor", None) is not None:
            return super().save_processor(processor, path)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        processor.tokenizer.save_pretrained(str(path))
        image_config = processor.image_processor.to_dict()
        # The video processor a torchvision install would build, from the image settings.
        video_config = {k: v for k, v in image_config.items() if k != "image_processor_type"}
        video_config["video_processor_type"] = "Qwen2VLVideoProcessor"  # both families use it
        config = {"processor_class": type(processor).__name__,
                  "image_processor": image_config, "video_processor": video_config}
        (path / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if isinstance(processor.chat_template, str):
            (path / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")


def _saved_chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return None


QWEN2_VL = register(Qwen2VLAdapter(
    family="qwen2_vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    language_model_path="model.language_model",
    multimodal=True,
    fallback_chat_template=read_template("qwen2_vl"),
    auto_class_name="AutoModelForImageTextToText",
))
