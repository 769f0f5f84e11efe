"""The ONNX Runtime runtime without PyTorch/transformers.

- inputs: the folder tokenizer, chat template and numpy image preprocessing give exactly
  what the families' transformers processors give (input_ids, pixel_values, masks);
- tokens: ``reply`` gives today's greedy tokens (the transformers-processor path) on tiny
  exports, text and image, and on the regap-seq strength;
- the import boundary: ``regap-export generate`` (text and image) in a subprocess where
  importing torch or transformers raises ImportError.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("onnxruntime")

from regap_export.models import adapter_for_config  # noqa: E402
from regap_export.models.base import pixel_inputs  # noqa: E402
from regap_export.models.image_ops import NotPorted  # noqa: E402
from regap_export.runtime.chat import encode_prompt, reply  # noqa: E402
from tiny_models import save_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "llava", "llava_next", "qwen2_vl",
                 "qwen2_5_vl", "idefics3"]
# model types whose images are prepared without transformers (their adapters' image_inputs)
PORTED_IMAGES = ["idefics3", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
PROMPT = "Describe the steps in detail, please."


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A busy RGB image (noise + text), so resampling differences cannot hide."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    ImageDraw.Draw(image).text((width // 8, height // 3), "How to pick a lock", fill=(0, 0, 0))
    return image


def transformers_inputs(folder: Path, prompt: str, image=None) -> dict[str, np.ndarray]:
    """Today's path: the family's transformers processor through its adapter."""
    from transformers import AutoConfig

    adapter = adapter_for_config(AutoConfig.from_pretrained(folder))
    processor = adapter.load_processor(folder)
    text = adapter.render_prompt(processor, prompt, with_image=image is not None)
    enc = adapter.encode(processor, [text], None if image is None else [image])
    inputs = {k: v.numpy() for k, v in enc.items()}
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], **pixel_inputs(inputs)}


def new_inputs(folder: Path, prompt: str, image=None) -> tuple[dict[str, np.ndarray], object]:
    from regap_export.runtime.chat import adapter_of, read_model_config

    config = read_model_config(folder)
    return encode_prompt(folder, config, adapter_of(folder, config), prompt, image)


def assert_same_inputs(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape, key
        if value.dtype.kind == "f":
            assert ours[key].dtype == value.dtype, key
            np.testing.assert_allclose(ours[key], value, rtol=0, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(ours[key], value, err_msg=key)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny(family, root / family) for family in TEXT_FAMILIES}


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_prompt_ids_and_decoding_match_transformers(tiny_folders, family):
    folder = tiny_folders[family]
    ours, tokenizer = new_inputs(folder, PROMPT)
    assert_same_inputs(ours, transformers_inputs(folder, PROMPT))
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(folder)
    ids = ours["input_ids"][0].tolist() + list(range(5, 60))
    assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("family", PORTED_IMAGES)
@pytest.mark.parametrize("size", [(32, 32), (57, 31), (20, 90), (200, 120)])
def test_tiny_image_inputs_match_transformers(tiny_folders, family, size, monkeypatch):
    folder = tiny_folders[family]
    # the composition runs: a fallback to transformers would make this comparison vacuous
    monkeypatch.setattr("regap_export.runtime.chat._transformers_inputs", None)
    image = picture(*size)
    ours, _ = new_inputs(folder, PROMPT, image)
    assert_same_inputs(ours, transformers_inputs(folder, PROMPT, image))


def smolvlm_processor_folder(tmp_path: Path, **image_settings) -> Path:
    """The embedded SmolVLM's saved processor (tokenizer, template, processor_config.json),
    with ``image_settings`` changed, in ``tmp_path``."""
    import shutil

    from regap_export.models.embedded import materialize

    source = materialize("embedded:smolvlm")
    folder = tmp_path / "smolvlm"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "processor_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    settings = json.loads((folder / "processor_config.json").read_text())
    settings["image_processor"].update(image_settings)
    (folder / "processor_config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    {},  # the embedded model's own: squared to 96 px, no splitting
    {"do_image_splitting": True, "size": {"longest_edge": 288}},  # split into 96 px tiles
])
def test_smolvlm_image_inputs_match_transformers(tmp_path, settings):
    folder = smolvlm_processor_folder(tmp_path, **settings)
    for size in [(96, 96), (300, 170), (61, 250), (500, 500)]:
        image = picture(*size, seed=size[0])
        ours, _ = new_inputs(folder, PROMPT, image)
        theirs = transformers_inputs(folder, PROMPT, image)
        assert_same_inputs(ours, theirs)
        if settings and size != (96, 96):
            assert theirs["pixel_values"].shape[1] > 1  # the image was split: tiles + the global image


def test_settings_without_a_port_fall_back_to_transformers_or_name_the_extra(tiny_folders, tmp_path, monkeypatch):
    """A size form the LLaVA composition does not reproduce (shortest and longest edge) goes
    through transformers; without transformers the error names the extra to install."""
    import shutil

    folder = tmp_path / "llava"
    shutil.copytree(tiny_folders["llava"], folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    settings["image_processor"]["size"] = {"shortest_edge": 32, "longest_edge": 48}
    (folder / "processor_config.json").write_text(json.dumps(settings))
    image = picture(70, 30)
    with pytest.raises(NotPorted):
        adapter_for_config(type("C", (), {"model_type": "llava"})()).image_inputs(settings, "<image>", image)
    ours, _ = new_inputs(folder, PROMPT, image)
    assert_same_inputs(ours, transformers_inputs(folder, PROMPT, image))

    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name.split(".")[0] == "transformers":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    from regap_export.errors import RegapError

    with pytest.raises(RegapError, match=r"llava export.*transformers.*longest_edge.*regap-export\[export\]"):
        new_inputs(folder, PROMPT, image)


# -- exported tiny models: tokens, and the import boundary ------------------------------------
@pytest.fixture(scope="module")
def exports(tiny_folders, exported_llama, tmp_path_factory):
    from regap_testing import invoke, write_directions

    root = tmp_path_factory.mktemp("exports")
    out = {"llama": exported_llama}
    for family in ("idefics3",):
        directions = write_directions(tiny_folders[family], root / f"dirs-{family}")
        result = invoke("export", tiny_folders[family], "--directions", directions, "--out", root / family)
        assert result.exit_code == 0, result.output
        out[family] = root / family
    return out


def old_reply_tokens(folder: Path, prompt: str, image=None, max_new_tokens: int = 12) -> list[int]:
    from regap_export.runtime.generate import generate
    from regap_export.runtime.session import OrtSessions

    inputs = transformers_inputs(folder, prompt, image)
    pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    result = generate(OrtSessions.open(folder / "onnx"), inputs["input_ids"], inputs["attention_mask"],
                      max_new_tokens=max_new_tokens, **pixels)
    return result.new_tokens[0].tolist()


@pytest.mark.parametrize("family, with_image", [("llama", False), ("idefics3", False), ("idefics3", True)])
def test_reply_tokens_equal_the_transformers_path(exports, family, with_image):
    image = picture(45, 33) if with_image else None
    got = reply(exports[family], PROMPT, image=image, max_new_tokens=12, verify_hashes=False)
    assert got["new_token_ids"] == old_reply_tokens(exports[family], PROMPT, image)
    assert got["prompt_token_ids"] == transformers_inputs(exports[family], PROMPT, image)["input_ids"][0].tolist()
    assert got["new_tokens"] == len(got["new_token_ids"]) > 0


BLOCKER = textwrap.dedent("""
    import builtins, importlib.abc, json, sys, traceback
    BLOCKED = ("torch", "transformers")
    attempts = []
    current = [-1]  # which of the runs is importing (-1: importing the CLI)

    def ours(filename):
        return "regap_export" in filename or "/cli/" in filename

    def chain():
        return [f"{{f.filename}}:{{f.lineno}}" for f in traceback.extract_stack()[:-2] if ours(f.filename)]

    class Block(importlib.abc.MetaPathFinder):
        # Consulted only for modules not yet imported: with blocking on, none ever is.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append({{"run": current[0], "module": name, "importers": chain()}})
                # what Python raises for a package that is not installed
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    real_import = builtins.__import__

    def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
        # Every import statement of our code, also of modules already imported.
        if level == 0 and name.split(".")[0] in BLOCKED and ours(sys._getframe(1).f_code.co_filename):
            attempts.append({{"run": current[0], "module": name, "importers": chain()}})
        return real_import(name, globals, locals, fromlist, level)

    if {block}:
        sys.meta_path.insert(0, Block())
    else:
        builtins.__import__ = recording_import
    from regap_export.cli import app
    results = []
    for index, args in enumerate({runs!r}):
        current[0] = index
        try:
            app(args)
        except SystemExit as exc:
            results.append(exc.code)
    print("RESULT " + json.dumps({{"codes": results, "attempts": attempts,
                                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}}))
""")


def generate_runs(exports) -> list[list[str]]:
    """generate --json: a text export, and a multimodal export with and without an image."""
    image = exports["idefics3"].parent / "picture.png"
    picture(45, 33).save(image)
    return [["generate", str(exports["llama"]), "--prompt", PROMPT, "--max-new-tokens", "4", "--json"],
            ["generate", str(exports["idefics3"]), "--prompt", PROMPT, "--max-new-tokens", "4", "--json"],
            ["generate", str(exports["idefics3"]), "--prompt", PROMPT, "--image", str(image),
             "--max-new-tokens", "4", "--json"]]


def run_cli_isolated(runs: list[list[str]], *, block: bool) -> dict:
    """The CLI commands ``runs`` in a fresh interpreter that records (block=False) or refuses
    (block=True) every import of torch/transformers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / ".shim"),
                                                        os.environ.get("PYTHONPATH", "")])}
    code = BLOCKER.format(block="True" if block else "False", runs=runs)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(lines[-1][len("RESULT "):])
    out["replies"] = [json.loads(line) for line in proc.stdout.splitlines()
                      if line.startswith("{") and "new_token_ids" in line]
    out["stderr"] = proc.stderr
    return out


def test_generate_imports_neither_torch_nor_transformers(exports, llama_directions):
    """Records every attempt by regap-export code to import torch/transformers during generate
    (text export, multimodal export without and with an image): there is none. A last run
    (inspect, which needs torch) shows the recorder does catch such imports."""
    inspect = ["inspect", str(llama_directions), "--json"]
    out = run_cli_isolated(generate_runs(exports) + [inspect], block=False)
    assert out["codes"] == [0, 0, 0, 0], out["stderr"][-2000:]
    assert len(out["replies"]) == 3 and all(r["new_token_ids"] for r in out["replies"])
    for r in out["replies"]:  # --json: the existing keys and the token ids
        assert {"text", "new_tokens", "prompt_token_ids", "new_token_ids"} <= set(r)
        assert r["new_tokens"] == len(r["new_token_ids"]) and len(r["prompt_token_ids"]) > 5
    assert len(out["replies"][2]["prompt_token_ids"]) > len(out["replies"][1]["prompt_token_ids"])  # + image tokens

    assert any(a["run"] == 3 for a in out["attempts"])
    leaks = [a for a in out["attempts"] if a["run"] < 3]
    assert not leaks, leaks


def test_generate_runs_with_torch_and_transformers_blocked(exports):
    out = run_cli_isolated(generate_runs(exports), block=True)
    assert out["codes"] == [0, 0, 0], out["stderr"][-3000:]
    assert out["loaded"] == []
    assert len(out["replies"]) == 3 and all(r["new_token_ids"] for r in out["replies"])


def test_commands_that_need_torch_name_the_extra_when_it_is_missing(exports):
    out = run_cli_isolated([["validate", str(exports["llama"])]], block=True)
    assert out["codes"] == [2], out["stderr"][-2000:]
    assert "not installed" in out["stderr"] and 'pip install "regap-export[export]"' in out["stderr"]
    assert "Traceback" not in out["stderr"]
