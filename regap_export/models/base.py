"""The adapter contract: everything regap-export needs to know about one model family.

An adapter is a small, stateless object. It knows where the decoder blocks are, how to
write a chat prompt with or without an image, and how to turn prompts and images into
model inputs. It does not load models (see ``regap_export.models.loading``), hook them,
or generate text.
"""
from __future__ import annotations

import contextlib

import functools
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from ..errors import ModelError

if TYPE_CHECKING:
    # Only for annotations: this module loads without torch (see ``regap_export.models``).
    import torch
    from torch import nn

    from .image_ops import ImagePreprocess
    from .positions import PositionKind
    from .vision_export import VisionSpec
    from .vision_runtime import VisionRuntime

INSTRUCTION_SENTINEL = "\u2063REGAP_INSTRUCTION\u2063"


@dataclass(frozen=True)
class ModelAdapter:
    """Family knowledge for a group of Hugging Face ``model_type`` values.

    ``language_model_path`` is the dotted path from the top-level model to the module
    that owns ``layers`` (the decoder blocks); it is resolved with ``get_submodule`` so a
    wrong path fails loudly instead of silently finding the wrong stack.
    """

    family: str
    model_types: tuple[str, ...]
    language_model_path: str
    multimodal: bool = False
    layers_attr: str = "layers"
    # Used only when the tokenizer/processor ships no chat template of its own.
    fallback_chat_template: str | None = None
    # Whether the family's template accepts a system turn (Gemma's does not).
    supports_system_role: bool = True
    # Name of the transformers Auto class that loads this family's checkpoints.
    auto_class_name: str = "AutoModelForCausalLM"
    # Processor outputs beside ``pixel_*`` that the image path needs (``pixel_inputs``).
    pixel_extra_keys: tuple[str, ...] = ()
    # Multimodal ONNX split, export side: model_type -> spec (``vision_export.vision_spec``).
    vision_export: Mapping[str, VisionSpec] | None = field(default=None, compare=False)
    # Multimodal ONNX split, runtime side (``regap_export.models.vision_runtime_for``).
    vision_runtime: VisionRuntime | None = None
    # Position ids other than the text scheme (``positions.position_config``); None: text.
    positions: PositionKind | None = None
    # Image preprocessing and prompt expansion without transformers (``image_ops``), used by
    # ``runtime.chat``; None: images go through the family's transformers processor.
    image_inputs: ImagePreprocess | None = None

    # -- structure -------------------------------------------------------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.language_model_path)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        from torch import nn

        layers = getattr(self.language_model(model), self.layers_attr)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{self.family}: {self.language_model_path}.{self.layers_attr} is not a ModuleList")
        return layers

    def text_config(self, config: Any) -> Any:
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def context_length(self, config: Any) -> int | None:
        """The text model's ``max_position_embeddings`` (None when the config names none)."""
        value = getattr(self.text_config(config), "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def hidden_size(self, model: nn.Module) -> int:
        return int(self.text_config(model.config).hidden_size)

    def image_token_id(self, config: Any) -> int | None:
        """The token id that marks image positions in ``input_ids``; None for text families."""
        return image_token_id_of(config) if self.multimodal else None

    # -- processor files -------------------------------------------------------------
    def load_processor(self, path: str | Path, **kwargs: Any) -> Any:
        """The tokenizer (text families) or processor (multimodal families) saved in ``path``."""
        from transformers import AutoProcessor, AutoTokenizer

        if not self.multimodal:
            return AutoTokenizer.from_pretrained(str(path), **kwargs)
        try:
            return AutoProcessor.from_pretrained(str(path), **kwargs)
        except (ImportError, ValueError):
            from . import pil_processors

            if not pil_processors.torchvision_missing():
                raise
            return pil_processors.pil_processor(path, **kwargs)  # transformers 5.17's PIL fallback is broken

    def save_processor(self, processor: Any, path: str | Path) -> None:
        """Write ``processor`` so that ``load_processor(path)`` reads it back."""
        processor.save_pretrained(str(path))

    # -- prompts ---------------------------------------------------------------------
    def messages(self, instruction: str, with_image: bool) -> list[dict]:
        """Chat messages for one user turn. Multimodal families put the image first."""
        if not self.multimodal:
            if with_image:
                raise self._no_image()
            return [{"role": "user", "content": instruction}]
        content: list[dict] = []
        if with_image:
            content.append({"type": "image"})
        content.append({"type": "text", "text": instruction})
        return [{"role": "user", "content": content}]

    def chat_template(self, processor: Any) -> str:
        """The chat template the processor (or its tokenizer) carries, else the family's fallback."""
        template = getattr(_chat_template_owner(processor), "chat_template", None)
        if isinstance(template, dict):  # named templates
            template = template.get("default")
        if isinstance(template, str):
            return template
        if self.fallback_chat_template is None:
            raise ModelError(f"{self.family}: the tokenizer has no chat template and the family has no fallback",
                             field="chat_template", hint="add a chat_template to the model folder's tokenizer_config.json")
        return self.fallback_chat_template

    def render_prompt(self, processor: Any, instruction: str, with_image: bool) -> str:
        """The full prompt string, ending with the template's generation prompt, as transformers'
        ``apply_chat_template`` renders it (in ``runtime.text``'s bounded sandbox). Control tokens
        the instruction spells are marked, so that ``encode`` keeps them as text
        (``runtime.text.mark_control_tokens``): user text never closes a turn or adds an image."""
        from ..runtime.text import mark_control_tokens, render_chat_template

        template = self.chat_template(processor)
        text = tokenizer_text(processor)
        marked = mark_control_tokens(instruction, text.control_tokens(template, self._reserved(processor)))
        return render_chat_template(template, self.messages(marked, with_image), special_tokens=text.special_tokens,
                                    path=getattr(tokenizer_of(processor), "name_or_path", None) or None)

    def _reserved(self, processor: Any) -> tuple[str, ...]:
        """Tokens the processor writes beside the template's own: its ``*_token`` attributes
        (``image_token``, ``video_token``, ``fake_image_token``, ...)."""
        if processor is tokenizer_of(processor):
            return ()
        names = sorted(name for name in vars(processor) if name.endswith("_token"))
        return tuple(value for value in (getattr(processor, name) for name in names) if isinstance(value, str))

    def post_instruction_length(self, processor: Any) -> int:
        """Tokens after the instruction in a rendered prompt (the template's suffix)."""
        prompt = self.render_prompt(processor, INSTRUCTION_SENTINEL, with_image=False)
        suffix = prompt.split(INSTRUCTION_SENTINEL, 1)[1]
        tok = tokenizer_of(processor)
        return max(1, len(tok(suffix, add_special_tokens=False)["input_ids"]))

    # -- inputs ----------------------------------------------------------------------
    def encode(self, processor: Any, prompts: Sequence[str], images: Sequence[Any] | None) -> dict[str, torch.Tensor]:
        """Left-padded model inputs for a batch of rendered prompts.

        ``images`` is None for a text batch, else one PIL image per prompt.
        """
        tok = tokenizer_of(processor)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        prompts = list(prompts)
        # Same rule as transformers' processor chat templating: the tokenizer adds its
        # special tokens (e.g. a BOS) unless the rendered template already starts with
        # BOS, so text-only and image prompts of one family are tokenized alike.
        add_special = not (tok.bos_token and prompts and prompts[0].startswith(tok.bos_token))
        if images is not None:
            if not self.multimodal:
                raise self._no_image()
            if len(images) != len(prompts):
                raise ValueError(f"{self.family}: {len(prompts)} prompts but {len(images)} images")

        def run(protected: list) -> Any:
            texts = [p.text for p in protected]
            if images is None:
                return tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
            return processor(text=texts, images=self.images_argument(images), return_tensors="pt",
                             padding=True, padding_side="left", add_special_tokens=add_special)

        # Typed control tokens (marked by render_prompt) are encoded as text (runtime.text).
        from ..runtime.text import encode_protected, has_marks

        text = tokenizer_text(processor)
        candidates = (text.placeholders(self.chat_template(processor), self._reserved(processor))
                      if any(has_marks(p) for p in prompts) else [])
        enc, rows = encode_protected(prompts, candidates, run, _unpadded_rows, text.plain,
                                     where=getattr(tok, "name_or_path", None) or None)
        enc = dict(enc)
        return enc if rows is None else _left_padded(enc, rows, int(tok.pad_token_id))

    def images_argument(self, images: Sequence[Any]) -> Any:
        """How this family's processor wants a batch of images (flat list by default)."""
        return list(images)

    def _no_image(self) -> ModelError:
        return ModelError(f"{self.family} is a text-only family and takes no image",
                          hint="drop the image, or use a multimodal model")


@dataclass
class TokenizerText:
    """What ``runtime.text``'s user-text rule needs of a transformers tokenizer."""

    added: dict[str, tuple[int, bool]]   # content -> (id, special)
    special_tokens: dict[str, str]       # bos_token, eos_token, ... as the chat template sees them
    make_plain: Any                      # () -> (piece -> ids, no added token matched)
    _plain: Any = None

    def plain(self, piece: str) -> list[int]:
        if self._plain is None:
            self._plain = self.make_plain()
        return self._plain(piece)

    def control_tokens(self, template: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
        from ..runtime.text import control_tokens_of

        return control_tokens_of({c: special for c, (_, special) in self.added.items()}, template, extra)

    def placeholders(self, template: str, extra: Sequence[str] = ()) -> list[tuple[str, int]]:
        from ..runtime.text import placeholder_candidates, template_literal_text

        literal = template_literal_text(template)
        avoid = {c for c in self.added if c in literal} | set(self.special_tokens.values()) | set(extra)
        return placeholder_candidates(self.added, avoid)


_TOKENIZER_TEXT: "weakref.WeakKeyDictionary[Any, tuple[int, TokenizerText]]"
_TOKENIZER_TEXT = weakref.WeakKeyDictionary()


def tokenizer_text(processor: Any) -> TokenizerText:
    """``TokenizerText`` of a processor's tokenizer (kept while the tokenizer's size is unchanged)."""
    from ..runtime.text import SPECIAL_TOKEN_NAMES, PlainTextEncoder, added_tokens_of

    tok = tokenizer_of(processor)
    size = len(tok)
    cached = _TOKENIZER_TEXT.get(tok)
    if cached is not None and cached[0] == size:
        return cached[1]
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
        added, plain = added_tokens_of(backend), functools.partial(PlainTextEncoder, backend)
    else:  # a tokenizer without a tokenizers backend: transformers' own split_special_tokens
        added = {t.content: (int(i), bool(t.special)) for i, t in tok.added_tokens_decoder.items()}
        def plain():
            return functools.partial(_plain_with_transformers, tok)
    special = {name: getattr(tok, name) for name in SPECIAL_TOKEN_NAMES}
    text = TokenizerText(added, {k: v for k, v in special.items() if isinstance(v, str)}, plain)
    _TOKENIZER_TEXT[tok] = (size, text)
    return text


def _plain_with_transformers(tok: Any, piece: str) -> list[int]:
    if not piece:
        return []
    newline = tok.encode("\n", add_special_tokens=False, split_special_tokens=True)
    ids = tok.encode("\n" + piece, add_special_tokens=False, split_special_tokens=True)
    return ids[len(newline):] if ids[:len(newline)] == newline else tok.encode(
        piece, add_special_tokens=False, split_special_tokens=True)


def _unpadded_rows(enc: Any) -> list[list[int]]:
    return [[int(t) for t, keep in zip(ids.tolist(), mask.tolist()) if keep]
            for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]


def _left_padded(enc: dict[str, Any], rows: Sequence[Any], pad_id: int) -> dict[str, Any]:
    """``enc`` with each row's ids replaced by its spliced row (``runtime.text.SplicedRow``),
    left-padded again; other per-token entries follow their tokens (0 for a typed token's ids)."""
    import torch

    ids, mask = enc["input_ids"], enc["attention_mask"]
    width = max(len(row.ids) for row in rows)
    per_token = {k: v for k, v in enc.items()
                 if isinstance(v, torch.Tensor) and v.shape == ids.shape and k not in ("input_ids", "attention_mask")}
    out = dict(enc)
    new_ids = torch.full((len(rows), width), pad_id, dtype=ids.dtype)
    new_mask = torch.zeros((len(rows), width), dtype=mask.dtype)
    new_other = {k: torch.zeros((len(rows), width), dtype=v.dtype) for k, v in per_token.items()}
    for i, row in enumerate(rows):
        offset = width - len(row.ids)
        first = int(ids.shape[1] - int(mask[i].sum()))  # where the row's tokens start (left padding)
        new_ids[i, offset:] = torch.tensor(row.ids, dtype=ids.dtype)
        new_mask[i, offset:] = 1
        for key, value in per_token.items():
            for j, source in enumerate(row.sources):
                if source >= 0:
                    new_other[key][i, offset + j] = value[i, first + source]
    out.update(input_ids=new_ids, attention_mask=new_mask, **new_other)
    return out


def pixel_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The image-side entries of a processor's output (``pixel_*`` and their layout, the
    families' ``pixel_extra_keys``)."""
    from . import pixel_extra_keys

    extra = pixel_extra_keys()
    return {k: v for k, v in inputs.items() if k.startswith("pixel") or k in extra}


def __getattr__(name: str) -> Any:
    # ``PIXEL_EXTRA_KEYS`` is built from the registry, which is filled after this module loads.
    if name == "PIXEL_EXTRA_KEYS":
        from . import pixel_extra_keys

        return pixel_extra_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def image_token_id_of(config: Any) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ModelError(f"{getattr(config, 'model_type', '?')}: the config names no image token id",
                     field="image_token_id", hint="set image_token_id in the model's config.json")


def read_template(name: str) -> str:
    """The fallback chat template of the registered family ``name`` (each family module holds its own)."""
    from . import adapter_for_family

    adapter = adapter_for_family(name)
    if adapter is None or adapter.fallback_chat_template is None:
        raise ValueError(f"no registered family {name!r} with a fallback chat template")
    return adapter.fallback_chat_template


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer inside a processor, or the object itself when it is a tokenizer."""
    return getattr(processor, "tokenizer", processor)


def _chat_template_owner(processor: Any) -> Any:
    if getattr(processor, "chat_template", None) is not None:
        return processor
    return tokenizer_of(processor) if getattr(tokenizer_of(processor), "chat_template", None) else processor


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword argument that carries a KV cache into ``model``'s forward: ``cache`` where
    the forward takes it (transformers 5.24), else ``past_key_values`` (5.17). An older forward
    passes an unknown ``cache=`` on in ``**kwargs`` where nothing reads it: the model then
    starts an empty cache and silently ignores the past."""
    return {_cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    # Once per class: decode loops call with_cache at every token.
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@contextlib.contextmanager
def cache_kept(cache: Any) -> Iterator[Any]:
    """Run forwards that extend ``cache`` (a transformers ``DynamicCache``), then put every layer's
    keys and values back as they were: one prefilled prompt serves many continuations. Also right
    after a forward that a hook ended early (``StopForward``), where only some layers grew."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no per-layer storage to restore")
    saved = [(layer, getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    count = len(layers)
    try:
        yield cache
    finally:
        del cache.layers[count:]
        for layer, keys, values in saved:
            layer.keys, layer.values = keys, values


def cache_of(output: Any) -> Any:
    """The KV cache of a model output: transformers 5 names it ``cache`` in most output
    classes and ``past_key_values`` in some."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache
