"""Trust boundaries, part 1: what the tool writes and what it runs. An exported folder, a model
folder and an output path may come from someone else (docs/SECURITY.md, "What we guarantee").

- Writes: a symbolic link planted where a report, a manifest temporary or a lock file goes is
  never written through; ``--force`` onto a linked ``--out`` leaves no link behind; an
  unwritable lock path is one line.
- The reader (``io.artifacts.ExportedFolder``): every command that reads an exported folder
  verifies it first (generate, validate, evaluate with either runtime, load_corrected,
  OrtSessions.open): hashes, a complete manifest whose paths stay inside, strict JSON, files
  that agree with each other, options in range; ``--no-verify-hashes`` skips hashes only.
- Pickles are never loaded.

Each test feeds the fault and checks the one-line error (exit 2, no traceback). Tiny Llama.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regap_export.errors import ArtifactError, RegapError
from regap_export.io.artifacts import MANIFEST_FILENAME
from regap_testing import copy_of, invoke, rehash

ROOT = Path(__file__).resolve().parents[1]


def refused(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def records_file(tmp_path: Path, extra: list[dict] = ()) -> Path:
    rows = [{"id": "h1", "instruction": "Explain how to pick a lock.", "label": "harmful"},
            {"id": "b1", "instruction": "Explain how to bake bread.", "label": "harmless"}, *extra]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI in a process of its own: a fault that hangs shows as a timeout, not a stuck suite."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "regap_export.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def refused_process(result: subprocess.CompletedProcess, *fragments) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    text = " ".join(output.split())
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


@pytest.fixture
def exported(exported_llama) -> Path:
    return exported_llama


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside every folder the tool is pointed at; no write may reach it."""
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_text("precious\n")
    return path


# ------------------------------------------------------------------------- writes and links

@pytest.mark.parametrize("name", ["parity.json", "regap_manifest.json.tmp", ".parity.json.tmp-1-a"])
def test_validate_never_writes_through_a_link_in_the_folder(exported, tmp_path, victim, name):
    out = copy_of(exported, tmp_path)
    (out / name).symlink_to(victim)
    refused(invoke("validate", out), name, "symbolic link")
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["evaluation.json", "evaluation.png"])
def test_evaluate_never_writes_through_a_link_in_the_folder(exported, tmp_path, victim, name):
    out = copy_of(exported, tmp_path)
    (out / name).symlink_to(victim)
    refused(invoke("evaluate", out, "--data", records_file(tmp_path)), name, "symbolic link")
    assert victim.read_text() == "precious\n"


def test_atomic_writes_replace_a_link_and_leave_its_target(tmp_path, victim):
    from regap_export.io.atomic import write_file_atomic, write_json_atomic

    link = tmp_path / "report.json"
    link.symlink_to(victim)
    write_json_atomic(link, {"ok": True})
    assert not link.is_symlink() and json.loads(link.read_text()) == {"ok": True}
    assert victim.read_text() == "precious\n"
    dangling = tmp_path / "plot.png"
    dangling.symlink_to(tmp_path / "outside" / "created-by-a-write.png")
    write_file_atomic(dangling, b"\x89PNG")
    assert not dangling.is_symlink() and not (tmp_path / "outside" / "created-by-a-write.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "plot.png", "report.json"]  # no temporaries


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    from regap_export.io.atomic import atomic_file

    path = tmp_path / "report.json"
    path.write_text("old\n")
    with pytest.raises(ZeroDivisionError):
        with atomic_file(path) as f:
            f.write("half")
            1 / 0
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_the_lock_file_is_never_opened_through_a_link(tiny_llama_folder, tmp_path, victim):
    out = tmp_path / "dirs"
    target = victim.parent / "created-through-the-lock"
    (tmp_path / ".dirs.lock").symlink_to(target)  # dangling: O_CREAT through it would create the target
    refused(invoke("calibrate", tiny_llama_folder, "--out", out, "--no-after", "--no-plot"),
            ".dirs.lock", "symbolic link")
    assert not target.exists() and not out.exists()


@pytest.mark.parametrize("out", ["/proc/regap-out", "/proc/self/regap-out"])
def test_an_unwritable_lock_path_is_one_line(tiny_llama_folder, out):
    """/proc takes no new file: the lock's O_CREAT fails with ENOENT (and /proc/self with EACCES)."""
    refused(invoke("calibrate", tiny_llama_folder, "--out", out, "--no-after", "--no-plot"), str(Path(out).parent))


def test_force_onto_a_linked_out_leaves_no_link_behind(tiny_llama_folder, llama_directions, tmp_path):
    real = tmp_path / "real"
    assert invoke("export", tiny_llama_folder, "--directions", llama_directions, "--out", real,
                  "--format", "safetensors").exit_code == 0
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    result = invoke("export", tiny_llama_folder, "--directions", llama_directions, "--out", link,
                    "--format", "safetensors", "--force")
    assert result.exit_code == 0, result.output
    assert link.is_dir() and not link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]  # no .out.old-* link, no partial
    assert (real / MANIFEST_FILENAME).is_file()  # the link's target is left as it was


# -------------------------------------------------------------------- every reader verifies

@pytest.mark.parametrize("runtime,damaged", [("onnxruntime", "onnx/model.onnx"),
                                             ("pytorch", "model.safetensors"),
                                             ("pytorch", "regap_directions.safetensors")])
def test_evaluate_refuses_a_byte_flipped_file(exported, tmp_path, runtime, damaged):
    out = copy_of(exported, tmp_path)
    flip_byte(out / damaged)
    refused(invoke("evaluate", out, "--data", records_file(tmp_path), "--runtime", runtime, "--no-plot"),
            damaged, "sha256")
    assert not (out / "evaluation.json").exists()


def test_load_corrected_and_the_runtime_sessions_verify(exported, tmp_path):
    from regap_export.export.load import load_corrected
    from regap_export.runtime.session import OrtSessions

    out = copy_of(exported, tmp_path)
    flip_byte(out / "model.safetensors")
    with pytest.raises(ArtifactError, match="model.safetensors.*sha256"):
        load_corrected(out)
    flip_byte(out / "model.safetensors")  # restored
    flip_byte(out / "onnx" / "model.onnx")
    with pytest.raises(ArtifactError, match="model.onnx.*sha256"):
        OrtSessions.open(out / "onnx")


def test_the_runtime_sessions_need_a_manifest(exported, tmp_path):
    from regap_export.runtime.session import OrtSessions

    out = copy_of(exported, tmp_path)
    (out / MANIFEST_FILENAME).unlink()
    with pytest.raises(ArtifactError, match="no manifest"):
        OrtSessions.open(out / "onnx")


def test_a_file_dropped_from_the_manifest_is_refused(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    edit_json(out / MANIFEST_FILENAME, lambda m: m["files"].pop("tokenizer.json"))
    refused(invoke("generate", out, "--prompt", "Hi"), "tokenizer.json", "manifest does not list")
    refused(invoke("generate", out, "--prompt", "Hi", "--no-verify-hashes"), "tokenizer.json")


def test_an_unlisted_file_a_loader_would_read_is_refused(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    (out / "added_tokens.json").write_text('{"<|im_start|>": 7}')  # transformers reads it if present
    refused(invoke("validate", out), "added_tokens.json", "manifest does not list")


@pytest.mark.parametrize("listed", ["../outside.txt", "/etc/hostname", "onnx/../../outside.txt"])
def test_manifest_paths_never_leave_the_folder(exported, tmp_path, listed):
    from regap_export.io.artifacts import sha256_file

    out = copy_of(exported, tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the export\n")
    target = Path(listed) if listed.startswith("/") else outside
    entry = {"sha256": sha256_file(target), "bytes": target.stat().st_size}
    edit_json(out / MANIFEST_FILENAME, lambda m: m["files"].__setitem__(listed, entry))
    refused(invoke("generate", out, "--prompt", "Hi"), "leaves the folder")


def test_a_listed_file_may_not_be_a_link_out_of_the_folder(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    moved = tmp_path / "tokenizer.json"
    (out / "tokenizer.json").rename(moved)
    (out / "tokenizer.json").symlink_to(moved)
    refused(invoke("generate", out, "--prompt", "Hi"), "tokenizer.json", "symbolic link")


@pytest.mark.parametrize("name,change", [
    ("config.json", lambda c: c.__setitem__("rms_norm_eps", float("nan"))),
    ("onnx/regap_onnx.json", lambda c: c.__setitem__("export_seconds", float("inf"))),
    ("tokenizer_config.json", lambda c: c.__setitem__("model_max_length", float("nan"))),
])
def test_nan_literals_are_refused(exported, tmp_path, name, change):
    out = copy_of(exported, tmp_path)
    edit_json(out / name, change)  # json.dumps writes NaN / Infinity
    rehash(out)
    refused(invoke("generate", out, "--prompt", "Hi"), name, "not strict JSON")


def test_a_nan_literal_in_the_manifest_is_refused(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    edit_json(out / MANIFEST_FILENAME, lambda m: m.__setitem__("parity", {"ok": float("nan")}))
    refused(invoke("generate", out, "--prompt", "Hi"), MANIFEST_FILENAME, "not strict JSON")


@pytest.mark.parametrize("name,key,value,fragment", [
    ("config.json", "hidden_size", 128, "hidden width is 64"),
    ("config.json", "num_hidden_layers", 6, "number of decoder layers"),
    ("config.json", "model_type", "qwen2", "family 'qwen2'"),
    ("onnx/regap_onnx.json", "num_layers", 3, "number of decoder layers"),
    ("onnx/regap_onnx.json", "vocab_size", 1000, "vocabulary size"),
])
def test_config_and_graphs_must_agree(exported, tmp_path, name, key, value, fragment):
    out = copy_of(exported, tmp_path)
    edit_json(out / name, lambda c: c.__setitem__(key, value))
    rehash(out)
    text = refused(invoke("generate", out, "--prompt", "Hi"), fragment)
    assert len(text.split(" (")[0]) < 400  # one line naming the mismatch


def test_a_decoder_of_another_model_is_one_line(exported, tmp_path):
    """A decoder that takes inputs_embeds (a multimodal family's) in a text export: refused from
    what the graph declares, before ONNX Runtime is asked to run it."""
    import onnx
    from onnx import TensorProto, helper

    out = copy_of(exported, tmp_path)
    inputs = [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["b", "s", 64]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])]
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 64])
    graph = helper.make_graph([helper.make_node("Identity", ["inputs_embeds"], ["logits"])], "other", inputs, [logits])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(out / "onnx" / "model.onnx"))
    rehash(out)
    refused(invoke("generate", out, "--prompt", "Hi"), "model.onnx", "another model")
    with pytest.raises(ArtifactError, match="another model"):
        from regap_export.runtime.session import OrtSessions

        OrtSessions.open(out / "onnx")


def test_graphs_swapped_between_roles_are_refused(tmp_path):
    """The multimodal split's decoder copied over its embed_tokens graph (a consistent manifest)."""
    import shutil

    from onnx_exports import exported as exported_graphs
    from regap_export.runtime.session import OrtSessions

    folder = tmp_path / "idefics3"
    shutil.copytree(exported_graphs("idefics3").folder.parent, folder)
    shutil.copyfile(folder / "onnx" / "decoder_model_merged.onnx", folder / "onnx" / "embed_tokens.onnx")
    rehash(folder)
    with pytest.raises(ArtifactError, match="embed_tokens.onnx.*takes no input 'input_ids'"):
        OrtSessions.open(folder / "onnx")


def test_external_data_outside_the_folder_is_refused(exported, tmp_path, victim):
    import onnx

    out = copy_of(exported, tmp_path)
    graph = out / "onnx" / "model.onnx"
    model = onnx.load(str(graph))
    tensor = next(t for t in model.graph.initializer if t.name.startswith("regap."))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", os.path.relpath(victim, graph.parent)
    onnx.save(model, str(graph))
    rehash(out)
    refused(invoke("generate", out, "--prompt", "Hi"), "external data", "not a file the manifest lists")


@pytest.mark.parametrize("name,path", [("onnx/regap_onnx.json", ("options", "tau")),
                                       ("config.json", ("regap", "options", "tau"))])
def test_options_out_of_range_are_refused_where_they_are_read(exported, tmp_path, name, path):
    out = copy_of(exported, tmp_path)

    def change(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = -1

    edit_json(out / name, change)
    rehash(out)
    for args in (("generate", out, "--prompt", "Hi"), ("validate", out)):
        refused(invoke(*args), name, "tau must be between 0 and 1")


def test_options_out_of_range_in_the_manifest(exported, tmp_path):
    out = copy_of(exported, tmp_path)

    def change(manifest):
        options = json.loads(manifest["options"])
        options["tau"] = -1
        manifest["options"] = json.dumps(options)

    edit_json(out / MANIFEST_FILENAME, change)
    refused(invoke("validate", out), MANIFEST_FILENAME, "options", "tau must be between 0 and 1")


def test_no_verify_hashes_skips_hashes_and_only_hashes(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    code = out / "modeling_regap.py"  # never run by regap-export: a changed byte here breaks nothing
    code.write_text(code.read_text().replace("regap-export", "regap-exporT", 1))
    refused(invoke("generate", out, "--prompt", "Hi"), "modeling_regap.py", "sha256")
    result = invoke("generate", out, "--prompt", "Hi", "--max-new-tokens", "2", "--no-verify-hashes")
    assert result.exit_code == 0, result.output
    (out / "notes.txt").write_text("unlisted\n")
    refused(invoke("generate", out, "--prompt", "Hi", "--no-verify-hashes"), "notes.txt")


# ------------------------------------------------------------------------------- pickles

def test_a_pickled_checkpoint_is_never_loaded(tiny_llama_folder, tmp_path):
    """A model folder whose weights are a pickle (pytorch_model.bin): refused, never unpickled."""
    import pickle
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama_folder, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    refused(invoke("calibrate", folder, "--out", tmp_path / "dirs", "--no-after", "--no-plot"),
            "safetensors")
    assert not marker.exists()


# ------------------------------------------------------------------------------ resources

def test_a_fifo_as_data_is_refused_not_read(tiny_llama_folder, tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    refused_process(run_cli("calibrate", tiny_llama_folder, "--data", fifo, "--out", tmp_path / "dirs"),
                    "data.jsonl", "FIFO")


def test_a_fifo_as_image_is_refused_not_read(tmp_path):
    """generate's --image (``runtime.chat.load_image``) and a data file's image."""
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    code = ("from regap_export.runtime.chat import load_image\n"
            f"load_image({str(fifo)!r})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode != 0 and "FIFO" in result.stderr.splitlines()[-1], result.stderr
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"id": "a", "instruction": "x", "label": "harmful", "image": "image.png"}) + "\n")
    refused_process(run_cli("calibrate", "/nonexistent-model-folder", "--data", data, "--out", tmp_path / "dirs"),
                    "set.jsonl:1", "FIFO")  # the data is read before the model is loaded


def test_a_fifo_in_a_model_folder_is_refused(tiny_llama_folder, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_folder, folder)
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    os.mkfifo(folder / "special_tokens_map.json")  # transformers' tokenizer loader opens it
    refused_process(run_cli("calibrate", folder, "--out", tmp_path / "dirs"), "special_tokens_map.json",
                    "not a regular file")


def test_a_nested_loop_chat_template_is_stopped(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    (out / "chat_template.jinja").write_text(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")
    rehash(out)
    refused_process(run_cli("generate", out, "--prompt", "Hi"), "chat_template.jinja", "stopped",
                    "steps")


def test_an_over_context_record_is_refused_before_evaluate_runs(exported, tmp_path):
    long = {"id": "long-one", "instruction": "basil " * 5000, "label": "harmful"}
    data = records_file(tmp_path, [long])
    text = refused(invoke("evaluate", exported, "--data", data, "--no-plot"), "eval.jsonl:3", "'long-one'",
                   "context holds 4096")
    assert "tokens" in text


def test_an_over_context_record_is_refused_before_calibrate_runs(tiny_llama_folder, tmp_path):
    rows = [{"id": f"h{i}", "instruction": f"Explain how to pick lock {i}.", "label": "harmful"} for i in range(3)]
    rows += [{"id": f"b{i}", "instruction": f"Explain how to bake bread {i}.", "label": "harmless"} for i in range(3)]
    rows.append({"id": "long-one", "instruction": "basil " * 5000, "label": "harmless"})
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(invoke("calibrate", tiny_llama_folder, "--data", data, "--out", tmp_path / "dirs", "--no-plot"),
            "cal.jsonl:7", "'long-one'", "context holds 4096")


def test_a_huge_prompt_is_refused_before_it_is_tokenized(exported):
    refused(invoke("generate", exported, "--prompt", "a" * 200_001), "--prompt", "at most 100,000")


def test_a_nul_in_a_prompt_never_reaches_the_model(exported):
    from regap_export.runtime.chat import reply

    with pytest.raises(RegapError, match="NUL"):
        reply(exported, "Hi\x00there", max_new_tokens=1)
