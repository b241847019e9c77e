"""The Python API: `trimode.load(...)` and `TriMode.generate(prompt, mode=...)`.

    import trimode
    tm = trimode.load()                                   # the bundled default model
    r = tm.generate("def add(a, b):", mode="linear_spec", max_new_tokens=64)
    r.text, r.token_ids, r.stats.forward_passes, r.stats.tokens_per_forward

Modes: `ar`, `diffusion`, `linear_spec`, `quadratic_spec` (see `trimode/decode/`). `stream(...)` yields the
same generation as events (committed text deltas, optional provisional diffusion blocks) and can be
abandoned at any point, which stops the work.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from trimode.decode.ar import ar_decode
from trimode.decode.diffusion import diffusion_decode
from trimode.decode.linear_spec import linear_spec_decode
from trimode.decode.quadratic_spec import quadratic_spec_decode
from trimode.decode.sampling import SamplingParams
from trimode.decode.stats import DecodeStats, DecodeStream, Provisional
from trimode.decode.stopping import StopRule, ThinkingBudget
from trimode.model.config import CheckpointError
from trimode.model.loading import LORA_DIR, load_lora, load_model, resolve_checkpoint
from trimode.model.tokenizer import NLDTokenizer
from trimode.model.transformer import NLDTransformer

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")


def default_model_path() -> Path:
    return Path(str(resources.files("trimode") / "data" / "default_model"))


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    stats: DecodeStats
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    mode: str = "ar"
    knobs: dict = field(default_factory=dict)


@dataclass
class Delta:
    """Newly committed tokens and their text."""

    token_ids: list[int]
    text: str


@dataclass
class BlockState:
    """A provisional view of the diffusion block being denoised (mask slots shown as None)."""

    token_ids: list[int | None]
    text: str


class TriMode:
    """A loaded NLD model (network + optional tokenizer and drafter adapter)."""

    def __init__(self, net: NLDTransformer, tokenizer: NLDTokenizer | None = None, path: Path | None = None) -> None:
        self.net = net
        self.tokenizer = tokenizer
        self.path = path
        self.config = net.config

    @property
    def has_drafter(self) -> bool:
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
        ids = {self.config.eos_token_id if eos_token_id is None else eos_token_id}
        if self.tokenizer is not None and eos_token_id is None:
            for name in ("eos_token", "eot_token"):
                tok = self.tokenizer.config.get(name)
                if isinstance(tok, str) and (tid := self.tokenizer.token_id(tok)) is not None:
                    ids.add(tid)
        return frozenset(i for i in ids if i >= 0)

    def knobs_for(self, mode: str, **given) -> dict:
        """The effective knobs of `mode`: given values, else the model's defaults."""
        k = {key: v for key, v in given.items() if v is not None}
        if mode in ("diffusion", "linear_spec", "quadratic_spec"):
            k.setdefault("block_length", self.config.block_size)
            if k["block_length"] < (2 if mode != "diffusion" else 1):
                raise ValueError(f"block_length {k['block_length']} is too small for {mode}")
        if mode == "diffusion":
            if "steps" in k:  # a step count selects the fixed-step schedule
                if "threshold" in k:
                    raise ValueError("give either threshold or steps for diffusion, not both")
                if k["steps"] < 1:
                    raise ValueError(f"steps must be >= 1, got {k['steps']}")
                k["threshold"] = None
            k.setdefault("threshold", 0.9)
            k.setdefault("causal_context", True)
        if mode == "linear_spec":
            k.setdefault("threshold", 0.0)
            k.setdefault("use_drafter", self.has_drafter)
            if k["use_drafter"] and not self.has_drafter:
                raise ValueError("use_drafter=True but this model has no linear_spec_lora adapter loaded")
        th = k.get("threshold")
        if th is not None and not 0 <= th <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {th}")
        return k

    def _decoder(self, mode, ids, stop, sampling, thinking, knobs, provisional) -> DecodeStream:
        net = self.net
        if mode == "ar":
            return ar_decode(net, ids, stop, sampling, thinking)
        if mode == "diffusion":
            return diffusion_decode(net, ids, stop, sampling, knobs["block_length"], knobs["threshold"],
                                    knobs["causal_context"], thinking, provisional, knobs.get("steps"))
        if mode == "linear_spec":
            return linear_spec_decode(net, ids, stop, sampling, knobs["block_length"], knobs["threshold"],
                                      knobs["use_drafter"], thinking)
        if mode == "quadratic_spec":
            return quadratic_spec_decode(net, ids, stop, sampling, knobs["block_length"], knobs.get("ar_mix_weight"),
                                         thinking)
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")

    def stream(
        self,
        prompt: str | list[int],
        mode: str = "ar",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
        eos_token_id: int | None = None,
        max_thinking_tokens: int | None = None,
        end_think_token_id: int | None = None,
        provisional: bool = False,
        block_length: int | None = None,
        threshold: float | None = None,
        causal_context: bool | None = None,
        steps: int | None = None,
        use_drafter: bool | None = None,
        ar_mix_weight: float | None = None,
    ) -> Generator[Delta | BlockState, None, GenerationResult]:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        knobs = self.knobs_for(mode, block_length=block_length, threshold=threshold, causal_context=causal_context,
                               steps=steps, use_drafter=use_drafter, ar_mix_weight=ar_mix_weight)
        prompt_ids = self.encode(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt_ids) + max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                f"length {self.max_context}"
            )
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        sampling = SamplingParams(temperature, top_p, top_k, seed).with_seed()
        thinking = None
        if max_thinking_tokens is not None:
            if end_think_token_id is None:
                end_think_token_id = self.tokenizer.token_id("</think>") if self.tokenizer else None
            if end_think_token_id is None:
                raise ValueError("max_thinking_tokens needs end_think_token_id (no </think> token in the vocabulary)")
            thinking = ThinkingBudget(max_thinking_tokens, end_think_token_id)
        rule = StopRule(max_new_tokens, self.eos_ids(eos_token_id))
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.net.device)
        decoder = self._decoder(mode, ids, rule, sampling, thinking, knobs, provisional)

        out: list[int] = []
        text = ""
        finish = "length"
        stats = DecodeStats(mode)
        t0 = time.perf_counter()
        try:
            for event in decoder:
                if isinstance(event, Provisional):
                    block = [None if t == self.config.mask_token_id else t for t in event.block[0]]
                    yield BlockState(block, self.decode([t for t in block if t is not None]) or "")
                    continue
                stats = event.stats
                new, over = rule.finish(out + event.tokens[0])
                new = new[len(out) :]
                out += new
                if rule.first_eos(out) is not None:
                    finish = "stop"
                full = self.decode(out)
                cut = _find_stop(full, stop) if full is not None and stop else None
                if cut is not None:
                    finish, over = "stop", True
                    full = full[:cut]
                elif full is not None and not over:
                    # Hold back text that may begin a stop string or end in an incomplete character.
                    full = full[: len(text) + _safe_len(full[len(text) :], stop)]
                if new or (full is not None and len(full) > len(text)):
                    delta = full[len(text) :] if full is not None else ""
                    text = full if full is not None else text
                    yield Delta(new, delta)
                if over:
                    break
            final = self.decode(out)
            if final is not None:
                cut = _find_stop(final, stop) if stop else None
                final = final[:cut] if cut is not None else final
                if len(final) > len(text):
                    yield Delta([], final[len(text) :])
                    text = final
        finally:
            decoder.close()  # abandoning the stream (client gone, stop string) ends the decode here
        stats.mode, stats.prompt_tokens, stats.generated_tokens = mode, len(prompt_ids), len(out)
        stats.seconds = time.perf_counter() - t0
        return GenerationResult(out, text if self.tokenizer else None, stats, finish, mode, knobs)

    def generate(self, prompt: str | list[int], mode: str = "ar", **kwargs) -> GenerationResult:
        """Generate for one prompt (text or token ids); see `stream` for the keyword arguments."""
        gen = self.stream(prompt, mode=mode, **kwargs)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                return done.value


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _safe_len(delta: str, stops: list[str] | None) -> int:
    """Length of the part of `delta` that can be shown now."""
    n = len(delta.rstrip("\ufffd"))
    for s in stops or []:
        for k in range(min(len(s) - 1, n), 0, -1):
            if delta[:n].endswith(s[:k]):
                n -= k
                break
    return n


def load(
    path_or_repo: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    lora: bool | str | Path = True,
    revision: str | None = None,
) -> TriMode:
    """Load an NLD checkpoint directory or Hub repo id (default: the bundled small model).

    dtype: "float32" / "bfloat16" / "float16" or a torch dtype; default float32 on CPU, bfloat16 on CUDA.
    lora: True loads `linear_spec_lora/` when present, False skips it, a path loads that adapter directory.
    """
    if path_or_repo is None:
        path_or_repo = default_model_path()
        if not (Path(path_or_repo) / "config.json").is_file():
            raise CheckpointError(f"the bundled default model is missing from {path_or_repo}; name a model")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        try:
            dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                     "float64": torch.float64}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}") from None
    ckpt = resolve_checkpoint(path_or_repo, revision=revision)
    net = load_model(ckpt, dtype=dtype, device=device)
    if lora is True:
        if (ckpt / LORA_DIR / "adapter_config.json").is_file():
            load_lora(net, ckpt / LORA_DIR)
    elif lora:
        load_lora(net, Path(lora))
    return TriMode(net, NLDTokenizer.from_dir(ckpt), ckpt)
