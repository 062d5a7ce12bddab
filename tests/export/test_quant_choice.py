"""The export's quantisation recommendation: fastest within the perplexity tolerance of q8_0."""

from __future__ import annotations

from tunelab.export.quant_choice import recommend_quant


def _row(quant, ppl, tok_s):
    return {"quant": quant, "ppl": ppl, "decode_tok_s": tok_s}


def test_fastest_within_tolerance_wins_and_lossy_faster_ones_are_named():
    rows = [_row("q8_0", 10.0, 70.0), _row("q5_k_m", 10.15, 78.0), _row("q4_k_m", 10.6, 85.0), _row("q4_0", 10.9, 95.0)]
    choice = recommend_quant(rows, tolerance_pct=2.0)
    assert choice["quant"] == "q5_k_m"  # q4_k_m (+6 %) and q4_0 (+9 %) are faster but too lossy
    assert "q4_0" in choice["reason"] and "q4_k_m" in choice["reason"]


def test_q8_0_is_chosen_when_it_is_fastest_and_nothing_without_it():
    assert recommend_quant([_row("q8_0", 10.0, 90.0), _row("q4_k_m", 10.1, 80.0)])["quant"] == "q8_0"
    assert recommend_quant([_row("q4_k_m", 10.1, 80.0)]) is None


def test_a_wider_tolerance_admits_the_faster_lossier_file():
    rows = [_row("q8_0", 10.0, 70.0), _row("q4_0", 10.9, 95.0)]
    assert recommend_quant(rows, tolerance_pct=10.0)["quant"] == "q4_0"
