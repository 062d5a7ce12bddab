"""The app's Dockerfile, checked by a dry run (Docker is not available where tunelab is developed): what it copies
exists and reaches the build context, what it pip-installs is what pyproject.toml / the Makefile pin, and the
command it runs is a real `tunelab serve` command line."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            joined.append(current)
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in joined]


def dockerignore_keeps(path: str) -> bool:
    """Docker's rule for a top-level path: the last matching .dockerignore pattern wins (`!` re-includes)."""
    kept = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatchcase(path.rstrip("/"), pattern):
            kept = negated
    return kept


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_dependencies() -> dict[str, Requirement]:
    return {canonicalize_name(Requirement(d).name): Requirement(d) for d in pyproject()["project"]["dependencies"]}


def pip_install_args(command: str) -> list[str]:
    """Package arguments of every `pip install` in a RUN command (options and their values dropped)."""
    words = shlex.split(command)
    found = []
    for i, word in enumerate(words):
        if word == "install" and i > 0 and words[i - 1] == "pip":
            rest = words[i + 1 :]
            skip_next = False
            for arg in rest:
                if arg in ("&&", ";", "|"):
                    break
                if skip_next:
                    skip_next = False
                elif arg in ("--index-url", "--extra-index-url", "-i", "--find-links", "-f"):
                    skip_next = True
                elif not arg.startswith("-"):
                    found.append(arg)
    return found


def test_every_copy_source_exists_and_is_in_the_build_context():
    copies = [args for name, args in instructions() if name == "COPY"]
    assert copies
    for args in copies:
        *sources, _destination = shlex.split(args)
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert dockerignore_keeps(source), f"COPY {source}: excluded by .dockerignore"


def test_pip_installs_are_the_versions_pyproject_and_makefile_pin():
    deps = pinned_dependencies()
    makefile = (REPO / "Makefile").read_text()
    llama_version = re.search(r"^LLAMA_CPP_VERSION\s*:=\s*(\S+)", makefile, re.M).group(1)
    copied_before: set[str] = set()
    packages = 0
    for name, args in instructions():
        if name == "COPY":
            copied_before.update(shlex.split(args)[:-1])
        if name != "RUN":
            continue
        for arg in pip_install_args(args):
            if arg == ".":
                assert {"pyproject.toml", "src"} <= copied_before, "pip install . before the project is copied"
                continue
            wanted = Requirement(arg)
            packages += 1
            declared = deps.get(canonicalize_name(wanted.name))
            assert declared is not None, f"{arg}: not a dependency in pyproject.toml"
            (pin,) = [s for s in wanted.specifier if s.operator == "=="]  # the image pins an exact version
            assert declared.specifier.contains(pin.version), f"{arg}: outside pyproject's {declared}"
            assert wanted.extras <= declared.extras, f"{arg}: extras not declared in pyproject"
            if canonicalize_name(wanted.name) == "llama-cpp-python":
                assert pin.version == llama_version, "the Makefile and the image must build the same llama.cpp"
    assert packages >= 2  # torch and llama-cpp-python are installed explicitly


def test_the_command_is_a_real_tunelab_serve_command_line():
    from typer.testing import CliRunner

    from tunelab.cli import app

    spec = dict(instructions())
    entrypoint, cmd = json.loads(spec["ENTRYPOINT"]), json.loads(spec["CMD"])
    assert entrypoint == ["tunelab"] and entrypoint[0] in pyproject()["project"]["scripts"]
    help_text = CliRunner().invoke(app, [cmd[0], "--help"], env={"COLUMNS": "200"}).output
    for option in (word for word in cmd if word.startswith("--")):
        assert option in help_text, f"CMD {option}: not an option of `tunelab {cmd[0]}`"
    assert cmd[cmd.index("--port") + 1] == spec["EXPOSE"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"  # reachable through `docker run -p`
    assert cmd[cmd.index("--feedback-db") + 1].startswith(spec["VOLUME"].strip('[]"') + "/")  # feedback survives


@pytest.mark.parametrize("path,kept", [("src", True), ("pyproject.toml", True), ("runs", False), ("tests", False)])
def test_dockerignore_keeps_only_what_the_image_needs(path, kept):
    assert dockerignore_keeps(path) is kept
