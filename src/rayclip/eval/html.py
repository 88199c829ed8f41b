"""The benchmark eval as one self-contained HTML page: Recall@K curves, the worst-ranked queries.

Everything is inline (SVG for the curves, thumbnails from the store as JPEG data URIs), so the page
can be mailed, attached to a ticket or opened from the build folder without a server.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from ..store import layout, storage

THUMB_PX = 96
THUMB_QUALITY = 70
# Curve colours: one per direction; chance drawn dashed in the same colour.
COLOURS = {"text_to_image": "#1f6feb", "image_to_text": "#d1242f"}
LABELS = {"text_to_image": "text→image", "image_to_text": "image→text"}
WIDTH, HEIGHT, MARGIN = 560, 320, 44

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1f2328; max-width: 1100px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table.recall { border-collapse: collapse; } .recall td, .recall th { padding: 3px 10px; text-align: right; }
.recall th { border-bottom: 1px solid #d0d7de; } .muted { color: #656d76; }
.query { display: flex; gap: 10px; align-items: flex-start; margin: 10px 0; padding-bottom: 10px;
         border-bottom: 1px solid #eaeef2; }
.query .text { width: 260px; flex: none; } figure { margin: 0; width: 100px; font-size: 11px; text-align: center; }
figure img { width: 96px; height: 96px; object-fit: cover; border: 3px solid transparent; }
figure.hit img { border-color: #1a7f37; } ol { margin: 0; padding-left: 20px; }
li.hit { color: #1a7f37; font-weight: 600; }
"""


def _thumbnail(root: Path, relpath: str | None, cache: dict[str, str]) -> str:
    """A small JPEG of a stored image as a data URI ('' when the store no longer has it)."""
    from PIL import Image

    if not relpath:
        return ""
    if relpath not in cache:
        try:
            with storage.open_input(root / relpath) as f, Image.open(f) as img:
                img = img.convert("RGB")
                img.thumbnail((THUMB_PX, THUMB_PX))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=THUMB_QUALITY)
            cache[relpath] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        except OSError:
            cache[relpath] = ""
    return cache[relpath]


def _figure(root: Path, image: dict, caption: str, hit: bool, cache: dict[str, str]) -> str:
    src = _thumbnail(root, image.get("path"), cache)
    picture = f'<img src="{src}" alt="">' if src else '<div class="muted">(not in the store)</div>'
    return f'<figure class="{"hit" if hit else ""}">{picture}<figcaption>{html.escape(caption)}</figcaption></figure>'


def recall_svg(curve: dict[str, list]) -> str:
    """Recall@K against K (log axis) for both directions, chance dashed beneath."""
    ks = curve["k"]
    k_max = max(ks[-1], 2)
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    def x(k: float) -> float:
        return MARGIN + plot_w * math.log(k) / math.log(k_max)

    def y(r: float) -> float:
        return MARGIN + plot_h * (1 - r)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-size="11">']
    for r in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<line x1="{MARGIN}" x2="{WIDTH - MARGIN}" y1="{y(r):.1f}" y2="{y(r):.1f}" stroke="#eaeef2"/>')
        parts.append(f'<text x="{MARGIN - 6}" y="{y(r) + 4:.1f}" text-anchor="end">{r:g}</text>')
    for k in sorted({1, 5, 10, 20, 50, ks[-1]}):
        if k <= ks[-1]:
            parts.append(
                f'<line x1="{x(k):.1f}" x2="{x(k):.1f}" y1="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#eaeef2"/>'
            )
            parts.append(f'<text x="{x(k):.1f}" y="{HEIGHT - MARGIN + 16}" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 6}" text-anchor="middle">K (log scale)</text>')
    parts.append(
        f'<text x="12" y="{HEIGHT / 2}" transform="rotate(-90 12 {HEIGHT / 2})" text-anchor="middle">Recall@K</text>'
    )
    for row, (direction, colour) in enumerate(COLOURS.items()):
        for key, dash in ((direction, ""), (f"chance_{direction}", ' stroke-dasharray="5 4"')):
            points = " ".join(f"{x(k):.1f},{y(r):.1f}" for k, r in zip(ks, curve[key]))
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        legend_x = MARGIN + 200 * row  # above the plot, where no curve can reach
        parts.append(
            f'<text x="{legend_x}" y="{MARGIN - 22}" fill="{colour}">{LABELS[direction]} (dashed: chance)</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _recall_table(report) -> str:
    rows = "".join(
        f"<tr><th>R@{k}</th><td>{report.text_to_image[k]:.3f}</td><td class=muted>{report.chance_text_to_image[k]:.3f}"
        f"</td><td>{report.image_to_text[k]:.3f}</td><td class=muted>{report.chance_image_to_text[k]:.3f}</td></tr>"
        for k in report.text_to_image
    )
    head = "<tr><th></th><th>text→image</th><th>chance</th><th>image→text</th><th>chance</th></tr>"
    return f'<table class="recall">{head}{rows}</table>'


def _worst_text_queries(root: Path, queries: list[dict], cache: dict[str, str]) -> str:
    blocks = []
    for q in queries:
        own = _figure(root, q["image"], "its image", True, cache)
        top = "".join(_figure(root, r, f"#{n} · {r['score']:.3f}", r["hit"], cache) for n, r in enumerate(q["top"], 1))
        rank = f'<span class="muted">its image ranks {q["rank"]}</span>'
        text = f'<div class="text">“{html.escape(q["caption"])}”<br>{rank}</div>'
        blocks.append(f'<div class="query">{text}{own}{top}</div>')
    return "".join(blocks)


def _worst_image_queries(root: Path, queries: list[dict], cache: dict[str, str]) -> str:
    blocks = []
    for q in queries:
        image = _figure(root, q["image"], f"best caption ranks {q['rank']}", False, cache)
        own = "".join(f"<li>{html.escape(c)}</li>" for c in q["captions"])
        top = "".join(
            f'<li class="{"hit" if r["hit"] else ""}">{html.escape(r["caption"])} '
            f'<span class="muted">{r["score"]:.3f}</span></li>'
            for r in q["top"]
        )
        blocks.append(
            f'<div class="query">{image}<div class="text"><b>its captions</b><ul>{own}</ul></div>'
            f"<div><b>top captions</b><ol>{top}</ol></div></div>"
        )
    return "".join(blocks)


def render(root: Path, report) -> str:
    """The page for one BenchmarkReport; thumbnails are read from the store under `root`."""
    cache: dict[str, str] = {}
    split = f", split {report.split}" if report.split else ""
    title = f"{report.dataset}{split}: {report.model_version}"
    facts = (
        f"{report.images} images, {report.captions} captions ({report.annotations}); build {report.build_id}. "
        f"Definition: {report.definition} (source: {report.source})."
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>rayclip eval — {html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>Retrieval eval — {html.escape(title)}</h1><p class=muted>{html.escape(facts)}</p>"
        f"{_recall_table(report)}<h2>Recall@K</h2>{recall_svg(report.curve)}"
        f"<h2>Worst-ranked captions (text→image): their top 5 images, the right one outlined</h2>"
        f"{_worst_text_queries(root, report.worst['text_to_image'], cache)}"
        f"<h2>Worst-ranked images (image→text): their top 5 captions, their own in green</h2>"
        f"{_worst_image_queries(root, report.worst['image_to_text'], cache)}"
        "</body></html>\n"
    )


def write(root: Path, report) -> Path:
    """eval.html next to the build's eval.json."""
    path = layout.eval_html_file(layout.build_dir(root, report.model_version, report.build_id))
    storage.write_atomic(path, render(root, report))
    return path
