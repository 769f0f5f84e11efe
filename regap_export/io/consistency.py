"""The files of an exported folder agree with each other (``ExportedFolder.open`` calls
``check_consistency`` after the files themselves are verified).

Each check compares two files' statements of one fact and names both in one line: the options
(manifest, config.json's ``regap`` section, regap_onnx.json), the family (the manifest,
config.json's ``model_type``, regap_onnx.json), and the text model's size (hidden width,
decoder layers, vocabulary: config.json, its ``regap`` section, regap_onnx.json, and the inputs
and outputs each graph declares). A graph from another model or family is refused here, before
ONNX Runtime loads it.
"""
from __future__ import annotations

import json
import os
import posixpath
from typing import TYPE_CHECKING, Any

from ..errors import ArtifactError, RegapError
from .graph_metadata import IMAGE_ROWS_CHANNEL

if TYPE_CHECKING:
    from .artifacts import ExportedFolder

KNOWN_FORMATS = ("onnx", "safetensors")
# regap_onnx.json's ``files`` roles, by prefix (a role such as "decoder_fp16" is a decoder).
DECODER, EMBED_TOKENS, VISION_ENCODER = "decoder", "embed_tokens", "vision_encoder"


def check_consistency(folder: ExportedFolder) -> None:
    manifest = folder.manifest
    where = folder.manifest_path
    formats = manifest.get("formats")
    if not isinstance(formats, list) or not formats or any(f not in KNOWN_FORMATS for f in formats):
        raise ArtifactError(f"formats {formats!r} is not a list of {', '.join(KNOWN_FORMATS)}", path=where,
                            field="formats", hint="re-run export")
    model = manifest.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("family"), str):
        raise ArtifactError("the manifest names no model family", path=where, field="model.family",
                            hint="re-run export")
    options = _options(manifest.get("options"), where, "options")
    if manifest.get("mode") != options["mode"]:
        raise ArtifactError(f"mode {manifest.get('mode')!r} disagrees with the options' {options['mode']!r}",
                            path=where, field="mode", hint="re-run export")
    sizes: dict[str, tuple[Any, str]] = {}  # fact -> (value, where it was read)
    if "safetensors" in formats:
        _check_checkpoint(folder, model["family"], options, sizes)
    if "onnx" in formats:
        _check_graphs(folder, model["family"], options, sizes)
    from .checks import check_exported_constants

    check_exported_constants(folder)


def _options(value: Any, path, field: str) -> dict[str, Any]:
    """Options as a dict after ``RegapOptions`` accepted them (values in range, names known)."""
    from ..options import RegapOptions

    try:
        text = value if isinstance(value, str) else json.dumps(value, allow_nan=False)
        return json.loads(RegapOptions.from_json(text).to_json())
    except (RegapError, TypeError, ValueError, KeyError) as exc:
        message = str(exc).replace("--", "")  # the options' own messages speak of CLI flags
        raise ArtifactError(f"invalid options ({message})", path=path, field=field, hint="re-run export") from None


def _same_options(ours: dict[str, Any], theirs: dict[str, Any], path, field: str, other: str) -> None:
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differing:
        key = differing[0]
        raise ArtifactError(f"option {key} is {theirs.get(key)!r} here but {ours.get(key)!r} in {other}", path=path,
                            field=f"{field}.{key}", hint="re-run export")


def _agree(sizes: dict[str, tuple[Any, str]], fact: str, value: Any, path, field: str) -> None:
    """Record ``fact`` = ``value`` (read at ``path``/``field``), or refuse a disagreement."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArtifactError(f"{fact} must be an integer, got {value!r}", path=path, field=field, hint="re-run export")
    label = f"{os.path.basename(str(path))} ({field})"
    if fact in sizes and sizes[fact][0] != value:
        raise ArtifactError(f"{fact} is {value} here but {sizes[fact][0]} in {sizes[fact][1]}", path=path,
                            field=field, hint="the files come from different models; re-run export")
    sizes.setdefault(fact, (value, label))


def _family_of(model_type: Any, path) -> str:
    from ..models import adapter_for_config
    from types import SimpleNamespace

    if not isinstance(model_type, str):
        raise ArtifactError("names no model_type", path=path, field="model_type", hint="re-run export")
    return adapter_for_config(SimpleNamespace(model_type=model_type), source=str(path)).family


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _check_checkpoint(folder: ExportedFolder, family: str, options: dict[str, Any],
                      sizes: dict[str, tuple[Any, str]]) -> None:
    config_path = folder.path("config.json", what="config.json")
    config = folder.model_config()
    found = _family_of(config.get("model_type"), config_path)
    if found != family:
        raise ArtifactError(f"model_type {config.get('model_type')!r} is family {found!r}, but the manifest says "
                            f"{family!r}", path=config_path, field="model_type", hint="re-run export")
    text = _text_config(config)
    _agree(sizes, "the hidden width", text.get("hidden_size"), config_path, "hidden_size")
    _agree(sizes, "the number of decoder layers", text.get("num_hidden_layers"), config_path, "num_hidden_layers")
    _agree(sizes, "the vocabulary size", text.get("vocab_size"), config_path, "vocab_size")
    section = config.get("regap")
    if not isinstance(section, dict):
        raise ArtifactError("config.json has no 'regap' section: not a corrected checkpoint", path=config_path,
                            field="regap", hint="re-run export")
    _agree(sizes, "the hidden width", section.get("hidden_size"), config_path, "regap.hidden_size")
    _agree(sizes, "the number of decoder layers", section.get("num_layers"), config_path, "regap.num_layers")
    if str(section.get("format_version")) == "1":
        return  # format 1 stored options of an older shape; read_regap_checkpoint handles it
    theirs = _options(section.get("options"), config_path, "regap.options")
    _same_options(options, theirs, config_path, "regap.options", "the manifest")
    tensors = section.get("tensors_file")
    if isinstance(tensors, str):
        path = folder.path(tensors, what=f"regap.tensors_file {tensors!r}")
        expected = section.get("tensors_sha256")
        if folder.hashes_verified and isinstance(expected, str) and expected:
            from .artifacts import sha256_file

            if sha256_file(path) != expected:
                raise ArtifactError("sha256 does not match config.json's regap.tensors_sha256 (the file is damaged "
                                    "or comes from another export)", path=path, hint="export the checkpoint again")
    index = "model.safetensors.index.json"
    if folder.has(index):
        weight_map = folder.json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ArtifactError("no weight_map", path=folder.path(index), field="weight_map", hint="re-run export")
        for shard in sorted(set(weight_map.values())):
            folder.path(shard if isinstance(shard, str) else repr(shard), what=f"the weight shard {shard!r}")


def _check_graphs(folder: ExportedFolder, family: str, options: dict[str, Any],
                  sizes: dict[str, tuple[Any, str]]) -> None:
    from .artifacts import ONNX_DIR, graph_facts

    onnx = folder.onnx_config()
    path = folder.path(f"{ONNX_DIR}/regap_onnx.json")
    for key, expected in (("family", family),):
        if onnx.get(key) != expected:
            raise ArtifactError(f"{key} {onnx.get(key)!r}, but the manifest says {expected!r}", path=path, field=key,
                                hint="re-run export")
    if "model_type" in onnx and folder.has("config.json"):
        model_type = folder.model_config().get("model_type")
        if onnx["model_type"] != model_type:
            raise ArtifactError(f"model_type {onnx['model_type']!r}, but config.json says {model_type!r}", path=path,
                                field="model_type", hint="re-run export")
    if onnx.get("options") is not None:
        _same_options(options, _options(onnx["options"], path, "options"), path, "options", "the manifest")
    _agree(sizes, "the hidden width", onnx.get("hidden_size"), path, "hidden_size")
    _agree(sizes, "the number of decoder layers", onnx.get("num_layers"), path, "num_layers")
    _agree(sizes, "the vocabulary size", onnx.get("vocab_size"), path, "vocab_size")
    layers = onnx.get("num_layers")
    for key in ("num_key_value_heads", "head_dim"):
        value = onnx.get(key)
        if value is not None and (not isinstance(value, list) or (isinstance(layers, int) and len(value) != layers)):
            raise ArtifactError(f"{key} must list one value per decoder layer ({layers})", path=path, field=key,
                                hint="re-run export")
    files = onnx.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError("names no graph files", path=path, field="files", hint="re-run export")
    roles = {}
    for role, name in files.items():
        if not isinstance(name, str):
            raise ArtifactError(f"files.{role} is not a file name", path=path, field=f"files.{role}")
        roles[f"{ONNX_DIR}/{name}"] = str(role)
        folder.path(f"{ONNX_DIR}/{name}", what=f"the {role} graph {name!r}")
    precisions = onnx.get("precisions") or {}
    if not isinstance(precisions, dict):
        raise ArtifactError("precisions is not an object", path=path, field="precisions", hint="re-run export")
    for precision, table in precisions.items():
        if not isinstance(table, dict):
            raise ArtifactError(f"precisions.{precision} is not an object", path=path,
                                field=f"precisions.{precision}", hint="re-run export")
        for role, name in table.items():
            if not isinstance(name, str):
                raise ArtifactError(f"precisions.{precision}.{role} is not a file name", path=path,
                                    field=f"precisions.{precision}.{role}", hint="re-run export")
            roles[f"{ONNX_DIR}/{name}"] = str(role)
            folder.path(f"{ONNX_DIR}/{name}", what=f"the {precision} {role} graph {name!r}")
    # Every listed graph (those regap_onnx.json names, and any other the exporter listed).
    for rel in sorted(r for r in folder.manifest["files"] if r.endswith(".onnx")):
        facts = graph_facts(folder.path(rel))
        _check_external_data(folder, rel, facts)
        role = roles.get(rel, "")
        if role.startswith(DECODER):
            _check_decoder(onnx, facts, folder.path(rel), sizes)
        elif role.startswith(EMBED_TOKENS):
            _check_names(facts, ["input_ids"], ["inputs_embeds"], "the embed_tokens graph", folder.path(rel))
            _check_width(facts.outputs.get("inputs_embeds"), "inputs_embeds", folder.path(rel), sizes, onnx)
        elif role.startswith(VISION_ENCODER):
            _check_names(facts, onnx.get("vision_inputs"), onnx.get("vision_outputs") or ["image_features"],
                         "the vision encoder graph", folder.path(rel))
            _check_width(facts.outputs.get("image_features"), "image_features", folder.path(rel), sizes, onnx)


def _check_external_data(folder: ExportedFolder, rel: str, facts) -> None:
    graph_dir = posixpath.dirname(rel)
    for location in sorted(facts.external_locations):
        target = posixpath.normpath(posixpath.join(graph_dir, location)) if location else ""
        if (not location or location.startswith("/") or "\\" in location
                or target.split("/")[:1] == [".."] or target not in folder.manifest["files"]):
            raise ArtifactError(f"the graph reads external data from {location!r}, which is not a file the "
                                "manifest lists beside it", path=folder.root / rel, hint="re-run export")


def _check_names(facts, inputs: Any, outputs: Any, what: str, path) -> None:
    """The graph declares these inputs and outputs (None: not checked)."""
    absent = [name for name in (inputs if isinstance(inputs, list) else []) if name not in facts.inputs]
    if absent:
        raise ArtifactError(f"{what} takes no input {absent[0]!r}: a graph of another kind or model", path=path,
                            hint="re-run export")
    missing = [name for name in (outputs if isinstance(outputs, list) else []) if name not in facts.outputs]
    if missing:
        raise ArtifactError(f"{what} has no output {missing[0]!r}: a graph of another kind or model", path=path,
                            hint="re-run export")


def _check_width(dims, name: str, path, sizes: dict[str, tuple[Any, str]], onnx: dict[str, Any]) -> None:
    # Embeddings with the modality channel are one channel wider than the hidden width.
    channel = 1 if onnx.get("image_rows") == IMAGE_ROWS_CHANNEL else 0
    if dims and isinstance(dims[-1], int) and dims[-1] > 0:
        _agree(sizes, "the hidden width", dims[-1] - channel, path,
               f"{name} (last dimension{' less the modality channel' if channel else ''})")


def _check_decoder(onnx: dict[str, Any], facts, path, sizes: dict[str, tuple[Any, str]]) -> None:
    for key, declared in (("decoder_inputs", facts.inputs), ("decoder_outputs", facts.outputs)):
        expected = onnx.get(key)
        if not isinstance(expected, list):
            continue
        missing = [n for n in expected if n not in declared]
        extra = [n for n in declared if n not in expected]
        if missing or extra:
            what = "inputs" if key == "decoder_inputs" else "outputs"
            detail = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}"
            raise ArtifactError(f"the decoder graph {detail}, unlike the {what} regap_onnx.json lists "
                                f"({len(declared)} declared, {len(expected)} listed): a graph of another model",
                                path=path, hint="re-run export")
    layers = sum(1 for name in facts.inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    if layers:
        _agree(sizes, "the number of decoder layers", layers, path, "past_key_values inputs")
    # With the modality channel layer 0's key is one channel wider: regap_onnx.json's key_dim.
    key_width = ("key_dim", onnx["key_dim"]) if "key_dim" in onnx else ("head_dim", onnx.get("head_dim"))
    heads = onnx.get("num_key_value_heads")
    for i in range(layers):
        dims = facts.inputs.get(f"past_key_values.{i}.key")
        if dims is None or len(dims) != 4:
            continue
        for axis, values, what in ((1, heads, "num_key_value_heads"), (3, key_width[1], key_width[0])):
            if isinstance(values, list) and i < len(values) and isinstance(dims[axis], int) and dims[axis] != values[i]:
                raise ArtifactError(f"past_key_values.{i}.key has {dims[axis]} on axis {axis}, but regap_onnx.json's "
                                    f"{what} says {values[i]}: a graph of another model", path=path,
                                    hint="re-run export")
    _check_width(facts.inputs.get("inputs_embeds"), "inputs_embeds", path, sizes, onnx)
    logits = facts.outputs.get("logits")
    if logits and isinstance(logits[-1], int) and logits[-1] > 0:
        _agree(sizes, "the vocabulary size", logits[-1], path, "logits (last dimension)")
