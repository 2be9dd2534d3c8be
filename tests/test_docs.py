"""The guides cannot rot: their Python blocks run, and generated tables match their generator."""

import re
import runpy
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(name: str) -> list[str]:
    """Every fenced ```python block of docs/<name>, in order."""
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


def test_guide_blocks_run(capsys):
    blocks = python_blocks("guide.md")
    assert len(blocks) == 3
    namespace: dict[str, object] = {}
    exec(compile("\n".join(blocks), str(DOCS / "guide.md"), "exec"), namespace)
    # the first block shows the error a replaced submodule raises
    assert "submodule '2' was replaced" in capsys.readouterr().out
    fresh = namespace["fresh"]
    assert fresh.num_updates == 2  # the old history (one update) carried over, plus one
    demo, tensors = namespace["demo"], namespace["tensors"]
    assert set(tensors) == set(demo.state_dict())


def test_snapshot_table_is_the_solvers():
    generated = runpy.run_path(str(DOCS / "snapshot_table.py"))["table"]()
    text = (DOCS / "guide.md").read_text()
    found = re.search(
        r"<!-- snapshot-table: begin.*?-->\n(.*?)\n<!-- snapshot-table: end", text, re.S
    )
    assert found, "the table's markers are missing from docs/guide.md"
    assert found.group(1) == generated


def test_relative_links_resolve():
    root = DOCS.parent
    pages = [root / "README.md", *sorted(DOCS.glob("*.md"))]
    links = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+?\.(?:md|py))\)", page.read_text()):
            links += 1
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"
    assert links >= 3
