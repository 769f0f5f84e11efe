"""Files that let the clients users already run load an exported folder as written
(docs/ONNX_CONTRACT.md, "Clients"): transformers.js, optimum (transformers 4.x) and
ONNX Runtime GenAI.

``write_client_files(folder, adapter)`` runs at the end of ``export`` (before the manifest,
so every file is hashed). It only adds keys / files:

- ``tokenizer_config.json``: ``chat_template`` (transformers.js reads the template only
  from here, not from ``chat_template.jinja``); ``tokenizer_class`` ``PreTrainedTokenizerFast``
  where transformers 5 wrote its generic ``TokenizersBackend`` (a name 4.x cannot resolve);
  ``model_input_names`` ``[input_ids, attention_mask]`` (4.x would otherwise return
  ``token_type_ids``, which the decoder does not take); a list of ``extra_special_tokens``
  as ``additional_special_tokens`` (4.x reads the former as a dict).
- ``preprocessor_config.json`` (multimodal): the image processor settings that transformers 5
  nests in ``processor_config.json``; transformers.js reads only the top-level file.
- ``genai_config.json`` (text LLMs): ONNX Runtime GenAI's description of ``onnx/model.onnx``,
  with ``past_present_share_buffer`` off (the graph's ``present.*`` grow with the sequence;
  a shared, preallocated buffer of the full context does not fit them).

The Idefics3 / SmolVLM vision encoder already takes transformers.js's input layout: the ONNX
export writes it so (``models/idefics3.py``, onnx contract 3). Image rows reach the decoder
flagged by the modality channel (``regap_export.method.modality``, onnx contract 5), so clients
apply the correction to image prompts at every precision without feeding anything of ours.

Where a client cannot run a family the export says so (``ClientNote``) instead of writing
a file that fails there.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.artifacts import read_json

log = logging.getLogger(__name__)

TOKENIZER_CONFIG = "tokenizer_config.json"
PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
GENAI_CONFIG = "genai_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
ONNX_SUBFOLDER = "onnx"

# transformers 5's generic fast tokenizer; 4.x knows the same class as PreTrainedTokenizerFast.
_GENERIC_V5_CLASS = "TokenizersBackend"
_GENERIC_V4_CLASS = "PreTrainedTokenizerFast"
DECODER_INPUT_NAMES = ["input_ids", "attention_mask"]

# ONNX Runtime GenAI 0.18's decoder-only model types that these graphs' families map to.
GENAI_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"}
# transformers.js 4.3's image-text-to-text classes for our multimodal families (its
# src/models/registry.js); the value is the reason a family is not supported.
TRANSFORMERS_JS_UNSUPPORTED = {
    "llava_next": "transformers.js has no LLaVA-NeXT model class",
    "qwen2_vl": ("transformers.js feeds Qwen2-VL's vision encoder pixel_values and image_grid_thw only; this "
                 "graph also takes vision_position_ids and cu_seqlens (and Qwen2.5-VL's window_index and "
                 "cu_window_seqlens), derived from the grid with data-dependent shapes by regap_export.runtime"),
}


@dataclass(frozen=True)
class ClientNote:
    """A client that cannot run this export as written, and why."""
    client: str
    reason: str

    def __str__(self) -> str:
        return f"{self.client}: not supported for this export ({self.reason})"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from ..io.atomic import write_file_atomic

    write_file_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_client_files(folder: Path, adapter: Any) -> list[ClientNote]:
    """Add the client files to an export being written in ``folder``; returns the notes
    about clients that cannot run it (also logged)."""
    folder = Path(folder)
    notes: list[ClientNote] = []
    onnx_config = read_json(folder / ONNX_SUBFOLDER / "regap_onnx.json", what="regap_onnx.json") \
        if (folder / ONNX_SUBFOLDER / "regap_onnx.json").is_file() else None
    if (folder / TOKENIZER_CONFIG).is_file():
        update_tokenizer_config(folder, adapter)
    if (folder / PROCESSOR_CONFIG).is_file():
        write_preprocessor_config(folder)
    if onnx_config is not None:
        if onnx_config["kind"] == "text":
            note = write_genai_config(folder, onnx_config)
            if note is not None:
                notes.append(note)
        else:
            notes.append(ClientNote("onnxruntime-genai", "GenAI's multimodal pipelines expect their own vision "
                                    "graphs and processors; this export's split is for regap_export.runtime "
                                    "and transformers.js"))
            family = onnx_config["family"]
            if family in TRANSFORMERS_JS_UNSUPPORTED:
                notes.append(ClientNote("transformers.js", TRANSFORMERS_JS_UNSUPPORTED[family]))
            elif family == "llava" and (folder / PROCESSOR_CONFIG).is_file():
                fold_llava_cls_token(folder)
    for note in notes:
        log.warning("%s", note)
    return notes


def update_tokenizer_config(folder: Path, adapter: Any) -> None:
    path = folder / TOKENIZER_CONFIG
    data = read_json(path, what=path.name)
    template_file = folder / CHAT_TEMPLATE_FILE
    if "chat_template" not in data:
        # The same template the tool renders prompts with: the saved one, else the family's fallback.
        if template_file.is_file():
            data["chat_template"] = template_file.read_text(encoding="utf-8")
        elif getattr(adapter, "fallback_chat_template", None) is not None:
            data["chat_template"] = adapter.fallback_chat_template
    if data.get("tokenizer_class") in (None, _GENERIC_V5_CLASS):
        data["tokenizer_class"] = _GENERIC_V4_CLASS
    data.setdefault("model_input_names", list(DECODER_INPUT_NAMES))
    if isinstance(data.get("extra_special_tokens"), list) and "additional_special_tokens" not in data:
        # transformers 5 writes the list under extra_special_tokens, which 4.x reads as a
        # {name: token} dict (and fails on a list); 5 reads additional_special_tokens as the same list.
        data["additional_special_tokens"] = data.pop("extra_special_tokens")
    _write_json(path, data)


def write_preprocessor_config(folder: Path) -> None:
    """The image processor settings at the top level (``preprocessor_config.json``), as
    transformers 4.x saved them and transformers.js reads them."""
    target = folder / PREPROCESSOR_CONFIG
    if target.is_file():
        return
    processor = read_json(folder / PROCESSOR_CONFIG, what=PROCESSOR_CONFIG)
    image = processor.get("image_processor")
    if not isinstance(image, dict):
        return
    data = dict(image)
    if "processor_class" in processor:
        data.setdefault("processor_class", processor["processor_class"])
    _write_json(target, data)


def fold_llava_cls_token(folder: Path) -> None:
    """LLaVA's processor writes ``(H/p)(W/p) + num_additional_image_tokens`` image tokens, less
    one for ``vision_feature_select_strategy`` "default" (the CLS feature is dropped);
    transformers.js's LlavaProcessor ignores the strategy and would write one token more than
    there are features. The processor uses the strategy for this count only, so the same count
    is written as ``num_additional_image_tokens - 1`` with strategy "full": transformers
    (4.x and 5) and transformers.js then count alike. The model's own strategy (config.json)
    is unchanged."""
    path = folder / PROCESSOR_CONFIG
    data = read_json(path, what=path.name)
    if data.get("vision_feature_select_strategy") != "default":
        return
    data["num_additional_image_tokens"] = int(data.get("num_additional_image_tokens") or 0) - 1
    data["vision_feature_select_strategy"] = "full"
    _write_json(path, data)


def write_genai_config(folder: Path, onnx_config: dict[str, Any]) -> ClientNote | None:
    """``genai_config.json`` for ``onnx/model.onnx``, or a note when GenAI cannot run it."""
    config = read_json(folder / "config.json", what="config.json") if (folder / "config.json").is_file() else None
    if config is None:
        return ClientNote("onnxruntime-genai", "no config.json (export with --format onnx,safetensors)")
    model_type = config.get("model_type")
    if model_type not in GENAI_TYPES:
        return ClientNote("onnxruntime-genai", f"model type {model_type!r} is not one GenAI 0.18 runs")
    if onnx_config.get("regap_alpha"):
        return ClientNote("onnxruntime-genai", "regap-seq graphs need regap_alpha from a probe pass, which GenAI "
                          "does not run; export with --mode regap or fixed")
    heads = set(onnx_config["num_key_value_heads"])
    dims = set(onnx_config["head_dim"])
    if len(heads) != 1 or len(dims) != 1:
        return ClientNote("onnxruntime-genai", "layers differ in KV heads or head size")
    eos = onnx_config.get("eos_token_id") or []
    context = int(config.get("max_position_embeddings") or 2048)
    decoder = onnx_config["files"]["decoder"]
    genai = {
        "model": {
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": f"{ONNX_SUBFOLDER}/{decoder}",
                "head_size": dims.pop(),
                "hidden_size": int(onnx_config["hidden_size"]),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": int(config["num_attention_heads"]),
                "num_hidden_layers": int(onnx_config["num_layers"]),
                "num_key_value_heads": heads.pop(),
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": onnx_config.get("pad_token_id") if onnx_config.get("pad_token_id") is not None
            else (eos[0] if eos else 0),
            "type": model_type,
            "vocab_size": int(onnx_config["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1,
            # present.* are [batch, heads, past + new, head]: a buffer shared between past and
            # present (preallocated at max_length) does not fit them.
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
    if config.get("bos_token_id") is not None:  # GenAI refuses a null (Qwen has no BOS)
        genai["model"]["bos_token_id"] = int(config["bos_token_id"])
    _write_json(folder / GENAI_CONFIG, genai)
    return None
