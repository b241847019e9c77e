"""The playground page as HTTP sees it: the files are served (also without the API key, and relative to the
page, so a path prefix works), and the stream carries what the page reads (`trimode` per chunk). The page in a
real browser: tests/test_playground_browser.py."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import trimode
from tests.test_serve_api import API_KEY, MODEL, ServerThread, build_checkpoint, chat_body, post, sse_events
from trimode.api import BlockState, Delta
from trimode.engine import Engine
from trimode.serve.app import ServerConfig, create_app
from trimode.serve.playground import STATIC, event_fields


@pytest.fixture(scope="module")
def tm(tmp_path_factory):
    return trimode.load(build_checkpoint(tmp_path_factory.mktemp("playground") / MODEL), dtype="float64")


@pytest.fixture(scope="module")
def served(tm):
    app = create_app(Engine(tm, max_queue=16), ServerConfig(MODEL, api_key=API_KEY, default_max_tokens=8))
    with ServerThread(app) as srv, ServerThread(Starlette(routes=[Mount("/p", app=app)])) as prefixed:
        srv.prefixed = prefixed.url + "/p"  # the same app behind a path prefix, as a reverse proxy would mount it
        yield srv


def test_the_page_and_its_files_need_no_key(served):
    for base in (served.url, served.prefixed):
        for path in ("/", "/playground"):
            r = httpx.get(base + path, timeout=30)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert "trimode playground" in r.text
            assert "connect-src 'self'" in r.headers["content-security-policy"]
        for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
            r = httpx.get(f"{base}/static/{name}", timeout=30)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    r = httpx.get(served.prefixed + "/playground/", timeout=30)
    assert r.status_code == 307 and r.headers["location"] == "../playground"  # relative: stays under the prefix
    assert httpx.get(served.url + "/v1/models", timeout=30).status_code == 401  # the API itself still needs it


def test_the_page_loads_nothing_from_elsewhere():
    html = (STATIC / "index.html").read_text()
    urls = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert urls and all(not re.match(r"^(/|[a-z]+:)", u) or u == "data:," for u in urls), urls
    js = (STATIC / "playground.js").read_text()
    assert "http://" not in js and "https://" not in js
    assert not re.search(r"fetch\(\s*[\"'`]/", js)  # API calls are relative to the page too
    assert "innerHTML" not in js  # model output is inserted as text only


def test_the_editing_controls_are_live():
    """Infill and revise are enabled, with their text fields; their requests go to this server's routes for edits
    (a completion with `suffix`, v1/edits). In a browser: tests/test_playground_browser.py."""
    html = (STATIC / "index.html").read_text()
    editing = re.search(r"<fieldset id=\"editing\"([^>]*)>(.*?)</fieldset>", html, re.S)
    assert editing and "disabled" not in editing[1]
    assert 'id="infill"' in editing[2] and 'id="revise"' in editing[2]
    for field in ("suffix", "draft"):
        assert re.search(f'<label for="{field}">', html) and f'<textarea id="{field}"' in html
    js = (STATIC / "playground.js").read_text()
    assert '"v1/edits"' in js and "suffix: run.suffix" in js and 'kind: "revise"' in js


def test_static_files_are_package_data():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"serve/static/*"' in pyproject
    assert {p.name for p in STATIC.iterdir()} >= {"index.html", "playground.js", "playground.css"}


def test_stream_chunks_carry_token_ids_and_block_pieces(served, tm):
    body = chat_body(max_tokens=10, mode="diffusion", block_length=4, threshold=0.99, stream=True, provisional=True)
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        events = sse_events(r)
    choices = [e["choices"][0] for e in events[:-1] if e["choices"]]
    commits = [c for c in choices if "token_ids" in c.get("trimode", {})]
    blocks = [c for c in choices if "provisional" in c]
    final = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]][-1]
    streamed = [t for c in commits for t in c["trimode"]["token_ids"]]
    assert len(streamed) == final["trimode"]["generated_tokens"]  # every token, also those without text
    whole = post(served, "/v1/chat/completions", {**body, "stream": False, "provisional": False}).json()
    assert tm.tokenizer.decode(streamed) == whole["choices"][0]["message"]["content"]
    assert "".join(c["delta"].get("content") or "" for c in choices) == whole["choices"][0]["message"]["content"]
    assert blocks and any(None in c["provisional"]["token_ids"] for c in blocks)
    for c in blocks:
        ids, pieces = c["provisional"]["token_ids"], c["trimode"]["pieces"]
        assert len(pieces) == len(ids)
        assert all((p is None) == (t is None) for t, p in zip(ids, pieces))
        assert all(p == tm.tokenizer.decode([t], skip_special_tokens=False) for t, p in zip(ids, pieces) if t)


def test_edit_streams_carry_block_pieces(served, tm):
    """Infill (`suffix` on /v1/completions) and revision (/v1/edits) stream their block slot by slot, as the page
    draws it: each slot's text, and the forward passes so far."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    infill = {"model": MODEL, "prompt": "Hello, ", "suffix": " world", "max_tokens": 4, "threshold": 1.0,
              "stream": True, "provisional": True}
    revise = {"model": MODEL, "kind": "revise", "messages": [{"role": "user", "content": "Hello"}],
              "draft": "abc def", "threshold": 1.0, "stream": True, "provisional": True}
    for path, body in (("/v1/completions", infill), ("/v1/edits", revise)):
        with httpx.stream("POST", served.url + path, json=body, headers=auth, timeout=60) as r:
            assert r.status_code == 200
            events = sse_events(r)
        chunks = [e["choices"][0] if e.get("choices") else e for e in events[:-1]]  # an edit's block: top level
        blocks = [c for c in chunks if "provisional" in c]
        assert blocks, events
        for b in blocks:
            ids, pieces = b["provisional"]["token_ids"], b["trimode"]["pieces"]
            assert len(pieces) == len(ids) and b["trimode"]["forward_passes"] >= 1
            assert all((p is None) == (t is None) for t, p in zip(ids, pieces))
            assert all(p == tm.tokenizer.decode([t], skip_special_tokens=False) for t, p in zip(ids, pieces) if t)


@dataclass
class CountedDelta(Delta):  # what trimode.api's events would be once they report the forward passes so far
    forward_passes: int = 0


def test_event_fields_pass_on_forward_counts_when_events_carry_them(tm):
    assert event_fields(tm, Delta([5, 6], "ab")) == {"token_ids": [5, 6]}
    assert event_fields(tm, CountedDelta([5], "a", 3)) == {"token_ids": [5], "forward_passes": 3}
    block = event_fields(tm, BlockState([5, None], "a"))
    assert block == {"pieces": [tm.tokenizer.decode([5], skip_special_tokens=False), None]}
