"""The playground page in a real browser: headless Chromium (Debian's, driven by Playwright) against a real
server on a free port, the page served behind a path prefix. The page loads, runs a prompt in two modes at
once, shows the diffusion block before it is committed, shows the server's errors, and cancels its requests
when stopped or closed. Its editing controls run on the bundled model: infill writes the middle `tm.infill`
writes, revise marks what `tm.revise` changed.

Needs a `chromium` binary (`.ci/run` installs Debian's); without one these tests are skipped, except in CI
(`CI` set), where that is a failure."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import trimode
from tests.test_serve_api import API_KEY, MODEL, ServerThread, build_checkpoint, wait_until_cancelled
from trimode.engine import Engine
from trimode.serve.app import ServerConfig, create_app

CHROMIUM = os.environ.get("TRIMODE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if CHROMIUM is None:
        return "no chromium binary (apt-get install chromium, or set TRIMODE_CHROMIUM)"
    return None


if (why := _missing()) is not None:
    if os.environ.get("CI"):
        raise RuntimeError(f"the browser tests must run in CI: {why}")
    pytest.skip(why, allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

BUNDLED = "trimode-default"
SORT = "Sort: 7 3 9 1 4 2"
SLOW = threading.Event()  # while set, every forward pass takes 20 ms longer: runs long enough to stop them


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tm = trimode.load(build_checkpoint(tmp_path_factory.mktemp("browser") / MODEL), dtype="float64")
    forward = tm.net.forward

    def slowed(*args, **kwargs):
        if SLOW.is_set():
            time.sleep(0.02)
        return forward(*args, **kwargs)

    tm.net.forward = slowed
    engine = Engine(tm, max_queue=16)
    app = create_app(engine, ServerConfig(MODEL, api_key=API_KEY, default_max_tokens=8))
    with ServerThread(app) as srv, ServerThread(Starlette(routes=[Mount("/p", app=app)])) as prefixed:
        srv.engine = engine
        srv.page = prefixed.url + "/p/playground"  # behind a path prefix, as a reverse proxy mounts it
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def bundled():
    """The bundled model served as `trimode serve` serves it (no API key): it sorts, so edits have a right answer."""
    tm = trimode.load()
    app = create_app(Engine(tm, max_queue=16), ServerConfig(BUNDLED))
    with ServerThread(app) as srv:
        srv.tm = tm
        srv.page = srv.url + "/playground"
        yield srv


@contextmanager
def opened(browser, url: str):
    """The page in a fresh browser context; no JavaScript errors by the end."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors: {errors}"


@pytest.fixture
def page(browser, served):
    with opened(browser, served.page) as page:
        yield page


@pytest.fixture
def bundled_page(browser, bundled):
    with opened(browser, bundled.page) as page:
        expect(page.locator("#server-info")).to_contain_text(BUNDLED)
        yield page


def connect(page: Page) -> None:
    """Enter the API key (the page asks for it after the server's 401) and wait for the model card."""
    expect(page.locator("#error")).to_contain_text("API key")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")  # a change event: the page retries with the key
    expect(page.locator("#server-info")).to_contain_text(MODEL)
    expect(page.locator("#error")).to_be_hidden()


def setup(page: Page, prompt: str, mode_a: str, mode_b: str | None = None, max_tokens: int = 12, **knobs) -> None:
    page.fill("#prompt", prompt)
    page.select_option("#mode-a", mode_a)
    page.set_checked("#compare", mode_b is not None)
    if mode_b:
        page.select_option("#mode-b", mode_b)
    page.fill("#max-tokens", str(max_tokens))
    for name, value in knobs.items():
        page.fill(f"#{name.replace('_', '-')}", str(value))


def panel(page: Page, mode: str):
    return page.locator(f'.panel[data-mode="{mode}"]')


def test_two_modes_side_by_side(page, served):
    connect(page)
    setup(page, "Hello, world!", "ar", "linear_spec")
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")  # keyboard: run
    for mode in ("ar", "linear_spec"):
        expect(panel(page, mode).locator(".state")).to_have_text("done: max tokens reached", timeout=60_000)
    expect(page.locator("#comparison")).to_contain_text("Same text from ar and linear_spec.")
    expect(page.locator("#comparison")).to_contain_text("Forward passes: ar 12, linear_spec")
    for mode in ("ar", "linear_spec"):  # the page's figures are the server's
        r = httpx.post(served.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hello, world!"}],
                             "max_tokens": 12, "mode": mode}, timeout=60).json()
        p = panel(page, mode)
        assert p.locator(".text").inner_text() == r["choices"][0]["message"]["content"]
        assert p.locator(".forwards").inner_text() == str(r["trimode"]["forward_passes"])
        assert p.locator(".tokens").inner_text() == "12"
        commits = p.locator(".commit")
        assert sum(int(t) for t in commits.all_inner_texts()) == 12  # tokens per committing pass
    assert panel(page, "ar").locator(".commit").count() == 12  # AR: one token per pass


# Records, in order, each render of a diffusion block (its masked slots) and each state the panel shows.
OBSERVER = """() => {
  window.log = [];
  new MutationObserver((records) => {
    for (const r of records) {
      const el = r.target;
      if (el.classList && el.classList.contains("block"))
        window.log.push(["block", [...r.addedNodes].filter((n) => n.classList.contains("mask")).length,
                         r.addedNodes.length]);
      if (el.classList && el.classList.contains("state") && r.addedNodes.length)
        window.log.push(["state", r.addedNodes[0].data]);
    }
  }).observe(document.getElementById("results"), {childList: true, subtree: true});
}"""


def test_the_diffusion_block_shows_before_it_is_committed(page):
    connect(page)
    setup(page, "Hello, world!", "diffusion", max_tokens=12, block_length=4, threshold=0.99)
    page.evaluate(OBSERVER)
    page.click("#run")
    state = panel(page, "diffusion").locator(".state")
    expect(state).to_contain_text("done", timeout=60_000)
    log = page.evaluate("window.log")
    done = next(i for i, e in enumerate(log) if e[0] == "state" and e[1].startswith("done"))
    blocks = [e for e in log[:done] if e[0] == "block"]
    assert len(blocks) >= 2, log  # updated pass by pass
    assert all(total == 4 for _, _, total in blocks)
    assert any(masked > 0 for _, masked, _ in blocks), log  # slots still masked: shown before the end
    assert panel(page, "diffusion").locator(".text").inner_text()


def test_server_errors_are_shown(page):
    page.fill("#api-key", "wrong-key")
    page.press("#api-key", "Tab")
    expect(page.locator("#error")).to_contain_text("401: missing or incorrect API key")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")
    expect(page.locator("#error")).to_be_hidden()
    setup(page, "Hello", "ar", "diffusion", max_tokens=100_000)
    page.click("#run")
    error = page.locator("#error")
    expect(error).to_contain_text("ar: 400:")
    expect(error).to_contain_text("exceeds this model's context")
    expect(error).to_contain_text("diffusion: 400:")
    expect(panel(page, "ar").locator(".state")).to_have_text("error")
    setup(page, "Hello", "diffusion", max_tokens=4, threshold=2)  # out of range: the server's message
    page.click("#run")
    expect(error).to_contain_text("threshold")
    expect(error).to_contain_text("less than or equal to 1")


def test_stop_and_closing_the_tab_cancel_the_request(browser, page, served):
    connect(page)
    SLOW.set()
    try:
        for how in ("stop", "close"):
            cancelled = served.engine.stats()["counters"].get("cancelled", 0)
            setup(page, "Hello", "ar", max_tokens=200)
            page.click("#run")
            expect(panel(page, "ar").locator(".text")).not_to_be_empty(timeout=30_000)
            if how == "stop":
                page.keyboard.press("Escape")
                expect(panel(page, "ar").locator(".state")).to_have_text("stopped")
            else:
                page.close()
            wait_until_cancelled(served.engine, cancelled)
    finally:
        SLOW.clear()


def test_the_page_fits_a_phone(browser, served):
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(served.url + "/")  # also at the root
    connect(page)
    setup(page, "Hello", "ar", "quadratic_spec", max_tokens=6)
    page.click("#run")
    expect(page.locator("#comparison")).to_be_visible(timeout=60_000)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    assert page.evaluate("window.scrollY") > 0  # the results, below the form, were brought into view
    boxes = [panel(page, m).bounding_box() for m in ("ar", "quadratic_spec")]
    assert boxes[1]["y"] >= boxes[0]["y"] + boxes[0]["height"]  # stacked, not squeezed side by side
    context.close()


def kind(page: Page) -> str:
    return page.locator('input[name="kind"]:checked').get_attribute("value")


def test_editing_controls_exclude_each_other_and_the_modes(page):
    connect(page)
    chat = page.locator('input[name="kind"][value="chat"]')
    mode_controls = [page.locator(s) for s in ("#mode-a", "#compare", "#mode-b")]
    expect(page.locator("#suffix-field")).to_be_hidden()
    expect(page.locator("#draft-field")).to_be_hidden()
    page.check("#infill")  # chat messages cannot be a completion prompt: the kind becomes completion
    assert kind(page) == "completion"
    expect(chat).to_be_disabled()
    expect(page.locator("#edit-hint")).to_contain_text("the kind is now completion")
    expect(page.locator("#suffix-field")).to_be_visible()
    expect(page.locator("#mode-hint")).to_be_visible()
    for control in mode_controls:
        expect(control).to_be_disabled()
    page.check("#revise")  # one edit at a time; the kind infill replaced comes back
    assert not page.is_checked("#infill") and kind(page) == "chat"
    expect(chat).to_be_enabled()
    expect(page.locator("#suffix-field")).to_be_hidden()
    expect(page.locator("#draft-field")).to_be_visible()
    for control in mode_controls:
        expect(control).to_be_disabled()
    page.uncheck("#revise")  # the page as it was
    for control in mode_controls:
        expect(control).to_be_enabled()
    assert page.is_checked("#compare")
    expect(page.locator("#mode-hint")).to_be_hidden()
    expect(page.locator("#draft-field")).to_be_hidden()


# Records each render of an edit's middle while it fills: its masked gaps and its text.
MIDDLE_OBSERVER = """() => {
  window.middles = [];
  new MutationObserver((records) => {
    for (const r of records)
      if (r.target.classList && r.target.classList.contains("middle"))
        window.middles.push([r.target.querySelectorAll(".gap").length, r.target.textContent]);
  }).observe(document.getElementById("results"), {childList: true, subtree: true});
}"""


def test_infill_writes_the_middle_tm_infill_writes(bundled_page, bundled):
    page, tm = bundled_page, bundled.tm
    prompt = tm.tokenizer.apply_chat_template([{"role": "user", "content": SORT}]) + "1 2"
    suffix = " 4 7 9"
    page.check("#infill")
    page.fill("#prompt", prompt)
    page.fill("#suffix", suffix)
    page.fill("#max-tokens", "8")
    for threshold in ("", "1"):  # the default, then one slot per pass: the hole fills before our eyes
        expected = tm.infill(prompt, suffix, max_new_tokens=8, **({"threshold": 1.0} if threshold else {}))
        page.fill("#threshold", threshold)
        page.evaluate(MIDDLE_OBSERVER)
        with page.expect_request("**/v1/completions") as request:
            page.click("#run")
        sent = json.loads(request.value.post_data)
        assert sent == {"model": BUNDLED, "prompt": prompt, "suffix": suffix, "max_tokens": 8, "stream": True,
                        "provisional": True, "temperature": 0, **({"threshold": 1} if threshold else {})}
        p = panel(page, "infill")
        expect(p.locator(".state")).to_have_text("done: stop", timeout=60_000)
        assert expected.text == " 3"
        assert p.locator(".middle").text_content() == expected.text
        assert p.locator(".text .given").all_text_contents() == [prompt, suffix]  # greyed around the middle
        assert p.locator(".text").text_content() == prompt + expected.text + suffix
        assert p.locator(".forwards").inner_text() == str(expected.stats.forward_passes)
        assert p.locator(".tokens").inner_text() == str(len(expected.token_ids))
        suffix_slots = p.locator(".block .cell.given")
        assert "".join(suffix_slots.all_text_contents()).replace("\u2423", " ") == suffix
    middles = page.evaluate("window.middles")
    assert any(gaps > 0 for gaps, _ in middles), middles  # the hole, masks still in it, before the end
    assert middles[-1] == [0, expected.text]


def test_revise_marks_what_tm_revise_changed(bundled_page, bundled):
    page, tm = bundled_page, bundled.tm
    expected = tm.revise(tm.tokenizer.apply_chat_template([{"role": "user", "content": SORT}]), "1 2 3 5 7 9")
    assert kind(page) == "chat"
    page.check("#revise")
    page.fill("#prompt", SORT)
    page.fill("#draft", "1 2 3 5 7 9")
    with page.expect_request("**/v1/edits") as request:
        page.click("#run")
    assert json.loads(request.value.post_data) == {
        "model": BUNDLED, "kind": "revise", "messages": [{"role": "user", "content": SORT}],
        "draft": "1 2 3 5 7 9", "stream": True, "provisional": True, "temperature": 0}
    p = panel(page, "revise")
    expect(p.locator(".state")).to_have_text("done: stop", timeout=60_000)
    assert expected.text == "1 2 3 4 7 9" and expected.spans == [(6, 7)]
    assert p.locator(".text").text_content() == expected.text
    assert p.locator(".text mark").all_text_contents() == ["4"]
    assert p.locator(".block .cell.changed").all_text_contents() == ["4"]  # the slot too
    assert p.locator(".forwards").inner_text() == str(expected.stats.forward_passes)


def test_the_learned_sampler_runs_diffusion_as_tm_generate_does(bundled_page, bundled):
    page, tm = bundled_page, bundled.tm
    page.fill("#prompt", SORT)
    page.select_option("#mode-a", "diffusion")
    page.set_checked("#compare", False)
    page.fill("#max-tokens", "16")
    page.select_option("#rule", "learned")
    page.fill("#threshold", "0.5")
    with page.expect_request("**/v1/chat/completions") as request:
        page.click("#run")
    sent = json.loads(request.value.post_data)
    assert sent["unmask"] == "learned" and sent["threshold"] == 0.5 and "steps" not in sent
    p = panel(page, "diffusion")
    expect(p.locator(".state")).to_have_text("done: stop", timeout=60_000)
    prompt = tm.tokenizer.apply_chat_template([{"role": "user", "content": SORT}])
    expected = tm.generate(prompt, mode="diffusion", max_new_tokens=16, unmask="learned", threshold=0.5)
    assert p.locator(".text").inner_text() == expected.text
    assert p.locator(".forwards").inner_text() == str(expected.stats.forward_passes)


# Records each render of a diffusion block as (its forced cells' texts, the model's filled cells).
FORCED_OBSERVER = """() => {
  window.blocks = [];
  new MutationObserver((records) => {
    for (const r of records) {
      if (!(r.target.classList && r.target.classList.contains("block")) || !r.addedNodes.length) continue;
      const cells = [...r.target.children];
      window.blocks.push([cells.filter((c) => c.classList.contains("forced")).map((c) => c.textContent),
                          cells.filter((c) => /\\bc[0-9]\\b/.test(c.className)).length]);
    }
  }).observe(document.getElementById("results"), {childList: true, subtree: true});
}"""


def test_the_diffusion_block_marks_the_tokens_a_schema_forced(bundled_page, bundled):
    """A JSON-schema run in diffusion: the block shows the tokens the grammar forced (the keys and punctuation,
    written without a forward pass) apart from the model's own, with a legend; the answer matches the schema."""
    page = bundled_page
    schema = {"type": "object", "properties": {"label": {"enum": ["positive_review", "negative_review"]},
                                               "score": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["label", "score"], "additionalProperties": False}
    page.fill("#prompt", "Classify: good")
    page.select_option("#mode-a", "diffusion")
    page.set_checked("#compare", False)
    page.fill("#max-tokens", "40")
    page.fill("#block-length", "8")
    page.click("#structured summary")
    page.fill("#json-schema", json.dumps(schema))
    page.evaluate(FORCED_OBSERVER)
    with page.expect_request("**/v1/chat/completions") as request:
        page.click("#run")
    assert json.loads(request.value.post_data)["provisional"] is True
    p = panel(page, "diffusion")
    expect(p.locator(".state")).to_contain_text("done", timeout=60_000)
    answer = json.loads(p.locator(".text").inner_text())
    assert answer["label"] in ("positive_review", "negative_review") and 0 <= answer["score"] <= 9
    blocks = page.evaluate("window.blocks")
    forced = "".join(t for texts, _ in blocks for t in texts).replace("\u2423", " ")  # spaces are shown as ␣
    assert '"label": "' in forced or '"score": ' in forced, blocks  # keys the schema fixes
    assert any(own for _, own in blocks), blocks  # and the model's own slots, styled apart
    expect(p.locator(".block-legend")).to_be_visible()
    expect(p.locator(".block-legend")).to_contain_text("forced by the grammar")
