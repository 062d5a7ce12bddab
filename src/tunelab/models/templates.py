"""Chat templates that `model.chat_template` can force (so a base model can be tuned with the seeds' format)."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import UserError

TEMPLATE_DIR = Path(__file__).parent / "templates"
NAMED_TEMPLATES = sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))
# Named templates whose turn ends with a token that is not every tokenizer's EOS (Gemma's base tokenizer ends
# text with <eos>, its chat turns with <end_of_turn>): that token becomes the EOS, so generation, the exported
# generation_config and the GGUF's eos all stop at the end of the model's turn.
TURN_END_TOKENS = {"gemma": "<end_of_turn>"}


class TemplateError(UserError):
    pass


def resolve_chat_template(choice: str | None, tokenizer) -> str:
    """Return the Jinja template text: the tokenizer's own by default, else a named or file template."""
    if choice is None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "model.chat_template: the tokenizer has no chat template; set one of " + ", ".join(NAMED_TEMPLATES)
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


def apply_turn_end(choice: str | None, tokenizer) -> None:
    """Make the named template's turn-end token the tokenizer's EOS (it must be one token of the vocabulary)."""
    token = TURN_END_TOKENS.get(choice or "")
    if token is None or tokenizer.eos_token == token:
        return
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise TemplateError(
            f"model.chat_template: `{choice}` ends turns with {token}, which is not one token of this tokenizer"
        )
    tokenizer.eos_token = token
