"""Rich displays: small HTML building blocks (escaped tables, inline images, a ``Display``
object with ``_repr_html_``, ``__repr__`` and ``save``) and the paper figure style (the
colour-blind-safe Okabe-Ito palette, one- and two-column sizes).

This subpackage sits just above :mod:`skilllens.io` and imports nothing else of skilllens, so
every layer can render with it; each class's own renderer lives in its subpackage
(``core/display.py``, ``stats/display.py``, ``unlearning/display.py``, ...).
"""
from skilllens.display.html import (Display, esc, figure_img, kv_table, section, short_hash,
                                    table, text_table)
from skilllens.display.style import (COLUMN_WIDTH, PAGE_WIDTH, PALETTE, paper_figure,
                                     small_multiples)

__all__ = ["Display", "esc", "figure_img", "kv_table", "section", "short_hash", "table",
           "text_table", "COLUMN_WIDTH", "PAGE_WIDTH", "PALETTE", "paper_figure",
           "small_multiples"]
