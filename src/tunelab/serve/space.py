"""A Hugging Face Space folder (Gradio, CPU) that serves tunelab's app (Chat, Travel Planner, Feedback, Overview)
with the exported q4_k_m GGUF.

tunelab is not on PyPI, so the part of the package the app needs is copied into the bundle (`DIR/tunelab/`,
exactly the module-level import closure of the bundle's app.py, see vendored_files); `app.py` (a copy of
tunelab/serve/space_app.py, settings in `space.json`) imports it from there, on a Space and locally
(`python DIR/app.py`). The GGUF is hard-linked (or copied) next to app.py; if it is missing there,
the app downloads it from MODEL_REPO (the --push-to-hub repo, when given).

Feedback: SQLite next to app.py (env FEEDBACK_DB). A Space's disk is wiped on restart, so with env
FEEDBACK_REPO (a Hub dataset id) and the HF_TOKEN secret the app copies it to that dataset every 5 minutes
(`tunelab.serve.hub_sync`).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

from tunelab.errors import UserError
from tunelab.io import atomic_folder, atomic_path, atomic_write

GGUF_NAME = "model-q4_k_m.gguf"
APP_SOURCE = Path(__file__).with_name("space_app.py")  # copied to the bundle as app.py


def _module_file(package_root: Path, module: str) -> Path:
    parts = module.split(".")[1:]  # without the leading "tunelab"
    folder = package_root.joinpath(*parts)
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


def _top_level_imports(source: Path) -> set[str]:
    """tunelab modules imported at module level (imports inside functions run only when called)."""
    found = set()
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tunelab"}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "tunelab"
            and not node.level
        ):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from tunelab import errors`
    return found


def vendored_files(package_root: Path | None = None) -> list[str]:
    """The files of tunelab that the bundle's app.py needs, relative to the package: the module-level import
    closure of space_app.py, the packages' __init__.py files on the way, and the resource folders those modules
    open next to themselves (`Path(__file__).parent / "prompts"`)."""
    import tunelab

    root = package_root or Path(tunelab.__file__).resolve().parent
    files: set[Path] = set()
    todo = [APP_SOURCE]
    while todo:
        source = todo.pop()
        for module in _top_level_imports(source):
            path = _module_file(root, module)
            if not path.is_file() or path in files:
                continue  # `from tunelab.x import name` also yields tunelab.x.name, which is no module
            files.add(path)
            todo.append(path)
            for package in path.relative_to(root).parents:
                init = root / package / "__init__.py"
                if init.is_file() and init not in files:
                    files.add(init)
                    todo.append(init)
    for path in list(files):
        for resource in re.findall(r'Path\(__file__\)\.parent / "([\w.-]+)"', path.read_text(encoding="utf-8")):
            folder = path.parent / resource
            files |= {f for f in folder.rglob("*") if f.is_file() and "__pycache__" not in f.parts}
    return sorted(f.relative_to(root).as_posix() for f in files)


GITIGNORE = """# written by app.py at run time: feedback (people's prompts) must not be uploaded with the Space
feedback.db*
*.sync/
__pycache__/
"""


def space_readme(title: str, license_: str, gradio_version: str) -> str:
    return f"""---
title: {title}
emoji: 💬
colorFrom: blue
colorTo: green
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: {license_}
---
# {title}

A tunelab LoRA fine-tune (`{GGUF_NAME}`, llama.cpp on CPU) in tunelab's app: Chat, Travel Planner,
👍/👎 feedback on every answer, and a feedback overview. `tunelab/` is the part of tunelab the app needs.

Run it locally: `pip install -r requirements.txt && python app.py` (listens on 127.0.0.1:7860; env `PORT`).
Local feedback goes to `feedback.db` here: keep it out of an upload (`hf upload ... --exclude "feedback.db*"`).

On a Space the disk is wiped on restart. To keep the feedback, set the variable `FEEDBACK_REPO` to a Hub
dataset id (e.g. `you/{_slug(title)}-feedback`, created private if missing) and the secret `HF_TOKEN` (write
access): the app uploads it there as JSONL every 5 minutes. Optional secret `TUNELAB_AUTH=USER:PASS` adds a
login; without it visitors do not see each other's feedback. All settings: the docstring of `app.py`.
"""


def _slug(title: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in title.lower()).split()) or "space"


def requirements(gradio_version: str) -> str:
    return (
        f"gradio=={gradio_version}\n"  # tunelab's app uses this Gradio's API (the README's sdk_version too)
        "llama-cpp-python>=0.3\n"
        "huggingface_hub\n"
        "jinja2\n"
    )


def vendor_tunelab(space_dir: Path) -> Path:
    """Copy the part of tunelab the app needs (vendored_files) into space_dir/tunelab, replacing an older copy."""
    import tunelab

    source = Path(tunelab.__file__).resolve().parent
    target = space_dir / "tunelab"
    with atomic_folder(target) as tmp:
        for rel in vendored_files(source):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, tmp / rel)
    return target


def build_space(space_dir: Path, export_dir: Path, title: str, license_: str, model_repo: str | None) -> list[Path]:
    """Write README.md, app.py, requirements.txt, .gitignore, tunelab/ and the q4_k_m GGUF into `space_dir`."""
    import importlib.metadata

    gguf = export_dir / GGUF_NAME
    if not gguf.is_file() and not model_repo:
        raise UserError(f"--space: needs {GGUF_NAME} (add q4_k_m to --gguf) or --push-to-hub to reference it")
    space_dir.mkdir(parents=True, exist_ok=True)
    gradio_version = importlib.metadata.version("gradio")
    files = {
        "README.md": space_readme(title, license_, gradio_version),
        "app.py": APP_SOURCE.read_text(encoding="utf-8"),
        "space.json": json.dumps({"title": title, "gguf": GGUF_NAME, "model_repo": model_repo or ""}, indent=2) + "\n",
        "requirements.txt": requirements(gradio_version),
        ".gitignore": GITIGNORE,
    }
    written = [atomic_write(space_dir / name, text) for name, text in files.items()]
    vendored = vendor_tunelab(space_dir)
    written += sorted(p for p in vendored.rglob("*") if p.is_file())
    if gguf.is_file():
        target = space_dir / GGUF_NAME
        with atomic_path(target) as tmp:
            tmp.unlink()
            try:
                os.link(gguf, tmp)  # same filesystem: no second 100 MB copy
            except OSError:
                shutil.copyfile(gguf, tmp)
        written.append(target)
    return written


def build_run_space(run_dir: Path, space_dir: Path, model_repo: str | None) -> list[Path]:
    """`tunelab export --space DIR`: the Space bundle for an exported run; its files are added to export.json."""
    from tunelab.export.card import base_model_and_license
    from tunelab.models.runs import run_config

    export_dir = run_dir / "export"
    _, license_ = base_model_and_license(run_config(run_dir))
    title = f"{run_dir.resolve().name} chat"
    files = build_space(space_dir, export_dir, title, license_ if " " not in license_ else "other", model_repo)
    summary = json.loads((export_dir / "export.json").read_text(encoding="utf-8"))
    summary["space"] = [str(p) for p in files]
    atomic_write(export_dir / "export.json", json.dumps(summary, indent=2))
    print(f">> Space bundle: {space_dir} (run it: python {space_dir / 'app.py'})")
    return files
