"""Processors with the PIL image backend, built from a saved folder without ``AutoProcessor``.

transformers 5 ships two image backends, PIL and torchvision, and picks PIL when torchvision
is missing. transformers 5.17 (the version of the GPU machine's image) breaks that fallback:
without torchvision, ``AutoImageProcessor`` and the top-level name ``Idefics3ImageProcessorPil``
are placeholders that raise, although the PIL classes themselves need only Pillow. The
adapters call these functions only after the ``Auto`` path has failed without torchvision.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from ..errors import ModelError


def torchvision_missing() -> bool:
    from transformers.utils import is_torchvision_available

    return not is_torchvision_available()


def saved_chat_template(path: Path) -> str | None:
    """The chat template a processor folder keeps beside its configs, if any."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path.name} ({exc})", path=path) from None


def processor_config(path: Path) -> dict[str, Any]:
    """processor_config.json (transformers 5 nests the image processor's settings in it), or {}."""
    file = path / "processor_config.json"
    return _read_json(file) if file.is_file() else {}


def pil_image_processor(path: str | Path, config: dict[str, Any] | None = None) -> Any:
    """The PIL-backend image processor that the folder's saved settings describe (``config``:
    its processor_config.json when the caller has read it already)."""
    import transformers

    path = Path(path)
    settings = (processor_config(path) if config is None else config).get("image_processor")
    if settings is None:
        if not (path / "preprocessor_config.json").is_file():
            raise ModelError("no image processor settings (processor_config.json 'image_processor' or "
                             "preprocessor_config.json)", path=path)
        settings = _read_json(path / "preprocessor_config.json")
    name = settings.get("image_processor_type")
    if not name:
        raise ModelError("the image processor settings name no image_processor_type", path=path)
    pil_name = name if name.endswith("Pil") else name + "Pil"
    model_type = _read_json(path / "config.json").get("model_type", "")
    try:  # the class's own module: 5.17's top-level name can be a placeholder
        cls = getattr(importlib.import_module(f"transformers.models.{model_type}.image_processing_pil_{model_type}"),
                      pil_name)
    except (ImportError, AttributeError):  # a class shared between families, e.g. Qwen2VLImageProcessorPil
        cls = getattr(transformers, pil_name, None)
    if cls is None:
        raise ModelError(f"transformers {transformers.__version__} has no {pil_name}; install torchvision "
                         f"or another transformers version", path=path)
    return cls.from_dict({k: v for k, v in settings.items() if k != "image_processor_type"})


def pil_processor(path: str | Path, **kwargs: Any) -> Any:
    """The folder's processor (image processor + tokenizer) with the PIL image backend."""
    import transformers
    from transformers import AutoTokenizer

    path = Path(path)
    config = processor_config(path)
    name = config.get("processor_class")
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ModelError(f"processor_config.json names no processor class this transformers has ({name!r})",
                         path=path)
    settings = {k: v for k, v in config.items()
                if k not in ("processor_class", "image_processor", "auto_map", "chat_template")}
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    chat_template = saved_chat_template(path) or config.get("chat_template") or tokenizer.chat_template
    return cls(image_processor=pil_image_processor(path, config), tokenizer=tokenizer, chat_template=chat_template,
               **settings)
