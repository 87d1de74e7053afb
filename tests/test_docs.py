"""The docs point at files that exist, inside the repository.

Every file name the docs and the kernel layer's docstrings mention in backticks (``x.py``,
``dir/x.md``, ...) must exist in the repository, so that a rename that forgets a reference fails
here; and none of them cites the design notes that live outside the repository.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "csrc" / "README.md", *(ROOT / "docs").glob("*.md"),
               *(ROOT / "altlora_kernels").glob("*.py")])
# A backticked file name: no spaces or placeholders, one of the extensions the repo's files have.
FILE_NAME = re.compile(r"`{1,2}([A-Za-z0-9_./-]+\.(?:py|md|cpp|h|toml|sh))`{1,2}")
# Folders a bare file name (no "/") may live in.
SEARCHED = ("", "altlora_kernels", "python/altlora", "python/altlora/finetune", "csrc", "tests", "bench",
            "docs", "examples", "experiments")


def _exists(name: str, doc: Path) -> bool:
    if "/" in name:
        return (ROOT / name).exists() or (doc.parent / name).exists()
    return any((ROOT / folder / name).exists() for folder in SEARCHED)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_a_doc_names_exists(doc):
    text = doc.read_text(encoding="utf-8")
    missing = sorted({name for name in FILE_NAME.findall(text) if not _exists(name, doc)})
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"
    assert "DESIGN.md" not in text, f"{doc.relative_to(ROOT)} cites design notes outside the repository"


def test_the_math_contract_is_in_the_repository():
    text = (ROOT / "docs" / "math.md").read_text(encoding="utf-8")
    for section in ("## A phase", "## Schedules", "## Damping escalation", "## State layout", "## Precision"):
        assert section in text
