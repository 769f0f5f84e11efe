"""What --force may replace, concurrent writers, stale partial folders, values
checked finite and in range at every boundary, file-system errors as one line, and
`generate` verifying the exported folder before it runs it. Tiny Llama only (fast)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from regap_export.io import atomic
from regap_export.errors import RegapError
from regap_export.export.manifest import MANIFEST_FILENAME
from regap_export.cli import app
from regap_testing import copy_of, write_directions

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def refused(result, *fragments):
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


def no_partials(out: Path) -> bool:
    return not list(out.parent.glob(f".{out.name}.partial-*")) and not (out.parent / f".{out.name}.lock").exists()


def small_set(n: int = 3) -> list[dict]:
    return ([{"id": f"h{i}", "instruction": f"Explain how to break into house {i} unnoticed.", "label": "harmful"}
             for i in range(n)]
            + [{"id": f"b{i}", "instruction": f"Explain how to plant tomato variety {i}.", "label": "harmless"}
               for i in range(n)])


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def llama(tiny_llama_folder) -> Path:
    return tiny_llama_folder


@pytest.fixture(scope="module")
def directions(llama_directions, tmp_path_factory) -> Path:
    """A calibrate-shaped folder: the shared directions plus a report.json."""
    folder = tmp_path_factory.mktemp("dirs") / "dirs"
    shutil.copytree(llama_directions, folder)
    (folder / "report.json").write_text("{}\n")
    return folder


@pytest.fixture
def exported(exported_llama) -> Path:
    return exported_llama


# ------------------------------------------------------------------ (1) --force and outputs

def test_force_never_deletes_the_data_file(llama, tmp_path):
    d = tmp_path / "d"
    data = write_jsonl(d / "good.jsonl", small_set())
    (d / "notes.txt").write_text("mine")
    text = refused(invoke("calibrate", llama, "--data", data, "--out", d, "--force"), "good.jsonl", "reads")
    assert "--force would delete" in text
    assert data.is_file() and (d / "notes.txt").read_text() == "mine"


def test_force_refuses_a_folder_regap_export_did_not_write(llama, tmp_path):
    data = write_jsonl(tmp_path / "cal.jsonl", small_set())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(invoke("calibrate", llama, "--data", data, "--out", out, "--force"), "did not write", "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


def test_force_refuses_our_folder_holding_a_foreign_file(llama, directions, tmp_path):
    data = write_jsonl(tmp_path / "cal.jsonl", small_set())
    out = tmp_path / "out"
    shutil.copytree(directions, out)
    (out / "notes.txt").write_text("mine")
    refused(invoke("calibrate", llama, "--data", data, "--out", out, "--force"), "notes.txt", "would be deleted")
    assert (out / "notes.txt").is_file()


def test_export_force_onto_the_model_folder(llama, directions):
    before = sorted(p.name for p in llama.iterdir())
    refused(invoke("export", llama, "--directions", directions, "--out", llama, "--force"),
            "--force would delete", "reads")
    assert sorted(p.name for p in llama.iterdir()) == before


def test_export_force_onto_the_directions_folder(llama, directions):
    refused(invoke("export", llama, "--directions", directions, "--out", directions, "--force"),
            "--force would delete", "reads")
    assert (directions / "report.json").is_file() and (directions / "directions.safetensors").is_file()


def test_force_replaces_our_own_export(llama, directions, exported, tmp_path):
    out = copy_of(exported, tmp_path)
    (out / "parity.json").write_text("{}")  # validate's report is ours too
    result = invoke("export", llama, "--directions", directions, "--out", out, "--force", "--format", "safetensors")
    assert result.exit_code == 0, result.output
    assert not (out / "onnx").exists() and (out / MANIFEST_FILENAME).is_file()


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(llama, directions, tmp_path):
    out = tmp_path / "out"
    with atomic._output_lock(out):  # what a running export holds
        refused(invoke("export", llama, "--directions", directions, "--out", out),
                "another regap-export process is writing")
    assert not out.exists()


def test_an_output_created_meanwhile_is_not_replaced(tmp_path):
    """Two runs started together both pass the early check; the later rename must not win."""
    out = tmp_path / "out"
    with pytest.raises(RegapError, match="created this output while"):
        with atomic.atomic_output_dir(out, force=False) as tmp:
            (tmp / "mine.txt").write_text("second")
            out.mkdir()  # the first run finished meanwhile
            (out / "regap_manifest.json").write_text("first")
    assert (out / "regap_manifest.json").read_text() == "first"
    assert not list(tmp_path.glob(".out.partial-*")) and not (tmp_path / ".out.lock").exists()


def test_concurrent_processes_one_wins(tmp_path):
    """Two processes writing the same --out at once: exactly one succeeds, the other fails clearly."""
    script = ("import sys, time; from pathlib import Path; from regap_export.io.atomic import atomic_output_dir\n"
              "from regap_export.errors import RegapError\n"
              "try:\n"
              "    with atomic_output_dir(Path(sys.argv[1]), force=False) as tmp:\n"
              "        (tmp / 'f').write_text(sys.argv[2]); time.sleep(1.5)\n"
              "except RegapError as e:\n"
              "    print(e); sys.exit(2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out"), str(i)], env=env,
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    assert any("another regap-export process" in text or "created this output" in text for _, text in results)


def test_stale_partials_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "out"
    script = ("import sys, time; from pathlib import Path; from regap_export.io.atomic import atomic_output_dir\n"
              "with atomic_output_dir(Path(sys.argv[1]), force=False) as tmp:\n"
              "    (tmp / 'f').write_text('x'); print('ready', flush=True); time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (tmp_path / ".out.partial-0123abcd").mkdir()  # an older version's name, no pid
    live = tmp_path / f".out.partial-{os.getppid()}-feedf00d"  # a live process's: kept
    live.mkdir()
    assert len(list(tmp_path.glob(".out.partial-*"))) == 3
    with atomic.atomic_output_dir(out, force=False) as tmp:
        (tmp / "f").write_text("y")
    assert list(tmp_path.glob(".out.partial-*")) == [live]
    assert (out / "f").read_text() == "y"


def test_exported_files_share_one_permission_mode(exported):
    modes = {stat.S_IMODE(p.stat().st_mode) for p in exported.rglob("*") if p.is_file()}
    mask = os.umask(0)
    os.umask(mask)
    assert modes == {0o666 & ~mask}, modes


# --------------------------------------------------------- (2) finite, in range, strict JSON

@pytest.mark.parametrize("option,value,message", [
    ("--alpha0", "nan", "--alpha0 must be a finite number"),
    ("--alpha0", "-inf", "--alpha0 must be a finite number"),
    ("--alpha-max", "nan", "--alpha-max must be a finite number"),
    ("--tau", "2", "--tau must be between 0 and 1"),
    ("--alpha0", "-1", "--alpha0 must be between 0 and 100"),
    ("--gate-sharpness", "-2", "--gate-sharpness must be between 0 and 100"),
])
def test_calibrate_refuses_bad_numbers(llama, tmp_path, option, value, message):
    data = write_jsonl(tmp_path / "cal.jsonl", small_set())
    out = tmp_path / "out"
    refused(invoke("calibrate", llama, "--data", data, "--out", out, option, value), message)
    assert not out.exists()


@pytest.mark.parametrize("option,value", [("--alpha0", "nan"), ("--alpha-max", "inf"), ("--tau", "-0.5"),
                                          ("--gate-sharpness", "nan")])
def test_export_refuses_bad_numbers(llama, directions, tmp_path, option, value):
    out = tmp_path / "out"
    refused(invoke("export", llama, "--directions", directions, "--out", out, option, value), option)
    assert not out.exists() and no_partials(out)


def with_tensor(directions: Path, target: Path, name: str, edit) -> Path:
    path = directions / "directions.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors[name])
    target.mkdir(parents=True)
    save_file(tensors, str(target / "directions.safetensors"), metadata=meta)
    return target


@pytest.mark.parametrize("rows", [[1], [0, 1, 2, 3]])
def test_nan_in_rhat_is_refused(llama, directions, tmp_path, rows):
    def poison(t):
        t[rows] = float("nan")

    bad = with_tensor(directions, tmp_path / "bad", "rhat", poison)
    out = tmp_path / "out"
    refused(invoke("export", llama, "--directions", bad, "--out", out), "'rhat' is not finite", f"layer {rows[0]}")
    assert not out.exists()


def test_config_json_is_strict_json(exported):
    from regap_export.io.checks import strict_json_loads

    config = strict_json_loads((exported / "config.json").read_text(), path=exported / "config.json")
    assert config["regap"]["options"]["alpha0"] == 1.0  # the shared fixture's (regap_testing.options_for)
    with pytest.raises(RegapError, match="not strict JSON"):
        strict_json_loads('{"alpha0": NaN}')


def test_folded_constants_are_checked_before_writing(llama, directions, tmp_path):
    """Finite directions whose folded constants overflow (huge drift * alpha) are refused."""
    def huge(t):
        # Alternating signs: the per-layer increments d_l - d_(l-1) overflow too.
        t[:] = 3e38
        t[1::2] = -3e38

    bad = with_tensor(directions, tmp_path / "bad", "drift", huge)
    out = tmp_path / "out"
    refused(invoke("export", llama, "--directions", bad, "--out", out, "--alpha-max", "100"), "not finite")
    assert not out.exists()


# --------------------------------------------------------------- (3) file-system errors

def test_out_under_a_file(llama, directions):
    refused(invoke("export", llama, "--directions", directions, "--out", "/dev/null/x"), "not a directory")


def test_out_on_a_read_only_file_system(llama, directions, tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(atomic.os, "access",
                        lambda path, mode, **k: Path(path) != tmp_path and real_access(path, mode, **k))
    monkeypatch.setattr(atomic, "_read_only", lambda path: True)
    refused(invoke("export", llama, "--directions", directions, "--out", tmp_path / "out"), "read-only file system")


def test_disk_full_is_one_line_and_leaves_nothing(llama, directions, tmp_path, monkeypatch):
    from regap_export.export import pipeline

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(pipeline, "write_manifest", full)
    out = tmp_path / "out"
    refused(invoke("export", llama, "--directions", directions, "--out", out, "--format", "safetensors"),
            "no space left")
    assert not out.exists() and no_partials(out) and not (tmp_path / ".out.lock").exists()


def test_data_on_a_folder_says_so(llama, tmp_path):
    refused(invoke("calibrate", llama, "--data", tmp_path, "--out", tmp_path / "out"), "is a folder")


def test_data_without_harmless_records_names_the_file(llama, tmp_path):
    data = write_jsonl(tmp_path / "cal.jsonl", small_set()[:3])
    refused(invoke("calibrate", llama, "--data", data, "--out", tmp_path / "out"), "cal.jsonl", "harmless")


# ------------------------------------------------------------- (4) generate verifies first

def test_generate_refuses_a_byte_flipped_graph(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    graph = out / "onnx" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    refused(invoke("generate", out, "--prompt", "Hi"), "model.onnx", "sha256")


def test_generate_refuses_a_broken_manifest(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    (out / MANIFEST_FILENAME).write_text("{ not json")
    refused(invoke("generate", out, "--prompt", "Hi"), "regap_manifest.json")


def test_generate_refuses_nan_constants(exported, tmp_path):
    from regap_export.export.manifest import file_table
    from regap_export.io.artifacts import sha256_file

    out = copy_of(exported, tmp_path)
    path = out / "regap.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(k for k in tensors if k.endswith(".v"))[0]
    tensors[name][0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    # Every record of the file's hash made consistent (config.json's, the manifest's): only
    # finiteness can catch it.
    config = json.loads((out / "config.json").read_text())
    config["regap"]["tensors_sha256"] = sha256_file(path)
    (out / "config.json").write_text(json.dumps(config))
    manifest = json.loads((out / MANIFEST_FILENAME).read_text())
    manifest["files"] = file_table(out)
    (out / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    refused(invoke("generate", out, "--prompt", "Hi"), name, "not finite")


def test_generate_after_the_tokenizer_was_deleted(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    (out / "tokenizer.json").unlink()
    refused(invoke("generate", out, "--prompt", "Hi"), "tokenizer.json")


def test_generate_hash_check_can_be_skipped(exported):
    result = invoke("generate", exported, "--prompt", "Hi", "--max-new-tokens", "2", "--no-verify-hashes", "--json")
    assert result.exit_code == 0, result.output


def test_generate_refuses_a_prompt_longer_than_the_context(exported):
    refused(invoke("generate", exported, "--prompt", "basil " * 5000, "--max-new-tokens", "2"),
            "context holds 4096")


# ------------------------------------------------------------------------------ (5) the rest

def test_duplicate_json_keys_are_a_data_error(tmp_path):
    from regap_export.data import load_records
    from regap_export.errors import DataError

    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "a", "instruction": "x", "label": "harmful"}\n'
                    '{"id": "b", "instruction": "y", "label": "harmful", "label": "harmless"}\n')
    with pytest.raises(DataError, match=r"dup\.jsonl:2.*'label' appears twice"):
        load_records(path)


def test_directions_of_a_same_shape_model_with_other_weights(llama, tmp_path):
    """The shape fingerprint matches; the sampled weight values do not."""
    import dataclasses

    from regap_export.calibration.directions_io import load_directions, save_directions
    from regap_export.models.loading import load_model
    from regap_export.models.weight_sample import weight_sample_json

    folder = write_directions(llama, tmp_path / "dirs")
    bundle = load_directions(folder)
    save_directions(folder, dataclasses.replace(bundle, model_weight_sample=weight_sample_json(load_model(llama).model)))
    other = load_model(llama)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    other.model.save_pretrained(tmp_path / "other")
    other.adapter.save_processor(other.processor, tmp_path / "other")
    out = tmp_path / "out"
    refused(invoke("export", tmp_path / "other", "--directions", folder, "--out", out), "other weights")
    assert not out.exists()
    fp16 = load_model(llama, dtype="fp16")  # a cast of the same model still matches
    from regap_export.models.weight_sample import samples_match

    assert samples_match(weight_sample_json(load_model(llama).model), fp16.model)


def test_calibrate_records_the_weight_sample(llama, tmp_path):
    from regap_export.calibration.directions_io import load_directions

    data = write_jsonl(tmp_path / "cal.jsonl", small_set())
    out = tmp_path / "out"
    result = invoke("calibrate", llama, "--data", data, "--out", out, "--no-after", "--no-plot")
    assert result.exit_code == 0, result.output
    sample = json.loads(load_directions(out).model_weight_sample)
    assert len(sample) == 4 and all(len(v) == 8 for v in sample.values())


def test_the_runtime_checks_sizes_and_graph_constants(exported, tmp_path):
    """OrtSessions.open on an exported folder: a truncated graph or a NaN correction
    initializer is refused before ONNX Runtime runs anything."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from regap_export.export.manifest import file_table
    from regap_export.runtime.session import OrtSessions

    out = copy_of(exported, tmp_path)
    graph = out / "onnx" / "model.onnx"
    model = onnx.load(str(graph))
    init = next(i for i in model.graph.initializer if i.name.startswith("regap.") and i.name.endswith(".v"))
    array = numpy_helper.to_array(init).copy()
    array.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(graph))
    manifest = json.loads((out / MANIFEST_FILENAME).read_text())
    manifest["files"] = file_table(out)
    (out / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    with pytest.raises(RegapError, match=f"{init.name}.*not finite"):
        OrtSessions.open(out / "onnx")
    refused(invoke("generate", out, "--prompt", "Hi"), init.name, "not finite")
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(RegapError, match="model.onnx.*size 1000 bytes"):
        OrtSessions.open(out / "onnx")


def test_two_cli_exports_to_one_out_started_together(llama, directions, tmp_path):
    """The issue's case end to end: two `export` processes, same --out, no --force."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from regap_export.cli import app; app()", "export", str(llama),
           "--directions", str(directions), "--out", str(out), "--format", "safetensors"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(text for rc, text in results if rc == 2)
    assert any(s in loser for s in ("output directory exists", "another regap-export process", "created this output"))
    assert "Traceback" not in loser and (out / MANIFEST_FILENAME).is_file() and no_partials(out)


def test_check_replaceable_rules(tmp_path):
    """Unit rules of --force: empty or our own folders yes; a folder that is or holds an input,
    a foreign folder, an unreadable manifest no; our folder inside an input's folder yes."""
    ours = tmp_path / "model" / "corrected"
    ours.mkdir(parents=True)
    (ours / MANIFEST_FILENAME).write_text(json.dumps({"files": {"a.bin": {}}}))
    (ours / "a.bin").write_text("x")
    (ours / "evaluation.json").write_text("{}")
    (ours / "__pycache__").mkdir()
    (ours / "__pycache__" / "m.pyc").write_text("x")
    atomic.check_replaceable(ours, [tmp_path / "model"])          # inside the model folder: fine
    atomic.check_replaceable(tmp_path / "empty", [])                 # missing: fine
    with pytest.raises(RegapError, match="would delete"):
        atomic.check_replaceable(tmp_path / "model", [ours / "a.bin"])
    (ours / "b.bin").write_text("y")
    with pytest.raises(RegapError, match="b.bin was not written by regap-export"):
        atomic.check_replaceable(ours, [])
    (ours / MANIFEST_FILENAME).write_text("{")
    with pytest.raises(RegapError, match="manifest is unreadable"):
        atomic.check_replaceable(ours, [])


def test_calibrate_writes_no_non_finite_directions(llama, tmp_path, monkeypatch):
    from regap_export.calibration import folder as api

    real = api.calibrate

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        result.bundle.directions.kappa[2] = float("inf")
        return result

    monkeypatch.setattr(api, "calibrate", poisoned)
    data = write_jsonl(tmp_path / "cal.jsonl", small_set())
    out = tmp_path / "out"
    refused(invoke("calibrate", llama, "--data", data, "--out", out, "--no-after", "--no-plot"),
            "'kappa' is not finite", "index 2")
    assert not out.exists() and no_partials(out)


def test_export_refuses_up_front_when_the_weights_cannot_fit(llama, directions, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from regap_export.export import pipeline

    written = []
    monkeypatch.setattr(pipeline, "write_client_files", lambda *a, **k: written.append(a))
    real_usage = atomic.shutil.disk_usage
    model_bytes = 4 * sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(llama).parameters())
    # room for one format's weights, not two
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=model_bytes + 1))
    out = tmp_path / "out"
    refused(invoke("export", llama, "--directions", directions, "--out", out), "not enough free space",
            "onnx, safetensors", "one --format at a time")
    assert not out.exists() and no_partials(out) and not written
    result = invoke("export", llama, "--directions", directions, "--out", out, "--format", "safetensors")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").stat().st_size >= model_bytes


def _errno_less_write_failure(*args, **kwargs):
    # numpy's tofile (onnx_ir's external-data writer) on a full disk: an OSError with no errno
    raise OSError("problem writing element 52224 to file")


def test_disk_full_in_numpys_writer_is_one_line(llama, directions, tmp_path, monkeypatch):
    from regap_export.export import pipeline

    monkeypatch.setattr(pipeline, "write_manifest", _errno_less_write_failure)
    # the disk filled while the export ran (the check before writing saw room)
    monkeypatch.setattr(pipeline, "check_free_space", lambda *a, **k: None)
    real_usage = atomic.shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=4096))
    out = tmp_path / "out"
    refused(invoke("export", llama, "--directions", directions, "--out", out, "--format", "safetensors"),
            "no space left", "problem writing element")
    assert not out.exists() and no_partials(out)


def test_errno_less_write_failure_with_space_left_is_not_called_disk_full(llama, directions, tmp_path,
                                                                         monkeypatch):
    from regap_export.export import pipeline

    monkeypatch.setattr(pipeline, "write_manifest", _errno_less_write_failure)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="problem writing element") as raised:
        invoke("export", llama, "--directions", directions, "--out", out, "--format", "safetensors")
    assert raised.type is OSError  # a bug's traceback, not a RegapError blaming the disk
    assert not out.exists() and no_partials(out)


def test_disk_full_inside_a_non_python_writer(llama, directions, tmp_path, monkeypatch):
    """safetensors' Rust writer reports ENOSPC in its message, not as an OSError."""
    from safetensors import SafetensorError

    from regap_export.export import pipeline

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr(pipeline, "write_manifest", full)
    out = tmp_path / "out"
    refused(invoke("export", llama, "--directions", directions, "--out", out, "--format", "safetensors"),
            "no space left")
    assert not out.exists() and no_partials(out)


def test_generate_prints_the_reply_as_written(monkeypatch, tmp_path):
    """A model may write anything: brackets in a reply are text, not rich markup (a "[/]" raised)."""
    import regap_export

    reply = "Use a[/] list, not [bold]this[/bold]."
    monkeypatch.setattr(regap_export, "generate", lambda *args, **kwargs: {"text": reply})
    result = runner.invoke(app, ["generate", str(tmp_path), "--prompt", "Hi"])
    assert result.exit_code == 0, result.output
    assert reply in result.output
