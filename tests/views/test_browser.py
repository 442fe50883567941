"""The HTML report in a real browser: headless Chromium (Debian's package) loads it from disk.

Checks the rendered page — every section drawn, the script ran, a hostile module name shows
as text — that nothing reached the console (errors, CSP violations), no dialog opened, no
request left the file, and saves a screenshot. ``make test`` installs Chromium; the test
skips only when it is absent and cannot be installed (not root, no apt-get).
"""

import json
import struct

import pytest
from chromium_cdp import INSTALL, Chromium, ensure_installed
from view_plans import XSS, hostile_plan, rich_plan

from autopar.views import build_view
from autopar.views.html import render_html

SECTIONS = ("mesh", "layers", "timeline", "memory", "breakdown", "alternatives", "passes", "shardings")
PAGE_FACTS = "(() => { const ids = " + json.dumps(SECTIONS) + ";" + """
  const box = id => document.getElementById(id).getBoundingClientRect();
  const sections = Object.fromEntries(ids.map(id => [id, [box(id).width, box(id).height]]));
  const device = document.querySelector('#mesh rect[data-rank="1"]');
  device.dispatchEvent(new MouseEvent('mouseenter'));
  const focused = [document.body.classList.contains('focus'), document.querySelectorAll('.hl').length];
  device.dispatchEvent(new MouseEvent('mouseleave'));
  return {sections, focused, unfocused: document.body.classList.contains('focus'),
          ready: Number(document.documentElement.getAttribute('data-ready')),
          marked: document.querySelectorAll('[data-rank]').length,
          svgs: document.querySelectorAll('svg').length, scripts: document.scripts.length,
          images: document.images.length, title: document.title,
          heading: document.querySelector('h1').textContent,
          pwned: typeof window.pwned, text: document.body.innerText};
})()"""


@pytest.fixture(scope="module")
def browser():
    executable = ensure_installed()
    if executable is None:
        pytest.skip(f"chromium is not installed and cannot be installed here; {INSTALL}")
    with Chromium(executable) as chromium:
        yield chromium


@pytest.mark.parametrize("make_plan", [rich_plan, hostile_plan], ids=["plan", "hostile-names"])
def test_report_renders_in_chromium(browser, make_plan, tmp_path):
    path = tmp_path / "report.html"
    path.write_text(render_html(build_view(make_plan())), encoding="utf-8")
    session, report = browser.open(path.as_uri())
    assert report.errors == [] and report.dialogs == []
    assert set(report.requests) == {path.as_uri()}  # the page itself, nothing else
    facts = browser.evaluate(session, PAGE_FACTS)
    for section, (width, height) in facts["sections"].items():
        assert width > 500 and height > 40, section
    assert facts["ready"] == facts["marked"] > 50  # the script ran over every marked element
    assert facts["focused"][0] and facts["focused"][1] > 5 and not facts["unfocused"]
    assert facts["svgs"] == 5 and facts["scripts"] == 1 and facts["images"] == 0
    assert facts["pwned"] == "undefined"
    for words in ("Device mesh", "Pipeline timeline", "Memory per device", "Alternatives considered"):
        assert words in facts["text"]
    assert "optimizer states" in facts["text"]  # the memory breakdown the plan stores, whatever its name
    if make_plan is hostile_plan:
        assert XSS in facts["title"] and XSS in facts["heading"] and XSS in facts["text"]
    shot = tmp_path / "report.png"
    width, height = browser.screenshot(session, shot)
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (width, height)
    assert width == 1280 and height > 1000


def test_the_checks_would_catch_a_broken_report(browser, tmp_path):
    """The same checks on a report with an injected script, a console error, a dialog and an
    external image: each is seen (the CSP blocks the script and the image)."""
    html = render_html(build_view(rich_plan()))
    injected = html.replace("</body>", '<img src="https://example.com/x.png"><script>alert(1)</script></body>')
    path = tmp_path / "injected.html"
    path.write_text(injected, encoding="utf-8")
    _, report = browser.open(path.as_uri())
    assert any("Content Security Policy" in e and "script" in e for e in report.errors)
    assert "https://example.com/x.png" in report.requests
    csp = html.split('content="', 1)[1].split('"', 1)[0]
    opened = html.replace(csp, "default-src 'none'; script-src 'unsafe-inline'").replace(
        "</body>", "<script>console.error('boom'); alert(3)</script></body>")
    path.write_text(opened, encoding="utf-8")
    _, report = browser.open(path.as_uri())
    assert "console: boom" in report.errors and report.dialogs == ["3"]
