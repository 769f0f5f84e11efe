"""An exported folder's tokenizer and chat template without transformers.

``FolderTokenizer.open(folder)`` reads ``tokenizer.json`` with the ``tokenizers`` library and
``tokenizer_config.json`` / ``chat_template.jinja`` as transformers 5 saves them, and does
what regap-export's adapters ask of a transformers tokenizer: render the chat template
(``render_chat``: transformers' Jinja environment), encode one prompt (``encode``: the same
BOS rule as ``ModelAdapter.encode``) and decode the reply (``decode``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..io.artifacts import read_json
from ..errors import ArtifactError, RegapError, first_line

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named special tokens a chat template sees.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def saved_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The chat template transformers would load from ``folder``: ``chat_template.jinja``,
    else ``chat_template.json``, else the tokenizer config's (its ``default`` when named)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template: Any = None
    if (folder / "chat_template.json").is_file():
        template = read_json(folder / "chat_template.json", what="chat_template.json").get("chat_template")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates, as tokenizer_config.json stores them
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def _compile(template: str):
    """transformers' chat template environment (``utils.chat_template_utils``): a sandbox
    with trim_blocks/lstrip_blocks, loop controls, ``raise_exception``, ``strftime_now``,
    a ``tojson`` that does not escape HTML, and ``{% generation %}`` blocks rendered as is."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(Extension):
        # transformers tracks assistant spans here; a reply only needs the text.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = dict
    return env.from_string(template)


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (WordPiece-style spaces before punctuation)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


@dataclass
class FolderTokenizer:
    folder: Path
    backend: Any                                  # tokenizers.Tokenizer
    config: dict[str, Any]                        # tokenizer_config.json
    chat_template: str | None
    special_tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path) -> "FolderTokenizer":
        from tokenizers import Tokenizer, processors

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError("the tokenizer is missing", path=path, hint="re-run export")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception type for every parse failure
            raise ArtifactError(f"the tokenizer cannot be loaded ({first_line(exc)})", path=path,
                                hint="re-run export") from None
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path, what="tokenizer_config.json") if config_path.is_file() else {}
        special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        special = {name: text for name, text in special.items() if text is not None}
        out = cls(folder=folder, backend=backend, config=config,
                  chat_template=saved_chat_template(folder, config), special_tokens=special)
        # transformers rebuilds the post-processor from add_bos_token / add_eos_token when the
        # config sets either (or the file has none): BOS/EOS around every encoded text.
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            bos, eos = special.get("bos_token"), special.get("eos_token")
            add_bos = bool(config.get("add_bos_token")) and bos is not None
            add_eos = bool(config.get("add_eos_token")) and eos is not None
            single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
            pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
            tokens = ([(bos, backend.token_to_id(bos))] if add_bos else []) + \
                     ([(eos, backend.token_to_id(eos))] if add_eos else [])
            backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)
        return out

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def render_chat(self, messages: list[dict[str, Any]], *, fallback_template: str | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The rendered prompt, as ``apply_chat_template(messages, tokenize=False)`` gives it."""
        import jinja2

        template = self.chat_template if self.chat_template is not None else fallback_template
        if template is None:
            raise ArtifactError("the tokenizer has no chat template", path=self.folder / "tokenizer_config.json",
                                hint="re-run export")
        try:
            return _compile(template).render(messages=messages, tools=None, documents=None,
                                             add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise RegapError(f"the chat template refuses this prompt ({exc})", field="--prompt") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of one rendered prompt. Same rule as ``ModelAdapter.encode``: the
        tokenizer's special tokens (a BOS) are added unless the prompt already starts with BOS."""
        bos = self.special_tokens.get("bos_token")
        add_special = not (bos and text.startswith(bos))
        return list(self.backend.encode(text, add_special_tokens=add_special).ids)

    def decode(self, ids: list[int]) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
        if self.config.get("clean_up_tokenization_spaces") and type(self.backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text
