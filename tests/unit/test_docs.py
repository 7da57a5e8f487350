"""The docs a newcomer reads: a short README, a module map that matches the package, and
relative links that lead somewhere.

- README.md stays under 300 lines; the long material lives in docs/*.md.
- docs/architecture.md lists every module of koala_batch/ exactly once, as a bullet
  "- `koala_batch/path/to/module.py`: ...", and nothing that is not there.
- Every relative markdown link in README.md, CONTRIBUTING.md and docs/*.md names a file
  that exists (web links and in-page anchors are not checked, nor #fragments).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"
PACKAGE_DIR = REPO_ROOT / "koala_batch"
README_MAX_LINES = 300

MODULE_BULLET = re.compile(r"^- `(koala_batch/[\w/]+\.py)`", re.MULTILINE)
# [text](target) or ![alt](target), the target up to a space or the closing parenthesis
# (an optional "title" after the space is ignored).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def markdown_files() -> list[Path]:
    return [README, REPO_ROOT / "CONTRIBUTING.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def relative_links(text: str) -> list[str]:
    """The relative link targets of a markdown text, #fragments stripped, code blocks
    left out (a recipe's `dataset[0]["image"]` is not a link)."""
    prose = FENCE.sub("", text)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    targets = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http(s)://, mailto: and the like; an anchor in the same page
        path = target.split("#", 1)[0]
        if path:
            targets.append(path)
    return targets


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, (
        f"README.md has {lines} lines, at most {README_MAX_LINES - 1} allowed: move the "
        "details into docs/*.md and link them"
    )


def test_architecture_lists_every_module_and_no_other():
    listed = MODULE_BULLET.findall(ARCHITECTURE.read_text())
    on_disk = {path.relative_to(REPO_ROOT).as_posix() for path in PACKAGE_DIR.rglob("*.py")}
    missing = sorted(on_disk - set(listed))
    extra = sorted(set(listed) - on_disk)
    twice = sorted({path for path in listed if listed.count(path) > 1})
    assert not (missing or extra or twice), (
        "docs/architecture.md's module list does not match koala_batch/:\n"
        f'  missing (add a bullet "- `path`: what it owns"): {missing}\n'
        f"  extra (no such file): {extra}\n"
        f"  listed more than once: {twice}"
    )


@pytest.mark.parametrize(
    "document", markdown_files(), ids=lambda path: path.relative_to(REPO_ROOT).as_posix()
)
def test_relative_links_lead_to_files(document: Path):
    broken = [
        target
        for target in relative_links(document.read_text())
        if not (document.parent / target).is_file()
    ]
    assert not broken, f"{document.relative_to(REPO_ROOT)} links to missing files: {broken}"
