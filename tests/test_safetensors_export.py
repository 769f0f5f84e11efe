"""The corrected safetensors checkpoint: our loader, plain transformers (trust_remote_code),
bit-for-bit original weights, and damaged files."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from regap_export.calibration.directions_io import DirectionsFile
from regap_export.errors import ArtifactError
from regap_export.export.load import load_corrected, read_regap_checkpoint, sequence_alpha
from regap_export.export.safetensors_export import render_remote_code, write_corrected_checkpoint
from regap_export.method.folding import fold
from regap_export.models.loading import load_model
from regap_export.validation.reference import reference_sequence_alpha
from regap_export.method.rewrite import corrections_of, insert_corrections, remove_corrections

from regap_testing import batch_inputs, logits_of, options_for, realistic_directions, rehash, with_manifest
from tiny_models import save_tiny

FAMILIES = ["llama", "llava"]
MODES = ["regap", "regap-seq"]
TOL = 1e-6


class Family:
    """A saved tiny model, loaded, with a left-padded batch and realistic directions."""

    def __init__(self, family: str, root: Path):
        self.family = family
        self.source = save_tiny(family, root / f"{family}-source")
        self.loaded = load_model(self.source)
        self.inputs = batch_inputs(self.loaded.adapter, self.loaded.processor)
        self.directions = realistic_directions(self.loaded.model, self.loaded.adapter, self.inputs,
                                               options_for("regap"))
        self.root = root
        self.exports: dict[tuple, tuple[Path, torch.Tensor, torch.Tensor | None]] = {}

    def bundle(self, options) -> DirectionsFile:
        return DirectionsFile(self.directions, options, self.loaded.fingerprint, "ab" * 32, str(self.source))

    def expected(self, options) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the in-memory corrected model (and regap-seq's alpha)."""
        model, adapter = self.loaded.model, self.loaded.adapter
        alpha = None
        if options.mode == "regap-seq":
            alpha = reference_sequence_alpha(model, adapter, self.directions, options, self.inputs)
        insert_corrections(model, adapter, fold(self.directions, options))
        try:
            kwargs = {"regap_alpha": alpha.float()} if alpha is not None else {}
            return logits_of(model, self.inputs, **kwargs), alpha
        finally:
            remove_corrections(model, adapter)

    def export(self, mode: str, *, max_shard_size=None) -> tuple[Path, torch.Tensor, torch.Tensor | None]:
        key = (mode, max_shard_size)
        if key not in self.exports:
            options = options_for(mode)
            out = self.root / f"{self.family}-{mode}-{max_shard_size or 'default'}"
            out.mkdir()
            write_corrected_checkpoint(self.loaded, self.bundle(options), options, out, max_shard_size=max_shard_size)
            with_manifest(out)
            self.exports[key] = (out, *self.expected(options))
        return self.exports[key]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                assert key not in out
                out[key] = f.get_tensor(key)
    return out


# -- (a) our loader ------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_load_corrected_matches_in_memory_model(fam, mode):
    out, expected, alpha = fam.export(mode)
    loaded = load_corrected(out)
    assert [c.layer for c in corrections_of(loaded.model, loaded.adapter)] == [0, 1, 2, 3]
    kwargs = {}
    if alpha is not None:
        got_alpha = sequence_alpha(loaded, fam.inputs)
        assert (got_alpha - alpha).abs().max().item() <= TOL
        kwargs["regap_alpha"] = alpha.float()
    got = logits_of(loaded.model, fam.inputs, **kwargs)
    assert (got - expected).abs().max().item() <= TOL
    assert not torch.allclose(got, logits_of(fam.loaded.model, fam.inputs), atol=1e-3)


def test_config_section_and_files(fam):
    out, _, _ = fam.export("regap")
    config = json.loads((out / "config.json").read_text())
    section = config["regap"]
    assert section["format_version"] == "2" and section["mode"] == "regap"
    assert section["layers"] == [{"layer": 0, "kind": "fixed"}, {"layer": 1, "kind": "fixed"},
                                 {"layer": 2, "kind": "gated"}, {"layer": 3, "kind": "gated"}]
    assert section["model_fingerprint"] == fam.loaded.fingerprint
    assert section["options"]["probe_band"] == [0, 2] and section["options"]["adaptive_band"] == [2, 4]
    base = type(fam.loaded.model).__name__
    auto = "AutoModelForImageTextToText" if fam.loaded.adapter.multimodal else "AutoModelForCausalLM"
    assert config["auto_map"] == {auto: f"modeling_regap.Regap{base}"}
    for name in ("model.safetensors", "regap.safetensors", "modeling_regap.py", "tokenizer.json",
                 "chat_template.jinja"):
        assert (out / name).is_file(), name
    if fam.loaded.adapter.multimodal:
        assert (out / "processor_config.json").is_file()
    with safe_open(str(out / "regap.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(["regap.0.v", "regap.1.v", "regap.2.v", "regap.2.w", "regap.2.b",
                                           "regap.3.v", "regap.3.w", "regap.3.b"])
        assert f.get_tensor("regap.2.w").shape == (64, 1) and f.get_tensor("regap.2.b").shape == (1,)
    checkpoint = read_regap_checkpoint(out)
    assert checkpoint.options == options_for("regap").resolved(4) and checkpoint.readout is None


# -- (b) plain transformers with trust_remote_code ----------------------------------
REMOTE_SCRIPT = textwrap.dedent('''
    import json, os, shutil, sys
    sys.modules["regap_export"] = None          # the custom code must not need regap-export
    import torch, transformers
    from safetensors.torch import load_file, save_file

    def run(out, inputs_file, result_file, auto_name):
        inputs = load_file(inputs_file)
        alpha = inputs.pop("__alpha__", None)
        auto = getattr(transformers, auto_name)
        model = auto.from_pretrained(out, trust_remote_code=True).eval()
        result = {"class": type(model).__name__, "module": type(model).__module__,
                  "state_dict_keys": sorted(model.state_dict())}
        tensors = {}
        with torch.no_grad():
            kwargs = {"regap_alpha": alpha} if alpha is not None else {}
            tensors["logits"] = model(**inputs, use_cache=False, **kwargs).logits.contiguous()
            gen = dict(max_new_tokens=4, do_sample=False)
            tensors["generated"] = model.generate(**inputs, **gen, **kwargs).contiguous()
            if alpha is not None:
                tensors["alpha"] = model.regap_sequence_alpha(**inputs).contiguous()
                tensors["generated_auto_alpha"] = model.generate(**inputs, **gen).contiguous()
                try:
                    model(**inputs)
                    result["no_alpha_error"] = None
                except ValueError as exc:
                    result["no_alpha_error"] = str(exc)
        # save_pretrained from the remote model writes regap.safetensors again and reloads
        again = out + "-resaved"
        model.save_pretrained(again)
        reloaded = auto.from_pretrained(again, trust_remote_code=True).eval()
        result["resaved_files"] = sorted(os.listdir(again))
        with torch.no_grad():
            tensors["logits_resaved"] = reloaded(**inputs, use_cache=False, **kwargs).logits.contiguous()
        # a damaged regap.safetensors is refused, naming the file
        damaged = out + "-damaged"
        shutil.copytree(out, damaged)
        path = damaged + "/regap.safetensors"
        data = bytearray(open(path, "rb").read()); data[-3] ^= 0xFF; open(path, "wb").write(bytes(data))
        try:
            auto.from_pretrained(damaged, trust_remote_code=True)
            result["damaged_error"] = None
        except Exception as exc:
            result["damaged_error"] = f"{type(exc).__name__}: {exc}"
        save_file(tensors, result_file + ".safetensors")
        json.dump(result, open(result_file, "w"))

    for job in json.load(open(sys.argv[1])):
        run(*job)
''')


@pytest.fixture(scope="module")
def remote_results(fam, tmp_path_factory):
    """One fresh interpreter per family loads every mode's export with plain transformers."""
    work = tmp_path_factory.mktemp(f"{fam.family}-remote")
    jobs = []
    for mode in MODES:
        out, _, alpha = fam.export(mode)
        inputs = {k: v.contiguous() for k, v in fam.inputs.items()}
        if alpha is not None:
            inputs["__alpha__"] = alpha.float()
        save_file(inputs, str(work / f"{mode}-inputs.safetensors"))
        auto = json.loads((out / "config.json").read_text())["regap"]["auto_class"]
        jobs.append([str(out), str(work / f"{mode}-inputs.safetensors"), str(work / f"{mode}.json"), auto])
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "remote.py").write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(work / "modules"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(work / "remote.py"), str(work / "jobs.json")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {}
    for mode in MODES:
        with safe_open(str(work / f"{mode}.json.safetensors"), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        results[mode] = (json.loads((work / f"{mode}.json").read_text()), tensors)
    return results


def test_regap_tensors_file_bytes_depend_only_on_its_content(fam, tmp_path):
    """config.json records regap.safetensors' sha256, so equal inputs give equal bytes: the
    safetensors writer orders the header's metadata by a hash map seeded per map (two keys: a
    coin flip per write), so the header is rewritten sorted. Six writes, one file."""
    import struct

    options = options_for("regap")
    files = set()
    for run in range(6):
        out = tmp_path / str(run)
        out.mkdir()
        write_corrected_checkpoint(fam.loaded, fam.bundle(options), options, out)
        files.add((out / "regap.safetensors").read_bytes())
    assert len(files) == 1
    raw = files.pop()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


@pytest.mark.parametrize("mode", MODES)
def test_plain_transformers_with_remote_code(fam, remote_results, mode):
    out, expected, alpha = fam.export(mode)
    result, got = remote_results[mode]
    assert result["class"] == f"Regap{type(fam.loaded.model).__name__}"
    assert result["module"].startswith("transformers_modules.")
    assert result["state_dict_keys"] == sorted(fam.loaded.model.state_dict()), "no extra keys in state_dict"
    assert (got["logits"] - expected).abs().max().item() <= TOL
    assert (got["logits_resaved"] - expected).abs().max().item() <= TOL
    assert "regap.safetensors" in result["resaved_files"]  # written beside, then renamed: nothing partial left
    assert not [name for name in result["resaved_files"] if "partial" in name or name.endswith(".tmp")]
    if alpha is not None:
        assert (got["alpha"].double() - alpha).abs().max().item() <= TOL
        assert torch.equal(got["generated_auto_alpha"], got["generated"])
        assert "regap_alpha" in result["no_alpha_error"]
    assert result["damaged_error"] and "regap.safetensors" in result["damaged_error"]
    if alpha is None:
        # The same greedy continuation as our loader's model. (regap-seq: transformers' generate()
        # refuses regap_alpha on the plain class that load_corrected returns.)
        loaded = load_corrected(out)
        with torch.no_grad():
            ours = loaded.model.generate(**fam.inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(ours, got["generated"])


def test_remote_code_is_self_contained():
    for base in ("LlamaForCausalLM", "LlavaForConditionalGeneration"):
        text = render_remote_code(base)
        tree = ast.parse(text)
        modules = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        modules |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert modules <= {"__future__", "hashlib", "inspect", "os", "typing", "torch", "safetensors", "transformers"}
        assert f"from transformers import {base} as RegapBase" in text
        assert f"class Regap{base}(RegapBase)" in text


# -- (c) original weights, bit for bit ------------------------------------------------
def test_original_weights_bit_for_bit(fam):
    out, _, _ = fam.export("regap")
    original, written = _weights(fam.source), _weights(out)
    assert sorted(written) == sorted(original)
    assert not any(key.startswith("regap.") for key in written)
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key


def test_sharded_checkpoint(fam):
    out, expected, _ = fam.export("regap", max_shard_size="2MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not any(key.startswith("regap.") for key in index["weight_map"])
    original, written = _weights(fam.source), _weights(out)
    assert sorted(written) == sorted(original)
    assert all(torch.equal(written[k], original[k]) for k in original)
    loaded = load_corrected(out)
    assert (logits_of(loaded.model, fam.inputs) - expected).abs().max().item() <= TOL


# -- (d) damaged or mismatched files --------------------------------------------------
def _copy(out: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(out, target)
    return target


def _drop_sha(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["regap"]["tensors_sha256"]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage", ["truncated", "truncated-no-sha", "flipped-byte", "missing", "tensor-missing"])
def test_damaged_tensor_file(fam, tmp_path, damage):
    out, _, _ = fam.export("regap")
    folder = _copy(out, tmp_path)
    path = folder / "regap.safetensors"
    data = path.read_bytes()
    if damage.startswith("truncated"):
        path.write_bytes(data[: len(data) // 2])
        if damage.endswith("no-sha"):
            _drop_sha(folder)
    elif damage == "flipped-byte":
        flipped = bytearray(data)
        flipped[-5] ^= 0x01
        path.write_bytes(bytes(flipped))
    elif damage == "missing":
        path.unlink()
    else:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k != "regap.2.w"}
        save_file(tensors, str(path))
        _drop_sha(folder)
    rehash(folder)  # a consistent manifest: only the checkpoint's own checks can catch the damage
    with pytest.raises(ArtifactError) as info:
        load_corrected(folder)
    assert str(path) in str(info.value)
    message = {"truncated": "sha256", "truncated-no-sha": "not a readable safetensors", "flipped-byte": "sha256",
               "missing": "missing", "tensor-missing": "regap.2.w"}[damage]
    assert message in str(info.value)


def test_config_without_regap_section(fam, tmp_path):
    out, _, _ = fam.export("regap")
    folder = _copy(out, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["regap"]
    (folder / "config.json").write_text(json.dumps(config))
    rehash(folder)
    with pytest.raises(ArtifactError, match="no 'regap' section") as info:
        load_corrected(folder)
    assert str(folder / "config.json") in str(info.value)


def test_weights_of_another_shape_refused(fam, tmp_path):
    out, _, _ = fam.export("regap")
    folder = _copy(out, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["regap"]["model_fingerprint"] = "0" * 16
    (folder / "config.json").write_text(json.dumps(config))
    rehash(folder)
    with pytest.raises(ArtifactError, match="fingerprint"):
        load_corrected(folder)


def test_directions_of_another_model_refused(fam, tmp_path):
    options = options_for("regap")
    bundle = DirectionsFile(fam.directions, options, "f" * 16, "ab" * 32, "elsewhere")
    with pytest.raises(ArtifactError, match="another model"):
        write_corrected_checkpoint(fam.loaded, bundle, options, tmp_path)


def test_export_of_a_corrected_model_saves_it_unwrapped(fam, tmp_path):
    """Corrections already inserted are taken out for the save and put back afterwards."""
    model, adapter = fam.loaded.model, fam.loaded.adapter
    options = options_for("fixed")
    bundle = fam.bundle(options)  # fingerprint of the unwrapped model
    insert_corrections(model, adapter, fold(fam.directions, options))
    try:
        write_corrected_checkpoint(fam.loaded, bundle, options_for("regap"), tmp_path)
        with_manifest(tmp_path)
        assert [c.kind for c in corrections_of(model, adapter)] == ["fixed"] * 4
    finally:
        remove_corrections(model, adapter)
    written = _weights(tmp_path)
    assert sorted(written) == sorted(_weights(fam.source))
    assert read_regap_checkpoint(tmp_path).mode == "regap"
