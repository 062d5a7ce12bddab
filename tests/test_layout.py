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

# Lowest first, one rank per stage (no two stages may import each other). Modules at the top of the package
# (errors.py, config.py, io.py, hub.py, ...) are the base. experiments/ sits above bench/: a study or a promotion
# gate measures with the bench's functions; the bench needs nothing from the experiments.
STAGES = ["<base>", "models", "data", "train", "eval", "export", "serve", "doctor", "bench", "experiments", "cli"]
RANK = {stage: rank for rank, stage in enumerate(STAGES)}


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


def test_bench_and_experiments_are_ordered(tmp_path):
    """bench/ is below experiments/: an experiment may use the bench, the bench may not use an experiment."""
    assert RANK["bench"] < RANK["experiments"]
    module = tmp_path / "commands.py"
    module.write_text("def bench():\n    from tunelab.experiments.quickstart import run_quickstart\n")
    assert upward_imports(module, "bench") == ["line 2: tunelab.experiments.quickstart (experiments)"]
    module.write_text("from tunelab.bench.infer import measure_model\n")
    assert upward_imports(module, "experiments") == []


def test_the_checker_sees_an_upward_import_even_inside_a_function(tmp_path):
    module = tmp_path / "loop.py"
    module.write_text(
        "from tunelab.train.batching import make_batch\n\n"
        "def evaluate():\n    from tunelab.eval.evaluate import evaluate_run\n"
    )
    assert upward_imports(module, "train") == ["line 4: tunelab.eval.evaluate (eval)"]
    assert stage_of("tunelab.io") == "<base>" and stage_of("tunelab.serve.app") == "serve"


def test_design_doc_maps_every_module():
    """docs/design.md names every module of the package (its layout block is the map a newcomer reads first)."""
    design = (PACKAGE.parent.parent / "docs" / "design.md").read_text(encoding="utf-8")
    unnamed = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py" and path.name not in design
    ]
    assert unnamed == []
