"""The family registry: one module per family, the lookups built from it, and the import
boundary that lets the torch-free runtime use ``regap_export.models``."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from regap_export import models
from regap_export.errors import ModelError, RegapError
from regap_export.models import positions, vision_export


def test_models_import_without_torch_or_transformers():
    # A fresh interpreter: this test process has torch loaded already.
    code = textwrap.dedent("""
        import sys
        import regap_export.models, regap_export.models.positions, regap_export.models.hooks
        from regap_export.models import vision_runtime_for
        from regap_export.models.base import pixel_inputs
        import regap_export.models.vision_export, regap_export.models.vision_runtime
        for family in ("idefics3", "llava", "llava_next", "qwen2_vl"):
            vision_runtime_for(family)
        regap_export.models.positions.position_scheme({"scheme": "mrope", "rank": 3,
                                                        "image_token_id": 9, "spatial_merge_size": 2})
        loaded = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        print("LOADED", loaded)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout


def test_every_family_module_registers_its_adapter():
    import importlib

    defined = []
    for name in ("gemma", "idefics3", "llama", "llava", "mistral", "qwen2", "qwen2_vl"):
        module = importlib.import_module(f"regap_export.models.{name}")
        defined += [v for v in vars(module).values() if isinstance(v, models.ModelAdapter)]
    assert sorted(a.family for a in defined) == sorted(a.family for a in models.registered_adapters())
    assert sorted(a.family for a in models.registered_adapters()) == [
        "gemma", "idefics3", "llama", "llava", "llava_next", "mistral", "qwen2", "qwen2_vl", "qwen3"]
    for adapter in models.registered_adapters():
        assert adapter.fallback_chat_template, adapter.family


def test_multimodal_tables_come_from_the_adapters():
    assert sorted(vision_export.vision_specs()) == ["idefics3", "llava", "llava_next", "qwen2_5_vl", "qwen2_vl"]
    for adapter in models.registered_adapters():
        assert (adapter.vision_runtime is not None) == adapter.multimodal, adapter.family
        assert bool(adapter.vision_export) == adapter.multimodal, adapter.family
    assert models.pixel_extra_keys() == ("image_sizes", "image_grid_thw")
    # one adapter family, two model types: the config's model type picks the spec
    windowed = vision_export.vision_spec("qwen2_vl", type("C", (), {"model_type": "qwen2_5_vl"})())
    assert windowed.inputs[-2:] == ("window_index", "cu_window_seqlens")
    assert vision_export.vision_spec("qwen2_vl").inputs == ("pixel_values", "vision_position_ids", "cu_seqlens")


def test_unknown_families_are_refused_with_regap_errors():
    with pytest.raises(ModelError, match="supported: idefics3, llava, llava_next, qwen2_5_vl, qwen2_vl"):
        vision_export.vision_spec("llama")
    with pytest.raises(RegapError, match="no image input handling for family 'llama'"):
        models.vision_runtime_for("llama")
    with pytest.raises(RegapError, match="unknown position_ids scheme"):
        positions.position_scheme({"scheme": "alibi", "rank": 2})


def test_position_schemes_come_from_the_adapters():
    config = type("C", (), {"image_token_id": 7, "vision_config": type("V", (), {"spatial_merge_size": 2})()})()
    assert positions.position_config("llama", config) == {"scheme": "text", "rank": 2}
    assert positions.position_config("qwen2_vl", config) == {"scheme": "mrope", "rank": 3, "image_token_id": 7,
                                                             "spatial_merge_size": 2}
    scheme = positions.position_scheme(positions.position_config("qwen2_vl", config))
    assert scheme.rank == 3
    ids, mask = np.array([[1, 2, 3]]), np.array([[0, 1, 1]])
    assert scheme.prefill(ids, mask).tolist() == [[[0, 0, 1]]] * 3
    assert positions.position_scheme(None).prefill(ids, mask).tolist() == [[1, 0, 1]]


def test_ported_select_best_resolution_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution as reference

    from regap_export.models.llava import select_best_resolution

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008], [20, 40], [40, 20], [40, 40]]
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 2000, size=(300, 2))] + [(30, 30), (672, 672), (1, 1)]
    for size in sizes:
        assert select_best_resolution(size, pinpoints) == tuple(reference(size, pinpoints)), size


def test_user_errors_in_models_are_regap_errors():
    from regap_export.models.base import image_token_id_of

    llama = models.adapter_for_family("llama")
    with pytest.raises(ModelError, match="text-only family"):
        llama.messages("hi", with_image=True)
    with pytest.raises(ModelError, match="names no image token id") as info:
        image_token_id_of(type("C", (), {"model_type": "llava"})())
    assert info.value.field == "image_token_id"
    with pytest.raises(RegapError, match="needs image_sizes") as info:
        models.vision_runtime_for("llava_next").prepare({"vision_config": {}}, pixel_values=np.zeros((1, 2, 3, 4, 4)))
    assert info.value.field == "image_sizes"
