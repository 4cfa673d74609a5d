"""HTML pieces for notebook displays and reports. Everything is escaped with :func:`html.escape`,
images are embedded as base64 ``data:`` URIs (no external file, no network), and every display
also has a plain-text form for terminals.

>>> from skilllens.display import Display, table
>>> d = Display("<b>x</b>", "x", title="demo")
>>> d._repr_html_().count("<b>x</b>"), repr(d)
(1, 'x')
"""
from __future__ import annotations

import base64
import html
import io as _bytes_io
import os
from pathlib import Path

#: scoped style: every display is wrapped in ``<div class="skl">``; narrow screens scroll tables
CSS = ("<style>.skl{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:13px;"
       "line-height:1.35;max-width:100%}.skl h3{font-size:15px;margin:.4em 0}"
       ".skl h4{font-size:13px;margin:.6em 0 .2em}.skl .tw{overflow-x:auto;max-width:100%}"
       ".skl table{border-collapse:collapse;margin:.2em 0}.skl td,.skl th{border:1px solid #ccc;"
       "padding:2px 7px;text-align:left;vertical-align:top}.skl th{background:#f3f3f3}"
       ".skl img{max-width:100%;height:auto}.skl .note{color:#555;font-size:12px}"
       ".skl mark{background:#ffd866;padding:0 1px;border-radius:2px}"
       ".skl code{font-size:12px}.skl p,.skl h1,.skl h2,.skl h3,.skl h4,.skl li,"
       ".skl figcaption{overflow-wrap:anywhere}</style>")


def esc(x) -> str:
    """``html.escape(str(x))`` (quotes too)."""
    return html.escape(str(x), quote=True)


def short_hash(h, n: int = 12) -> str:
    """The first ``n`` characters of a hash (``"n/a"`` for None)."""
    return "n/a" if h is None else str(h)[:n]


def table(head: list, rows: list[list], caption: str | None = None, raw: bool = False) -> str:
    """An HTML table in a horizontally scrolling wrapper; cells are escaped unless ``raw``."""
    cell = (lambda c: str(c)) if raw else esc
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return ("<div class='tw'><table>" + cap + "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head)
            + "</tr>" + "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>"
                                for r in rows) + "</table></div>")


def kv_table(pairs) -> str:
    """A two-column table of ``(name, value)`` pairs (a dict works too)."""
    items = pairs.items() if isinstance(pairs, dict) else pairs
    return table(["", ""], [[k, v] for k, v in items]).replace("<tr><th></th><th></th></tr>", "")


def text_table(head: list, rows: list[list]) -> str:
    """The same table as fixed-width text (for ``__repr__`` in a terminal)."""
    cols = [list(map(str, c)) for c in zip(head, *rows)] if rows else [[str(h)] for h in head]
    widths = [max(len(x) for x in c) for c in cols]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def section(title: str, body: str, level: int = 4) -> str:
    return f"<h{level}>{esc(title)}</h{level}>{body}"


def figure_img(fig, alt: str, fmt: str = "png", dpi: int = 110, close: bool = True) -> str:
    """``<img>`` holding ``fig`` as a base64 PNG (or SVG) data URI; closes the figure."""
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    if close:
        import matplotlib.pyplot as plt
        plt.close(fig)
    mime = "image/svg+xml" if fmt == "svg" else f"image/{fmt}"
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img src='data:{mime};base64,{data}' alt='{esc(alt)}'>"


class Display:
    """A rendered object: ``_repr_html_`` for Jupyter, JupyterLab and VS Code, the plain
    ``text`` as ``repr`` in a terminal, and :meth:`save` to a standalone HTML page."""

    def __init__(self, html_body: str, text: str, title: str = "skilllens"):
        self.html, self.text, self.title = html_body, text, title

    def _repr_html_(self) -> str:
        return CSS + f"<div class='skl'>{self.html}</div>"

    def __repr__(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text

    def page(self) -> str:
        """A standalone HTML page (UTF-8, phone-friendly viewport)."""
        return ("<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' "
                "content='width=device-width,initial-scale=1'>"
                f"<title>{esc(self.title)}</title></head><body>{self._repr_html_()}</body></html>")

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`page` atomically to ``path``; returns the path."""
        from skilllens.io import write_text

        write_text(path, self.page())
        return Path(path)
