"""report.md as one self-contained HTML page: its tables rendered, its plots inlined as data URIs, so
the page shows whole wherever it is opened on its own (an MLflow artifact, Snakemake's report)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}
code{background:#f3f3f3;padding:0 3px}"""
IMG = re.compile(r'<img src="([^"]+\.png)"')


def markdown_html(md: str, base: Path) -> str:
    """The page: ``md`` rendered (CommonMark with tables), each relative PNG under ``base`` inlined; a
    PNG that is missing stays a link (the page says what it lacks instead of failing the report)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(md)

    def inline(m: re.Match) -> str:
        path = base / m.group(1)
        if not path.is_file():
            return m.group(0)
        return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    title = next((line[2:].strip() for line in md.splitlines() if line.startswith("# ")), "report")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{IMG.sub(inline, body)}</body></html>\n")
