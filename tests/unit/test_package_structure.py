"""The package's shape: no import cycles, each part imports only from its layer or below.

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

# Bottom to top: the ground, the job spec, the models and the input, the output, the
# stages of the graph, running a job, the command line. A part may import from its own
# layer (without a cycle) and below. A part is a top-level module or a subpackage.
LAYERS: list[set[str]] = [
    {"errors", "keys", "schemas", "storage", "compat", "presets"},
    {"spec"},
    {"models", "inputs"},
    {"output"},
    {"stages"},
    {"runtime"},
    {"cli", "__init__"},
]
LAYER_OF = {part: layer for layer, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    """A source file's module under koala_batch, dotted: `runtime.job`, `errors`."""
    parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def package_imports(path: Path) -> set[str]:
    """The koala_batch modules one source file imports, anywhere in it, dotted."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "koala_batch" or node.module.startswith("koala_batch."):
                base = node.module.removeprefix("koala_batch").lstrip(".")
                for alias in node.names:
                    candidate = f"{base}.{alias.name}" if base else alias.name
                    imported.add(candidate if candidate in MODULES else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("koala_batch."):
                    imported.add(alias.name.removeprefix("koala_batch."))
    return {name for name in imported if name in MODULES and name}


def part_of(module: str) -> str:
    return module.split(".")[0]


GRAPH = {module: package_imports(path) for module, path in MODULES.items()}


def test_every_part_has_a_layer():
    assert {part_of(module) for module in GRAPH} == set(LAYER_OF), "add new parts to LAYERS"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_module_imports_only_from_its_layer_or_below(module):
    here = LAYER_OF[part_of(module)]
    upward = sorted(name for name in GRAPH[module] if LAYER_OF[part_of(name)] > here)
    assert not upward, f"{module} imports {upward} from a higher layer"


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
    source.write_text("def f():\n    from koala_batch.inputs.files import plan_input\n")
    assert package_imports(source) == {"inputs.files"}


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
