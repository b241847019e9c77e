"""A loaded model as the layers above it see it: the network, its tokenizer and what follows from the two.

The request core, the engine and the API take this handle (`trimode.api.TriMode` is one, with the user methods on
top), so nothing below the API needs the API.
"""

from __future__ import annotations

from pathlib import Path

from trimode.model.config import NLDConfig
from trimode.model.tokenizer import NLDTokenizer
from trimode.model.transformer import NLDTransformer


class ModelHandle:
    """A loaded NLD model: network, optional tokenizer (None: token ids only) and the directory it came from."""

    def __init__(self, net: NLDTransformer, tokenizer: NLDTokenizer | None = None, path: Path | None = None) -> None:
        self.net = net
        self.tokenizer = tokenizer
        self.path = path

    @property
    def config(self) -> NLDConfig:
        return self.net.config

    @property
    def has_drafter(self) -> bool:
        """Whether the linear_spec drafter adapter (LoRA) is loaded."""
        return self.net.encoder.layers[0].self_attn.o_proj.lora_A is not None

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None

    def eos_ids(self, eos_token_id: int | None = None) -> frozenset[int]:
        """The tokens that end a generation: `eos_token_id`, else the config's EOS and the tokenizer's EOS/EOT."""
        ids = {self.config.eos_token_id if eos_token_id is None else eos_token_id}
        if self.tokenizer is not None and eos_token_id is None:
            for name in ("eos_token", "eot_token"):
                tok = self.tokenizer.config.get(name)
                if isinstance(tok, str) and (tid := self.tokenizer.token_id(tok)) is not None:
                    ids.add(tid)
        return frozenset(i for i in ids if i >= 0)
