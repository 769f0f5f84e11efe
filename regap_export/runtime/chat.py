"""One chat turn on an exported folder with ONNX Runtime: prompt (+ image) in, text out."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ArtifactError, DataError
from ..models import adapter_for_config


def _processor_and_adapter(folder: Path):
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ArtifactError("generate needs the tokenizer and config written by the safetensors export",
                            path=folder / "config.json", hint="export with --format onnx,safetensors")
    config = AutoConfig.from_pretrained(folder)
    adapter = adapter_for_config(config, source=str(folder / "config.json"))
    return adapter.load_processor(folder), adapter


def reply(folder: str | Path, prompt: str, *, image: Any = None, max_new_tokens: int = 64,
          device: str = "cpu", correct: bool = True) -> dict[str, Any]:
    """One greedy reply. ``image``: a file path or a PIL image. ``correct=False``: the same
    graphs with the correction switched off (the uncorrected model)."""
    from PIL import Image, UnidentifiedImageError

    from .generate import generate
    from .session import OrtSessions

    folder = Path(folder)
    processor, adapter = _processor_and_adapter(folder)
    sessions = OrtSessions.open(folder / "onnx", device=device)
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
    pixels = {k: v for k, v in inputs.items() if k.startswith("pixel") or k in ("image_sizes", "image_grid_thw")}
    result = generate(sessions, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens,
                      correct=correct, **pixels)
    tokenizer = getattr(processor, "tokenizer", processor)
    answer = tokenizer.decode(result.new_tokens[0], skip_special_tokens=True).strip()
    out: dict[str, Any] = {"text": answer, "new_tokens": int(result.new_tokens.shape[1])}
    if result.regap_alpha is not None:
        out["regap_alpha"] = float(result.regap_alpha[0])
    return out
