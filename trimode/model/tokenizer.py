"""The checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` library, plus the chat template.

The chat template (Jinja, from `tokenizer_config.json` or `chat_template.jinja`) is rendered in an immutable
sandboxed environment: a checkpoint's template cannot reach Python objects or the file system.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from trimode.model.config import CheckpointError


class TemplateError(ValueError):
    """The chat template failed to render the given messages."""


def _raise(message: str):
    raise TemplateError(message)


class NLDTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict | None = None, chat_template: str | None = None) -> None:
        self.tok = tokenizer
        self.config = config or {}
        self.chat_template = chat_template or self.config.get("chat_template")
        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._env.globals["raise_exception"] = _raise

    @classmethod
    def from_dir(cls, path: Path) -> NLDTokenizer | None:
        """The tokenizer in `path`, or None when the checkpoint ships none."""
        tj = path / "tokenizer.json"
        if not tj.is_file():
            return None
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as e:
            raise CheckpointError(f"{tj} is not a valid tokenizers file: {e}") from None
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else None
        return cls(tok, cfg, template)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text` and each one's character range in it. The byte tokens of one character (byte-level
        BPE splits a character it has no token for) all have that character's range."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for (a byte-level token's text is at most its
        vocabulary entry, one character per byte; an added token's is its content): a text longer than
        `n * max_token_chars` cannot fit in n tokens."""
        return max((len(k) for k in self.tok.get_vocab(with_added_tokens=True)), default=1)

    @cached_property
    def token_texts(self) -> list[str]:
        """The text of every token id alone (special tokens: empty)."""
        return self.tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=True)

    def heal_trailing_space(self, ids: list[int]) -> tuple[list[int], str, list[int]] | None:
        """Token healing for text cut after a space, as a caller cuts a prefix before a hole ("a b " | "c").

        Byte-level BPE writes a word with the space before it as one token (" c"), so a cut text that ends in a
        space ends in a token of its own, which the model rarely saw before a word. Healing backs up over that
        token: returns (the ids without it, its text, the ids whose text starts with that text, which the first
        written token must be one of), or None when the ids do not end in a token of spaces only, or that token
        is all they are. A newline is never healed: pre-tokenizers split there, so it ends tokens anyway."""
        if len(ids) < 2 or not 0 <= ids[-1] < self.vocab_size:
            return None
        texts = self.token_texts
        last = texts[ids[-1]]
        if not last or last.strip(" ") != "":
            return None
        allowed = [i for i, t in enumerate(texts) if t.startswith(last)]
        return (ids[:-1], last, allowed) if len(allowed) > 1 else None

    @cached_property
    def _text_only(self) -> Tokenizer:
        """A copy that reads special-token text ("</s>", "<|user|>") as plain text: for text a user wrote."""
        tok = Tokenizer.from_str(self.tok.to_str())
        tok.encode_special_tokens = True
        return tok

    @cached_property
    def _specials(self) -> re.Pattern | None:
        names = sorted((t.content for t in self.tok.get_added_tokens_decoder().values() if t.special), key=len,
                       reverse=True)
        return re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    @property
    def knows_tools(self) -> bool:
        """Whether the chat template renders `tools`, `tool_calls` and `role: "tool"` itself."""
        return bool(self.chat_template) and "tools" in self.chat_template

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """The ids of the rendered chat template, where only the template's own text can make special tokens.

        A message's content is text: "</s>" or "<|assistant|>" typed into it is encoded as those characters,
        never as the EOS or role marker ids. The template is rendered with a placeholder for each content; the
        rendered text is cut at the placeholders and at the template's special tokens, and every run of text
        between special tokens (template text and contents alike) is encoded with special-token parsing off. A
        message without special-token text gets exactly the ids of `encode(apply_chat_template(...))`: the
        tokenizer also encodes the text between special tokens run by run."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        masked = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        rendered = self.apply_chat_template(masked, add_generation_prompt, tools)
        parts = re.split("\ue000(\\d+)\ue001", rendered)
        if len(parts) != 2 * len(messages) + 1 or parts[1::2] != [str(i) for i in range(len(messages))]:
            raise TemplateError("the chat template changes or repeats message contents; it cannot be encoded "
                                "with the contents as plain text")
        ids: list[int] = []
        run = ""  # text since the last special token
        for k, part in enumerate(parts):
            if k % 2:  # a message's content: text only
                run += messages[k // 2].get("content") or ""
                continue
            pieces = self._specials.split(part) if self._specials is not None else [part]
            for j, piece in enumerate(pieces):
                if j % 2:  # a special token the template wrote
                    ids += self._text_only.encode(run, add_special_tokens=False).ids if run else []
                    ids.append(self.tok.token_to_id(piece))
                    run = ""
                else:
                    run += piece
        if run:
            ids += self._text_only.encode(run, add_special_tokens=False).ids
        return ids

    @property
    def _template(self):
        """The chat template, compiled once per text (compiling costs far more than rendering)."""
        cached = getattr(self, "_compiled", None)
        if cached is None or cached[0] != self.chat_template:
            cached = self._compiled = (self.chat_template, self._env.from_string(self.chat_template))
        return cached[1]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The template rendered; `tools` (OpenAI tool dicts) only for a template that `knows_tools`."""
        if not self.chat_template:
            raise TemplateError("this checkpoint has no chat template; use a completion instead")
        try:
            template = self._template
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools or None,
                bos_token=self.config.get("bos_token", ""),
                eos_token=self.config.get("eos_token", ""),
            )
        except TemplateError:
            raise
        except Exception as e:
            raise TemplateError(f"chat template failed: {e}") from None
