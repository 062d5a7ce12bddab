"""Which GGUF quantisation to ship: the fastest one whose held-out perplexity is within a tolerance of q8_0's.

q8_0 is the quality reference (it is indistinguishable from f16 on held-out text at these sizes); a smaller type
is worth shipping only when it decodes faster *and* loses little. The tolerance is on perplexity of the run's
validation conversations, measured through llama.cpp, relative to q8_0's.
"""

from __future__ import annotations

PPL_TOLERANCE_PCT = 2.0  # a smaller quantisation may be at most this much worse (perplexity) than q8_0
REFERENCE = "q8_0"


def recommend_quant(rows: list[dict], tolerance_pct: float = PPL_TOLERANCE_PCT) -> dict | None:
    """rows: {"quant", "ppl", "decode_tok_s"} per GGUF. Returns {"quant", "reason"}, or None without q8_0 or speeds.

    Among the quantisations whose perplexity is at most `tolerance_pct` % above q8_0's, the one with the highest
    decode tokens/s (q8_0 itself always qualifies).
    """
    by_quant = {r["quant"]: r for r in rows if r.get("ppl") and r.get("decode_tok_s")}
    reference = by_quant.get(REFERENCE)
    if reference is None:
        return None
    limit = reference["ppl"] * (1 + tolerance_pct / 100)
    eligible = [r for r in by_quant.values() if r["ppl"] <= limit and r["quant"] != "f16"]
    best = max(eligible, key=lambda r: r["decode_tok_s"])
    delta = 100 * (best["ppl"] - reference["ppl"]) / reference["ppl"]
    rejected = sorted(q for q, r in by_quant.items() if r["ppl"] > limit)
    reason = (
        f"{best['quant']}: fastest decode ({best['decode_tok_s']:.1f} tok/s) among quantisations within "
        f"{tolerance_pct:g}% perplexity of q8_0 ({delta:+.2f}%)"
        + (f"; too lossy: {', '.join(rejected)}" if rejected else "")
    )
    return {"quant": best["quant"], "reason": reason, "tolerance_pct": tolerance_pct}
