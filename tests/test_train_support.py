"""Shared helpers of the training tests: a tiny byte-level BPE tokenizer, a toy corpus, a tiny recipe."""

import json
import random
from pathlib import Path

import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trimode.model.tokenizer import NLDTokenizer
from trimode.train.data import Document

SPECIALS = ["<unk>", "<s>", "</s>", "<mask>"]  # ids 0..3
WORDS = "the cat dog sat ran on under mat rug red blue big small a".split()


def toy_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n)]


def make_tokenizer(out: Path, vocab_size: int = 300) -> NLDTokenizer:
    """A byte-level BPE (every string encodes) with `SPECIALS`, written as tokenizer.json + tokenizer_config.json."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(toy_texts(300, seed=123), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return NLDTokenizer.from_dir(out)


def write_jsonl(path: Path, docs: list[Document]) -> Path:
    path.write_text("".join(json.dumps({"text": d.text, "prompt": d.prompt}) + "\n" for d in docs))
    return path


TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "eos_token_id": "</s>", "bos_token_id": "<s>",
              "mask_token_id": "<mask>", "block_size": 8}


def tiny_recipe(tmp: Path, out: str = "out", **sections) -> Path:
    """A recipe file in `tmp` training a 2-layer, hidden-32 model on a toy corpus; `sections` override keys."""
    tok_dir = tmp / "tok"
    if not (tok_dir / "tokenizer.json").is_file():
        make_tokenizer(tok_dir)
    texts = toy_texts(120, seed=1)
    train = write_jsonl(tmp / "train.jsonl", [Document(t) for t in texts[:100]])
    held = write_jsonl(tmp / "eval.jsonl", [Document(t, prompt="say: ") for t in texts[100:]])
    recipe = {
        "output_dir": out,
        "model": {"config": dict(TINY_MODEL), "dtype": "float32"},
        "tokenizer": {"path": "tok"},
        "data": {"train_jsonl": [train.name], "eval_jsonl": [held.name], "seq_len": 32},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_steps": 2},
        "train": {"steps": 6, "batch_size": 4, "micro_batch_size": 2, "seed": 0},
        "eval": {"every": 3, "max_rows": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **values}
        else:
            recipe[section] = values
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_tiny_tokenizer_round_trips(tmp_path):
    tok = make_tokenizer(tmp_path)
    assert tok.vocab_size <= 300
    assert [tok.token_id(s) for s in SPECIALS] == [0, 1, 2, 3]
    text = "the big cat sat on a red mat."
    assert tok.decode(tok.encode(text)) == text
