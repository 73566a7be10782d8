"""The quickstart notebook: committed with its outputs (plots visible on a repository page), and it
executes top to bottom (offline, tiny) through the public ``elm.api``, so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def outputs(nb) -> tuple[list[dict], str]:
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return outs, "".join(
        o.get("text", "") for o in outs if o.get("output_type") == "stream" and o["name"] == "stdout"
    )


def check(nb) -> str:
    outs, text = outputs(nb)
    assert not [o for o in outs if o.get("output_type") == "error"]
    assert (
        len([o for o in outs if "image/png" in o.get("data", {})]) == 4
    )  # PCA, CKA, architecture, accuracy bars
    assert "searched: accuracy" in text and "scratch: accuracy" in text and "searched - scratch = " in text
    return text


def test_committed_notebook_shows_its_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "elm.api.search(" in code and "elm.api.retrain(" in code and "elm.api.finetune(" in code
    assert "from elm." not in code  # the public API only, no internals
    text = check(nb)
    count = text.split("searched: ")[1].split(" parameters")[
        0
    ]  # one parameter count, printed the same everywhere
    assert f"ElmModel {count} parameters True" in text


@pytest.mark.slow
def test_quickstart_executes(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    check(nb)
