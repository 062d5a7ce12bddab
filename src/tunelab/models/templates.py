"""Chat templates that `model.chat_template` can force (so a base model can be tuned with the seeds' format)."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import UserError

TEMPLATE_DIR = Path(__file__).parent / "templates"
NAMED_TEMPLATES = sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


class TemplateError(UserError):
    pass


def resolve_chat_template(choice: str | None, tokenizer) -> str:
    """Return the Jinja template text: the tokenizer's own by default, else a named or file template."""
    if choice is None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "model.chat_template: the tokenizer has no chat template; set one of "
                + ", ".join(NAMED_TEMPLATES)
            )
        return tokenizer.chat_template
    if choice in NAMED_TEMPLATES:
        return (TEMPLATE_DIR / f"{choice}.jinja").read_text(encoding="utf-8")
    path = Path(choice).expanduser()
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text(encoding="utf-8")
    raise TemplateError(
        f"model.chat_template: unknown template `{choice}` (known: {', '.join(NAMED_TEMPLATES)}, or a .jinja file)"
    )
