"""ONNX Runtime sessions for the graphs of "onnx contract 1" (docs/ONNX_CONTRACT.md).

``OrtSessions.open(folder, device="cpu"|"cuda")`` opens ``model.onnx`` (text) or the
multimodal split. On CUDA the decoder runs with IO binding: inputs are copied to the GPU
once, the KV cache (``present.*``) stays on the GPU as ``OrtValue``s and is bound directly
as the next step's ``past_key_values.*``; only logits (and ``regap_score``) come back to
the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ArtifactError, RegapError
from ..export.onnx_export import read_config

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(bool)": np.bool_, "tensor(double)": np.float64, "tensor(int32)": np.int32}


# --------------------------------------------------------------------------------------
# family-specific image inputs (numpy; the export side is export/onnx_families.py)
# --------------------------------------------------------------------------------------
def _idefics3_images(config: dict, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray | None = None,
                     **_: Any) -> dict[str, np.ndarray]:
    """[batch, max_images, 3, H, W] (processor output) -> real images only [n, 3, H, W].
    Padding images are all zeros, as Idefics3Model.get_image_features decides."""
    pv = np.asarray(pixel_values, dtype=np.float32)
    if pv.ndim == 5:
        b, n = pv.shape[:2]
        pv = pv.reshape(b * n, *pv.shape[2:])
        if pixel_attention_mask is not None:
            pixel_attention_mask = np.asarray(pixel_attention_mask).reshape(b * n, *pv.shape[2:])
    real = ~(pv == 0.0).all(axis=(1, 2, 3))
    pv = pv[real]
    if pixel_attention_mask is None:
        mask = np.ones((pv.shape[0], pv.shape[2], pv.shape[3]), dtype=np.int64)
    else:
        mask = np.asarray(pixel_attention_mask).astype(np.int64)[real]
    return {"pixel_values": np.ascontiguousarray(pv), "pixel_attention_mask": np.ascontiguousarray(mask)}


def _llava_images(config: dict, pixel_values: np.ndarray, **_: Any) -> dict[str, np.ndarray]:
    pv = np.asarray(pixel_values, dtype=np.float32)
    if pv.ndim == 5:
        pv = pv.reshape(-1, *pv.shape[2:])
    return {"pixel_values": np.ascontiguousarray(pv)}


def _flatten_features(config: dict, outputs: dict[str, np.ndarray], **_: Any) -> np.ndarray:
    features = outputs["image_features"]
    return features.reshape(-1, features.shape[-1])


# LLaVA-NeXT: any-resolution crops. Ports of transformers' llava_next helpers.
def _best_resolution(image_size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    from transformers.image_processing_utils import select_best_resolution

    return tuple(int(x) for x in select_best_resolution(tuple(image_size), pinpoints))


def _llava_next_num_patches(image_size: tuple[int, int], pinpoints: list[list[int]], crop: int) -> int:
    height, width = _best_resolution(image_size, pinpoints)
    return len(range(0, height, crop)) * len(range(0, width, crop)) + 1


def _unpad(tensor: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """transformers' llava_next ``unpad_image`` for a [channels, height, width] array."""
    original_height, original_width = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        scale = current_width / original_width
        new_height = int(round(original_height * scale, 7))
        padding = (current_height - new_height) // 2
        return tensor[:, padding: current_height - padding, :]
    scale = current_height / original_height
    new_width = int(round(original_width * scale, 7))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding: current_width - padding]


def _llava_next_images(config: dict, pixel_values: np.ndarray, image_sizes: np.ndarray | None = None,
                       **_: Any) -> dict[str, np.ndarray]:
    """[num_images, max_patches, 3, S, S] -> the real crops of every image, concatenated."""
    if image_sizes is None:
        raise RegapError("LLaVA-NeXT needs image_sizes (the processor returns them)")
    vision = config["vision_config"]
    pv = np.asarray(pixel_values, dtype=np.float32)
    if pv.ndim == 4:
        return {"pixel_values": np.ascontiguousarray(pv)}
    crops = []
    for image, size in zip(pv, np.asarray(image_sizes)):
        n = _llava_next_num_patches((int(size[0]), int(size[1])), vision["image_grid_pinpoints"], vision["image_size"])
        crops.append(image[:n])
    return {"pixel_values": np.ascontiguousarray(np.concatenate(crops, axis=0))}


def _llava_next_pack(config: dict, outputs: dict[str, np.ndarray], image_sizes: np.ndarray | None = None,
                     **_: Any) -> np.ndarray:
    """LlavaNextModel.pack_image_features in numpy: base crop, then the unpadded grid of
    crops with an ``image_newline`` column after every row."""
    vision = config["vision_config"]
    features, newline = outputs["image_features"], outputs["image_newline"]
    crop, side = vision["image_size"], vision["image_size"] // vision["patch_size"]
    pinpoints = vision["image_grid_pinpoints"]
    packed, offset = [], 0
    for size in np.asarray(image_sizes):
        size = (int(size[0]), int(size[1]))
        n = _llava_next_num_patches(size, pinpoints, crop)
        feature = features[offset: offset + n]
        offset += n
        if n > 1:
            base, grid = feature[0], feature[1:]
            best_h, best_w = _best_resolution(size, pinpoints)
            rows, cols = best_h // crop, best_w // crop
            dim = grid.shape[-1]
            grid = grid.reshape(rows, cols, side, side, dim).transpose(4, 0, 2, 1, 3).reshape(dim, rows * side, cols * side)
            grid = _unpad(grid, size)
            column = np.broadcast_to(newline[:, None, None], (dim, grid.shape[1], 1)).astype(grid.dtype)
            grid = np.concatenate([grid, column], axis=-1)
            grid = grid.reshape(dim, -1).T
            packed.append(np.concatenate([base, grid], axis=0))
        else:
            packed.append(np.concatenate([feature[0], newline[None].astype(feature.dtype)], axis=0))
    if offset != features.shape[0]:
        raise RegapError(f"LLaVA-NeXT: {features.shape[0]} crops encoded, image_sizes account for {offset}")
    return np.concatenate(packed, axis=0)


@dataclass(frozen=True)
class VisionRuntime:
    # prepare(config, **pixel inputs) -> the vision encoder's feeds
    prepare: Callable[..., dict[str, np.ndarray]]
    # place(config, outputs, **pixel inputs) -> feature rows [image tokens, hidden], in token order
    place: Callable[..., np.ndarray] = _flatten_features


VISION_RUNTIME: dict[str, VisionRuntime] = {
    "idefics3": VisionRuntime(_idefics3_images),
    "llava": VisionRuntime(_llava_images),
    "llava_next": VisionRuntime(_llava_next_images, _llava_next_pack),
}


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
    _input_types: dict[str, Any] = field(default_factory=dict)

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path, device: str = "cpu", *, device_id: int = 0,
             session_options: Any = None, intra_op_threads: int | None = None) -> "OrtSessions":
        import onnxruntime as ort

        folder = Path(folder)
        config = read_config(folder)
        if device not in ("cpu", "cuda"):
            raise RegapError(f"unknown device {device!r}; choose cpu or cuda")
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RegapError("ONNX Runtime has no CUDA provider here",
                                 hint="install regap-export[gpu] (onnxruntime-gpu) instead of onnxruntime")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]

        def make(name: str):
            path = folder / name
            if not path.is_file():
                raise ArtifactError(f"{name} is missing", path=folder)
            opts = session_options
            if opts is None:
                opts = ort.SessionOptions()
                if intra_op_threads is not None:
                    opts.intra_op_num_threads = intra_op_threads
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types, one per failure
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ArtifactError(f"ONNX Runtime cannot load this graph ({first_line})", path=path,
                                    hint="the file is corrupted or truncated; re-run export") from None
            if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
                raise RegapError(f"{name}: ONNX Runtime could not start its CUDA provider",
                                 hint="check the CUDA / cuDNN libraries onnxruntime-gpu needs")
            return sess

        files = config["files"]
        out = cls(folder=folder, config=config, decoder=make(files["decoder"]), device=device, device_id=device_id)
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
    def num_layers(self) -> int:
        return int(self.config["num_layers"])

    @property
    def kv_dtype(self) -> Any:
        return self._input_types["past_key_values.0.key"]

    @property
    def embeds_dtype(self) -> Any:
        return self._input_types.get("inputs_embeds", np.float32)

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
        ``pixel_attention_mask`` or ``image_sizes``)."""
        if self.vision_encoder is None:
            raise RegapError("this export is a text model: it takes no image")
        family = self.config["family"]
        handler = VISION_RUNTIME.get(family)
        if handler is None:
            raise RegapError(f"no image input handling for family {family!r}")
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
                    past: Sequence[Any], regap_alpha: np.ndarray | None = None) -> DecoderOutput:
        """One decoder call: ``main`` is input_ids (text) or inputs_embeds (multimodal)."""
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
