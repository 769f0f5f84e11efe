"""One chat turn on an exported folder with ONNX Runtime: prompt (+ image) in, text out."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ArtifactError, DataError
from ..models import adapter_for_config
from ..models.base import pixel_inputs


def _processor_and_adapter(folder: Path):
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ArtifactError("generate needs the tokenizer and config written by the safetensors export",
                            path=folder / "config.json", hint="export with --format onnx,safetensors")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"config.json cannot be read ({exc})", path=folder / "config.json",
                            hint="re-run export") from None
    adapter = adapter_for_config(config, source=str(folder / "config.json"))
    try:
        return adapter.load_processor(folder), adapter
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ArtifactError(f"the tokenizer/processor cannot be loaded ({first_line})", path=folder,
                            hint="re-run export") from None


def verify_export(folder: Path, *, verify_hashes: bool = True) -> None:
    """Before running an exported folder: its manifest lists every file with the right size
    (and sha256 unless ``verify_hashes`` is False), and its correction constants are finite."""
    from ..checks import check_exported_constants
    from ..export.manifest import read_manifest, verify_files

    verify_files(folder, read_manifest(folder), hashes=verify_hashes)
    check_exported_constants(folder)


def check_prompt_length(config: Any, adapter, prompt_tokens: int, max_new_tokens: int) -> None:
    """The prompt plus the reply fit the model's context (max_position_embeddings)."""
    limit = getattr(adapter.text_config(config), "max_position_embeddings", None)
    if not limit or prompt_tokens + max_new_tokens <= int(limit):
        return
    if prompt_tokens >= int(limit):
        raise DataError(f"the prompt is {prompt_tokens} tokens; the model's context holds {limit}",
                        field="--prompt", hint="shorten the prompt")
    raise DataError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} exceed the "
                    f"model's context of {limit} tokens", field="--max-new-tokens",
                    hint=f"use --max-new-tokens {int(limit) - prompt_tokens} or less")


def processor_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def reply(folder: str | Path, prompt: str, *, image: Any = None, max_new_tokens: int = 64,
          device: str = "cpu", correct: bool = True, verify_hashes: bool = True) -> dict[str, Any]:
    """One greedy reply. ``image``: a file path or a PIL image. ``correct=False``: the same
    graphs with the correction switched off (the uncorrected model). ``verify_hashes=False``:
    check the manifest's sizes but not its sha256 (faster on large exports)."""
    from PIL import Image, UnidentifiedImageError

    from .generate import generate
    from .session import OrtSessions

    folder = Path(folder)
    verify_export(folder, verify_hashes=verify_hashes)
    processor, adapter = _processor_and_adapter(folder)
    images = None
    if image is not None:
        if not adapter.multimodal:
            raise DataError(f"{adapter.family} is a text-only model and takes no image", path=image, field="--image")
        if isinstance(image, Image.Image):
            images = [image.convert("RGB")]
        else:
            try:
                with Image.open(image) as im:
                    images = [im.convert("RGB")]
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"not a readable image ({exc})", path=image, field="--image") from None
    text = adapter.render_prompt(processor, prompt, with_image=images is not None)
    inputs = {k: v.numpy() for k, v in adapter.encode(processor, [text], images).items()}
    check_prompt_length(processor_config(folder), adapter, int(inputs["input_ids"].shape[1]), max_new_tokens)
    sessions = OrtSessions.open(folder / "onnx", device=device)
    pixels = pixel_inputs(inputs)
    result = generate(sessions, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens,
                      correct=correct, **pixels)
    tokenizer = getattr(processor, "tokenizer", processor)
    answer = tokenizer.decode(result.new_tokens[0], skip_special_tokens=True).strip()
    out: dict[str, Any] = {"text": answer, "new_tokens": int(result.new_tokens.shape[1])}
    if result.regap_alpha is not None:
        out["regap_alpha"] = float(result.regap_alpha[0])
    return out
