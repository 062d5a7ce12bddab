"""DPO/KTO: tunelab's sequence log-probs and losses against TRL's own loss code on the same inputs.

TRL 1.x has no standalone loss function: the loss lives in `DPOTrainer._compute_loss` / `KTOTrainer._compute_loss`.
We call those unbound, with a minimal trainer object and a stand-in model that returns per-token log-probs
computed the plain way (full logits of a tiny transformers Llama + log_softmax), and with the reference
log-probs passed in as precomputed (`precompute_ref_log_probs=True`), which is how tunelab computes them too.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import fresh_cache
from tunelab.data.masking import IGNORE_INDEX
from tunelab.train.batching import make_batch
from tunelab.train.preference import dpo_loss, kto_kl, kto_loss, sequence_logps

VOCAB = 97


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def random_sequences(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels): a prompt (unlabelled) then a completion (labelled), of varying lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p, c = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(2, 7, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (p + c,), generator=g).tolist()
        rows.append((ids, [IGNORE_INDEX] * p + ids[p:]))
    return rows


def padded(rows):
    """TRL's batch layout: right-padded input_ids, attention_mask, completion_mask."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids)
    for r, (ids, labels) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
        completion[r, : len(ids)] = torch.tensor([x != IGNORE_INDEX for x in labels])
    return input_ids, attention, completion


@torch.no_grad()
def plain_token_logps(model, rows) -> torch.Tensor:
    """[rows, T-1] log p(token t+1) at completion positions, 0 elsewhere: full logits, plain log_softmax."""
    input_ids, attention, completion = padded(rows)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    logps = F.log_softmax(logits, dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return logps * completion[:, 1:]


class StandInModel:
    """Returns precomputed per-token log-probs for each input_ids tensor, as TRL's fused LM head would."""

    def __init__(self, by_input: dict[int, torch.Tensor]):
        self.by_input = by_input

    def __call__(self, input_ids, **kwargs):
        logps = self.by_input[id(input_ids)]
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trainer_stub(**fields):
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics=metrics,
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        **fields,
    )


def trl_dpo(model, chosen, rejected, ref_chosen, ref_rejected, beta, loss_type):
    from trl import DPOTrainer

    rows = chosen + rejected  # TRL's batch is [chosen..., rejected...]
    input_ids, attention, completion = padded(rows)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    stub = trainer_stub(
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        label_smoothing=0.0,
    )
    loss = DPOTrainer._compute_loss(stub, StandInModel({id(input_ids): plain_token_logps(model, rows)}), inputs, False)
    return loss, stub._metrics["train"]


def ours_logps(model, rows, packing):
    batch = make_batch(rows, packing, pad_id=0)
    with torch.no_grad():
        return sequence_logps(model, batch, len(rows), chunk_tokens=5)  # a small chunk: several chunks per batch


@pytest.mark.parametrize("packing", [True, False])
def test_sequence_logps_equal_full_logits_sums(tiny_model, packing):
    from tunelab.train.packed_attention import register

    tiny_model.config._attn_implementation = register() if packing else "sdpa"
    rows = random_sequences(5, seed=1)
    logps, counts = ours_logps(tiny_model, rows, packing)
    tiny_model.config._attn_implementation = "sdpa"
    expected = plain_token_logps(tiny_model, rows).sum(1)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [sum(x != IGNORE_INDEX for x in labels[1:]) for _, labels in rows]


def test_sequence_logps_gradient_equals_autograd_through_full_logits(tiny_model):
    rows = random_sequences(3, seed=2)
    batch = make_batch(rows, packing=False, pad_id=0)
    weights = torch.tensor([0.5, -1.0, 2.0])
    hidden_ours = tiny_model.model(**batch.model_kwargs()).last_hidden_state.detach().requires_grad_()
    hidden_ref = hidden_ours.detach().clone().requires_grad_()

    from tunelab.train.loss import LinearTokenLogProbs

    keep = batch.targets != IGNORE_INDEX
    owner = torch.arange(3)[:, None].expand_as(keep)[keep]
    ours = LinearTokenLogProbs.apply(hidden_ours[keep], tiny_model.lm_head.weight, batch.targets[keep], 4)
    (ours * weights[owner]).sum().backward()
    logits = tiny_model.lm_head(hidden_ref).float()
    ref = F.log_softmax(logits, -1).gather(2, batch.targets.clamp(min=0)[..., None]).squeeze(2)
    (ref * keep * weights[:, None]).sum().backward()
    torch.testing.assert_close(hidden_ours.grad, hidden_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_rewards_equal_trl(tiny_model, variant, beta):
    chosen, rejected = random_sequences(4, seed=3), random_sequences(4, seed=4)
    g = torch.Generator().manual_seed(5)
    ref_chosen, ref_rejected = -20 * torch.rand(4, generator=g), -20 * torch.rand(4, generator=g)
    trl_value, trl_metrics = trl_dpo(tiny_model, chosen, rejected, ref_chosen, ref_rejected, beta, variant)

    (logps, counts) = ours_logps(tiny_model, chosen + rejected, packing=False)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps[:4], logps[4:], ref_chosen, ref_rejected, beta, variant, counts[:4], counts[4:]
    )
    torch.testing.assert_close(losses.mean(), trl_value, rtol=1e-5, atol=1e-6)
    assert chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"][0], rel=1e-5, abs=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"][0], rel=1e-5, abs=1e-6)
    margin = (chosen_rewards - rejected_rewards).mean().item()
    assert margin == pytest.approx(trl_metrics["rewards/margins"][0], rel=1e-5, abs=1e-6)
    accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
    assert accuracy == trl_metrics["rewards/accuracies"][0]


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.7)])
def test_kto_loss_kl_and_rewards_equal_trl(tiny_model, weights):
    from trl import KTOTrainer

    rows = random_sequences(6, seed=6)
    labels = torch.tensor([True, False, True, True, False, False])
    # mismatched pairs: each prompt with the previous row's completion (as TRL builds them)
    kl_rows = []
    for i, (ids, row_labels) in enumerate(rows):
        prompt_len = sum(x == IGNORE_INDEX for x in row_labels)
        prev_ids, prev_labels = rows[i - 1]
        prev_prompt = sum(x == IGNORE_INDEX for x in prev_labels)
        kl_rows.append((ids[:prompt_len] + prev_ids[prev_prompt:], row_labels[:prompt_len] + prev_labels[prev_prompt:]))
    g = torch.Generator().manual_seed(7)
    ref_logps = -20 * torch.rand(6, generator=g)
    # the reference a little below the policy on the mismatched pairs, so the clamped KL is not just 0
    ref_kl_logps = plain_token_logps(tiny_model, kl_rows).sum(1) - torch.rand(6, generator=g)
    beta = 0.3

    input_ids, attention, completion = padded(rows)
    kl_input_ids, kl_attention, kl_completion = padded(kl_rows)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "label": labels,
        "KL_input_ids": kl_input_ids,
        "KL_attention_mask": kl_attention,
        "KL_completion_mask": kl_completion,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    stand_in = StandInModel(
        {id(input_ids): plain_token_logps(tiny_model, rows), id(kl_input_ids): plain_token_logps(tiny_model, kl_rows)}
    )
    stub = trainer_stub(
        calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1]
    )
    stub._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stub, model, batch)
    trl_value = KTOTrainer._compute_loss(stub, stand_in, inputs, False)
    trl_metrics = stub._metrics["train"]

    logps, _ = ours_logps(tiny_model, rows, packing=False)
    kl_logps, _ = ours_logps(tiny_model, kl_rows, packing=False)
    kl = kto_kl(kl_logps, ref_kl_logps)
    assert kl.item() > 0.1
    losses, rewards = kto_loss(logps, ref_logps, labels, kl, beta, *weights)
    torch.testing.assert_close(losses.mean(), trl_value, rtol=1e-5, atol=1e-6)
    assert kl.item() == pytest.approx(trl_metrics["kl"][0], rel=1e-5, abs=1e-6)
    assert rewards[labels].mean().item() == pytest.approx(trl_metrics["rewards/chosen"][0], rel=1e-5, abs=1e-6)
    assert rewards[~labels].mean().item() == pytest.approx(trl_metrics["rewards/rejected"][0], rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------- `tunelab train`
WORDS = "trip lisbon museum food train hotel beach city walk map plan day night river art coffee".split()


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs where the chosen answer always starts with "sure" and the rejected one with "never" (learnable)."""
    import random

    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        topic = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        pairs.append({"prompt": f"note {i}: {topic}", "chosen": f"sure, {answer}", "rejected": f"never, {answer}"})
    return pairs


@pytest.fixture(scope="module")
def dpo_workspace(tmp_path_factory):
    """A tiny random Llama saved with the embedded SmolLM2 tokenizer, and a DPO pairs file."""
    import json

    from tests.helpers import build_tiny_llama
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    root = tmp_path_factory.mktemp("dpo")
    tokenizer = load_tokenizer(ModelConfig())
    model = build_tiny_llama(vocab_size=len(tokenizer))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in preference_pairs(80)))
    return root


def dpo_config(root, run_dir, **train):
    import yaml

    cfg = {
        "model": {"name": str(root / "model")},
        "data": {
            "sources": [{"path": str(root / "pairs.jsonl")}],
            "val_fraction": 0.25,
            "output_dir": str(root / "prepared"),
        },
        "lora": {"r": 8, "alpha": 16},
        "train": {
            "objective": "dpo",
            "beta": 0.1,
            "output_dir": str(run_dir),
            "max_steps": 24,
            "batch_size": 4,
            "lr": 5e-3,
            "warmup_steps": 0,
            "max_seq_len": 96,
            "precision": "fp32",
            "threads": 1,
            "seed": 3,
            "save_steps": 4,
            "eval_steps": 12,
            **train,
        },
        "eval": {"batch_size": 8},
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def tunelab_train(config, cache, fault=None):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TUNELAB_FAULT"}
    env.update(
        TUNELAB_CACHE=str(fresh_cache(cache)), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    if fault:
        env["TUNELAB_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "train", str(config)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


@pytest.fixture(scope="module")
def dpo_run(dpo_workspace):
    run_dir = dpo_workspace / "runs" / "full"
    result = tunelab_train(dpo_config(dpo_workspace, run_dir), dpo_workspace / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.mark.slow
def test_dpo_run_raises_heldout_preference_accuracy_above_chance(dpo_run):
    import json

    run_dir, result = dpo_run
    assert "reference log-probs: computing" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["val_rows"] >= 12
    figures = summary["final_val_metrics"]
    # Before training the adapter is zero (policy == reference): every reward is 0, no pair is ranked right.
    assert figures["val_pref_accuracy"] >= 0.8, figures
    assert figures["val_reward_margin"] > 0 and figures["val_loss"] < 0.6931, figures  # below -log sigmoid(0)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "val_pref_accuracy" in r]
    assert [r["step"] for r in evals] == [12, 24]
    assert evals[-1]["val_pref_accuracy"] == figures["val_pref_accuracy"]
    assert all("loss" in r and "tok_per_s" in r for r in lines if "val_loss" not in r)


@pytest.mark.slow
def test_reference_logprobs_are_cached_with_the_prepared_data_and_equal_the_base_model(dpo_run, dpo_workspace):
    """The cache holds the base model's log-probs (computed here again with plain transformers, no adapter)."""
    from transformers import AutoModelForCausalLM

    from tunelab.data.prepare import load_prepared

    cached = list((dpo_workspace / "prepared" / "reference").glob("*.pt"))
    assert len(cached) == 1
    logps = torch.load(cached[0], weights_only=True)
    train, _ = load_prepared(dpo_workspace / "prepared")
    base = AutoModelForCausalLM.from_pretrained(dpo_workspace / "model").eval()
    rows = [(r["chosen_input_ids"], r["chosen_labels"]) for r in train.select(range(4))]
    rows += [(r["rejected_input_ids"], r["rejected_labels"]) for r in train.select(range(4))]
    expected = plain_token_logps(base, rows).sum(1)
    torch.testing.assert_close(logps["train"][:4, 0], expected[:4], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logps["train"][:4, 1], expected[4:], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_killed_dpo_run_resumes_to_the_uninterrupted_adapter(dpo_run, dpo_workspace):
    from safetensors.torch import load_file

    run_dir = dpo_workspace / "runs" / "killed"
    config = dpo_config(dpo_workspace, run_dir)
    killed = tunelab_train(
        config, dpo_workspace / "cache", fault="step:7"
    )  # SIGKILL after step 7; checkpoint 4 is newest
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = tunelab_train(config, dpo_workspace / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step-000004" in resumed.stdout
    assert "reference log-probs: cached" in resumed.stdout  # computed once, by the first run
    ours, expected = (
        load_file(run_dir / "adapter" / "adapter_model.safetensors"),
        load_file(dpo_run[0] / "adapter" / "adapter_model.safetensors"),
    )
    assert ours.keys() == expected.keys()
    assert max((ours[k] - expected[k]).abs().max().item() for k in ours) <= 1e-6


def test_kto_rows_pair_each_prompt_with_the_previous_rows_completion():
    from datasets import Dataset

    from tunelab.train.objectives import thumb_rows

    ids = [[1, 2, 10, 11], [3, 20], [4, 5, 6, 30, 31, 32]]
    prompt_lens = [2, 1, 3]
    labels = [[IGNORE_INDEX] * n + row[n:] for row, n in zip(ids, prompt_lens)]
    rows = thumb_rows(
        Dataset.from_dict({"input_ids": ids, "labels": labels, "prompt_len": prompt_lens, "label": [True, False, True]})
    )
    assert [r.desirable for r in rows] == [True, False, True]
    assert [r.mismatched[0] for r in rows] == [[1, 2, 30, 31, 32], [3, 10, 11], [4, 5, 6, 20]]
    assert [r.mismatched[1] for r in rows] == [
        [IGNORE_INDEX] * 2 + [30, 31, 32],
        [IGNORE_INDEX, 10, 11],
        [IGNORE_INDEX] * 3 + [20],
    ]


@pytest.mark.slow
def test_kto_run_learns_the_thumbs(dpo_workspace):
    import json

    records = [
        {"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
        for i, p in enumerate(preference_pairs(80, seed=1))
    ]
    (dpo_workspace / "thumbs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_dir = dpo_workspace / "runs" / "kto"
    config = dpo_config(dpo_workspace, run_dir, objective="kto", max_steps=12, save_steps=12)
    text = (
        config.read_text()
        .replace("pairs.jsonl", "thumbs.jsonl")
        .replace(str(dpo_workspace / "prepared"), str(dpo_workspace / "prepared-kto"))
    )
    config.write_text(text)
    result = tunelab_train(config, dpo_workspace / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((run_dir / "summary.json").read_text())["final_val_metrics"]
    assert figures["val_pref_accuracy"] >= 0.8 and figures["val_reward_margin"] > 0, figures


@pytest.mark.slow
def test_tunelab_eval_scores_a_dpo_run_on_its_chosen_completions(dpo_run, dpo_workspace):
    from tunelab.data.prepare import load_prepared
    from tunelab.eval.evaluate import evaluate_run

    report = evaluate_run(dpo_run[0], samples=False)
    _, val = load_prepared(dpo_workspace / "prepared")
    assert report["val_rows"] == len(val)
    # the adapter learnt to put more mass on "sure, ..." answers: the chosen completions got likelier
    assert report["tuned"]["val_loss"] < report["base"]["val_loss"]


def test_tunelab_export_merges_a_dpo_run_judged_on_its_chosen_completions(dpo_run, dpo_workspace):
    """`tunelab export` of a preference run: the merge's held-out check reads the chosen completions (a dpo run's
    prepared rows have no plain input_ids)."""
    from tests.helpers import tunelab_here
    from tunelab.data.prepare import load_prepared
    from tunelab.export.merge import val_rows

    run_dir = dpo_run[0]
    _, val = load_prepared(dpo_workspace / "prepared")
    rows = val_rows(run_dir, limit=3)
    assert rows and [r["input_ids"] for r in rows] == val["chosen_input_ids"][: len(rows)]
    assert [r["labels"] for r in rows] == val["chosen_labels"][: len(rows)]
    result = tunelab_here("export", str(run_dir), "--gguf", "f16", "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "export" / "model-f16.gguf").is_file()
