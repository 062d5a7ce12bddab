"""The stage layout of src/tunelab (docs/design.md): a module imports only from its own stage or lower ones.

Every `import tunelab...` / `from tunelab... import` in every module is checked, including the imports inside
functions (they run too, only later), so the rule cannot be dodged by importing lazily.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tunelab

PACKAGE = Path(tunelab.__file__).resolve().parent

# Lowest first. Modules at the top of the package (errors.py, config.py, io.py, hub.py, ...) are the base.
STAGES = ["<base>", "models", "data", "train", "eval", "export", "serve", "doctor", "bench", "experiments", "cli"]
RANK = {
    "<base>": 0,
    "models": 1,
    "data": 2,
    "train": 3,
    "eval": 4,
    "export": 5,
    "serve": 6,
    "doctor": 7,
    "bench": 8,
    "experiments": 8,
    "cli": 9,
}


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # `tunelab` itself (__version__)
        return "<base>"
    name = parts[1]
    if name == "cli":
        return "cli"
    return name if (PACKAGE / name).is_dir() else "<base>"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def tunelab_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every tunelab import in the file, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tunelab"]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] == "tunelab":
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; use the absolute tunelab.* name")
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_stage_folder_is_known():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= set(STAGES), f"a new stage folder needs its place in STAGES: {folders - set(STAGES)}"


def upward_imports(path: Path, own: str) -> list[str]:
    return [
        f"line {line}: {target} ({stage_of(target)})"
        for line, target in tunelab_imports(path)
        if RANK[stage_of(target)] > RANK[own]
    ]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_import(path):
    own = stage_of(module_name(path))
    upward = upward_imports(path, own)
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}) imports from a higher stage: " + "; ".join(upward)


def test_the_checker_sees_an_upward_import_even_inside_a_function(tmp_path):
    module = tmp_path / "loop.py"
    module.write_text(
        "from tunelab.train.batching import make_batch\n\n"
        "def evaluate():\n    from tunelab.eval.evaluate import evaluate_run\n"
    )
    assert upward_imports(module, "train") == ["line 4: tunelab.eval.evaluate (eval)"]
    assert stage_of("tunelab.io") == "<base>" and stage_of("tunelab.serve.app") == "serve"
