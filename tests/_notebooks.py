"""The one runner the notebook tests share: read a notebook under ``notebooks/``, execute it top
to bottom with nbclient on the ``python3`` kernel, and hand back what a reader would see.

Tests call it through the ``run_notebook`` fixture (tests/conftest.py), which also sets the
kernel's environment. A test skips when nbformat or nbclient is not installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def read_notebook(name: str):
    """``notebooks/<name>`` as an nbformat v4 notebook (skips without nbformat)."""
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(NOTEBOOKS / name, as_version=4)


@dataclass
class ExecutedNotebook:
    """An executed notebook and its code cells' outputs, in cell order."""
    nb: object

    @property
    def outputs(self) -> list:
        return [o for c in self.nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]

    @property
    def errors(self) -> list:
        return [o for o in self.outputs if o.get("output_type") == "error"]

    @property
    def text(self) -> str:
        """Everything the cells printed (stream outputs), joined."""
        return "".join(o.get("text", "") for o in self.outputs)

    @property
    def html(self) -> list[str]:
        """Every ``text/html`` rich display."""
        return [o["data"]["text/html"] for o in self.outputs if "text/html" in o.get("data", {})]


def execute_notebook(name: str, *, cwd: Path = REPO, timeout: int = 600) -> ExecutedNotebook:
    """Execute ``notebooks/<name>`` with the kernel's working directory ``cwd`` (``timeout``
    seconds per cell); a cell that raises fails the test (nbclient's CellExecutionError)."""
    nbclient = pytest.importorskip("nbclient")
    nb = read_notebook(name)
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return ExecutedNotebook(nb)
