"""Exported folders in the clients users already run, as written: greedy tokens
from transformers.js (npm ``@huggingface/transformers``, ``clients/``) and ONNX Runtime GenAI
equal ``regap_export.runtime``'s, with and without images.

No client feeds ``regap_image_mask``. The multimodal exports (tiny vision families, the
embedded SmolVLM and the organism, default ``positions``) find image rows by the modality marker (ONNX
contract 4), so the clients run the corrected model on image prompts, compared with the
tool's corrected run. The tiny text models are exported with ``positions = all`` (the
graph's default mask is 1), so the correction acts on text too.

Needs node + ``bash scripts/install_clients.sh`` (transformers.js) and onnxruntime-genai;
each client's tests are skipped, with the reason, when it is missing.
"""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from regap_export.export.client_files import (
    GENAI_CONFIG, PREPROCESSOR_CONFIG, TOKENIZER_CONFIG, write_client_files,
)
from regap_export.method.modality import marked_rows, unmark
from regap_export.models.idefics3 import LAYOUT_BATCH_IMAGES, LAYOUT_KEY
from regap_testing import ORGANISM_GROUP, SMOLLM2_GROUP

pytestmark = pytest.mark.clients

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ROOT / "clients"
NODE_SCRIPT = CLIENTS / "generate.mjs"
TJS_PACKAGE = CLIENTS / "node_modules" / "@huggingface" / "transformers" / "package.json"

TEXT_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text"]
# Multimodal families transformers.js 4.3 runs (LLaVA-NeXT and Qwen2-VL: client_files notes).
VISION_FAMILIES = ["idefics3", "llava"]
PROMPT = "Write a short poem about the sea."
TINY_TOKENS, EMBEDDED_TOKENS, ORGANISM_TOKENS = 16, 64, 24


def _transformers_js_missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (bash scripts/install_clients.sh)"
    if not TJS_PACKAGE.is_file():
        return "the npm package @huggingface/transformers is not installed in clients/ (bash scripts/install_clients.sh)"
    return None


def _genai_missing() -> str | None:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "onnxruntime-genai is not installed (bash scripts/install_clients.sh)"
    return None


needs_tjs = pytest.mark.skipif(_transformers_js_missing() is not None, reason=str(_transformers_js_missing()))
needs_genai = pytest.mark.skipif(_genai_missing() is not None, reason=str(_genai_missing()))


# -- exports: the tiny models' shared by every test of the session, the real ones per param ---
class Exports:
    def __init__(self, root: Path):
        self.root = root

    @functools.lru_cache(maxsize=None)
    def tiny(self, family: str) -> Path:
        from regap_export.export.pipeline import export_to_folder
        from regap_testing import options_for, write_directions
        from tiny_models import save_tiny

        model = save_tiny(family, self.root / "models" / family)
        # Text: positions "all" (the graph's default mask is 1, so clients that never feed it
        # run the corrected model). Vision: the default positions, image rows found by the marker.
        positions = "last+generated" if family in VISION_FAMILIES else "all"
        directions = write_directions(model, self.root / "directions" / family,
                                      options_for("regap", positions=positions))
        return export_to_folder(str(model), directions, self.root / "exports" / family)


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("client_exports"))


def export_embedded(name: str, root: Path) -> Path:
    """``embedded:NAME`` exported with the tool's default options."""
    from regap_export.export.pipeline import export_to_folder
    from regap_export.models.loading import load_model
    from regap_export.options import RegapOptions
    from regap_testing import write_directions

    folder = load_model(f"embedded:{name}").folder
    directions = write_directions(folder, root / "directions", RegapOptions())
    return export_to_folder(str(folder), directions, root / "export")


@pytest.fixture(scope="module")
def real_export(request, tmp_path_factory):
    """``export_embedded(request.param)`` (about 1 GB), deleted once the tests that use it are
    done: session-wide, every worker once held three real exports to the end and CI ran out of
    disk. (The SmolLM2 and organism exports are conftest.py's, one of each per session.)"""
    root = tmp_path_factory.mktemp(f"real-{request.param}")
    yield export_embedded(request.param, root)
    shutil.rmtree(root, ignore_errors=True)


def native_image(folder: Path) -> Path:
    """An image at the size the folder's image processor resizes to (Idefics3: longest_edge
    square; LLaVA: the crop), so neither processor resamples it: transformers.js resizes with
    its own kernel, whose pixels differ from PIL's by up to 5/255 (measured on a 64x48 image
    for SmolVLM), enough to change a greedy token of a random vision tower after ~40 steps.
    Same pixels, same features: what this file checks is the export."""
    config = json.loads((folder / PREPROCESSOR_CONFIG).read_text())
    crop = config.get("crop_size")
    height, width = (crop["height"], crop["width"]) if crop else (config["size"]["longest_edge"],) * 2
    path = folder.parent / f"{folder.name}-image-{width}x{height}.png"
    if not path.is_file():
        image = Image.linear_gradient("L").convert("RGB").resize((width, height), Image.NEAREST)
        draw = ImageDraw.Draw(image)
        draw.rectangle((width // 8, height // 5, width // 2, 3 * height // 4), fill=(200, 30, 30))
        draw.ellipse((width // 2, height // 8, 7 * width // 8, height // 2), fill=(20, 160, 40))
        image.save(path)
    return path


# -- the three runners ----------------------------------------------------------------------
def tool_tokens(folder: Path, prompt: str, image: Path | None, max_new_tokens: int, *, correct: bool
                ) -> dict[str, list[int]]:
    """regap_export.runtime's greedy reply (what ``regap-export generate`` runs)."""
    from transformers import AutoConfig

    from regap_export.models import adapter_for_config
    from regap_export.models.base import pixel_inputs
    from regap_export.runtime import OrtSessions, generate

    adapter = adapter_for_config(AutoConfig.from_pretrained(folder))
    processor = adapter.load_processor(folder)
    images = None if image is None else [Image.open(image).convert("RGB")]
    text = adapter.render_prompt(processor, prompt, with_image=images is not None)
    inputs = {k: v.numpy() for k, v in adapter.encode(processor, [text], images).items()}
    sessions = OrtSessions.open(folder / "onnx")
    result = generate(sessions, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens,
                      correct=correct, **pixel_inputs(inputs))
    return {"prompt_ids": inputs["input_ids"][0].tolist(), "generated_ids": _until_eos(result.new_tokens[0], sessions)}


def _until_eos(tokens: np.ndarray, sessions) -> list[int]:
    """The row's tokens up to and including its first EOS (the rest is padding)."""
    eos = set(sessions.config.get("eos_token_id") or [])
    out = []
    for token in tokens.tolist():
        out.append(int(token))
        if token in eos:
            break
    return out


def transformers_js_tokens(folder: Path, prompt: str, image: Path | None, max_new_tokens: int) -> dict[str, Any]:
    proc = subprocess.run(["node", str(NODE_SCRIPT), str(folder), prompt, str(image) if image else "-",
                           str(max_new_tokens)], cwd=CLIENTS, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"transformers.js failed on {folder}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def genai_tokens(folder: Path, prompt: str, max_new_tokens: int) -> dict[str, list[int]]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]),
                                         add_generation_prompt=True)
    ids = [int(i) for i in tokenizer.encode(text)]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return {"prompt_ids": ids, "generated_ids": out}


def assert_same(client: dict[str, Any], tool: dict[str, list[int]], what: str) -> None:
    assert client["prompt_ids"] == tool["prompt_ids"], f"{what}: the prompt is tokenized differently"
    same = sum(a == b for a, b in zip(client["generated_ids"], tool["generated_ids"]))
    print(f"{what}: {same} of {len(tool['generated_ids'])} tokens equal")
    assert client["generated_ids"] == tool["generated_ids"], what


# -- tiny models ----------------------------------------------------------------------------
@needs_tjs
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_transformers_js_text_families(exports, family):
    folder = exports.tiny(family)
    tool = tool_tokens(folder, PROMPT, None, TINY_TOKENS, correct=True)
    assert_same(transformers_js_tokens(folder, PROMPT, None, TINY_TOKENS), tool, f"transformers.js {family}")


@needs_genai
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_genai_text_families(exports, family):
    folder = exports.tiny(family)
    config = json.loads((folder / GENAI_CONFIG).read_text())
    assert config["search"]["past_present_share_buffer"] is False
    tool = tool_tokens(folder, PROMPT, None, TINY_TOKENS, correct=True)
    assert_same(genai_tokens(folder, PROMPT, TINY_TOKENS), tool, f"onnxruntime-genai {family}")


@needs_tjs
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_transformers_js_vision_families(exports, family, with_image):
    folder = exports.tiny(family)
    image = native_image(folder) if with_image else None
    tool = tool_tokens(folder, PROMPT, image, TINY_TOKENS, correct=True)
    assert_same(transformers_js_tokens(folder, PROMPT, image, TINY_TOKENS), tool,
                f"transformers.js {family} ({'image' if with_image else 'text'})")


# -- the embedded models, exported as the demo does ----------------------------------------
# SmolLM2: conftest.py's calibrated export, shared with test_real_model.py (one worker builds it).
@pytest.mark.slow
@pytest.mark.xdist_group(SMOLLM2_GROUP)
@needs_tjs
def test_transformers_js_smollm2(smollm2_export):
    folder = smollm2_export
    tool = tool_tokens(folder, PROMPT, None, EMBEDDED_TOKENS, correct=True)
    assert_same(transformers_js_tokens(folder, PROMPT, None, EMBEDDED_TOKENS), tool, "transformers.js smollm2")


@pytest.mark.slow
@pytest.mark.xdist_group(SMOLLM2_GROUP)
@needs_genai
def test_genai_smollm2(smollm2_export):
    folder = smollm2_export
    tool = tool_tokens(folder, PROMPT, None, EMBEDDED_TOKENS, correct=True)
    assert_same(genai_tokens(folder, PROMPT, EMBEDDED_TOKENS), tool, "onnxruntime-genai smollm2")


# By hand only (-m full): the organism below is the same SmolVLM-shaped graph with real
# weights, and its test checks both paths (its export costs CI the same 3 minutes).
@pytest.mark.full
@needs_tjs
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
@pytest.mark.parametrize("real_export", ["smolvlm"], indirect=True)
def test_transformers_js_smolvlm_demo_folder(real_export, with_image):
    """The folder ``demo --model embedded:smolvlm`` writes (default options) loads as is and runs the
    corrected model: on an image prompt the decoder finds the image rows by their marker. The
    correction changes this reply, so equal tokens show that transformers.js applied it."""
    folder = real_export
    image = native_image(folder) if with_image else None
    tool = tool_tokens(folder, PROMPT, image, EMBEDDED_TOKENS, correct=True)
    if with_image:
        assert tool_tokens(folder, PROMPT, image, EMBEDDED_TOKENS, correct=False) != tool
    assert_same(transformers_js_tokens(folder, PROMPT, image, EMBEDDED_TOKENS), tool,
                f"transformers.js smolvlm ({'image' if with_image else 'text'})")


@pytest.mark.slow
@pytest.mark.xdist_group(ORGANISM_GROUP)
@needs_tjs
def test_transformers_js_corrects_the_organism_image_path(organism_demo, tmp_path):
    """The folder the README's demo writes (``embedded:organism``, directions it calibrated): the
    harmful image request (its token-cell rendering) that the demo's evaluation saw answered
    uncorrected and refused corrected is so again here, and transformers.js, fed only the
    carrier text and the image, gives the corrected tokens: it found the image rows by their
    marker and ran the correction. As text, the same request gets the same reply with the
    correction on and off, in both runtimes."""
    from transformers import AutoTokenizer

    from regap_export.evaluation.behaviour import is_refusal, showcase
    from regap_export.data import load_bundled
    from regap_export.data.render import DEFAULT_CARRIER, TWIN_SUFFIX, declared_renderer
    from regap_export.evaluation import EVALUATION_FILENAME

    folder = organism_demo[0] / "corrected"
    evaluation = json.loads((folder / EVALUATION_FILENAME).read_text())
    requests = {r.id + TWIN_SUFFIX: r.instruction for r in load_bundled("heldout")}
    flipped = showcase(evaluation["generations"], evaluation["behaviour"]["markers"], requests)["flipped"]
    assert flipped is not None, "the demo's correction refused no harmful image request it answered uncorrected"
    request = requests[flipped]
    image = tmp_path / "request.png"
    declared_renderer(folder)(request).save(image)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tool = tool_tokens(folder, DEFAULT_CARRIER, image, ORGANISM_TOKENS, correct=True)
    uncorrected = tool_tokens(folder, DEFAULT_CARRIER, image, ORGANISM_TOKENS, correct=False)
    markers = evaluation["behaviour"]["markers"]
    assert not is_refusal(tokenizer.decode(uncorrected["generated_ids"]), markers)
    assert is_refusal(tokenizer.decode(tool["generated_ids"]), markers)
    assert_same(transformers_js_tokens(folder, DEFAULT_CARRIER, image, ORGANISM_TOKENS), tool,
                "transformers.js organism (image)")
    tool_text = tool_tokens(folder, request, None, ORGANISM_TOKENS, correct=True)
    assert tool_text == tool_tokens(folder, request, None, ORGANISM_TOKENS, correct=False)
    assert_same(transformers_js_tokens(folder, request, None, ORGANISM_TOKENS), tool_text, "transformers.js organism (text)")


# -- the files themselves (no client needed) ------------------------------------------------
def test_client_files_of_a_text_export(exports):
    folder = exports.tiny("llama")
    tokenizer = json.loads((folder / TOKENIZER_CONFIG).read_text())
    assert tokenizer["chat_template"] == (folder / "chat_template.jinja").read_text()
    assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer["model_input_names"] == ["input_ids", "attention_mask"]
    genai = json.loads((folder / GENAI_CONFIG).read_text())
    onnx_config = json.loads((folder / "onnx" / "regap_onnx.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "onnx/model.onnx"
    assert genai["model"]["decoder"]["num_hidden_layers"] == onnx_config["num_layers"]
    assert not (folder / PREPROCESSOR_CONFIG).exists()
    manifest = json.loads((folder / "regap_manifest.json").read_text())
    listed = json.dumps(manifest)
    assert GENAI_CONFIG in listed and TOKENIZER_CONFIG in listed


@pytest.mark.parametrize("family", ["qwen2", "idefics3"])
def test_transformers5_reads_the_rewritten_tokenizer_config(exports, family):
    """transformers 5 reads the rewritten tokenizer as the source model's: same special
    tokens, ids and chat prompt; no token_type_ids."""
    from transformers import AutoTokenizer

    folder = exports.tiny(family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    source = AutoTokenizer.from_pretrained(exports.root / "models" / family)
    encoded = tokenizer(PROMPT)
    assert set(encoded) == {"input_ids", "attention_mask"}
    assert encoded["input_ids"] == source(PROMPT)["input_ids"]
    assert tokenizer.all_special_tokens == source.all_special_tokens
    assert tokenizer.extra_special_tokens == source.extra_special_tokens
    messages = [{"role": "user", "content": PROMPT}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == source.apply_chat_template(messages, tokenize=False)


def test_idefics3_encoder_takes_transformers_js_layout(exports):
    """[batch, images, 3, H, W] float + bool mask; all-zero padding images dropped in the graph
    as Idefics3Model.get_image_features drops them; our runtime feeds the same layout."""
    import onnxruntime as ort
    import torch

    from regap_export.models.loading import load_model

    folder = exports.tiny("idefics3")
    config = json.loads((folder / "onnx" / "regap_onnx.json").read_text())
    assert config[LAYOUT_KEY] == LAYOUT_BATCH_IMAGES and config["vision_input_dtypes"] == ["float32", "bool"]
    assert (folder / PREPROCESSOR_CONFIG).is_file()
    session = ort.InferenceSession(str(folder / "onnx" / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    ranks = {i.name: len(i.shape) for i in session.get_inputs()}
    assert ranks == {"pixel_values": 5, "pixel_attention_mask": 4}
    loaded = load_model(folder)
    size = loaded.model.config.vision_config.image_size
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 2, 3, size, size)).astype(np.float32)
    pixels[1, 1] = 0.0  # sample 1 has one real image and one padding image
    mask = np.ones((2, 2, size, size), dtype=bool)
    mask[1, 1] = False
    mask[0, 0, :, size // 2:] = False  # a partly padded real image
    got = session.run(["image_features"], {"pixel_values": pixels, "pixel_attention_mask": mask})[0]
    assert config["image_rows"] == "marked" and marked_rows(got).all()
    got = unmark(got)
    with torch.no_grad():
        out = loaded.model.model.get_image_features(pixel_values=torch.from_numpy(pixels),
                                                    pixel_attention_mask=torch.from_numpy(mask))
    want = torch.cat(list(out.pooler_output))  # per sample [images * tokens, hidden]
    assert got.shape[0] == 3
    np.testing.assert_allclose(got.reshape(-1, got.shape[-1]), want.reshape(-1, got.shape[-1]).numpy(),
                               rtol=1e-4, atol=1e-4)
    # every image padding: the first is kept (as transformers 4.x did; 5.x would encode none)
    zeros = np.zeros((1, 2, 3, size, size), dtype=np.float32)
    kept = session.run(["image_features"], {"pixel_values": zeros,
                                            "pixel_attention_mask": np.ones((1, 2, size, size), dtype=bool)})[0]
    assert kept.shape[0] == 1


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_unsupported_families_say_so(tmp_path, family):
    """A family transformers.js cannot run gets a note, and its encoder is left as it is."""
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "regap_onnx.json").write_text(json.dumps({"kind": "multimodal", "family": family}))
    notes = write_client_files(tmp_path, adapter=None)
    clients = {note.client for note in notes}
    assert clients == {"transformers.js", "onnxruntime-genai"}
    assert all("not supported" in str(note) for note in notes)
    assert not (tmp_path / GENAI_CONFIG).exists()
    assert LAYOUT_KEY not in json.loads((onnx_dir / "regap_onnx.json").read_text())


def test_regap_seq_text_export_gets_no_genai_config(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 4}))
    (tmp_path / "onnx" / "regap_onnx.json").write_text(json.dumps({
        "kind": "text", "family": "llama", "regap_alpha": True, "num_key_value_heads": [2], "head_dim": [16]}))
    notes = write_client_files(tmp_path, adapter=None)
    assert [n.client for n in notes] == ["onnxruntime-genai"] and "regap_alpha" in notes[0].reason
    assert not (tmp_path / GENAI_CONFIG).exists()


_TOKENIZER4_SCRIPT = """
import json, sys
import transformers
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
text = tokenizer.apply_chat_template(json.loads(sys.argv[2]), tokenize=False, add_generation_prompt=True)
add_special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
encoded = tokenizer(text, add_special_tokens=add_special)
print(json.dumps({"version": transformers.__version__, "class": type(tokenizer).__name__,
                  "keys": sorted(encoded), "ids": encoded["input_ids"]}))
"""


@pytest.mark.parametrize("family", ["llama", "idefics3"])
def test_transformers4_loads_the_tokenizer_as_written(exports, tmp_path, family):
    """optimum's stack (transformers 4.57) resolves tokenizer_class, finds the chat template and
    returns no token_type_ids; its ids equal the tool's prompt ids."""
    from pinned_transformers import TransformersUnavailable, run_transformers4

    folder = exports.tiny(family)
    script = tmp_path / "tokenizer4.py"
    script.write_text(_TOKENIZER4_SCRIPT)
    try:
        from transformers import AutoConfig

        from regap_export.models import adapter_for_config

        messages = adapter_for_config(AutoConfig.from_pretrained(folder)).messages(PROMPT, False)
        result = run_transformers4(script, folder, json.dumps(messages), modules_cache=tmp_path / "modules")
    except TransformersUnavailable as exc:
        pytest.skip(str(exc))
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["version"].startswith("4.")
    assert got["keys"] == ["attention_mask", "input_ids"]
    tool = tool_tokens(folder, PROMPT, None, 1, correct=True)
    assert got["ids"] == tool["prompt_ids"]


@pytest.mark.parametrize("positions,noted", [("last+generated", True), ("image", True), ("all", False)])
def test_mask_input_multimodal_exports_say_images_run_uncorrected(tmp_path, positions, noted):
    """A multimodal decoder that takes the image rows as regap_image_mask (float16 exports):
    transformers.js, which never feeds it, would run image prompts uncorrected, unless the
    export corrects every position (default mask 1)."""
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "regap_onnx.json").write_text(json.dumps({
        "kind": "multimodal", "family": "idefics3", "image_rows": "mask input", "options": {"positions": positions}}))
    notes = [n for n in write_client_files(tmp_path, adapter=None) if n.client == "transformers.js"]
    assert bool(notes) == noted
    if noted:
        assert "uncorrected" in notes[0].reason
