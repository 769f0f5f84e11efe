"""ONNX Runtime sessions for the graphs of "onnx contract 4" (docs/ONNX_CONTRACT.md).

``OrtSessions.open(folder, device="cpu"|"cuda")`` opens ``model.onnx`` (text) or the
multimodal split. On CUDA the decoder runs with IO binding: inputs are copied to the GPU
once, the KV cache (``present.*``) stays on the GPU as ``OrtValue``s and is bound directly
as the next step's ``past_key_values.*``; only logits (and ``regap_score``) come back to
the host.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..io.artifacts import exported_folder_of
from ..errors import ArtifactError, RegapError, first_line
from ..models.positions import PositionScheme, position_scheme
from ..models import vision_runtime_for

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(bool)": np.bool_, "tensor(double)": np.float64, "tensor(int32)": np.int32}


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
    _input_types: dict[str, Any] = field(default_factory=dict)

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path, device: str = "cpu", *, device_id: int = 0,
             session_options: Any = None, intra_op_threads: int | None = None,
             cuda_tf32: bool = False, verify_hashes: bool = True) -> "OrtSessions":
        """The sessions of an exported folder's graphs (``folder``: its ``onnx/`` folder, or the
        exported folder itself), after ``io.artifacts.ExportedFolder.open`` verified the folder
        (``verify_hashes=False`` skips the sha256 of each file, and only that)."""
        import onnxruntime as ort

        exported = exported_folder_of(folder, verify_hashes=verify_hashes)
        folder = exported.onnx_folder()
        config = exported.onnx_config()
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

        def make(name: str):
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
            return sess

        files = config["files"]
        out = cls(folder=folder, config=config, decoder=make(files["decoder"]), device=device, device_id=device_id,
                  cuda_tf32=cuda_tf32 and device == "cuda")
        if config["kind"] == "multimodal":
            out.embed_tokens = make(files["embed_tokens"])
            out.vision_encoder = make(files["vision_encoder"])
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
    def marks_image_rows(self) -> bool:
        """The graphs carry the modality marker (``regap_export.method.modality``, contract 4): image
        features come out of the vision encoder marked, and the decoder finds image rows itself."""
        return self.config.get("image_rows") == "marked"

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
        """The cache for a prefill: past length 0."""
        out = []
        for i in range(self.num_layers):
            shape = (batch, self.config["num_key_value_heads"][i], 0, self.config["head_dim"][i])
            out += [np.zeros(shape, dtype=self.kv_dtype), np.zeros(shape, dtype=self.kv_dtype)]
        return out

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        if self.embed_tokens is None:
            raise RegapError("this export is a text model: it has no embed_tokens graph")
        return self.embed_tokens.run(["inputs_embeds"], {"input_ids": np.asarray(input_ids, dtype=np.int64)})[0]

    def image_features(self, **pixel_inputs: Any) -> np.ndarray:
        """Image feature rows [image tokens, hidden], in the order of the image tokens, for
        the processor's pixel inputs (``pixel_values`` and the family's extras, such as
        ``pixel_attention_mask`` or ``image_sizes``). Marked (x 2**64) when
        ``marks_image_rows``: ``regap_export.method.modality.unmark`` gives the model's features."""
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
            if self.marks_image_rows:
                raise RegapError("this graph takes no regap_image_mask: it finds image rows by their marker "
                                 "(ONNX contract 4)", hint="to run it uncorrected, merge the image features "
                                 "divided back (regap_export.method.modality.unmark)")
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
