"""The report's look: one inline stylesheet and the page shell (no external fonts, scripts or URLs)."""

from __future__ import annotations

from html import escape

from protoquant.render.text import shown_name

CSS = """
:root {
  --bg: #f5f6f8; --card: #ffffff; --ink: #18202e; --muted: #5d6677; --line: #e2e5eb;
  --accent: #2f5bd3; --accent-soft: #e9effd; --radius: 14px;
  --sans: system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "Helvetica Neue", Arial, sans-serif;
}
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; background: var(--bg); color: var(--ink); font: 16px/1.55 var(--sans); }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
header.top { position: sticky; top: 0; z-index: 5; background: rgba(255,255,255,.94);
  border-bottom: 1px solid var(--line); }
header.top .inner { max-width: 1180px; margin: 0 auto; padding: 10px 24px; display: flex;
  align-items: center; gap: 20px; flex-wrap: wrap; }
.brand { font-weight: 700; letter-spacing: -.01em; color: var(--ink); }
.brand span { color: var(--accent); }
nav { display: flex; gap: 4px; flex-wrap: wrap; }
nav a { color: var(--muted); padding: 6px 12px; border-radius: 999px; font-size: .92rem; }
nav a:hover { text-decoration: none; background: var(--accent-soft); color: var(--accent); }
nav a.active { background: var(--accent); color: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 48px; }
h1 { font-size: clamp(1.6rem, 1.2rem + 1.6vw, 2.3rem); line-height: 1.15; letter-spacing: -.02em; margin: 0 0 .3em; }
h2 { font-size: 1.35rem; line-height: 1.25; letter-spacing: -.01em; margin: 0 0 .4em; }
h3 { font-size: 1.05rem; margin: 0 0 .5em; }
.lead { color: var(--muted); max-width: 72ch; margin: 0 0 1.2em; font-size: 1.05rem; }
.muted { color: var(--muted); }
.small { font-size: .85rem; }
.num { font-variant-numeric: tabular-nums; }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr)); gap: 14px; margin: 8px 0 30px; }
.stat { background: var(--card); border: 1px solid var(--line); border-radius: var(--radius); padding: 14px 18px; }
.stat .value { font-size: 1.7rem; font-weight: 680; letter-spacing: -.02em; font-variant-numeric: tabular-nums; }
.stat .label { color: var(--muted); font-size: .85rem; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: var(--radius); padding: 22px;
  margin: 0 0 26px; box-shadow: 0 1px 2px rgba(16,24,40,.05); }
figure { margin: 0; }
img.tile { display: block; width: 100%; height: auto; border-radius: 8px; background: #e9ecf1; }
figcaption { font-size: .8rem; color: var(--muted); margin-top: 5px; line-height: 1.35; font-variant-numeric: tabular-nums; }
.exp-head { display: grid; grid-template-columns: minmax(150px, 230px) 1fr; gap: 24px; align-items: start; margin-bottom: 18px; }
.kicker { text-transform: uppercase; letter-spacing: .08em; font-size: .72rem; color: var(--muted); font-weight: 600; }
.pill { display: inline-block; padding: 2px 10px; border-radius: 999px; background: var(--accent-soft);
  color: var(--accent); font-size: .95rem; font-weight: 650; vertical-align: middle; font-variant-numeric: tabular-nums; }
.probs { list-style: none; padding: 0; margin: 10px 0 12px; max-width: 560px; }
.probs li { display: grid; grid-template-columns: minmax(9ch, 22ch) 1fr 6.5ch; gap: 12px; align-items: center;
  font-size: .9rem; padding: 3px 0; }
.probs li .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.probs li.top .name { font-weight: 650; }
.bar { height: 8px; background: #edf0f5; border-radius: 999px; overflow: hidden; }
.bar > span { display: block; height: 100%; background: var(--accent); border-radius: 999px; }
.right { text-align: right; }
.why { border-top: 1px solid var(--line); padding-top: 14px; margin-top: 6px; }
details.why > summary { cursor: pointer; font-weight: 600; padding: 4px 0; }
.evidence { list-style: none; padding: 0; margin: 0; }
.evidence > li { display: grid; grid-template-columns: 2rem minmax(120px, 160px) minmax(72px, 108px) 3.5rem minmax(0, 1fr) minmax(130px, 170px);
  gap: 16px; align-items: center; padding: 14px 0; border-top: 1px dashed var(--line); }
.evidence > li:first-child { border-top: 0; }
.rank { width: 2rem; height: 2rem; border-radius: 50%; background: var(--accent-soft); color: var(--accent);
  display: grid; place-items: center; font-weight: 700; font-size: .9rem; }
.looks { color: var(--muted); font-style: italic; font-size: .85rem; text-align: center; }
.that { display: grid; grid-template-columns: repeat(auto-fill, minmax(72px, 108px)); gap: 10px; }
.clip { display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.grid.wide { grid-template-columns: repeat(auto-fill, minmax(min(100%, 480px), 1fr)); }
.that figure.source img.tile { outline: 2px dashed var(--line); outline-offset: 2px; }
.colourbar { display: grid; grid-template-columns: minmax(120px, 260px) 1fr; gap: 2px 12px; align-items: center; margin-top: 8px; }
.colourbar .ramp { display: block; height: 10px; border-radius: 999px; }
.colourbar .ends { display: flex; justify-content: space-between; font-size: .75rem; color: var(--muted); grid-column: 1; }
.colourbar .muted { grid-column: 2; grid-row: 1 / 3; }
img.strip-img { display: block; width: 100%; height: auto; border-radius: 6px; image-rendering: auto; }
.contrib { font-size: 1.35rem; font-weight: 700; font-variant-numeric: tabular-nums; letter-spacing: -.01em; }
.formula { font-size: .82rem; color: var(--muted); font-variant-numeric: tabular-nums; margin-bottom: 6px; }
.rest { font-size: .85rem; color: var(--muted); margin: 10px 0 0 calc(2rem + 16px); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 18px; }
.grid > .card { margin: 0; padding: 16px; }
.proto-head { display: flex; justify-content: space-between; align-items: baseline; gap: 4px 12px;
  flex-wrap: wrap; margin-bottom: 10px; }
.proto-head h3 { margin: 0; white-space: nowrap; }
.strip { display: grid; grid-template-columns: repeat(5, minmax(0, 1fr)); gap: 6px; }
.strip figcaption { font-size: .72rem; text-align: center; }
.strip figcaption b { color: var(--ink); font-weight: 600; }
.chips { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 12px; }
.chip { font-size: .78rem; padding: 2px 9px; border-radius: 999px; background: #f0f2f6; color: var(--ink);
  font-variant-numeric: tabular-nums; }
.chip b { font-weight: 650; }
.minis { display: grid; grid-template-columns: repeat(auto-fill, minmax(112px, 1fr)); gap: 14px; }
table.facts { border-collapse: collapse; width: 100%; font-size: .93rem; }
table.facts th, table.facts td { text-align: left; padding: 8px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
table.facts th { color: var(--muted); font-weight: 600; width: 34%; }
table.facts td.n { text-align: right; font-variant-numeric: tabular-nums; }
img.figure { max-width: 100%; height: auto; display: block; border-radius: 8px; }
footer { max-width: 1180px; margin: 0 auto; padding: 0 24px 40px; color: var(--muted); font-size: .82rem; }
@media (max-width: 860px) {
  .evidence > li { grid-template-columns: 2rem minmax(0, 1fr) minmax(0, 1fr) minmax(0, 1fr); }
  .evidence > li .looks { display: none; }
  .evidence > li .that { grid-column: 2 / 5; grid-template-columns: repeat(4, minmax(0, 1fr)); }
  .evidence > li .numbers { grid-column: 4; grid-row: 1; }
  .rest { margin-left: 0; }
}
@media (max-width: 560px) {
  main { padding: 18px 14px 36px; }
  .exp-head { grid-template-columns: 1fr; }
  .exp-head figure.input { max-width: 260px; }
  .card { padding: 16px; }
  .grid { grid-template-columns: 1fr; }
  .stats { grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 10px; }
  .stat .value { font-size: 1.35rem; }
  .colourbar { grid-template-columns: 1fr; }
  .colourbar .muted { grid-column: 1; grid-row: auto; }
}
"""

PAGES = (
    ("index.html", "Explanations"),
    ("prototypes.html", "Prototypes"),
    ("classes.html", "Classes"),
    ("model.html", "Model"),
)


def page(title: str, current: str, body: str, footer: str) -> str:
    """A complete HTML document: inline CSS, navigation bar with `current` highlighted."""
    active = ' class="active" aria-current="page"'
    links = "".join(
        f'<a href="{href}"{active if href == current else ""}>{label}</a>' for href, label in PAGES
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(shown_name(title))}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<header class="top"><div class="inner"><a class="brand" href="index.html">proto<span>quant</span></a>'
        f"<nav>{links}</nav></div></header>\n<main>\n{body}\n</main>\n"
        f"<footer>{footer}</footer>\n</body>\n</html>\n"
    )
