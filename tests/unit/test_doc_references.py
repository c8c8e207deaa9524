"""Comments and docstrings cite the project's own documents, and those documents exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"\b(?:docs/[\w.-]+\.md|[\w./-]*PROTOCOL\.md|[\w./-]*CLIENTS\.md)")


def test_cited_documents_exist_in_the_repository() -> None:
    sources = [*ROOT.glob("mirror/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*")]
    cited = {
        (path.relative_to(ROOT).as_posix(), name)
        for path in sources
        if path.is_file() and path.name != Path(__file__).name
        for name in CITED.findall(path.read_text(errors="replace"))
    }
    missing = sorted((source, name) for source, name in cited if not (ROOT / name).is_file())
    assert missing == []
    assert ("mirror/upstream/client.py", "docs/protocol.md") in cited
