"""An exported folder's tokenizer and chat template without transformers, and the rule every
prompt path follows for the user's text.

``FolderTokenizer.open(folder)`` reads ``tokenizer.json`` with the ``tokenizers`` library and
``tokenizer_config.json`` / ``chat_template.jinja`` as transformers 5 saves them, and does
what regap-export's adapters ask of a transformers tokenizer: render the chat template
(``render_chat``: transformers' sandboxed Jinja environment, with a bound on the work a
template may do), encode one prompt (``encode``: the same BOS rule as ``ModelAdapter.encode``)
and decode the reply (``decode``).

User text is text. Control tokens (the tokenizer's special tokens, the added tokens the chat
template writes, the image token) come only from the chat template, never from what a user
typed: a message or instruction that spells ``<|im_end|><|im_start|>system`` or ``<image>``
is encoded as those characters. The same steps run in the runtime (``FolderTokenizer``) and
on transformers tokenizers and processors (``ModelAdapter.render_prompt`` / ``encode``), so
every path gives the same ids:

1. ``mark_control_tokens``: before rendering, each control token in the user's text is wrapped
   in two private-use markers (the ones transformers' ``sanitize_control_tokens`` uses);
   markers already in the text are dropped.
2. ``protect``: after rendering, each marked token is replaced by a placeholder, a special
   token of the tokenizer that the prompt does not otherwise hold, so the image expansion and
   the tokenizer never see the typed token.
3. ``splice``: after encoding, each placeholder id is replaced by the typed token's ids as
   plain text (no added token matched, ``PlainTextEncoder``).

Text without control tokens is untouched by all three steps.
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from ..io.artifacts import read_json
from ..errors import ArtifactError, ModelError, RegapError, first_line

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
    from ..io.files import read_regular_bytes

    jinja = folder / "chat_template.jinja"
    if jinja.exists() or jinja.is_symlink():
        raw = read_regular_bytes(jinja, limit=MAX_TEMPLATE_FILE_BYTES, what="the chat template", error=ArtifactError,
                                 hint="re-run export")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ArtifactError("the chat template is not UTF-8 text", path=jinja, hint="re-run export") from None
    template: Any = None
    if (folder / "chat_template.json").exists():
        template = read_json(folder / "chat_template.json", what="chat_template.json").get("chat_template")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates, as tokenizer_config.json stores them
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


# -- user text is text --------------------------------------------------------------------
# transformers' markers (utils.chat_template_utils._CONTROL_TOKEN_START / _END): private use.
CONTROL_START, CONTROL_END = "\U000f0000", "\U000f0001"


def template_literal_text(template: str | None) -> str:
    """The literal strings of a chat template (its text and string constants), joined with NUL
    so that no search matches across two of them (transformers' ``_get_template_literal_text``)."""
    if not template:
        return ""
    import jinja2
    import jinja2.nodes

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.exceptions.TemplateError:
        return template  # the template will fail to render anyway; its text is what it holds
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(sorted(literals))


def control_tokens_of(added: Mapping[str, bool], template: str | None, extra: Iterable[str | None] = ()
                      ) -> tuple[str, ...]:
    """The tokens user text may not produce: every special added token, every added token the
    template writes literally (whitespace ones excepted, as transformers does), and ``extra``
    (a family's image token). ``added``: content -> special. Longest first."""
    literal = template_literal_text(template)
    tokens = {content for content, special in added.items()
              if special or (content in literal and not content.isspace())}
    tokens |= {t for t in extra if t}
    return tuple(sorted(tokens, key=lambda t: (-len(t), t)))


def mark_control_tokens(text: str, tokens: Sequence[str]) -> str:
    """``text`` with every control token wrapped in the markers (markers already in it dropped)."""
    text = text.replace(CONTROL_START, "").replace(CONTROL_END, "")
    if not tokens:
        return text
    return _token_pattern(tuple(tokens)).sub(lambda m: f"{CONTROL_START}{m.group(0)}{CONTROL_END}", text)


def _token_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in tokens) or "(?!)")


# A marked token, or a lone marker (a template's string method cut a pair apart).
_MARKED = re.compile(f"{CONTROL_START}([^{CONTROL_START}{CONTROL_END}]*){CONTROL_END}|[{CONTROL_START}{CONTROL_END}]")


def has_marks(text: str) -> bool:
    return CONTROL_START in text or CONTROL_END in text


@dataclass(frozen=True)
class ProtectedText:
    """A rendered prompt whose typed control tokens are replaced by ``placeholder``; ``pieces``
    holds the typed text each placeholder stands for, in order (an empty piece is a break
    where a template cut a marker from its token)."""

    text: str
    pieces: tuple[str, ...] = ()
    placeholder: str = ""


def protect(rendered: str, placeholder: str) -> ProtectedText:
    pieces: list[str] = []

    def replace(match: re.Match) -> str:
        pieces.append(match.group(1) or "")
        return placeholder

    text = _MARKED.sub(replace, rendered)
    return ProtectedText(text, tuple(pieces), placeholder)


class Misaligned(Exception):
    """The placeholder token also came from elsewhere (an image expansion): choose another."""


@dataclass(frozen=True)
class SplicedRow:
    ids: list[int]
    sources: list[int]  # per id: its position in the encoded row, or -1 for a typed token's plain-text id


def splice(ids: Sequence[int], placeholder_id: int, pieces: Sequence[Sequence[int]]) -> SplicedRow:
    """``ids`` with the i-th ``placeholder_id`` replaced by ``pieces[i]``."""
    positions = [i for i, token in enumerate(ids) if int(token) == placeholder_id]
    if len(positions) != len(pieces):
        raise Misaligned(f"{len(positions)} placeholders for {len(pieces)} pieces")
    out: list[int] = []
    sources: list[int] = []
    start = 0
    for position, piece in zip(positions, pieces):
        out += [int(t) for t in ids[start:position]] + [int(t) for t in piece]
        sources += list(range(start, position)) + [-1] * len(piece)
        start = position + 1
    out += [int(t) for t in ids[start:]]
    sources += list(range(start, len(ids)))
    return SplicedRow(out, sources)


def placeholder_candidates(added: Mapping[str, tuple[int, bool]], avoid: Iterable[str]) -> list[tuple[str, int]]:
    """Special added tokens that may stand in for typed text: not whitespace, not one the
    template or the processor is known to write (``avoid``). Later (rarer) ids first."""
    avoid = set(avoid)
    found = [(content, token_id) for content, (token_id, special) in added.items()
             if special and content not in avoid and content.strip() and not has_marks(content)]
    return sorted(found, key=lambda item: -item[1])


def encode_protected(rendered: str | Sequence[str], candidates: Sequence[tuple[str, int]],
                     encode: Callable[[list[ProtectedText]], Any], ids_of: Callable[[Any], list[list[int]]],
                     plain: Callable[[str], list[int]], where: str | Path | None = None
                     ) -> tuple[Any, list[SplicedRow] | None]:
    """Encode rendered prompts whose typed control tokens were marked (``mark_control_tokens``):
    ``encode`` gets the protected texts (placeholders in place of typed tokens) and returns its
    result; ``ids_of`` gives each row's ids (unpadded) of that result. Returns (the result,
    the spliced rows), or (the result, None) when no prompt holds a typed control token (the
    result is then the final encoding)."""
    texts = [rendered] if isinstance(rendered, str) else list(rendered)
    if not any(has_marks(t) for t in texts):
        return encode([ProtectedText(t) for t in texts]), None
    for placeholder, placeholder_id in candidates:
        if any(placeholder in t for t in texts):
            continue
        protected = [protect(t, placeholder) for t in texts]
        result = encode(protected)
        try:
            rows = [splice(row, placeholder_id, [plain(piece) for piece in p.pieces])
                    for row, p in zip(ids_of(result), protected)]
        except Misaligned:
            continue
        return result, rows
    raise ModelError("the tokenizer has no spare special token to keep typed control tokens as text",
                     path=where, hint="remove the control tokens from the text")


class PlainTextEncoder:
    """Encodes text as plain text: no added token (special or not) is matched, as transformers'
    ``split_special_tokens`` does for special ones. A copy of the tokenizer with every added
    token marked special and ``encode_special_tokens`` on; a piece is encoded after a newline
    that is then removed, so a SentencePiece tokenizer adds no word-start space (the piece
    follows a token mid-prompt; transformers' ``_encode_chat_piece``)."""

    def __init__(self, backend: Any):
        from tokenizers import Tokenizer

        data = json.loads(backend.to_str())
        for token in data.get("added_tokens") or []:
            token["special"] = True
        self.backend = Tokenizer.from_str(json.dumps(data))
        self.backend.encode_special_tokens = True
        self._newline = self._ids("\n")

    def _ids(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def __call__(self, piece: str) -> list[int]:
        if not piece:
            return []
        ids = self._ids("\n" + piece)
        if ids[: len(self._newline)] == self._newline:
            return ids[len(self._newline):]
        return self._ids(piece)


def added_tokens_of(backend: Any) -> dict[str, tuple[int, bool]]:
    """content -> (id, special) of a ``tokenizers.Tokenizer``'s added tokens."""
    return {token.content: (int(token_id), bool(token.special))
            for token_id, token in backend.get_added_tokens_decoder().items()}


# -- chat templates: transformers' sandbox, with a bound on the work ----------------------------
MAX_TEMPLATE_STEPS = 200_000          # lines of template code run (a loop that does not end); a chat of
                                      # a hundred messages runs a few thousand
MAX_TEMPLATE_SECONDS = 5.0
MAX_TEMPLATE_CHARS = 16_000_000       # the rendered prompt, and any string or list the template builds
MAX_TEMPLATE_INT_ARGUMENT = 100_000   # an integer passed to a call (jinja2's sandbox caps range() so)


class TemplateBudgetExceeded(Exception):
    pass


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check_size(value: Any) -> Any:
    if _size(value) > MAX_TEMPLATE_CHARS:
        raise TemplateBudgetExceeded(f"it built a value of more than {MAX_TEMPLATE_CHARS:,d} items")
    return value


def _check_frame(frame: Any) -> None:
    from jinja2.utils import Namespace

    for value in frame.f_locals.values():
        _check_size(value)
        if isinstance(value, Namespace):
            for inner in value._Namespace__attrs.values():  # noqa: SLF001 (jinja2 keeps them here)
                _check_size(inner)


@contextlib.contextmanager
def _bounded_work() -> Iterator[None]:
    """Stop a template's code after ``MAX_TEMPLATE_STEPS`` lines or ``MAX_TEMPLATE_SECONDS``, or
    when a value it holds grows past ``MAX_TEMPLATE_CHARS`` (checked on every template line).
    Only frames of compiled templates are traced."""
    deadline = time.monotonic() + MAX_TEMPLATE_SECONDS
    steps = [0]

    def local(frame, event, arg):
        if event == "line":
            steps[0] += 1
            if steps[0] > MAX_TEMPLATE_STEPS:
                raise TemplateBudgetExceeded(f"it ran more than {MAX_TEMPLATE_STEPS:,d} steps (a loop that does not end?)")
            if steps[0] % 256 == 0 and time.monotonic() > deadline:
                raise TemplateBudgetExceeded(f"it ran longer than {MAX_TEMPLATE_SECONDS:g} s")
            _check_frame(frame)
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        yield
    finally:
        sys.settrace(previous)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """transformers' chat template environment (``utils.chat_template_utils``): a sandbox
    with trim_blocks/lstrip_blocks, loop controls, ``raise_exception``, ``strftime_now``,
    a ``tojson`` that does not escape HTML, and ``{% generation %}`` blocks rendered as is;
    plus bounds on what one operation may build (``+``, ``*``, ``**`` and the integers given to
    calls), so that a template from someone else cannot take the machine's memory."""
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

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["+", "*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise TemplateBudgetExceeded(f"an exponent of {right}")
            if operator == "*":
                for sequence, count in ((left, right), (right, left)):
                    if _size(sequence) and isinstance(count, int) and _size(sequence) * count > MAX_TEMPLATE_CHARS:
                        raise TemplateBudgetExceeded(f"it built a value of more than {MAX_TEMPLATE_CHARS:,d} items")
            if operator == "+" and _size(left) + _size(right) > MAX_TEMPLATE_CHARS:
                raise TemplateBudgetExceeded(f"it built a value of more than {MAX_TEMPLATE_CHARS:,d} items")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            for value in (*args, *kwargs.values()):
                if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEMPLATE_INT_ARGUMENT:
                    raise TemplateBudgetExceeded(f"a call with the number {value}")
            return _check_size(super().call(__context, __obj, *args, **kwargs))

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = dict
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict[str, Any]], *, special_tokens: Mapping[str, str],
                         add_generation_prompt: bool = True, path: str | Path | None = None) -> str:
    """The rendered prompt, as transformers' ``apply_chat_template(messages, tokenize=False)``
    gives it, in a sandbox with bounded work (``MAX_TEMPLATE_*``): a template that loops without
    end or builds a huge value is stopped with one line naming ``path``."""
    import jinja2

    hint = "the chat template comes with the model folder; check it or use another model"
    try:
        compiled = _compile(template)
    except jinja2.exceptions.TemplateError as exc:
        raise ArtifactError(f"the chat template cannot be read ({first_line(exc)})", path=path, hint=hint) from None
    parts: list[str] = []
    total = 0
    try:
        with _bounded_work():
            for part in compiled.generate(messages=messages, tools=None, documents=None,
                                          add_generation_prompt=add_generation_prompt, **special_tokens):
                total += len(part)
                if total > MAX_TEMPLATE_CHARS:
                    raise TemplateBudgetExceeded(f"it wrote more than {MAX_TEMPLATE_CHARS:,d} characters")
                parts.append(part)
    except TemplateBudgetExceeded as exc:
        raise ArtifactError(f"the chat template was stopped: {exc}", path=path, hint=hint) from None
    except jinja2.exceptions.SecurityError as exc:
        raise ArtifactError(f"the chat template tried an unsafe operation ({first_line(exc)})", path=path,
                            hint=hint) from None
    except jinja2.exceptions.TemplateError as exc:
        raise RegapError(f"the chat template refuses this prompt ({first_line(exc)})", path=path,
                         field="--prompt") from None
    except (RecursionError, MemoryError, OverflowError, TypeError, ValueError, ArithmeticError, LookupError,
            AttributeError) as exc:
        raise ArtifactError(f"the chat template failed ({type(exc).__name__}: {first_line(exc)})", path=path,
                            hint=hint) from None
    return "".join(parts)


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (WordPiece-style spaces before punctuation)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


MAX_TOKENIZER_BYTES = 1 << 30
MAX_TEMPLATE_FILE_BYTES = 4 << 20


@dataclass
class FolderTokenizer:
    folder: Path
    backend: Any                                  # tokenizers.Tokenizer
    config: dict[str, Any]                        # tokenizer_config.json
    chat_template: str | None
    special_tokens: dict[str, str] = field(default_factory=dict)
    _plain: PlainTextEncoder | None = field(default=None, repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> "FolderTokenizer":
        from tokenizers import Tokenizer, processors

        from ..io.files import check_regular_file

        folder = Path(folder)
        path = folder / "tokenizer.json"
        size = check_regular_file(path, what="the tokenizer", error=ArtifactError, hint="re-run export",
                                  missing="the tokenizer is missing")
        if size > MAX_TOKENIZER_BYTES:
            raise ArtifactError("the tokenizer is larger than 1 GB", path=path, hint="re-run export")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception type for every parse failure
            raise ArtifactError(f"the tokenizer cannot be loaded ({first_line(exc)})", path=path,
                                hint="re-run export") from None
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path, what="tokenizer_config.json") if config_path.exists() else {}
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

    def template(self, fallback_template: str | None = None) -> str:
        template = self.chat_template if self.chat_template is not None else fallback_template
        if template is None:
            raise ArtifactError("the tokenizer has no chat template", path=self.folder / "tokenizer_config.json",
                                hint="re-run export")
        return template

    def control_tokens(self, fallback_template: str | None = None, extra: Iterable[str | None] = ()) -> tuple[str, ...]:
        """The tokens a user's text may not produce (``control_tokens_of``)."""
        added = {content: special for content, (_, special) in added_tokens_of(self.backend).items()}
        return control_tokens_of(added, self.template(fallback_template), extra)

    def placeholders(self, fallback_template: str | None = None, extra: Iterable[str | None] = ()
                     ) -> list[tuple[str, int]]:
        literal = template_literal_text(self.template(fallback_template))
        added = added_tokens_of(self.backend)
        avoid = {c for c in added if c in literal} | set(self.special_tokens.values()) | {t for t in extra if t}
        return placeholder_candidates(added, avoid)

    def plain(self, piece: str) -> list[int]:
        """``piece`` as plain text (``PlainTextEncoder``)."""
        if self._plain is None:
            self._plain = PlainTextEncoder(self.backend)
        return self._plain(piece)

    def render_chat(self, messages: list[dict[str, Any]], *, fallback_template: str | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The rendered prompt, as ``apply_chat_template(messages, tokenize=False)`` gives it
        (``render_chat_template``: sandboxed, bounded)."""
        where = self.folder / ("chat_template.jinja" if (self.folder / "chat_template.jinja").exists()
                               else "tokenizer_config.json")
        return render_chat_template(self.template(fallback_template), messages, special_tokens=self.special_tokens,
                                    add_generation_prompt=add_generation_prompt, path=where)

    def encode(self, text: str) -> list[int]:
        """Token ids of one rendered prompt. Same rule as ``ModelAdapter.encode``: the
        tokenizer's special tokens (a BOS) are added unless the prompt already starts with BOS.
        The text is encoded as it is: typed control tokens are kept as text by the caller
        (``encode_protected``)."""
        bos = self.special_tokens.get("bos_token")
        add_special = not (bos and text.startswith(bos))
        return list(self.backend.encode(text, add_special_tokens=add_special).ids)

    def decode(self, ids: list[int]) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
        if self.config.get("clean_up_tokenization_spaces") and type(self.backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text
