"""Model-family adapters, checked on tiny seeded models of every supported family."""
from __future__ import annotations

import functools

import pytest
import torch
import transformers
from PIL import Image

from regap_export.errors import ModelError
from regap_export.models import adapter_for_config, adapter_for_model, supported_model_types
from regap_export.models.base import ModelAdapter, tokenizer_of
from tiny_models import TINY_FAMILIES, build_tiny, save_tiny

FAMILIES = list(TINY_FAMILIES)
SHORT, LONG = "Say hi.", "Write a long and careful story about a cat who learns to sail a small boat."
# Inputs a family's processor must return next to input_ids / attention_mask / pixel_values.
EXTRA_IMAGE_INPUTS = {"llava_next": {"image_sizes"}, "qwen2_vl": {"image_grid_thw", "mm_token_type_ids"},
                      "qwen2_5_vl": {"image_grid_thw", "mm_token_type_ids"}}


@functools.lru_cache(maxsize=None)
def tiny(family: str):
    """One build per family for the whole module (tests must not change the weights)."""
    return build_tiny(family)


def images() -> list[Image.Image]:
    """Two images of different sizes and aspect ratios."""
    return [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (70, 96), (20, 90, 200))]


def batch(adapter: ModelAdapter, processor, with_image: bool):
    prompts = [adapter.render_prompt(processor, text, with_image=with_image) for text in (SHORT, LONG)]
    return adapter.encode(processor, prompts, images() if with_image else None)


def assert_left_padded(enc) -> None:
    mask = enc["attention_mask"]
    assert mask.shape[0] == 2
    assert mask[0, 0] == 0 and mask[0, -1] == 1, "the shorter prompt must be padded on the left"
    assert bool(mask[1].all())


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_found_and_structure(family):
    model, _ = tiny(family)
    adapter = adapter_for_config(model.config)
    assert adapter is adapter_for_model(model)
    assert model.config.model_type in adapter.model_types
    assert isinstance(model, getattr(transformers, adapter.auto_class_name)._model_mapping[type(model.config)])
    text_config = adapter.text_config(model.config)
    layers = adapter.decoder_layers(model)
    assert len(layers) == text_config.num_hidden_layers == adapter.num_layers(model) >= 4
    assert adapter.hidden_size(model) == text_config.hidden_size
    assert adapter.language_model(model) is model.get_submodule(adapter.language_model_path)
    assert not adapter.multimodal or adapter.language_model_path != "model"


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_match_hidden_states(family):
    """Block i's output is hidden_states[i + 1], except the last, which HF reports after the final norm."""
    model, processor = tiny(family)
    adapter = adapter_for_config(model.config)
    layers = adapter.decoder_layers(model)
    enc = batch(adapter, processor, with_image=adapter.multimodal)
    assert_left_padded(enc)
    captured: dict[int, torch.Tensor] = {}

    def hook(index):
        def fn(module, args, output):
            captured[index] = (output[0] if isinstance(output, tuple) else output).detach()
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    hidden = out.hidden_states
    n = len(layers)
    assert len(hidden) == n + 1 and sorted(captured) == list(range(n))
    real = enc["attention_mask"].bool()
    for i in range(n - 1):
        torch.testing.assert_close(captured[i][real], hidden[i + 1][real], atol=1e-6, rtol=0)
    final_norm = adapter.language_model(model).norm
    torch.testing.assert_close(final_norm(captured[n - 1])[real], hidden[n][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_render_prompt(family):
    model, processor = tiny(family)
    adapter = adapter_for_config(model.config)
    for with_image in ([False, True] if adapter.multimodal else [False]):
        prompt = adapter.render_prompt(processor, SHORT, with_image=with_image)
        assert SHORT in prompt
        generation_suffix = prompt.split(SHORT, 1)[1]
        # The prompt ends where the assistant's answer begins: nothing but the template's tail
        # follows the instruction, and the same tail for any instruction.
        other = adapter.render_prompt(processor, LONG, with_image=with_image)
        assert other.endswith(generation_suffix)
        assert adapter.post_instruction_length(processor) >= 1
    if not adapter.multimodal:
        with pytest.raises(ModelError, match="text-only"):
            adapter.render_prompt(processor, SHORT, with_image=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_text_batch(family):
    model, processor = tiny(family)
    adapter = adapter_for_config(model.config)
    enc = batch(adapter, processor, with_image=False)
    assert_left_padded(enc)
    with torch.no_grad():
        logits = model(**enc, logits_to_keep=1).logits
    assert logits.shape[:2] == (2, 1) and torch.isfinite(logits).all()
    if not adapter.multimodal:
        prompts = [adapter.render_prompt(processor, SHORT, with_image=False)] * 2
        with pytest.raises(ModelError, match="text-only"):
            adapter.encode(processor, prompts, images())


@pytest.mark.parametrize("family", [f for f in FAMILIES if not isinstance(f, str) or f in
                                    ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")])
def test_encode_image_batch(family):
    model, processor = tiny(family)
    adapter = adapter_for_config(model.config)
    enc = batch(adapter, processor, with_image=True)
    assert_left_padded(enc)
    assert {"input_ids", "attention_mask", "pixel_values"} | EXTRA_IMAGE_INPUTS.get(family, set()) <= set(enc)
    with torch.no_grad():
        logits = model(**enc, logits_to_keep=1).logits
    assert logits.shape[:2] == (2, 1) and torch.isfinite(logits).all()
    # Text and image prompts of one family start alike (no BOS on one side only).
    text = batch(adapter, processor, with_image=False)
    first = lambda e: e["input_ids"][1, 0].item()  # noqa: E731  (row 1 is unpadded)
    assert first(text) == first(enc)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload(family, tmp_path):
    model, processor = tiny(family)
    folder = save_tiny(family, tmp_path / family, built=(model, processor))
    config = transformers.AutoConfig.from_pretrained(folder)
    adapter = adapter_for_config(config, source=str(folder))
    loaded = getattr(transformers, adapter.auto_class_name).from_pretrained(folder).eval()
    loaded_processor = adapter.load_processor(folder)
    assert type(loaded) is type(model)
    assert len(tokenizer_of(loaded_processor)) == len(tokenizer_of(processor))
    assert tokenizer_of(loaded_processor).chat_template == tokenizer_of(processor).chat_template
    with_image = adapter.multimodal
    enc = batch(adapter, processor, with_image)
    enc_loaded = batch(adapter, loaded_processor, with_image)
    assert set(enc) == set(enc_loaded)
    for key in enc:
        torch.testing.assert_close(enc_loaded[key], enc[key], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc, logits_to_keep=1).logits, model(**enc, logits_to_keep=1).logits,
                                   atol=1e-5, rtol=1e-5)


def test_builds_are_seeded():
    a, _ = build_tiny("qwen2")
    b, _ = tiny("qwen2")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_all_families_covered():
    """Every registered model type has a tiny model (idefics3 comes from tests/tiny_idefics3.py)."""
    covered = set()
    for family in TINY_FAMILIES:
        covered.add(tiny(family)[0].config.model_type)
    missing = set(supported_model_types()) - covered
    assert not missing


def test_unsupported_model_type():
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    with pytest.raises(ModelError) as err:
        adapter_for_config(config, source="/models/gpt2")
    message = str(err.value)
    assert "gpt2" in message and "/models/gpt2" in message
    for model_type in ("llama", "qwen2_vl", "llava_next", "gemma3_text"):
        assert model_type in message
