"""Tokenise conversations with the tokenizer's chat template; labels only on what the assistant writes.

How the assistant tokens are found, for any template (no per-template code):
for the k-th assistant reply at message index i, render
    prompt_k = template(messages[:i], add_generation_prompt=True)    (... up to the assistant header)
    full_k   = template(messages[:i+1])                               (... through the reply and its end token)
The reply segment is full_k[len(prompt_k):] without trailing whitespace: the assistant content plus the token
that closes the turn (`<|im_end|>`, `<|eot_id|>`, `</s>`), so the model learns to stop. The whitespace the
template puts after it (ChatML's newline) belongs to the next, unlabelled segment.
The template must be *prefix-stable*: full_{k-1} is a prefix of prompt_k and prompt_k of full_k. Templates that
rewrite earlier turns (e.g. drop past reasoning) are rejected with TemplateError: masks would be wrong.

Speed: segments are rendered per exchange for all conversations at once (waves), and tokenised with one batched
fast-tokenizer call per wave. A conversation leaves the waves as soon as it is over train.max_seq_len, and a long
segment is first tokenised only as far as the budget can matter (see `_tokenize_within_budget`).
Segments are tokenised separately; for the first VERIFY_ROWS rows we check that tokenising the whole text gives
the same ids. A mismatch (a tokenizer merging characters across a segment boundary, e.g. a template's special
markers that are plain text for this tokenizer) is counted in the report; rows keep the per-segment ids, which
decode to exactly the same text and keep the labels exact.

Truncation policy (`data.truncation`, limit `train.max_seq_len` tokens):
- `truncate`: keep the longest run of whole user->assistant exchanges that fits; a conversation whose first
  exchange does not fit is dropped (`first_turn_too_long`). Rows never end mid-reply, so every row teaches the
  end-of-turn token.
- `drop`: a conversation that does not fit whole is dropped (`over_max_seq_len`).
Rows with no label token are dropped (`no_label_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.data.normalize import Message
from tunelab.data.problems import RecordProblem
from tunelab.models.templates import TemplateError

IGNORE_INDEX = -100
VERIFY_ROWS = 2000  # rows whose whole-text tokenisation is compared with the per-segment ids
CHARS_PER_TOKEN_CAP = 6  # a segment is first tokenised up to (budget + 1) * this many characters (~1.3x English)
CAP_MARGIN = 8  # tokens a cut word can add at the cut point


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    messages: list[Message]  # the conversation as kept (whole exchanges; shorter when truncated)
    truncated: bool


@dataclass
class EncodeStats:
    truncated: int = 0
    verified: int = 0
    boundary_mismatch: int = 0
    long_segments_retokenized: int = 0


@dataclass
class _Progress:
    """One conversation moving through the waves."""

    messages: list[Message]
    where: str
    replies: list[int]  # message index of every assistant reply
    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    rendered: str = ""  # full_{k-1}: the template text through the last kept reply (with trailing whitespace)
    kept_replies: int = 0
    open: bool = True
    overflow: bool = False

    @property
    def text(self) -> str:  # the row's text: rendered, ending at the end-of-turn token
        return self.rendered.rstrip()


def encode_conversations(
    tokenizer,
    conversations: list[list[Message]],
    wheres: list[str],
    max_seq_len: int,
    policy: str,
    verify_rows: int = VERIFY_ROWS,
) -> tuple[list[Encoded | RecordProblem], EncodeStats]:
    stats = EncodeStats()
    rows = [
        _Progress(m, w, [i for i, msg in enumerate(m) if msg["role"] == "assistant"])
        for m, w in zip(conversations, wheres)
    ]
    wave = 0
    while True:
        active = [r for r in rows if r.open and wave < len(r.replies)]
        if not active:
            break
        _encode_exchange(tokenizer, active, wave, max_seq_len, stats)
        wave += 1
    results = [_finish(r, policy, stats) for r in rows]
    _verify_segments(tokenizer, [r for r, res in zip(rows, results) if isinstance(res, Encoded)][:verify_rows], stats)
    return results, stats


def _encode_exchange(tokenizer, active: list[_Progress], k: int, max_seq_len: int, stats: EncodeStats) -> None:
    """Add the k-th user->assistant exchange to every active conversation that still fits."""
    prompts = render(tokenizer, [r.messages[: r.replies[k]] for r in active], add_generation_prompt=True)
    fulls = render(tokenizer, [r.messages[: r.replies[k] + 1] for r in active], add_generation_prompt=False)
    for r, prompt, full in zip(active, prompts, fulls):
        check_prefix_stable(r, prompt, full)
    # Prompts first: a reply whose prompt already overflows is never tokenised.
    prompt_ids = _tokenize_within_budget(
        tokenizer,
        [p[len(r.text) :] for r, p in zip(active, prompts)],
        [max_seq_len - len(r.ids) for r in active],
        stats,
    )
    fitting = [i for i, ids in enumerate(prompt_ids) if ids is not None and len(active[i].ids) + len(ids) < max_seq_len]
    reply_ids = _tokenize_within_budget(
        tokenizer,
        [fulls[i][len(prompts[i]) :].rstrip() for i in fitting],
        [max_seq_len - len(active[i].ids) - len(prompt_ids[i]) for i in fitting],
        stats,
    )
    replies = dict(zip(fitting, reply_ids))
    for i, r in enumerate(active):
        reply = replies.get(i)
        if reply is None or len(r.ids) + len(prompt_ids[i]) + len(reply) > max_seq_len:
            r.open, r.overflow = False, True
            continue
        r.ids += prompt_ids[i] + reply
        r.labels += [IGNORE_INDEX] * len(prompt_ids[i]) + reply
        r.rendered = fulls[i]
        r.kept_replies = k + 1


def render(tokenizer, conversations: list[list[Message]], add_generation_prompt: bool) -> list[str]:
    try:
        return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja raises its own types (e.g. raise_exception in a template)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TemplateError(f"model.chat_template: rendering a conversation failed: {first}") from None


def check_prefix_stable(r: _Progress, prompt: str, full: str) -> None:
    if not prompt.startswith(r.rendered) or not full.startswith(prompt):
        raise TemplateError(
            f"model.chat_template: the template is not prefix-stable at {r.where} (rendering the first messages is "
            "not a prefix of rendering more of them), so assistant tokens cannot be masked reliably; "
            "set model.chat_template to chatml, llama-3.1 or zephyr"
        )


def _tokenize_within_budget(
    tokenizer, texts: list[str], budgets: list[int], stats: EncodeStats
) -> list[list[int] | None]:
    """Token ids of each text, or None when it surely has more than its budget of tokens.

    A long text is first tokenised only up to (budget+1)*CHARS_PER_TOKEN_CAP characters: if that head already has
    more than budget+CAP_MARGIN tokens, the whole text cannot fit and its exact ids are never needed (a 100k
    character answer costs a few thousand characters of tokenising). Otherwise the head grows 4x and we retry,
    until the answer is certain or the whole text has been tokenised.
    """
    ids: list[list[int] | None] = [None] * len(texts)
    pending, chars_per_token = list(range(len(texts))), CHARS_PER_TOKEN_CAP
    while pending:
        heads = [texts[i][: (budgets[i] + 1) * chars_per_token] for i in pending]
        undecided = []
        for i, head, head_ids in zip(pending, heads, batch_token_ids(tokenizer, heads)):
            if len(head) == len(texts[i]):
                ids[i] = head_ids
            elif len(head_ids) <= budgets[i] + CAP_MARGIN:
                undecided.append(i)
            # else: surely over budget, stays None
        stats.long_segments_retokenized += len(undecided)
        pending, chars_per_token = undecided, chars_per_token * 4
    return ids


def batch_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _finish(r: _Progress, policy: str, stats: EncodeStats) -> Encoded | RecordProblem:
    if r.overflow and policy == "drop":
        return RecordProblem("over_max_seq_len", "longer than train.max_seq_len")
    if r.kept_replies == 0:
        return RecordProblem("first_turn_too_long", "the first exchange is longer than train.max_seq_len")
    if all(label == IGNORE_INDEX for label in r.labels):
        return RecordProblem("no_label_tokens", "no assistant tokens")
    stats.truncated += r.overflow
    kept_messages = r.messages[: r.replies[r.kept_replies - 1] + 1]
    return Encoded(r.ids, r.labels, kept_messages, truncated=r.overflow)


def _verify_segments(tokenizer, rows: list[_Progress], stats: EncodeStats) -> None:
    whole = batch_token_ids(tokenizer, [r.text for r in rows])
    stats.verified = len(rows)
    stats.boundary_mismatch = sum(ids != r.ids for ids, r in zip(whole, rows))
