"""The HTML report's inline stylesheet, script, colours and Content-Security-Policy.

Data flow: constants read by ``views.html`` and ``views.svg`` while they write the report.
The policy allows nothing from the network and only this exact script (by its SHA-256), so
even a string that escaped escaping could not run or load anything.
"""

from __future__ import annotations

import base64
import colorsys
import hashlib

KIND_COLOURS = {
    "forward": "#4e79a7", "backward": "#59a14f", "backward_weight": "#9bd08f", "recompute": "#f28e2b",
    "send": "#b07aa1", "recv": "#e2c6dc",
}
MEMORY_COLOURS = {
    "weights": "#4e79a7", "gradients": "#a0cbe8", "optimizer states": "#59a14f", "activations": "#f28e2b",
    "logits": "#e15759", "reserve": "#bab0ac", "peak": "#76b7b2",
}
BREAKDOWN_COLOURS = {
    "compute": "#4e79a7", "recompute": "#f28e2b", "tp_comm": "#b07aa1", "pp_comm": "#ff9da7",
    "dp_comm": "#9c755f", "ep_comm": "#edc948", "cp_comm": "#59a14f", "bubble": "#bab0ac",
    "optimizer": "#76b7b2",
}


def rank_colour(index: int) -> str:
    """Distinct colours for any number of pipeline ranks (golden-angle hues), as ``#rrggbb``."""
    red, green, blue = colorsys.hls_to_rgb(index * 137.508 % 360 / 360, 0.58 if index % 2 else 0.48, 0.55)
    return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


CSS = """
:root{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;background:#fafafa}
body{margin:0 auto;max-width:1180px;padding:16px 20px 40px}
h1{font-size:22px;margin:4px 0}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#555;margin:2px 0 10px}.note{color:#666;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:19px}.card span{color:#666;font-size:12px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto;background:#fff;border:1px solid #ddd;border-radius:4px;padding:4px}
svg text{font-size:11px;fill:#333}svg .axis{stroke:#999}svg .cap{stroke:#d62728;stroke-dasharray:4 3}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;margin:6px 0}
.legend i{display:inline-block;width:11px;height:11px;margin-right:4px;vertical-align:-1px;border-radius:2px}
.focus [data-rank]:not(.hl){opacity:.22}
code{background:#f0f0f0;padding:0 3px;border-radius:3px}
details summary{cursor:pointer;color:#444}
"""

JS = """(function () {
  var marked = document.querySelectorAll('[data-rank]');
  function focus(rank) {
    document.body.classList.toggle('focus', rank !== null);
    marked.forEach(function (el) {
      el.classList.toggle('hl', rank !== null && el.getAttribute('data-rank') === rank);
    });
  }
  marked.forEach(function (el) {
    el.addEventListener('mouseenter', function () { focus(el.getAttribute('data-rank')); });
    el.addEventListener('mouseleave', function () { focus(null); });
  });
  document.documentElement.setAttribute('data-ready', String(marked.length));
})();"""

CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'sha256-"
       + base64.b64encode(hashlib.sha256(JS.encode()).digest()).decode() + "'")
