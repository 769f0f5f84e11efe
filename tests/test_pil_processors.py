"""The processor fallback for transformers versions whose PIL image backend cannot be reached
without torchvision (5.17, the GPU machine's): the processor it builds from a saved folder
encodes a prompt and an image exactly as the Auto classes do where they work."""
from __future__ import annotations

import numpy as np
import pytest
import transformers
from PIL import Image

from regap_export.errors import ModelError
from regap_export.models import adapter_for_config, pil_processors
from tiny_models import save_tiny

MULTIMODAL = ["idefics3", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]


def busy_image() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))


def encode(adapter, processor) -> dict[str, np.ndarray]:
    text = adapter.render_prompt(processor, "Describe the picture.", with_image=True)
    return {k: v.numpy() for k, v in adapter.encode(processor, [text], [busy_image()]).items()}


def broken_auto(*args, **kwargs):
    raise ImportError("Idefics3ImageProcessorPil requires the Torchvision library")  # as transformers 5.17 raises


@pytest.mark.parametrize("family", MULTIMODAL)
def test_the_pil_image_processor_is_the_one_auto_picks(tmp_path, family):
    folder = save_tiny(family, tmp_path / family)
    try:
        auto = transformers.AutoImageProcessor.from_pretrained(str(folder))
    except ImportError:
        pytest.skip(f"AutoImageProcessor needs torchvision in transformers {transformers.__version__}")
    ours = pil_processors.pil_image_processor(folder)
    assert type(ours) is type(auto) and type(ours).__name__.endswith("Pil")
    assert ours.to_dict() == auto.to_dict()
    expected, got = auto(busy_image(), return_tensors="np"), ours(busy_image(), return_tensors="np")
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.parametrize("family", MULTIMODAL)
def test_the_adapter_falls_back_when_the_auto_classes_fail(tmp_path, monkeypatch, family):
    folder = save_tiny(family, tmp_path / family)
    adapter = adapter_for_config(transformers.AutoConfig.from_pretrained(folder))
    expected = encode(adapter, adapter.load_processor(folder))

    monkeypatch.setattr(pil_processors, "torchvision_missing", lambda: True)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", broken_auto)
    fallback = adapter.load_processor(folder)
    assert type(fallback.image_processor).__name__.endswith("Pil")
    got = encode(adapter, fallback)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_a_folder_without_image_settings_is_named(tmp_path):
    folder = save_tiny("idefics3", tmp_path / "idefics3")
    (folder / "processor_config.json").unlink()
    with pytest.raises(ModelError, match="processor_config.json"):
        pil_processors.pil_processor(folder)
    with pytest.raises(ModelError, match="no image processor settings"):
        pil_processors.pil_image_processor(folder)
