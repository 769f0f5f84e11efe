"""ReGap drift correction for plain Hugging Face transformers (custom code, ``trust_remote_code``).

regap-export writes this file next to a corrected checkpoint. It needs torch, transformers
and safetensors only (it never imports regap_export):

    from transformers import AutoModelForCausalLM          # AutoModelForImageTextToText for VLMs
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The model is the original transformers class, loaded with the original weights. After
loading, each corrected decoder block gets a ``regap_correction`` child and a forward hook
that applies it to the block output h (the residual stream):

    gated:  h' = h + m * sigmoid(h . w + b) * v      (adaptive layers of mode "regap")
    fixed:  h' = h + m * v                           (probe layers; mode "fixed")
    scaled: h' = h + m * alpha * v                   (mode "regap-seq"; alpha [batch] per sequence)

m is the image mask [batch, seq]: the correction removes the image-induced drift, so it acts
only on rows that hold an image token (in this call or earlier in the conversation), at the
positions ``regap.options.positions`` names ("last+generated": the last position of every
call, i.e. the last prompt token and every generated token, and in a chat continued with
``past_key_values`` the last token of each later turn; "image": from the first image token on;
"all": everywhere, images or not). ``generate()`` computes it from ``input_ids`` (the whole
conversation, as transformers' multi-turn generation passes it); ``forward`` takes it as
``regap_image_mask`` and, without it, uses the default (1 for "all", else 0: the uncorrected
model), exactly as the exported ONNX graph does.

The constants are in ``regap.safetensors`` (``regap.{layer}.v|w|b``; for regap-seq also the
score readout ``regap.score.w|b``). config.json's ``regap`` section lists the layers and their
kinds, regap-seq's read layer and kappa, and the file's sha256. The correction buffers are
not persistent, so ``state_dict()`` holds exactly the original weights; ``save_pretrained``
writes ``regap.safetensors`` again next to them.

regap-seq: pass ``regap_alpha`` (a [batch] tensor) to ``forward``, or let ``generate`` compute
it with the probe pass (``regap_sequence_alpha``): the prompt runs with alpha0 on the probe
band, the score z = h . w + b is read after block l_s (``regap.readout.layer``) at each row's
last prompt token, and alpha = alpha_max * sigmoid(kappa * (z - tau)). The per-call alpha is
held on the model for the duration of one forward, so one model object must not run two
forwards concurrently.
"""
from __future__ import annotations

import hashlib
import inspect
import os
from typing import Any

import torch
import transformers
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn
from transformers import LlamaForCausalLM as RegapBase  # regap-export: base class

FORMAT_VERSION = "2"
LEGACY_FORMAT_VERSIONS = ("1",)  # corrected every position of every input
TENSORS_FILENAME = "regap.safetensors"
FIXED, GATED, SCALED = "fixed", "gated", "scaled"


class _RegapStop(Exception):
    """Ends the probe pass right after the read block."""


class _RegapState:
    """What the hooks of one model share: the current alpha and the probe-pass readout."""

    def __init__(self, section: dict[str, Any]):
        self.section = section
        self.mode = section["mode"]
        positions = section["options"].get("positions", "all")
        self.positions = "all" if str(section.get("format_version")) in LEGACY_FORMAT_VERSIONS else positions
        self.image_token_id = section.get("image_token_id")
        self.alpha: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.generation: dict[str, Any] | None = None  # masks of the generate() call in progress
        self.read_layer: int | None = None
        self.captured: torch.Tensor | None = None
        self.handles: list[Any] = []


class RegapCorrection(nn.Module):
    """One correction after one decoder block. Projections run in float32."""

    def __init__(self, layer: int, kind: str, v: torch.Tensor, w: torch.Tensor | None = None,
                 b: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if kind not in (FIXED, GATED, SCALED):
            raise ValueError(f"unknown ReGap correction kind {kind!r} at layer {layer}")
        self.layer, self.kind = int(layer), kind
        v = v.detach().reshape(-1)
        # Not persistent: state_dict() stays the original model's.
        self.register_buffer("v", v.to(dtype if kind == FIXED else torch.float32).clone(), persistent=False)
        if kind == GATED:
            if w is None or b is None:
                raise ValueError(f"the gated correction at layer {layer} needs w and b")
            self.register_buffer("w", w.detach().to(torch.float32).reshape(-1, 1).clone(), persistent=False)
            self.register_buffer("b", b.detach().to(torch.float32).reshape(1).clone(), persistent=False)

    def forward(self, h: torch.Tensor, alpha: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = (torch.ones(1, 1, 1, device=h.device) if mask is None
                else mask.to(device=h.device, dtype=torch.float32).reshape(h.shape[0], -1, 1))
        if self.kind == FIXED:
            return h + mask.to(h.dtype) * self.v.to(h.dtype)
        wide = h if h.dtype == torch.float32 else h.to(torch.float32)
        if self.kind == GATED:
            out = wide + torch.sigmoid(wide @ self.w.float() + self.b.float()) * mask * self.v.float()
        else:
            if alpha is None:
                raise ValueError("this ReGap model (mode regap-seq) needs regap_alpha [batch] at every forward; "
                                 "get it with model.regap_sequence_alpha(**inputs), or call generate(), "
                                 "which computes it")
            out = wide + alpha.to(device=h.device, dtype=torch.float32).reshape(-1, 1, 1) * mask * self.v.float()
        return out if h.dtype == torch.float32 else out.to(h.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"regap.{self.layer}.v": self.v}
        if self.kind == GATED:
            out[f"regap.{self.layer}.w"] = self.w
            out[f"regap.{self.layer}.b"] = self.b
        return {k: t.detach().cpu().contiguous() for k, t in out.items()}

    def extra_repr(self) -> str:
        return f"layer={self.layer}, kind={self.kind}, hidden={self.v.numel()}"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensors_path(name_or_path: Any, kwargs: dict[str, Any]) -> str:
    path = os.fspath(name_or_path)
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        return os.path.join(path, subfolder, TENSORS_FILENAME)
    from transformers.utils import cached_file

    return cached_file(path, TENSORS_FILENAME, subfolder=subfolder, cache_dir=kwargs.get("cache_dir"),
                       revision=kwargs.get("revision"), token=kwargs.get("token"),
                       local_files_only=kwargs.get("local_files_only", False))


def _image_masks(positions: str, input_ids: torch.Tensor, image_token_id: int | None, images: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt mask [batch, seq], decode-step mask [batch, 1]) for a left-padded prompt batch fed
    in one call (its last columns, when a cache holds the first ones: the mask of the uncached
    tokens, since a row holds an image from its first image token on). ``images=False`` (no pixel
    values in this conversation): no row holds an image, whatever ids it holds (an image token
    typed as text is not an image; the ONNX graphs see it so too)."""
    batch, seq = input_ids.shape
    if positions == "all":
        return torch.ones(batch, seq), torch.ones(batch, 1)
    if image_token_id is None or not images:
        is_image = torch.zeros_like(input_ids, dtype=torch.bool)
    else:
        is_image = input_ids == int(image_token_id)
    has_image = is_image.any(dim=1, keepdim=True).cpu()
    if positions == "last+generated":
        covered = torch.zeros(batch, seq, dtype=torch.bool)
        covered[:, -1] = True
    elif positions == "image":
        covered = is_image.long().cumsum(dim=1).cpu() > 0
    else:
        raise ValueError(f"unknown ReGap positions {positions!r}")
    return (covered & has_image).float(), has_image.float()


def _call_length(args: tuple, kwargs: dict[str, Any]) -> int:
    """How many positions this forward computes (input_ids or inputs_embeds)."""
    main = kwargs.get("input_ids")
    if main is None:
        main = kwargs.get("inputs_embeds")
    if main is None and args and torch.is_tensor(args[0]):
        main = args[0]
    return int(main.shape[1])


def _last_token(h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    batch, seq = h.shape[0], h.shape[1]
    if attention_mask is None or attention_mask.shape[-1] != seq:
        index = torch.full((batch,), seq - 1, dtype=torch.long, device=h.device)
    else:
        mask = attention_mask.to(device=h.device, dtype=torch.long) > 0
        positions = torch.arange(seq, device=h.device).expand(batch, seq)
        index = (positions * mask).amax(dim=-1)
    return h[torch.arange(batch, device=h.device), index]


def _release(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string ("5.0.0.dev0" -> (5, 0, 0))."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def regap_check_transformers(config: Any) -> None:
    """Refuse a transformers version that would read this checkpoint as another model.

    config.json's ``regap.min_transformers`` is the lowest version that reads the same model
    (``"4.57.0"`` when config.json carries transformers 4.x's keys beside transformers 5's,
    ``"5.0.0"`` when 4.x cannot read it, with ``min_transformers_reason``). A folder without
    it predates those keys: only transformers 5 reads it right. Under 4.x, the text config's
    ``rope_theta`` must also agree with transformers 5's ``rope_parameters``.
    """
    section = getattr(config, "regap", None)
    if not isinstance(section, dict):
        return
    need = str(section.get("min_transformers") or "5.0.0")
    have = transformers.__version__
    if _release(have) < _release(need):
        why = section.get("min_transformers_reason") or (
            "config.json lacks the keys transformers 4.x reads (rope_theta, rope_scaling): it would build "
            "another model" if "min_transformers" not in section else "older versions are not tested")
        raise ValueError(f"this ReGap-corrected checkpoint needs transformers >= {need}, found {have}: {why} "
                         f"(pip install 'transformers>={need}')")
    if _release(have) < (5, 0, 0):
        for sub in {id(c): c for c in (config, config.get_text_config())}.values():
            rope = getattr(sub, "rope_parameters", None)
            if isinstance(rope, dict) and "rope_theta" in rope and float(getattr(sub, "rope_theta", -1.0)) != float(
                    rope["rope_theta"]):
                raise ValueError(f"config.json: rope_theta {getattr(sub, 'rope_theta', None)} disagrees with "
                                 f"rope_parameters.rope_theta {rope['rope_theta']}; transformers {have} would "
                                 "build another model (export the checkpoint again)")


class RegapLlamaForCausalLM(RegapBase):  # regap-export: class
    """The original model class with ReGap's correction layers attached after loading."""

    def __init__(self, config, *args, **kwargs):
        regap_check_transformers(config)  # before any weight is read
        super().__init__(config, *args, **kwargs)

    @classmethod
    def is_custom_code(cls) -> bool:
        # The modelling is the library's own class; only hooks are added after loading. Saying
        # so keeps transformers' checkpoint key conversions (e.g. LLaVA's legacy names) and its
        # weight initialisation exactly as for the base class.
        return False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        result = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        model.regap_attach(_tensors_path(pretrained_model_name_or_path, kwargs))
        return result

    # -- attaching -------------------------------------------------------------------
    def regap_attach(self, tensors_path: str) -> None:
        """Read ``regap.safetensors`` and hook its corrections onto the decoder blocks."""
        if getattr(self, "_regap_state", None) is not None:
            raise ValueError("ReGap corrections are already attached to this model")
        section = getattr(self.config, "regap", None)
        if not isinstance(section, dict):
            raise ValueError("config.json has no 'regap' section: not a ReGap-corrected checkpoint")
        if str(section.get("format_version")) not in (FORMAT_VERSION, *LEGACY_FORMAT_VERSIONS):
            raise ValueError(f"config.json: ReGap format version {section.get('format_version')!r}; "
                             f"this code reads version {FORMAT_VERSION!r}")
        if not os.path.isfile(tensors_path):
            raise OSError(f"{tensors_path}: the ReGap correction tensors are missing")
        with open(tensors_path, "rb") as f:
            data = f.read()
        expected = section.get("tensors_sha256")
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{tensors_path}: sha256 does not match config.json's regap.tensors_sha256 "
                             "(the file is damaged or comes from another export)")
        try:
            tensors = load_safetensors_bytes(data)
        except Exception as exc:
            raise ValueError(f"{tensors_path}: not a readable safetensors file ({exc})") from None

        blocks = self.get_submodule(section["decoder_layers_path"])
        hidden = int(self.config.get_text_config().hidden_size)
        state = _RegapState(section)
        for entry in section["layers"]:
            layer, kind = int(entry["layer"]), entry["kind"]
            block = blocks[layer]
            param = next(block.parameters())

            def get(name: str, shape: tuple[int, ...], layer: int = layer) -> torch.Tensor:
                key = f"regap.{layer}.{name}"
                if key not in tensors:
                    raise ValueError(f"{tensors_path}: tensor {key} is missing")
                if tuple(tensors[key].shape) != shape:
                    raise ValueError(f"{tensors_path}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                                     f"expected {shape}")
                return tensors[key]

            w = get("w", (hidden, 1)) if kind == GATED else None
            b = get("b", (1,)) if kind == GATED else None
            correction = RegapCorrection(layer, kind, get("v", (hidden,)), w, b, dtype=param.dtype)
            block.add_module("regap_correction", correction.to(param.device))
            state.handles.append(block.register_forward_hook(self._regap_hook(state, correction)))
        if state.mode == "regap-seq":
            for name, shape in (("w", (hidden,)), ("b", (1,))):
                key = f"regap.score.{name}"
                if key not in tensors or tuple(tensors[key].shape) != shape:
                    raise ValueError(f"{tensors_path}: tensor {key} is missing or has the wrong shape")
            self._regap_score = {name: tensors[f"regap.score.{name}"].to(torch.float32) for name in ("w", "b")}
        self._regap_state = state

    @staticmethod
    def _regap_hook(state: _RegapState, correction: RegapCorrection):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            mask = state.mask
            if mask is None and state.positions == "all":
                mask = None  # the default, 1 everywhere
            elif mask is None:
                mask = torch.zeros(hidden.shape[0], hidden.shape[1])  # the default: uncorrected
            hidden = correction(hidden, state.alpha, mask)
            if state.read_layer == correction.layer:
                state.captured = hidden
                raise _RegapStop
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def regap_detach(self) -> None:
        """Remove the corrections: the model is the original one again."""
        state = getattr(self, "_regap_state", None)
        if state is None:
            return
        for handle in state.handles:
            handle.remove()
        blocks = self.get_submodule(state.section["decoder_layers_path"])
        for entry in state.section["layers"]:
            block = blocks[int(entry["layer"])]
            if "regap_correction" in block._modules:
                del block._modules["regap_correction"]
        self._regap_state = None

    def regap_corrections(self) -> list[RegapCorrection]:
        state = getattr(self, "_regap_state", None)
        if state is None:
            return []
        blocks = self.get_submodule(state.section["decoder_layers_path"])
        return [blocks[int(e["layer"])].regap_correction for e in state.section["layers"]]

    # -- running ---------------------------------------------------------------------
    def forward(self, *args, regap_alpha: torch.Tensor | None = None,
                regap_image_mask: torch.Tensor | None = None, **kwargs):
        state = getattr(self, "_regap_state", None)
        if state is None:
            return super().forward(*args, **kwargs)
        if regap_image_mask is None and state.generation is not None:
            key = "prompt" if state.generation["first"] else "step"
            regap_image_mask, state.generation["first"] = state.generation[key], False
            if key == "prompt":  # a continued chat feeds only the tokens its cache does not hold
                regap_image_mask = regap_image_mask[:, -_call_length(args, kwargs):]
        previous = state.alpha, state.mask
        state.alpha, state.mask = regap_alpha, regap_image_mask
        try:
            return super().forward(*args, **kwargs)
        finally:
            state.alpha, state.mask = previous

    def regap_image_masks(self, input_ids: torch.Tensor, images: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt mask [batch, seq], decode-step mask [batch, 1]) for a left-padded prompt;
        ``images=False``: the prompt comes without pixel values."""
        state = self._regap_state
        return _image_masks(state.positions, input_ids, state.image_token_id, images)

    @torch.no_grad()
    def regap_sequence_alpha(self, **inputs) -> torch.Tensor:
        """regap-seq's alpha(x) [batch] from a probe pass over the prompt inputs."""
        state = getattr(self, "_regap_state", None)
        if state is None or state.mode != "regap-seq":
            raise ValueError("regap_sequence_alpha is for ReGap models of mode regap-seq")
        options = state.section["options"]
        inputs = {k: v for k, v in inputs.items() if k not in ("use_cache", "past_key_values", "regap_alpha")}
        if inputs.get("regap_image_mask") is None and inputs.get("input_ids") is not None:
            images = inputs.get("pixel_values") is not None
            inputs["regap_image_mask"] = self.regap_image_masks(inputs["input_ids"], images)[0]
        reference = inputs.get("input_ids")
        if reference is None:
            reference = inputs["inputs_embeds"]
        device = reference.device
        alpha0 = torch.full((reference.shape[0],), float(options["alpha0"]), dtype=torch.float32, device=device)
        state.read_layer, state.captured = int(state.section["readout"]["layer"]), None
        try:
            self.forward(**inputs, regap_alpha=alpha0, use_cache=False)
        except _RegapStop:
            pass
        finally:
            state.read_layer = None
        hidden, state.captured = state.captured, None
        if hidden is None:
            raise RuntimeError("the probe pass did not reach the read layer")
        last = _last_token(hidden, inputs.get("attention_mask")).to(torch.float32)
        w, b = (self._regap_score[k].to(device) for k in ("w", "b"))
        score = last @ w + b
        kappa = float(state.section["readout"]["kappa"])
        return float(options["alpha_max"]) * torch.sigmoid(kappa * (score - float(options["tau"])))

    def generate(self, *args, **kwargs):
        state = getattr(self, "_regap_state", None)
        if state is None:
            return super().generate(*args, **kwargs)
        tensors = {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
        if "inputs" in tensors:
            tensors["input_ids"] = tensors.pop("inputs")
        if args and torch.is_tensor(args[0]):
            tensors.setdefault("input_ids", args[0])
        if state.mode == "regap-seq" and kwargs.get("regap_alpha") is None:
            kwargs["regap_alpha"] = self.regap_sequence_alpha(**tensors)
        if tensors.get("input_ids") is None:
            return super().generate(*args, **kwargs)
        images = tensors.get("pixel_values") is not None or kwargs.get("past_key_values") is not None
        prompt, step = self.regap_image_masks(tensors["input_ids"], images)
        state.generation = {"prompt": prompt, "step": step, "first": True}
        try:
            return super().generate(*args, **kwargs)
        finally:
            state.generation = None

    # -- saving ----------------------------------------------------------------------
    def regap_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for correction in self.regap_corrections():
            tensors.update(correction.tensors())
        for name, value in (getattr(self, "_regap_score", None) or {}).items():
            tensors[f"regap.score.{name}"] = value.detach().cpu().contiguous()
        return tensors

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        state = getattr(self, "_regap_state", None)
        if state is not None and is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            path = os.path.join(save_directory, TENSORS_FILENAME)
            # Written to a new file beside (created exclusively, never through a link planted in the
            # folder) and renamed, so an interrupted save never leaves half a file under the name
            # that config.json's sha256 will describe (this file runs standalone: no regap_export).
            data = save_safetensors_bytes(self.regap_tensors(), metadata={"format_version": FORMAT_VERSION,
                                                                          "mode": state.mode})
            _write_new_then_rename(path, data)
            state.section = {**state.section, "tensors_sha256": _sha256(path)}
            self.config.regap = state.section
        return super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)


def _write_new_then_rename(path: str, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    partial = f"{path}.{os.getpid()}-{os.urandom(4).hex()}.partial"
    fd = os.open(partial, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    except BaseException:
        if os.path.lexists(partial):
            os.unlink(partial)
        raise


def _forward_signature(base_forward) -> inspect.Signature:
    """The base forward's signature plus ``regap_alpha`` and ``regap_image_mask``, so generate()
    accepts and forwards them and still sees the base's own parameters (logits_to_keep, ...)."""
    signature = inspect.signature(base_forward)
    params = list(signature.parameters.values())
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in ("regap_alpha", "regap_image_mask")]
    cut = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    return signature.replace(parameters=params[:cut] + extra + params[cut:])


RegapLlamaForCausalLM.forward.__signature__ = _forward_signature(RegapBase.forward)  # regap-export: class
