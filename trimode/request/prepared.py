"""A validated request (`Prepared`) and its preparation from a prompt, a mode and the request's settings.

`prepare` (a continuation in one of the modes) and `prepare_edit` (an edit's block, built by `trimode.request.edits`)
check everything a request carries and raise ValueError naming the field; what they return runs as it is: the
batch-1 driver (the API facade, `TriMode.drive`) and the engine both build its step machine (`Prepared.machine`)
and its output (`Prepared.output`) from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.decode.grammar import CompiledConstraint, Constraint, compile_constraint, constraint_of
from trimode.decode.modes import ModelDefaults, mode_spec, resolve_knobs
from trimode.decode.sampling import SamplingParams
from trimode.decode.step import Machine
from trimode.decode.stopping import StopRule, ThinkingBudget
from trimode.model.handle import ModelHandle
from trimode.request.edit_plan import EditPlan
from trimode.request.output import EditOutput, TextOutput


@dataclass
class Prepared:
    """A validated request: its prompt ids, stop rule, sampling, thinking budget and effective knobs; for an edit,
    its plan (the block and how the filled block is shown)."""

    prompt_ids: list[int]
    mode: str
    knobs: object
    rule: StopRule
    sampling: SamplingParams
    thinking: ThinkingBudget | None
    stop: list[str] | None
    edit: EditPlan | None = None
    constraint: CompiledConstraint | None = None  # what the output must match (decode/grammar.py)

    @property
    def knob_dict(self) -> dict:
        return {k: getattr(self.knobs, k) for k in mode_spec(self.mode).knob_names}

    def kv_slots(self) -> int:
        return mode_spec(self.mode).kv_slots(len(self.prompt_ids), self.rule.max_new_tokens, self.knobs)

    def machine(self, model: ModelHandle, provisional: bool = False, steer=None) -> Machine:
        """The step machine of this request (one sequence). Its tensors live on the host: the drivers move what
        a forward needs to the model's device, and the decision stage returns host tensors."""
        ids = torch.tensor([self.prompt_ids], dtype=torch.long)
        grammar = None if self.constraint is None else self.constraint.matcher(self.thinking)
        return mode_spec(self.mode).machine(ids, self.rule, self.sampling, model.config.mask_token_id, self.knobs,
                                            self.thinking, provisional, steer,
                                            self.edit.block if self.edit is not None else None, grammar)

    def output(self, model: ModelHandle, defer_text: bool = False) -> TextOutput | EditOutput:
        """What turns this request's machine events into the caller's deltas and result (`defer_text`: a
        continuation without stop strings leaves its text to the reader, `TextOutput`)."""
        if self.edit is not None:
            return EditOutput(model, self.edit, self.prompt_ids, self.knob_dict, self.stop)
        return TextOutput(model, self.mode, self.rule, self.stop, len(self.prompt_ids), self.knob_dict, defer_text)


def model_defaults(model: ModelHandle) -> ModelDefaults:
    """What `model` contributes to knob defaults (its block size, whether it has a drafter, its sampler)."""
    return ModelDefaults(model.config.block_size, model.has_drafter, model.net.sampler)


def check_text(model: ModelHandle, text: str, what: str) -> None:
    """Reject text that cannot fit in the context before it is tokenized (ValueError naming `what`)."""
    per_token = model.tokenizer.max_token_chars if model.tokenizer is not None else 1
    if len(text) > model.max_context * per_token:
        raise ValueError(f"{what} is {len(text)} characters long: more than the model's context of "
                         f"{model.max_context} tokens can hold")


def token_ids(model: ModelHandle, text: str | list[int], what: str) -> list[int]:
    """`text` as token ids (a list of ids is checked and copied); ValueError naming `what` otherwise."""
    if isinstance(text, str):
        check_text(model, text, what)
        return model.encode(text) if text else []
    if not isinstance(text, list | tuple) or not all(isinstance(t, int) and not isinstance(t, bool) for t in text):
        raise ValueError(f"{what} must be text or a list of token ids")
    return list(text)


def show(value) -> str:
    """`value` for an error message: short, whatever its size (a huge integer is not spelt out)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        return "a huge integer"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_count(value, what: str, most: int) -> int:
    """`value` as a token count in [1, most] (ValueError naming `what` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {show(value)}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {show(value)}")
    if value > most:
        raise ValueError(f"{what} ({show(value)}) exceeds the context length {most}")
    return value


def _thinking(model: ModelHandle, max_thinking_tokens: int | None,
              end_think_token_id: int | None) -> ThinkingBudget | None:
    if max_thinking_tokens is None:
        return None
    vocab = model.config.vocab_size
    if end_think_token_id is None:
        end_think_token_id = model.tokenizer.token_id("</think>") if model.tokenizer else None
    if end_think_token_id is None:
        raise ValueError("max_thinking_tokens needs end_think_token_id (no </think> token in the vocabulary)")
    if max_thinking_tokens < 0 or not 0 <= end_think_token_id < vocab:
        raise ValueError(f"max_thinking_tokens must be >= 0 and end_think_token_id in [0, {vocab})")
    return ThinkingBudget(max_thinking_tokens, end_think_token_id)


def check_stop(stop) -> None:
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ValueError("stop must be a list of strings")


def prepare(model: ModelHandle, prompt: str | list[int], mode: str = "ar", max_new_tokens: int = 128,
            temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
            stop: list[str] | None = None, eos_token_id: int | None = None, max_thinking_tokens: int | None = None,
            end_think_token_id: int | None = None, constraint: Constraint | None = None, json_schema=None,
            json_object: bool = False, regex: str | None = None, choice: list[str] | None = None,
            grammar: str | None = None, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
            presence_penalty: float = 0.0, logit_bias: dict[int, float] | None = None, min_tokens: int = 0,
            logprobs: int | None = None, **knobs) -> Prepared:
    """Validate a continuation (ValueError naming the problem) and resolve everything it will run with.
    Structured output: one of `constraint` (a `Constraint`), `json_schema` (a dict, JSON text or pydantic model
    class), `json_object=True`, `regex`, `choice` (a list of strings), `grammar` (llguidance Lark text).
    The logit processors (repetition / frequency / presence penalty, logit_bias, min_tokens) and `logprobs`:
    see `SamplingParams` and `trimode.decode.decide`."""
    spec = mode_spec(mode)
    wanted = constraint_of(constraint, json_schema, json_object, regex, choice, grammar)
    if wanted is not None and not spec.constrained:
        raise ValueError(f"mode {mode} cannot write under a grammar (structured output)")
    check_count(max_new_tokens, "max_new_tokens", model.max_context)
    k = resolve_knobs(mode, model_defaults(model), max_new_tokens, **knobs)
    if not isinstance(prompt, str | list | tuple):
        raise ValueError("the prompt must be text or a list of token ids")
    prompt_ids = token_ids(model, prompt, "the prompt")
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    if len(prompt_ids) + max_new_tokens > model.max_context:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                         f"length {model.max_context}")
    check_stop(stop)
    bias = check_logit_bias(logit_bias, vocab)
    if isinstance(min_tokens, int) and not isinstance(min_tokens, bool) and min_tokens > max_new_tokens:
        raise ValueError(f"min_tokens ({min_tokens}) exceeds max_new_tokens ({max_new_tokens})")
    sampling = SamplingParams(temperature, top_p, top_k, seed, repetition_penalty, frequency_penalty,
                              presence_penalty, bias, min_tokens, logprobs).with_seed()
    thinking = _thinking(model, max_thinking_tokens, end_think_token_id)
    rule = StopRule(max_new_tokens, model.eos_ids(eos_token_id))
    compiled = None
    if wanted is not None:
        compiled = compile_constraint(model.tokenizer, vocab, rule.eos_token_ids, wanted)
    return Prepared(prompt_ids, mode, k, rule, sampling, thinking, stop, constraint=compiled)


def check_logit_bias(logit_bias, vocab: int) -> tuple[tuple[int, float], ...]:
    """`logit_bias` ({token id: bias}) as SamplingParams holds it; ValueError naming the field otherwise."""
    if logit_bias is None:
        return ()
    if not isinstance(logit_bias, dict):
        raise ValueError("logit_bias must be a mapping of token ids to biases")
    for token in logit_bias:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab}), got {show(token)}")
    return tuple(sorted(logit_bias.items()))


def prepare_edit(model: ModelHandle, prefix: list[int], plan: EditPlan, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                 **knobs) -> Prepared:
    """Validate an edit (ValueError naming the problem) and resolve what it runs with. `stop`: strings that cut
    the shown text (an infill's middle)."""
    check_edit_model(model)
    k = resolve_knobs("edit", model_defaults(model), **knobs)
    if not prefix:
        raise ValueError("an edit needs some text before the first hole or the draft (a prompt or a prefix)")
    n = len(plan.block.tokens)
    check_edit_context(model, len(prefix), n)
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for t in prefix) or any(not 0 <= t < vocab for t in plan.block.tokens):
        raise ValueError(f"token ids must be in [0, {vocab})")
    check_stop(stop)
    sampling = SamplingParams(temperature, top_p, top_k, seed).with_seed()
    return Prepared(list(prefix), "edit", k, StopRule(n), sampling, None, stop, plan)


def check_edit_model(model: ModelHandle) -> None:
    if model.config.mask_token_id is None or model.config.mask_token_id < 0:
        raise ValueError("this checkpoint has no mask token, so it cannot fill or revise text")


def check_edit_context(model: ModelHandle, prefix_tokens: int, block_tokens: int) -> None:
    """The text before the edit and the edited block must fit the context (checked before the block is built)."""
    if prefix_tokens + block_tokens > model.max_context:
        raise ValueError(f"the text before the edit ({prefix_tokens} tokens) and the edited block ({block_tokens} "
                         f"tokens) exceed the context length {model.max_context}")
