"""The package's shape: no import cycles, each module imports only from the levels below.

Read from the source with `ast`, so a function-level import counts as much as one at the
top of a module (that is how the read/validate cycle once hid).
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGE_DIR = REPO_ROOT / "koala_batch"

# Bottom to top; a module may import from its own level (without a cycle) and below.
LEVELS: list[set[str]] = [
    {"errors", "internals"},
    {"schemas", "storage", "keys", "model", "accelerations", "progress", "stats", "weights"},
    {"layout", "architectures", "config"},
    {"preflight", "lease"},
    {"read", "validate", "generate", "encode", "write"},
    {"commit", "card", "coverage"},
    {"job", "verify", "report", "submit"},
    {"cli", "__init__"},
]
LEVEL_OF = {module: level for level, modules in enumerate(LEVELS) for module in modules}


def package_imports(path: Path) -> set[str]:
    """Names of the koala_batch modules one source file imports, anywhere in it."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "koala_batch":
                imported.update(alias.name for alias in node.names)
            elif node.module.startswith("koala_batch."):
                imported.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("koala_batch."):
                    imported.add(alias.name.split(".")[1])
    return {name for name in imported if (PACKAGE_DIR / f"{name}.py").exists()}


GRAPH = {path.stem: package_imports(path) for path in sorted(PACKAGE_DIR.glob("*.py"))}


def test_every_module_has_a_level():
    assert set(GRAPH) == set(LEVEL_OF), "add new modules to LEVELS"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_module_imports_only_from_its_level_or_below(module):
    upward = sorted(name for name in GRAPH[module] if LEVEL_OF[name] > LEVEL_OF[module])
    assert not upward, f"{module} imports {upward} from a higher level"


def test_no_import_cycles():
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, f"cycle: {' -> '.join([*visiting, module])}"
        visiting.append(module)
        for name in GRAPH[module]:
            visit(name)
        visiting.pop()
        done.add(module)

    for module in GRAPH:
        visit(module)


def test_the_checker_sees_function_level_imports(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("def f():\n    from koala_batch.read import plan_input\n")
    assert package_imports(source) == {"read"}


def test_nothing_in_the_repo_reads_files_beside_it():
    # A user's clone stands alone: no tracked file may point at the folder beside it.
    listed = (
        subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    beside = ".." + "/shared"
    offenders = [
        name
        for name in listed
        if name
        and (REPO_ROOT / name).is_file()
        and beside in (REPO_ROOT / name).read_text(errors="ignore")
    ]
    assert offenders == []
