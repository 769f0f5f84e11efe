"""ONNX Runtime sessions for the graphs of "onnx contract 5" (docs/ONNX_CONTRACT.md).

``OrtSessions.open(folder, device="cpu"|"cuda", precision="fp32")`` opens ``model.onnx``
(text) or the multimodal split, at one of the precisions the export wrote, and refuses a set
of graphs that is not the one the export wrote (``io.graph_metadata.check_graph``). On CUDA the decoder runs with IO binding: inputs are copied to the GPU
once, the KV cache (``present.*``) stays on the GPU as ``OrtValue``s and is bound directly
as the next step's ``past_key_values.*``; only logits (and ``regap_score``) come back to
the host.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..io.artifacts import CONTRACT_VERSION, exported_folder_of
from ..io.graph_metadata import (
    DEFAULT_PRECISION, IMAGE_ROWS_CHANNEL, PRECISIONS, ROLE_DECODER, ROLE_EMBED, ROLE_MODEL, ROLE_VISION, check_graph,
)
from ..errors import ArtifactError, RegapError, first_line
from ..models.positions import PositionScheme, position_scheme
from ..models import vision_runtime_for

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(bool)": np.bool_, "tensor(double)": np.float64, "tensor(int32)": np.int32}
_TYPE_NAMES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
               "tensor(int64)": "int64", "tensor(bool)": "bool", "tensor(double)": "float64", "tensor(int32)": "int32"}


def module_precisions(config: dict[str, Any], precision: str | Mapping[str, str]) -> dict[str, str]:
    """``{files key: precision}``: one precision for every graph, or one per module
    (``{"vision_encoder": "fp16", "decoder": "q4f16", ...}``, as transformers.js's ``dtype``
    option takes them; modules not named get fp32). Modules whose floating-point inputs and
    outputs differ in type (fp32 / q8 / q4 against fp16 / q4f16) do not fit together."""
    keys = list(config["files"])
    if isinstance(precision, str):
        chosen = {key: precision for key in keys}
    else:
        unknown = sorted(set(precision) - set(keys))
        if unknown:
            raise RegapError(f"this export has no module {', '.join(map(repr, unknown))} (it has {', '.join(keys)})")
        chosen = {key: precision.get(key, DEFAULT_PRECISION) for key in keys}
    for key, name in chosen.items():
        if name not in PRECISIONS:
            raise RegapError(f"unknown precision {name!r} for {key}; choose one of {', '.join(PRECISIONS)}")
    io_types = {PRECISIONS[name].io_dtype for name in chosen.values()}
    if len(io_types) > 1:
        raise RegapError(f"these precisions do not fit together ({', '.join(f'{k} {v}' for k, v in chosen.items())}): "
                         "their graphs pass embeddings as " + " and ".join(sorted(io_types)),
                         hint="pick modules of one kind: fp32, q8, q4 (float32) or fp16, q4f16 (float16)")
    return chosen


def precision_files(config: dict[str, Any], precision: str) -> dict[str, str]:
    """The graph files of ``precision`` (regap_onnx.json ``precisions``; folders before
    contract 5 hold one set, ``files``, at their ``dtype``)."""
    if precision not in PRECISIONS:
        raise RegapError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    table = config.get("precisions")
    if table is None:
        if precision != DEFAULT_PRECISION:
            raise RegapError(f"this folder ({config.get('contract')}) holds {config.get('dtype')} graphs only",
                             hint="re-export with --precision to write other precisions")
        return dict(config["files"])
    if precision not in table:
        raise RegapError(f"this export holds no {precision} graphs (it has {', '.join(table)})",
                         hint=f"re-export with --precision {','.join([*table, precision])}")
    return dict(table[precision])


# --------------------------------------------------------------------------------------
@dataclass
class DecoderOutput:
    logits: np.ndarray                    # [batch, seq, vocab]
    presents: list[Any]                   # np.ndarray (CPU) or ort.OrtValue (CUDA), 2 per layer
    regap_score: np.ndarray | None = None  # [batch, seq]


@dataclass
class OrtSessions:
    folder: Path
    config: dict[str, Any]
    decoder: Any
    embed_tokens: Any = None
    vision_encoder: Any = None
    device: str = "cpu"
    device_id: int = 0
    cuda_tf32: bool = False
    precision: str = DEFAULT_PRECISION   # of the decoder; ``precisions`` has every module's
    precisions: dict[str, str] = field(default_factory=dict)
    _input_types: dict[str, Any] = field(default_factory=dict)

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path, device: str = "cpu", *, device_id: int = 0,
             session_options: Any = None, intra_op_threads: int | None = None,
             cuda_tf32: bool = False, verify_hashes: bool = True,
             precision: str | Mapping[str, str] = DEFAULT_PRECISION) -> "OrtSessions":
        """The sessions of an exported folder's graphs (``folder``: its ``onnx/`` folder, or the
        exported folder itself), after ``io.artifacts.ExportedFolder.open`` verified the folder
        (``verify_hashes=False`` skips the sha256 of each file, and only that). ``precision``: one
        of the export's precisions for every graph, or one per module (``module_precisions``)."""
        import onnxruntime as ort

        exported = exported_folder_of(folder, verify_hashes=verify_hashes)
        folder = exported.onnx_folder()
        config = exported.onnx_config()
        chosen = module_precisions(config, precision)
        files = {key: precision_files(config, name)[key] for key, name in chosen.items()}
        if device not in ("cpu", "cuda"):
            raise RegapError(f"unknown device {device!r}; choose cpu or cuda")
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RegapError("ONNX Runtime has no CUDA provider here",
                                 hint="install regap-export[gpu] (onnxruntime-gpu) instead of onnxruntime")
            # ONNX Runtime's CUDA provider rounds float32 matrix products to TF32 (10-bit
            # mantissa) unless told not to: on embedded:smollm2 that moved fp32 logits by 0.12
            # and changed greedy tokens. Exact float32 is the default; TF32 is opt-in.
            cuda = {"device_id": device_id, "use_tf32": int(cuda_tf32)}
            providers: list[Any] = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]

        def make(name: str, role: str, precision: str):
            path = exported.path(f"{folder.name}/{name}")
            opts = session_options
            if opts is None:
                opts = ort.SessionOptions()
                threads = intra_op_threads if intra_op_threads is not None else _threads_from_environment()
                if threads is not None:
                    opts.intra_op_num_threads = threads
                # Errors only: ONNX Runtime warns at every load that the overridable
                # regap_image_mask initializer (contract 2) is not folded as a constant.
                opts.log_severity_level = 3
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types, one per failure
                raise ArtifactError(f"ONNX Runtime cannot load this graph ({first_line(exc)})", path=path,
                                    hint="the file is corrupted or truncated; re-run export") from None
            if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
                raise RegapError(f"{name}: ONNX Runtime could not start its CUDA provider",
                                 hint="check the CUDA / cuDNN libraries onnxruntime-gpu needs")
            if config.get("contract") == CONTRACT_VERSION:
                types = {v.name: _TYPE_NAMES.get(v.type, v.type) for v in [*sess.get_inputs(), *sess.get_outputs()]}
                check_graph(path, sess.get_modelmeta().custom_metadata_map, types, role=role, config=config,
                            precision=precision)
            return sess

        multimodal = config["kind"] == "multimodal"
        decoder = make(files["decoder"], ROLE_DECODER if multimodal else ROLE_MODEL, chosen["decoder"])
        out = cls(folder=folder, config=config, decoder=decoder, device=device, device_id=device_id,
                  cuda_tf32=cuda_tf32 and device == "cuda", precision=chosen["decoder"], precisions=chosen)
        if multimodal:
            out.embed_tokens = make(files["embed_tokens"], ROLE_EMBED, chosen["embed_tokens"])
            out.vision_encoder = make(files["vision_encoder"], ROLE_VISION, chosen["vision_encoder"])
        out._input_types = {i.name: _ORT_TYPES.get(i.type, None) for i in out.decoder.get_inputs()}
        return out

    # -- facts ---------------------------------------------------------------------------
    @property
    def multimodal(self) -> bool:
        return self.config["kind"] == "multimodal"

    @property
    def has_regap_alpha(self) -> bool:
        return bool(self.config["regap_alpha"])

    @property
    def has_regap_score(self) -> bool:
        return bool(self.config["regap_score"])

    @property
    def has_image_mask(self) -> bool:
        return bool(self.config.get("regap_image_mask"))

    @property
    def image_channel(self) -> bool:
        """The graphs carry the modality channel (``regap_export.method.modality``, contract 5):
        embeddings and image features are one channel wider (0: text row, 1: image row), the
        decoder finds image rows itself, and layer 0's key cache carries the image flag."""
        return self.config.get("image_rows") == IMAGE_ROWS_CHANNEL

    @property
    def correction_positions(self) -> str:
        """Where the correction acts (``RegapOptions.positions``; ``regap_export.method.modality``)."""
        return (self.config.get("options") or {}).get("positions", "all")

    @property
    def image_token_id(self) -> int | None:
        value = self.config.get("image_token_id")
        return None if value is None else int(value)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_layers"])

    @property
    def kv_dtype(self) -> Any:
        return self._input_types["past_key_values.0.key"]

    @property
    def embeds_dtype(self) -> Any:
        return self._input_types.get("inputs_embeds", np.float32)

    @functools.cached_property
    def positions(self) -> PositionScheme:
        """How this export's ``position_ids`` are computed (prefill and next step)."""
        return position_scheme(self.config.get("position_ids"))

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    # -- building blocks -----------------------------------------------------------------
    def empty_past(self, batch: int) -> list[np.ndarray]:
        """The cache for a prefill: past length 0 (layer 0's keys one channel wider with the
        modality channel: ``key_dim``)."""
        out = []
        key_dims = self.config.get("key_dim") or self.config["head_dim"]
        for i in range(self.num_layers):
            heads = self.config["num_key_value_heads"][i]
            out += [np.zeros((batch, heads, 0, key_dims[i]), dtype=self.kv_dtype),
                    np.zeros((batch, heads, 0, self.config["head_dim"][i]), dtype=self.kv_dtype)]
        return out

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        if self.embed_tokens is None:
            raise RegapError("this export is a text model: it has no embed_tokens graph")
        return self.embed_tokens.run(["inputs_embeds"], {"input_ids": np.asarray(input_ids, dtype=np.int64)})[0]

    def image_features(self, **pixel_inputs: Any) -> np.ndarray:
        """Image feature rows [image tokens, hidden], in the order of the image tokens, for
        the processor's pixel inputs (``pixel_values`` and the family's extras, such as
        ``pixel_attention_mask`` or ``image_sizes``). With ``image_channel``, one channel wider
        (1: ``regap_export.method.modality.without_channel`` gives the model's features)."""
        if self.vision_encoder is None:
            raise RegapError("this export is a text model: it takes no image")
        family = self.config["family"]
        handler = vision_runtime_for(family)
        pixel_inputs = {k: np.asarray(v) for k, v in pixel_inputs.items() if v is not None}
        feeds = handler.prepare(self.config, **pixel_inputs)
        names = self.config.get("vision_outputs", ["image_features"])
        values = self.vision_encoder.run(names, {n: feeds[n] for n in self.config["vision_inputs"]})
        return handler.place(self.config, dict(zip(names, values)), **pixel_inputs)

    def prompt_embeds(self, input_ids: np.ndarray, **pixel_inputs: Any) -> np.ndarray:
        """Token embeddings with image features written at the image-token positions
        (the runtime's half of the split; same order as transformers' masked_scatter)."""
        embeds = self.embed(input_ids)
        if pixel_inputs.get("pixel_values") is None:
            return embeds
        features = self.image_features(**pixel_inputs)
        return merge_image_features(embeds, input_ids, features, int(self.config["image_token_id"]))

    def run_decoder(self, main: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                    past: Sequence[Any], regap_alpha: np.ndarray | None = None,
                    regap_image_mask: np.ndarray | None = None) -> DecoderOutput:
        """One decoder call: ``main`` is input_ids (text) or inputs_embeds (multimodal);
        ``position_ids`` [batch, seq], or [3, batch, seq] for M-RoPE exports (``positions``).
        ``regap_image_mask`` [batch, seq] (``regap_export.method.modality``): None feeds nothing, so
        the graph's default applies."""
        rank = self.positions.rank
        if np.ndim(position_ids) != rank:
            raise RegapError(f"this graph takes position_ids of rank {rank}, got shape {np.shape(position_ids)}",
                             hint="compute them with OrtSessions.positions")
        main_name = "inputs_embeds" if self.multimodal else "input_ids"
        main_dtype = self.embeds_dtype if self.multimodal else np.int64
        feeds: dict[str, Any] = {
            main_name: np.asarray(main, dtype=main_dtype),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "position_ids": np.asarray(position_ids, dtype=np.int64),
        }
        if self.has_regap_alpha:
            if regap_alpha is None:
                raise RegapError("this graph is regap-seq: it needs regap_alpha [batch]")
            feeds["regap_alpha"] = np.asarray(regap_alpha, dtype=np.float32).reshape(-1)
        elif regap_alpha is not None:
            raise RegapError("this graph takes no regap_alpha (it was not exported in regap-seq mode)")
        if regap_image_mask is not None:
            if self.image_channel:
                raise RegapError("this graph takes no regap_image_mask: it finds image rows by the modality channel "
                                 "of inputs_embeds (ONNX contract 5)", hint="to run it uncorrected, clear the channel "
                                 "(regap_export.method.modality.clear_image_flags)")
            if not self.has_image_mask:
                raise RegapError("this graph takes no regap_image_mask (it has no correction layers)")
            feeds["regap_image_mask"] = np.asarray(regap_image_mask, dtype=np.float32)
        for name, value in zip(self.past_names(), past):
            feeds[name] = value
        outputs = ["logits"] + (["regap_score"] if self.has_regap_score else []) + self.present_names()
        if self.device == "cuda":
            values = self._run_bound(feeds, outputs)
        else:
            values = self.decoder.run(outputs, feeds)
        logits = values[0]
        score = values[1] if self.has_regap_score else None
        presents = list(values[2 if self.has_regap_score else 1:])
        return DecoderOutput(logits=logits, presents=presents, regap_score=score)

    def _run_bound(self, feeds: dict[str, Any], outputs: list[str]) -> list[Any]:
        """CUDA: IO binding. numpy inputs are copied to the device; OrtValues (the previous
        step's presents) are bound as they are. logits / regap_score come back as numpy,
        presents stay on the device as OrtValues."""
        import onnxruntime as ort

        binding = self.decoder.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                array = np.ascontiguousarray(value)
                binding.bind_ortvalue_input(
                    name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", self.device_id))
        for name in outputs:
            binding.bind_output(name, "cuda", self.device_id)
        binding.synchronize_inputs()
        self.decoder.run_with_iobinding(binding)
        binding.synchronize_outputs()
        values = binding.get_outputs()
        host = {"logits", "regap_score"}
        return [v.numpy() if name in host else v for name, v in zip(outputs, values)]

    def to_host(self, value: Any) -> np.ndarray:
        """A present (numpy or OrtValue) as a numpy array."""
        return value if isinstance(value, np.ndarray) else value.numpy()


def _threads_from_environment() -> int | None:
    """``OMP_NUM_THREADS``, which ONNX Runtime itself ignores: processes that share the
    cores (parallel test workers, several servers on one host) set it to avoid spinning
    thread pools competing for the same cores."""
    import os

    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def merge_image_features(embeds: np.ndarray, input_ids: np.ndarray, features: np.ndarray,
                         image_token_id: int) -> np.ndarray:
    """Replace the embeddings at image-token positions by the image features, in row-major
    order (what ``inputs_embeds.masked_scatter(input_ids == image_token_id, features)`` does)."""
    mask = np.asarray(input_ids) == image_token_id
    flat = features.reshape(-1, features.shape[-1])
    count = int(mask.sum())
    if count != flat.shape[0]:
        raise RegapError(f"image features and image tokens do not match: {count} image tokens, "
                         f"{flat.shape[0]} feature vectors")
    out = embeds.copy()
    out[mask] = flat.astype(out.dtype)
    return out
