"""One chat turn on an exported folder with ONNX Runtime: prompt (+ image) in, text out.

Without PyTorch or transformers: the folder's ``config.json`` is read as JSON, its
tokenizer and chat template by ``runtime.text``, and images are prepared by the family's
``ModelAdapter.image_inputs`` (Idefics3, LLaVA, LLaVA-NeXT, Qwen2-VL: numpy/PIL ports in
their ``regap_export.models`` modules) when it reproduces the folder's processor settings;
other images go through the family's transformers processor, which needs
``regap-export[export]``.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..errors import ArtifactError, DataError, RegapError, first_line
# Family knowledge (multimodal or not, message layout, fallback chat template, image preprocessing).
from ..models import adapter_for_config
from ..models.image_ops import NotPorted
from ..io.artifacts import ExportedFolder, read_json
from .text import FolderTokenizer, ProtectedText, encode_protected, mark_control_tokens

EXPORT_EXTRA = "regap-export[export]"


def read_model_config(folder: Path) -> dict[str, Any]:
    """config.json of an exported folder (written by the safetensors export), strictly parsed."""
    path = Path(folder) / "config.json"
    if not os.path.lexists(path):
        raise ArtifactError("generate needs the tokenizer and config written by the safetensors export",
                            path=path, hint="export with --format onnx,safetensors")
    config = read_json(path, what="config.json")
    if not isinstance(config.get("model_type"), str):
        raise ArtifactError("config.json names no model_type", path=path, hint="re-run export")
    return config


def adapter_of(folder: Path, config: dict[str, Any]):
    return adapter_for_config(SimpleNamespace(model_type=config["model_type"]), source=str(folder / "config.json"))


def verify_export(folder: Path, *, verify_hashes: bool = True) -> ExportedFolder:
    """Before running an exported folder: ``ExportedFolder.open`` (every file listed, inside the
    folder, of the right size and sha256 unless ``verify_hashes`` is False, strict JSON, the
    files consistent, the correction constants finite); generate needs the ONNX graphs (and
    the config and tokenizer every export writes beside them)."""
    exported = ExportedFolder.open(folder, verify_hashes=verify_hashes)
    exported.require_formats("onnx", command="generate")
    return exported


def context_length(config: dict[str, Any]) -> int | None:
    """max_position_embeddings of the text model (a multimodal config nests it in text_config)."""
    text = config.get("text_config")
    value = (text if isinstance(text, dict) else config).get("max_position_embeddings")
    return int(value) if isinstance(value, (int, float)) and value else None


def check_prompt_length(limit: int | None, prompt_tokens: int, max_new_tokens: int) -> None:
    """The prompt plus the reply fit the model's context (max_position_embeddings)."""
    if not limit or prompt_tokens + max_new_tokens <= int(limit):
        return
    if prompt_tokens >= int(limit):
        raise DataError(f"the prompt is {prompt_tokens} tokens; the model's context holds {limit}",
                        field="--prompt", hint="shorten the prompt")
    raise DataError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} exceed the "
                    f"model's context of {limit} tokens", field="--max-new-tokens",
                    hint=f"use --max-new-tokens {int(limit) - prompt_tokens} or less")


def processor_settings(folder: Path) -> dict[str, Any]:
    """The processor's settings: processor_config.json (image processor nested), else
    preprocessor_config.json (the image processor's own)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        if os.path.lexists(folder / name):
            return read_json(folder / name, what=name)
    raise ArtifactError("the image processor settings are missing", path=folder / "processor_config.json",
                        hint="re-run export")


def load_image(image: Any) -> Any:
    """``--image`` as RGB: a regular file within the size limits, converted as the model's
    processor converts it (``io.images``)."""
    from PIL import Image

    from ..io.images import open_rgb_image, to_rgb

    if isinstance(image, Image.Image):
        return to_rgb(image, field="--image")
    return open_rgb_image(image, field="--image")


def image_token_of(tokenizer: FolderTokenizer, config: dict[str, Any]) -> str | None:
    """The image token's text (config.json's ``image_token_id``/``image_token_index``), or None."""
    for key in ("image_token_id", "image_token_index"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return tokenizer.backend.id_to_token(value)
    return None


def encode_prompt(folder: Path, config: dict[str, Any], adapter: Any, prompt: str, image: Any = None
                  ) -> tuple[dict[str, np.ndarray], Any]:
    """(model inputs for one prompt: input_ids, attention_mask, pixel inputs; a tokenizer with
    ``decode``), as ``ModelAdapter.encode`` on the folder's transformers processor gives them.
    The prompt is text: control tokens it spells are encoded as text (``runtime.text``)."""
    if image is not None and adapter.image_inputs is None:
        return _transformers_inputs(folder, adapter, prompt, image, why="no numpy port for this family")
    tokenizer = FolderTokenizer.open(folder)
    template = adapter.fallback_chat_template
    reserved = (image_token_of(tokenizer, config),)
    marked = mark_control_tokens(prompt, tokenizer.control_tokens(template, extra=reserved))
    text = tokenizer.render_chat(adapter.messages(marked, with_image=image is not None), fallback_template=template)
    settings = processor_settings(folder) if image is not None else None

    def encode(protected: list[ProtectedText]) -> tuple[list[int], dict[str, np.ndarray]]:
        prepared_text, pixels = protected[0].text, {}
        if image is not None:
            prepared = adapter.image_inputs(settings, prepared_text, image)
            prepared_text, pixels = prepared.text, prepared.pixels
        return tokenizer.encode(prepared_text), pixels

    try:
        (ids, pixels), rows = encode_protected(text, tokenizer.placeholders(template, extra=reserved), encode,
                                               lambda result: [result[0]], tokenizer.plain, where=folder)
    except NotPorted as exc:
        return _transformers_inputs(folder, adapter, prompt, image, why=f"processor settings not ported: {exc}")
    if rows is not None:
        ids = rows[0].ids
    array = np.asarray([ids], dtype=np.int64)
    return {"input_ids": array, "attention_mask": np.ones_like(array), **pixels}, tokenizer


class _TransformersTokenizer:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _transformers_inputs(folder: Path, adapter: Any, prompt: str, image: Any, *, why: str):
    """Images the family's ``image_inputs`` does not reproduce (``why``): its transformers processor."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise RegapError(f"images for this {adapter.family} export are prepared by transformers ({why}), "
                         "which is not installed", path=folder, field="--image",
                         hint=f'pip install "{EXPORT_EXTRA}"') from None
    from ..models.base import pixel_inputs

    try:
        processor = adapter.load_processor(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"the tokenizer/processor cannot be loaded ({first_line(exc)})", path=folder,
                            hint="re-run export") from None
    text = adapter.render_prompt(processor, prompt, with_image=True)
    inputs = {k: v.numpy() for k, v in adapter.encode(processor, [text], [image]).items()}
    kept = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], **pixel_inputs(inputs)}
    return kept, _TransformersTokenizer(getattr(processor, "tokenizer", processor))


def reply(folder: str | Path, prompt: str, *, image: Any = None, max_new_tokens: int = 64,
          device: str = "cpu", correct: bool = True, verify_hashes: bool = True,
          precision: str = "fp32") -> dict[str, Any]:
    """One greedy reply. ``image``: a file path or a PIL image. ``correct=False``: the same
    graphs with the correction switched off (the uncorrected model). ``verify_hashes=False``:
    check the manifest's sizes but not its sha256 (faster on large exports). ``precision``:
    which of the export's graphs (fp32, fp16, q4f16, q8, q4: those it wrote).

    Returns ``text``, ``new_tokens`` (how many), ``prompt_token_ids``, ``new_token_ids`` and,
    for regap-seq exports, ``regap_alpha``."""
    from .generate import generate
    from .session import OrtSessions

    from ..data.records import check_user_text

    check_user_text(prompt, field="--prompt")
    folder = Path(folder)
    exported = verify_export(folder, verify_hashes=verify_hashes)
    config = exported.model_config()
    adapter = adapter_of(folder, config)
    if image is not None:
        if not adapter.multimodal:
            raise DataError(f"{adapter.family} is a text-only model and takes no image", path=image, field="--image")
        image = load_image(image)
    inputs, tokenizer = encode_prompt(folder, config, adapter, prompt, image)
    check_prompt_length(context_length(config), int(inputs["input_ids"].shape[1]), max_new_tokens)
    sessions = OrtSessions.open(exported.onnx_folder(), device=device, verify_hashes=verify_hashes,
                                precision=precision)
    pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    result = generate(sessions, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens,
                      correct=correct, **pixels)
    new_ids = [int(t) for t in result.new_tokens[0]]
    out: dict[str, Any] = {"text": tokenizer.decode(new_ids).strip(), "new_tokens": len(new_ids),
                           "prompt_token_ids": [int(t) for t in inputs["input_ids"][0]], "new_token_ids": new_ids}
    if result.regap_alpha is not None:
        out["regap_alpha"] = float(result.regap_alpha[0])
    return out
