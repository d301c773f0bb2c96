"""The book as a reader gets it: the `ci` build, served on localhost and opened page by page in a real headless
Chromium (Debian's `chromium`, driven by Playwright). Every page of _toc.yml: no console errors, every equation
typeset by the MathJax served with the book, every image loaded, media that can play; each chapter's claim
table, each kernel page's implementation checks; the search page finds a chapter's word; the notebook
download link serves the notebook."""
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "book"))
from build import html_dir, toc_entries  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("the browser test needs Debian's chromium (the Makefile's setup installs it as root)")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")]
# Flags for a machine with no network: no background connections, no sandbox as root, no GPU.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site():
    "The `ci` book, built (reusing the notebooks the tests executed) and served on a free localhost port."
    subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "--scale", "ci"], check=True)
    handler = functools.partial(QuietHandler, directory=str(html_dir("ci")))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def open_page(browser, url):
    "Open `url`, wait for MathJax to finish, and return the page with the console errors seen."
    page = browser.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(url, wait_until="load")
    page.evaluate("async () => { if (window.MathJax && MathJax.startup && MathJax.startup.promise)"
                  " await MathJax.startup.promise; }")
    return page, errors


@pytest.mark.parametrize("entry", toc_entries())
def test_page_renders_for_a_reader(site, browser, entry):
    page, errors = open_page(browser, f"{site}/{entry}.html")
    try:
        assert not errors, f"{entry}: console errors {errors[:6]}"
        text = page.inner_text("main")
        assert "\\(" not in text and "$$" not in text, f"{entry}: raw math left in the text"
        has_math = page.evaluate("() => document.querySelectorAll('.math, span.math, div.math').length")
        typeset = page.evaluate("() => document.querySelectorAll('mjx-container').length")
        assert typeset >= (1 if has_math else 0), f"{entry}: {has_math} math elements but {typeset} typeset"
        broken = page.evaluate("() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))"
                               ".map(i => i.src)")
        assert not broken, f"{entry}: images that did not load: {broken[:3]}"
        media = page.evaluate("() => [...document.querySelectorAll('audio, video')].filter(m => m.error)"
                              ".map(m => m.currentSrc)")
        assert not media, f"{entry}: media that cannot play: {media[:3]}"
        headers = page.evaluate("() => [...document.querySelectorAll('table')].map(t => [...t.querySelectorAll('thead th')]"
                                ".map(th => th.innerText.trim()).join(' '))")
        if entry.endswith("index") or entry.endswith(("00_core", "01_lm")):
            return
        kernel = Path(entry).name[2:3].isalpha()  # nbs/10a_selective_scan: a kernel page
        wanted = ("check", "criterion", "passed") if kernel else ("claim", "paper", "ours", "outcome", "source")
        assert any(all(w in h for w in wanted) for h in headers), f"{entry}: no table with columns {wanted}"
    finally:
        page.close()


def test_search_finds_a_chapter(site, browser):
    page, errors = open_page(browser, f"{site}/search.html?q=Megalodon")
    try:
        page.wait_for_selector("#search-results ul li, ul.search li", timeout=30_000)
        hits = page.evaluate("() => [...document.querySelectorAll('ul.search li a')].map(a => a.href)")
        assert any("11_megalodon" in h for h in hits), hits[:5]
    finally:
        page.close()


def test_download_link_serves_the_notebook(site, browser):
    page, _ = open_page(browser, f"{site}/nbs/00_core.html")
    try:
        links = page.evaluate("() => [...document.querySelectorAll('a[href$=\".ipynb\"]')].map(a => a.href)")
        assert links, "no download link to the notebook"
        response = page.request.get(links[0])
        assert response.ok and '"cells"' in response.text(), links[0]
    finally:
        page.close()
