"""One side of `tunelab bench train --objective dpo --vs trl`, in its own process (its peak RSS is its own).

    python -m tunelab.bench.dpo_worker --side tunelab|trl --spec SPEC.json --out RESULT.json

Both sides get the same tokenised pairs (tunelab's prepared rows: prompt, chosen and rejected token ids) in the
same order (tunelab's `step_indices`; TRL with sequential sampling), the same LoRA, beta, sigmoid loss, lr
schedule, steps, pairs per step, threads and precision. TRL's DPOTrainer is given the token ids directly
(its tokenising step is bypassed) so both train on identical sequences. Each side computes its reference
log-probs once before training (tunelab: train/reference.py; TRL: `precompute_ref_log_probs=True`), outside
the timed part. After training both adapters are scored by tunelab's held-out preference evaluator on the same
val pairs (reference = the same base model with the adapter disabled).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tunelab.bench.train_worker import after_first_step, ordered_rows


def pairs_from(data: list) -> list:
    from tunelab.train.objectives import PairRow

    return [PairRow(tuple(c), tuple(r)) for c, r in data]


def train_config(spec: dict, output_dir: Path):
    from tunelab.config import Config

    return Config.model_validate(
        {
            "model": {"name": spec["model_path"]},
            "lora": spec["lora"],
            "train": {
                "objective": "dpo",
                "beta": spec["beta"],
                "dpo_loss": "sigmoid",
                "output_dir": str(output_dir),
                "max_steps": spec["steps"],
                "batch_size": spec["batch_size"],
                "grad_accum": 1,
                "lr": spec["lr"],
                "warmup_steps": spec["warmup_steps"],
                "weight_decay": spec["weight_decay"],
                "max_grad_norm": spec["max_grad_norm"],
                "max_seq_len": spec["max_seq_len"],
                "loss_chunk_tokens": spec["loss_chunk_tokens"],
                "precision": spec["precision"],
                "threads": spec["threads"],
                "save_steps": spec["steps"],
                "eval_steps": spec["steps"],
                "seed": spec["seed"],
            },
            "eval": {"batch_size": 8},
        }
    )


def score(model, val_rows: list, spec: dict, pad_id: int) -> dict:
    """tunelab's held-out DPO figures (padded batches) for a trained PEFT model, reference = adapter disabled."""
    from tunelab.train.objectives import PreferenceObjective
    from tunelab.train.precision import Precision
    from tunelab.train.reference import reference_logps, store

    cfg = train_config(spec, Path("unused")).train.model_copy(update={"packing": False})
    precision = Precision(spec["precision"], "bench")
    device = torch.device("cpu")
    for row, values in zip(
        val_rows, reference_logps(model, val_rows, 8, False, pad_id, precision, device, cfg.loss_chunk_tokens).tolist()
    ):
        store(row, values)
    from tunelab.config import EvalConfig

    return PreferenceObjective([], val_rows, cfg, EvalConfig(batch_size=8), pad_id, precision).evaluate(model, device)


# ------------------------------------------------------------------------------------ tunelab
def run_tunelab(spec: dict, train_rows: list, val_rows: list, workdir: Path) -> dict:
    from accelerate import Accelerator

    from tunelab.models import load_tokenizer
    from tunelab.train.loop import train_lora
    from tunelab.train.precision import Precision
    from tunelab.train.recipe import build_lora_model, layer_surgery
    from tunelab.train.reference import reference_logps, store

    cfg = train_config(spec, workdir / "run")
    precision = Precision(spec["precision"], "bench")
    tokenizer = load_tokenizer(cfg.model)
    model = build_lora_model(cfg, precision)
    started = time.perf_counter()
    ref = reference_logps(
        model,
        train_rows,
        16,
        cfg.train.packing,
        tokenizer.pad_token_id,
        precision,
        torch.device("cpu"),
        cfg.train.loss_chunk_tokens,
    )
    for row, values in zip(train_rows, ref.tolist()):
        store(row, values)
    reference_seconds = time.perf_counter() - started
    cpu_marks, token_marks = [], []

    def progress(step, record):
        cpu_marks.append(time.process_time())
        token_marks.append(record["tokens"])

    layer_surgery(model, cfg.train)  # as the recipe does: fused or compiled layers
    result = train_lora(
        model,
        train_rows,
        val_rows[:1],
        cfg.train,
        cfg.eval,
        workdir / "run",
        precision,
        tokenizer.pad_token_id,
        Accelerator(cpu=True),
        resume=False,
        log=lambda *_: None,
        progress=progress,
    )
    figures = score(model, val_rows, spec, tokenizer.pad_token_id)
    return {
        **after_first_step(cpu_marks, token_marks),
        "tokens": result.tokens,
        "train_seconds": result.train_seconds,
        "step_seconds": [h["step_s"] for h in result.history if "step_s" in h],
        "reference_seconds": reference_seconds,
        "val_loss": figures["val_loss"],
        "val_pref_accuracy": figures["val_pref_accuracy"],
        "val_reward_margin": figures["val_reward_margin"],
        "final_train_loss": result.final_train_loss,
    }


# ---------------------------------------------------------------------------------------- TRL
def trl_settings(spec: dict, output_dir: str) -> dict:
    """DPOConfig arguments: TRL's defaults plus what makes the job the same as tunelab's."""
    bf16 = spec["precision"] == "bf16"
    return {
        "output_dir": output_dir,
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "linear",
        "warmup_steps": spec["warmup_steps"],
        "weight_decay": spec["weight_decay"],
        "max_grad_norm": spec["max_grad_norm"],
        "optim": "adamw_torch",
        "beta": spec["beta"],
        "loss_type": ["sigmoid"],
        "max_length": spec["max_seq_len"],
        "precompute_ref_log_probs": True,
        "bf16": bf16,
        "model_init_kwargs": {"dtype": "bfloat16" if bf16 else "float32"},
        "use_cpu": True,
        "train_sampling_strategy": "sequential",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 10,
        "dataloader_num_workers": 0,
        "seed": spec["seed"],
    }


def run_trl(spec: dict, train_rows: list, val_rows: list, workdir: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunelab.config import ModelConfig
    from tunelab.data.masking import IGNORE_INDEX
    from tunelab.models import load_tokenizer

    rows = ordered_rows(train_rows, spec["steps"], spec["batch_size"], spec["seed"])

    def split(example):
        ids, labels = example
        n = sum(1 for x in labels if x == IGNORE_INDEX)
        return ids[:n], ids[n:]

    prompts, chosen, rejected = [], [], []
    for row in rows:
        (p, c), (_, r) = split(row.chosen), split(row.rejected)
        prompts.append(p)
        chosen.append(c)
        rejected.append(r)
    dataset = Dataset.from_dict({"prompt_ids": prompts, "chosen_ids": chosen, "rejected_ids": rejected})

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenised by tunelab: the same ids on both sides

    tokenizer = load_tokenizer(ModelConfig(name=spec["model_path"]))
    lora = spec["lora"]
    peft_config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks, self.cpu_marks, self.token_marks = [], [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())
            self.token_marks.append(counted["tokens"])

    counted = {"tokens": 0}
    timer = StepTimer()
    started = time.perf_counter()
    trainer = PreTokenized(
        model=spec["model_path"],
        args=DPOConfig(**trl_settings(spec, str(workdir / "trl"))),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[timer],
    )
    reference_seconds = time.perf_counter() - started  # includes model loading; the reference pass dominates

    def count_real_tokens(module, args, kwargs):  # padding excluded; chosen + rejected rows of each forward
        mask = kwargs.get("attention_mask")
        counted["tokens"] += int(mask.sum()) if mask is not None else int(kwargs["input_ids"].numel())

    model = trainer.model
    handle = model.register_forward_pre_hook(count_real_tokens, with_kwargs=True)
    trainer.train()
    handle.remove()
    step_seconds = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    figures = score(model, val_rows, spec, tokenizer.pad_token_id)
    return {
        **after_first_step(timer.cpu_marks, timer.token_marks),
        "tokens": counted["tokens"],
        "train_seconds": sum(step_seconds),
        "step_seconds": step_seconds,
        "reference_seconds": reference_seconds,
        "val_loss": figures["val_loss"],
        "val_pref_accuracy": figures["val_pref_accuracy"],
        "val_reward_margin": figures["val_reward_margin"],
        "final_train_loss": losses[-1] if losses else None,
        "trl_settings": {k: v for k, v in trl_settings(spec, "").items() if k != "output_dir"},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["tunelab", "trl"], required=True)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    from tunelab.train.memory import peak_rss_mib
    from tunelab.train.recipe import set_threads

    threads = set_threads(spec["threads"])
    data = json.loads(Path(spec["data_file"]).read_text())
    train_rows, val_rows = pairs_from(data["train"]), pairs_from(data["val"])
    with tempfile.TemporaryDirectory(prefix=f"bench-dpo-{args.side}-") as tmp:
        run = run_tunelab if args.side == "tunelab" else run_trl
        result = run(spec, train_rows, val_rows, Path(tmp))
    result.update(
        side=args.side,
        precision=spec["precision"],
        threads=threads,
        steps=spec["steps"],
        tok_per_s=result["tokens"] / max(result["train_seconds"], 1e-9),
        s_per_step=statistics.median(result["step_seconds"]) if result["step_seconds"] else None,
        peak_rss_mib=peak_rss_mib(),
        pid=os.getpid(),
    )
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
