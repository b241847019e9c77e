"""Screenshots of the playground for the docs: the bundled model served in-process, the page in headless
Chromium (Debian's `chromium`, driven by Playwright), a laptop and a phone-width window.

    python scripts/playground_screenshots.py   # docs/playground.png, playground-phone.png, playground-denoising.png,
                                               # playground-editing.png, playground-infill.png

The third one is taken mid-run, with every forward pass slowed down, to catch a diffusion block half filled in;
the fourth is a revised draft (what changed marked), the fifth an infill caught mid-way the same way.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

import trimode
from trimode.engine import Engine
from trimode.serve.app import ServerConfig, create_app

DOCS = Path(__file__).resolve().parents[1] / "docs"
# (file, viewport, prompt, mode A, mode B, knobs): AR against a draft accepted in one step, and against diffusion
# filling a block in a few passes.
SHOTS = [
    ("playground.png", {"width": 1280, "height": 900}, "Sort: 7 3 9 1 4 2", "ar", "linear_spec", {}),
    ("playground-phone.png", {"width": 390, "height": 844}, "Sort: 9 8 7 6 5 4", "ar", "diffusion",
     {"threshold": "0.99"}),
]


SLOW = threading.Event()  # while set, each forward pass sleeps first: a run slow enough to catch mid-way


def shoot_mid_run(page, seen, path: Path, what: str) -> None:
    """Start a slowed run and screenshot its panel as soon as `seen()` holds (within a minute)."""
    SLOW.set()
    try:
        page.click("#run")
        deadline = time.time() + 60
        while not seen():
            assert time.time() < deadline, f"no {what} seen"
            time.sleep(0.05)
        page.locator(".panel").screenshot(path=str(path))
        print(path)
    finally:
        SLOW.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DOCS, help="directory for the PNGs (default: docs/)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()

    tm = trimode.load()
    forward = tm.net.forward

    def slowed(*a, **kw):
        if SLOW.is_set():
            time.sleep(0.6)
        return forward(*a, **kw)

    tm.net.forward = slowed
    app = create_app(Engine(tm), ServerConfig("trimode-default"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/playground"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            for name, viewport, prompt, mode_a, mode_b, knobs in SHOTS:
                page = browser.new_page(viewport=viewport, device_scale_factor=1)
                page.goto(url)
                page.wait_for_selector("#server-info:has-text('trimode-default')")
                page.fill("#prompt", prompt)
                page.select_option("#mode-a", mode_a)
                page.select_option("#mode-b", mode_b)
                for knob, value in knobs.items():
                    page.fill(f"#{knob}", value)
                for _ in range(2):  # the second run is the one shown: the first one warms the engine up
                    page.click("#run")
                    page.wait_for_selector("#comparison:not([hidden])", timeout=60_000)
                page.screenshot(path=str(args.out / name), full_page=True)
                print(args.out / name)
                page.close()
            page = browser.new_page(viewport={"width": 760, "height": 900}, device_scale_factor=1)
            page.goto(url)
            page.wait_for_selector("#server-info:has-text('trimode-default')")
            page.fill("#prompt", "Sort: 9 8 7 6 5 4")
            page.select_option("#mode-a", "diffusion")
            page.set_checked("#compare", False)
            page.fill("#threshold", "1")  # one slot per pass (at 0.99 the bundled model fills this block in two)
            # Mid-run: slots filled by earlier passes, by the latest one, still masked.
            earlier, latest = page.locator(".block .cell:not(.mask):not(.new)"), page.locator(".block .new")
            masked = page.locator(".block .mask")
            shoot_mid_run(page, lambda: earlier.count() >= 4 and latest.count() >= 1 and masked.count() >= 1,
                          args.out / "playground-denoising.png", "half-filled block")
            page.close()

            page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
            page.goto(url)
            page.wait_for_selector("#server-info:has-text('trimode-default')")
            page.check("#revise")
            page.fill("#prompt", "Sort: 7 3 9 1 4 2")
            page.fill("#draft", "1 2 3 5 7 9")
            for _ in range(2):  # the second run is the one shown, as above
                page.click("#run")
                page.wait_for_selector(".panel[data-state='done']", timeout=60_000)
            page.screenshot(path=str(args.out / "playground-editing.png"), full_page=True)
            print(args.out / "playground-editing.png")
            # Infill at threshold 1 (one slot per pass), slowed down: caught with slots filled and still masked.
            page.check("#infill")
            chat = tm.tokenizer.apply_chat_template([{"role": "user", "content": "Sort: 7 3 9 1 4 2"}])
            page.fill("#prompt", chat + "1 2")
            page.fill("#suffix", " 4 7 9")
            page.fill("#max-tokens", "8")
            page.fill("#threshold", "1")
            filled, gaps = page.locator(".block .cell:not(.mask):not(.given)"), page.locator(".middle .gap")
            shoot_mid_run(page, lambda: filled.count() >= 3 and gaps.count() >= 2, args.out / "playground-infill.png",
                          "half-filled hole")
            page.close()
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)


if __name__ == "__main__":
    main()
