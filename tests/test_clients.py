"""Exported folders in the clients users already run, as written: greedy tokens from
transformers.js (npm ``@huggingface/transformers``, ``clients/``) and ONNX Runtime GenAI equal
``regap_export.runtime``'s, with and without images, at the precisions users ship.

No client feeds ``regap_image_mask``. The multimodal exports (tiny vision families, the
embedded SmolVLM and the organism, default ``positions``) carry the modality channel (ONNX
contract 5), so the clients run the corrected model on image prompts at every precision,
compared with the tool's corrected run. The tiny text models are exported with
``positions = all`` (the graph's default mask is 1), so the correction acts on text too.

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
from regap_export.method.modality import image_flags, without_channel
from regap_export.models.idefics3 import LAYOUT_BATCH_IMAGES, LAYOUT_KEY
from regap_testing import ORGANISM_GROUP, SMOLLM2_GROUP, rehash

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
# What transformers.js users ship multimodal models at (its dtype option).
CLIENT_PRECISIONS = ("fp32", "fp16", "q4f16")


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
        # run the corrected model). Vision: the default positions, image rows found by the modality channel.
        positions = "last+generated" if family in VISION_FAMILIES else "all"
        directions = write_directions(model, self.root / "directions" / family,
                                      options_for("regap", positions=positions))
        precisions = CLIENT_PRECISIONS if family in VISION_FAMILIES else ("fp32",)
        return export_to_folder(str(model), directions, self.root / "exports" / family, precisions=precisions)


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
def tool_tokens(folder: Path, prompt: str, image: Path | None, max_new_tokens: int, *, correct: bool,
                precision: str = "fp32", follow_up: list[int] | None = None) -> dict[str, list[int]]:
    """regap_export.runtime's greedy reply (what ``regap-export generate`` runs); with
    ``follow_up``, the chat continued with the cache as transformers.js's generate.mjs does."""
    from transformers import AutoConfig

    from regap_export.models import adapter_for_config
    from regap_export.models.base import pixel_inputs
    from regap_export.runtime import OrtSessions, generate

    adapter = adapter_for_config(AutoConfig.from_pretrained(folder))
    processor = adapter.load_processor(folder)
    images = None if image is None else [Image.open(image).convert("RGB")]
    text = adapter.render_prompt(processor, prompt, with_image=images is not None)
    inputs = {k: v.numpy() for k, v in adapter.encode(processor, [text], images).items()}
    sessions = OrtSessions.open(folder / "onnx", precision=precision)
    result = generate(sessions, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens,
                      correct=correct, **pixel_inputs(inputs))
    generated = _until_eos(result.new_tokens[0], sessions)
    out = {"prompt_ids": inputs["input_ids"][0].tolist(), "generated_ids": generated}
    if follow_up is not None:
        conversation = np.asarray([out["prompt_ids"] + generated + list(follow_up)], dtype=np.int64)
        turn2 = generate(sessions, conversation, np.ones_like(conversation), past=result.cache,
                         max_new_tokens=max_new_tokens, correct=correct)
        out["follow_up_generated_ids"] = _until_eos(turn2.new_tokens[0], sessions)
    return out


def _until_eos(tokens: np.ndarray, sessions) -> list[int]:
    """The row's tokens up to and including its first EOS (the rest is padding)."""
    eos = set(sessions.config.get("eos_token_id") or [])
    out = []
    for token in tokens.tolist():
        out.append(int(token))
        if token in eos:
            break
    return out


def transformers_js_run(folder: Path, prompt: str, image: Path | None, max_new_tokens: int, *,
                        dtype: str = "fp32", follow_up: list[int] | None = None) -> subprocess.CompletedProcess:
    args = [str(folder), prompt, str(image) if image else "-", str(max_new_tokens), dtype]
    if follow_up is not None:
        args.append(json.dumps(list(follow_up)))
    return subprocess.run(["node", str(NODE_SCRIPT), *args], cwd=CLIENTS, capture_output=True, text=True, timeout=600)


def transformers_js_tokens(folder: Path, prompt: str, image: Path | None, max_new_tokens: int, *,
                           dtype: str = "fp32", follow_up: list[int] | None = None) -> dict[str, Any]:
    proc = transformers_js_run(folder, prompt, image, max_new_tokens, dtype=dtype, follow_up=follow_up)
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
@pytest.mark.parametrize("with_image,precision", [(True, "fp32"), (True, "fp16"), (True, "q4f16"), (False, "fp32")],
                         ids=["image-fp32", "image-fp16", "image-q4f16", "text-fp32"])
@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_transformers_js_vision_families(exports, family, with_image, precision):
    """The modality channel at every float type: transformers.js at fp16 and q4f16 loads the
    ``_fp16`` / ``_q4f16`` graphs and gives our runtime's corrected tokens at that precision."""
    folder = exports.tiny(family)
    image = native_image(folder) if with_image else None
    tool = tool_tokens(folder, PROMPT, image, TINY_TOKENS, correct=True, precision=precision)
    assert_same(transformers_js_tokens(folder, PROMPT, image, TINY_TOKENS, dtype=precision), tool,
                f"transformers.js {family} {precision} ({'image' if with_image else 'text'})")


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
    corrected model: on an image prompt the decoder finds the image rows by the modality channel. The
    correction changes this reply, so equal tokens show that transformers.js applied it."""
    folder = real_export
    image = native_image(folder) if with_image else None
    tool = tool_tokens(folder, PROMPT, image, EMBEDDED_TOKENS, correct=True)
    if with_image:
        assert tool_tokens(folder, PROMPT, image, EMBEDDED_TOKENS, correct=False) != tool
    assert_same(transformers_js_tokens(folder, PROMPT, image, EMBEDDED_TOKENS), tool,
                f"transformers.js smolvlm ({'image' if with_image else 'text'})")


# The organism: the folder the README's demo writes (``embedded:organism``, directions it
# calibrated), with the fp16 and q4f16 graphs ``export --precision fp32,fp16,q4f16`` adds, made
# here from its float32 graphs by the same module (export.precision) in a copy of its client files.
# Where the organism itself still refuses harmful requests (as text): its 4-bit weights lose that.
REFUSING_PRECISIONS = ("fp32", "fp16")
FOLLOW_UP = "Please answer in one short sentence."


class OrganismCase:
    def __init__(self, demo: Path, root: Path):
        from regap_export.data import load_bundled
        from regap_export.data.render import TWIN_SUFFIX, declared_renderer
        from regap_export.evaluation import EVALUATION_FILENAME
        from regap_export.evaluation.behaviour import showcase

        self.demo = demo
        evaluation = json.loads((demo / EVALUATION_FILENAME).read_text())
        self.markers = evaluation["behaviour"]["markers"]
        requests = {r.id + TWIN_SUFFIX: r.instruction for r in load_bundled("heldout")}
        flipped = showcase(evaluation["generations"], self.markers, requests)["flipped"]
        assert flipped is not None, "the demo's correction refused no harmful image request it answered uncorrected"
        self.request = requests[flipped]
        self.image = root / "request.png"
        declared_renderer(demo)(self.request).save(self.image)
        from regap_export.export.precision import write_precisions

        # The whole exported folder (our runtime verifies it against its manifest; the clients
        # read what they need of it), with the other precisions written as export writes them.
        self.folder = root / "precisions"
        shutil.copytree(demo, self.folder)
        write_precisions(self.folder / "onnx", CLIENT_PRECISIONS)
        rehash(self.folder)

    def refuses(self, tokens: list[int]) -> bool:
        from transformers import AutoTokenizer

        from regap_export.evaluation.behaviour import is_refusal

        return is_refusal(AutoTokenizer.from_pretrained(self.folder).decode(tokens), self.markers)


@pytest.fixture(scope="module")
def organism(organism_demo, tmp_path_factory) -> OrganismCase:
    return OrganismCase(organism_demo[0] / "corrected", tmp_path_factory.mktemp("organism-clients"))


def follow_up_ids(folder: Path, text: str) -> list[int]:
    """A second user turn as the chat template renders it after an assistant reply (the reply's
    own end token comes from the generation)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    first = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]
    head = tokenizer.apply_chat_template(first, tokenize=False)
    full = tokenizer.apply_chat_template(first + [{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    assert full.startswith(head)
    return tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]


@pytest.mark.slow
@pytest.mark.xdist_group(ORGANISM_GROUP)
@needs_tjs
@pytest.mark.parametrize("precision", CLIENT_PRECISIONS)
def test_transformers_js_corrects_the_organism_at_every_precision(organism, precision):
    """At fp32, fp16 and q4f16 (transformers.js's dtype option, default settings otherwise):
    transformers.js, fed only the carrier text and the image of the harmful request the demo's
    evaluation saw answered uncorrected and refused corrected, gives our runtime's corrected tokens
    at the same precision, then continues the chat with its cache to the same second reply; as
    text, the same request gets the uncorrected model's reply, in both runtimes. At fp32 and fp16
    the uncorrected image reply answers and the corrected one refuses. At q4f16 the correction
    still changes the image reply, but refusal is not asserted: the organism's 4-bit weights
    remove its refusal of the request even as text (docs/CLIENTS.md), so there is none to restore."""
    from regap_export.data.render import DEFAULT_CARRIER

    folder, image = organism.folder, organism.image
    follow = follow_up_ids(folder, FOLLOW_UP)
    tool = tool_tokens(folder, DEFAULT_CARRIER, image, ORGANISM_TOKENS, correct=True, precision=precision,
                       follow_up=follow)
    uncorrected = tool_tokens(folder, DEFAULT_CARRIER, image, ORGANISM_TOKENS, correct=False, precision=precision)
    assert tool["generated_ids"] != uncorrected["generated_ids"], precision
    if precision in REFUSING_PRECISIONS:
        assert not organism.refuses(uncorrected["generated_ids"]), precision
        assert organism.refuses(tool["generated_ids"]), precision
    client = transformers_js_tokens(folder, DEFAULT_CARRIER, image, ORGANISM_TOKENS, dtype=precision, follow_up=follow)
    assert_same(client, tool, f"transformers.js organism {precision} (image)")
    assert client["follow_up_generated_ids"] == tool["follow_up_generated_ids"], f"{precision}: turn 2"
    text = tool_tokens(folder, organism.request, None, ORGANISM_TOKENS, correct=True, precision=precision)
    assert text == tool_tokens(folder, organism.request, None, ORGANISM_TOKENS, correct=False, precision=precision)
    assert_same(transformers_js_tokens(folder, organism.request, None, ORGANISM_TOKENS, dtype=precision), text,
                f"transformers.js organism {precision} (text)")


@pytest.mark.slow
@pytest.mark.xdist_group(ORGANISM_GROUP)
@needs_tjs
def test_a_float16_conversion_by_the_clients_route_stays_corrected(organism, tmp_path):
    """The float32 export converted to float16 as transformers.js's conversion script does (ONNX
    Runtime's / onnxconverter-common's converter, constants clamped to 1e4, pixel inputs kept
    float32), written under transformers.js's fp16 names: transformers.js loads it and still refuses
    the harmful image request the uncorrected model answers (the 0 / 1 channel survives the clamp),
    and answers the text request as the uncorrected model does; our runtime refuses such a graph."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from regap_export.data.render import DEFAULT_CARRIER
    from regap_export.errors import ArtifactError
    from regap_export.io.artifacts import read_config
    from regap_export.io.graph_metadata import precision_file
    from regap_export.runtime import OrtSessions

    import onnx

    folder = tmp_path / "converted"
    shutil.copytree(organism.demo, folder)
    onnx_dir = folder / "onnx"
    config = read_config(onnx_dir)
    for key, name in config["files"].items():
        model = onnx.load(str(onnx_dir / name))
        keep = list(config["vision_inputs"]) if key == "vision_encoder" else False
        converted = convert_float_to_float16(model, min_positive_val=1e-7, max_finite_val=1e4, keep_io_types=keep,
                                             disable_shape_infer=True)
        onnx.save(converted, str(onnx_dir / precision_file(name, "fp16")), save_as_external_data=True,
                  location=precision_file(name, "fp16") + ".data")
    client = transformers_js_tokens(folder, DEFAULT_CARRIER, organism.image, ORGANISM_TOKENS, dtype="fp16")
    assert organism.refuses(client["generated_ids"]), client["text"]
    uncorrected = tool_tokens(organism.folder, organism.request, None, ORGANISM_TOKENS, correct=False,
                              precision="fp16")
    text = transformers_js_tokens(folder, organism.request, None, ORGANISM_TOKENS, dtype="fp16")
    assert text["generated_ids"] == uncorrected["generated_ids"], text["text"]
    # our runtime, told these are its fp16 graphs, refuses them in one line
    config["precisions"] = {"fp32": config["files"], "fp16": {k: precision_file(v, "fp16") for k, v in
                                                                config["files"].items()}}
    (onnx_dir / "regap_onnx.json").write_text(json.dumps(config))
    rehash(folder)  # a consistent manifest: only the graphs' own metadata can tell
    with pytest.raises(ArtifactError, match="precision fp32, regap_onnx.json lists it as fp16"):
        OrtSessions.open(onnx_dir, precision="fp16")


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
    assert config["image_rows"] == "channel" and image_flags(got).all()
    got = without_channel(got)
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
