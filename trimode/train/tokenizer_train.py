"""Training the small model's tokenizer: byte-level BPE (the `tokenizers` library) plus a chat template.

Special tokens get the lowest ids, in this order, so every tokenizer trained here agrees on them:

    0 <pad>   1 <s> (bos)   2 </s> (eos, also the end of an assistant turn)   3 <|mask|> (the diffusion mask)
    4 <|system|>   5 <|user|>   6 <|assistant|>

`<think>` / `</think>` are added after training as ordinary (non-special) tokens so decoded text keeps them
visible; the thinking budget finds `</think>` by name. Digits are split one per token, which makes the
arithmetic tasks learnable by a tiny model.

How the ids reach the model: `config_fields(tokenizer)` returns `vocab_size`, `bos_token_id`, `eos_token_id`,
`mask_token_id` and `pad_token_id` under the `NLDConfig` field names; a recipe merges them into its model
section (the trainer does this when the recipe asks for a trained tokenizer), so `config.json` names the same
ids as `tokenizer_config.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from trimode.model.tokenizer import NLDTokenizer

PAD, BOS, EOS, MASK = "<pad>", "<s>", "</s>", "<|mask|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [PAD, BOS, EOS, MASK, SYSTEM, USER, ASSISTANT]

# One turn per role tag; an assistant turn ends with the EOS token, so a model trained on rendered
# conversations stops after its answer. `add_generation_prompt` leaves the assistant tag open. With `tools`, the
# system part lists them (the preamble of trimode/request/tools.py, each tool as JSON); an assistant message's
# `tool_calls` are written as `<tool_call>` blocks, a `role: "tool"` message as a user turn holding
# `<tool_response>`: the text the tool-call grammar and parser of request/tools.py write and read.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "<|system|>\n{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}"
    "\n\n{% endif %}"
    "{{ \"# Tools\\n\\nYou may call one or more functions to assist with the user query. The functions are "
    "listed as JSON between <tools> and </tools>. For each call, write a JSON object with the function's name "
    "and arguments between <tool_call> and </tool_call>:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call>\\n\" }}"
    "<tools>\n{% for tool in tools %}"
    "{{ tool | tojson }}"
    "\n{% endfor %}"
    "</tools>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if not tools %}"
    "<|system|>\n{{ message['content'] }}"
    "\n{% elif not loop.first %}"
    "<|system|>\n{{ message['content'] }}"
    "\n{% endif %}"
    "{% elif message['role'] == 'user' %}"
    "<|user|>\n{{ message['content'] }}"
    "\n{% elif message['role'] == 'assistant' %}"
    "<|assistant|>\n{{ message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if not loop.first %}"
    "\n{% endif %}"
    "<tool_call>\n{\"name\": {{ call['function']['name'] | tojson }}"
    ", \"arguments\": {% if call['function']['arguments'] is string %}"
    "{{ call['function']['arguments'] }}"
    "{% else %}"
    "{{ call['function']['arguments'] | tojson }}"
    "{% endif %}"
    "}"
    "\n</tool_call>{% endfor %}"
    "{{ eos_token }}"
    "\n{% elif message['role'] == 'tool' %}"
    "<|user|>\n<tool_response>\n{{ message['content'] }}"
    "\n</tool_response>\n{% else %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user, assistant or tool') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|assistant|>\n{% endif %}"
)

TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": BOS,
    "eos_token": EOS,
    "mask_token": MASK,
    "pad_token": PAD,
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "chat_template": CHAT_TEMPLATE,
}


def chat_renderer() -> NLDTokenizer:
    """An NLDTokenizer with no vocabulary, for rendering the chat template before a tokenizer exists.

    The corpus renders its SFT documents with it, so training data and inference prompts
    (`NLDTokenizer.apply_chat_template` on the trained tokenizer) go through the same code.
    """
    return NLDTokenizer(Tokenizer(models.BPE()), dict(TOKENIZER_CONFIG), CHAT_TEMPLATE)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2,
                    model_max_length: int | None = None) -> NLDTokenizer:
    """Train a byte-level BPE tokenizer on `texts`; write `tokenizer.json` and `tokenizer_config.json`.

    `texts` may be strings or objects with `prompt` and `text` (corpus Documents). `vocab_size` counts every
    token, the special and the two thinking tokens included.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 2:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least 265 tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,  # room for <think> and </think>, added below
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_strings(texts), trainer=trainer)
    tok.add_tokens([AddedToken(THINK, special=False, normalized=False),
                    AddedToken(END_THINK, special=False, normalized=False)])
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = dict(TOKENIZER_CONFIG)
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    loaded = NLDTokenizer.from_dir(out)
    assert loaded is not None
    return loaded


def config_fields(tokenizer: NLDTokenizer) -> dict[str, int]:
    """The NLDConfig fields a model trained with `tokenizer` must carry."""
    ids = {}
    for field, name in (("bos_token_id", BOS), ("eos_token_id", EOS), ("mask_token_id", MASK),
                        ("pad_token_id", PAD)):
        tid = tokenizer.token_id(name)
        if tid is None:
            raise ValueError(f"the tokenizer has no {name} token")
        ids[field] = tid
    return {"vocab_size": tokenizer.vocab_size, **ids}


def _strings(texts: Iterable) -> Iterable[str]:
    for t in texts:
        if isinstance(t, str):
            yield t
        else:
            yield t.prompt + t.text
