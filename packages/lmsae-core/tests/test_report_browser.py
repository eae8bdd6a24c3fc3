"""The HTML report in a real browser: headless Chromium opens the pages from disk (file://),
runs their scripts, and dumps the resulting DOM.

Chromium is part of the project's setup (``make browser``: ``apt-get install -y chromium``); when
it is missing these tests fail and say how to install it.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest

#: the fake store and the HTML parsing helpers of the fast tests
_spec = importlib.util.spec_from_file_location("lmsae_report_test_helpers",
                                               pathlib.Path(__file__).with_name("test_report.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

BROWSER_TIMEOUT_S = 30
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]


def chromium() -> str:
    path = os.environ.get("LMSAE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.access("/usr/bin/chromium", os.X_OK):
        path = "/usr/bin/chromium"
    if path is None or not os.access(path, os.X_OK):
        pytest.fail("headless Chromium is needed for the HTML report's browser tests and was not found; install "
                    "it with `apt-get install -y chromium` (or `make browser`), or point LMSAE_CHROMIUM at it")
    return path


def console_lines(stderr: str) -> list[str]:
    """Lines of Chromium's log that report a page's console output or an uncaught error."""
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line or "Uncaught" in line or "console.error" in line]


def dump_dom(url: str, profile: pathlib.Path) -> tuple[str, str]:
    """The DOM of ``url`` after its scripts ran, and Chromium's log."""
    res = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout, res.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("report") / "site"
    store = helpers.populate(helpers.FakeStore())
    helpers.make_report(store, out)
    return out


@pytest.fixture
def browse(site, tmp_path):
    def run(page: str) -> helpers._Collector:
        path, _, fragment = page.partition("#")
        dom, log = dump_dom((site / path).as_uri() + (f"#{fragment}" if fragment else ""), tmp_path / "profile")
        assert console_lines(log) == [], "\n".join(console_lines(log))
        assert 'data-ready="1"' in dom.split(">", 2)[1]  # the page's script ran to its end
        collector = helpers._Collector()
        collector.feed(dom)
        collector.dom = dom  # type: ignore[attr-defined]
        return collector

    return run


def order(collector) -> list[int]:
    return [int(r["data-index"]) for r in collector.rows]


def test_index_lists_features_in_index_order(browse):
    page = browse("index.html")
    assert order(page) == helpers.ANALYSED
    assert "1–6 of 6" in page.dom and 'aria-sort="ascending"' in page.dom


@pytest.mark.parametrize("fragment, expected", [
    # act_count = 10 * (index + 1), feature 3 dead: numbers sort descending by default
    ("sort=act_count", [5, 4, 2, 1, 0, 3]),
    ("sort=act_count&order=asc", [3, 0, 1, 2, 4, 5]),
    # features without a score come last whatever the order, by index
    ("sort=detection", [1, 2, 0, 3, 4, 5]),
    # density filter in percent (densities: 1, 2, 3, 0, 5, 6 %)
    ("dmin=2.5", [2, 4, 5]),
    # text search in explanations ("+" is a space in the fragment)
    ("q=%3Cpets%3E+%22named", [1]),
    # paging: two rows a page, second page
    ("size=2&page=2", [2, 3]),
])
def test_fragment_sorts_filters_and_pages_on_load(browse, fragment, expected):
    page = browse(f"index.html#{fragment}")
    assert order(page) == expected


def test_feature_page_shows_highlighted_contexts(browse):
    page = browse("features/1.html")
    assert page.contexts == [
        "The cat sat on the mat.",
        'The dog ran <script>alert(1)</script> & "quoted"↵\\x1b[31m',
        " the mat.",
    ]
    assert '<span class="on pk" style="--a:1.000" title="2.00"> cat</span>' in page.dom
    assert "<svg" in page.dom and page.dom.count('<rect class="bar"') == 4
    assert "<script>alert" not in page.dom and "&lt;script&gt;</span>alert(1)&lt;/script&gt;" in page.dom


def test_console_errors_are_detected(tmp_path):
    # the check above must not pass vacuously: a failing script shows up in the log
    broken = tmp_path / "broken.html"
    broken.write_text("<!doctype html><html><body><script>console.error('bad'); missing();</script></body></html>")
    _, log = dump_dom(broken.as_uri(), tmp_path / "profile")
    lines = console_lines(log)
    assert any("bad" in line for line in lines) and any("Uncaught ReferenceError" in line for line in lines)
