"""`tunelab quickstart`: the whole loop on the embedded model and data, on this CPU: training takes minutes, the
48-prompt travel check most of the time (README: how long on which machine)."""

from __future__ import annotations

from pathlib import Path

from tunelab.config import QUICKSTART_CONFIG, load_config
from tunelab.hardware import usable_cores


def run_quickstart(
    output: Path,
    overrides: list[str] | None = None,
    serve: bool = False,
    travel_prompts: int = 48,
    log=print,
    travel_samples: int = 2,
    threads: int | None = None,
) -> dict:
    """Train, then judge where the user lives: held-out loss, and (travel_prompts > 0) the travel rubric on that
    many shipped prompts, base vs tuned, both from the q4_k_m GGUF the app serves: per prompt the greedy answer
    and `travel_samples` sampled ones, on `threads` llama.cpp threads per model (default: half the cores, so the
    two models answer side by side), with the comparison's statistics."""
    from tunelab.doctor.after import doctor_run
    from tunelab.doctor.before import pre_training_gate
    from tunelab.doctor.report import render_report, write_json
    from tunelab.eval.evaluate import evaluate_run
    from tunelab.experiments.travel_eval import domain_eval_name
    from tunelab.serve.limits import PLANNER_DAY_FORMAT
    from tunelab.train.recipe import run_training

    cfg = load_config(QUICKSTART_CONFIG, [f"train.output_dir={output}", *(overrides or [])])
    log(f"quickstart: config {QUICKSTART_CONFIG}, run folder {output}")
    summary = run_training(cfg, resume=True, log=log, preflight=pre_training_gate)
    report = evaluate_run(output, verbose=True)
    verdict = "lower" if report["improved"] else "NOT lower"
    check_file = domain_eval_name("travel", PLANNER_DAY_FORMAT)  # what the travel check writes in RUN/eval
    travel_answers = f"; {check_file}.md: every travel answer and its scores" if travel_prompts else ""
    if travel_prompts:
        report["travel"] = _travel_check(output, travel_prompts, log, travel_samples, threads)
    doctor = doctor_run(output)  # after training (and the q4_k_m export, when the travel check made one)
    render_report(doctor)
    write_json(doctor, Path(output) / "doctor.json")
    report["doctor"] = doctor.to_json()["counts"]
    log(
        f"\ntuned val loss {report['tuned']['val_loss']:.4f} is {verdict} than base {report['base']['val_loss']:.4f}"
        f" ({summary['tokens_per_second']:.0f} train tok/s, {summary['precision']})\n"
        f"{_travel_line(report.get('travel'))}"
        f"run folder: {output}\n"
        f"  adapter/        PEFT adapter (peft.PeftModel.from_pretrained)\n"
        f"  eval/           base vs tuned loss and sample answers{travel_answers}\n"
        f"  metrics.jsonl   training curve (TensorBoard: tensorboard --logdir {output}/tb)\n"
        f"  doctor.json     the doctor's checks after training (tunelab doctor {output})\n"
        f"next:\n"
        f"  tunelab export {output} --gguf q4_k_m,q8_0,f16 --space {output}/space\n"
        f"  tunelab chat {output}\n"
        f"  tunelab serve {output}/export/model-q4_k_m.gguf"
    )
    if serve:
        _export_and_serve(output, log)
    return report


def half_the_cores() -> int:
    """The travel check's llama.cpp threads per model when not given: base and tuned then answer side by side
    (eval.domain.sides_fit_side_by_side), which for a small model beats one model on every core."""
    return max(1, usable_cores() // 2)


def _travel_check(run_dir: Path, prompts: int, log, samples: int = 2, threads: int | None = None) -> dict:
    """Base vs tuned q4_k_m GGUF on the shipped travel prompts: win rate of non-tied with its interval, sign test,
    verdict and per-criterion means."""
    from tunelab.experiments.travel_eval import planner_decoding, run_domain_eval, tuned_gguf_path
    from tunelab.export.pipeline import export_run

    if not tuned_gguf_path(run_dir).is_file():
        export_run(run_dir, ["q4_k_m"])
    threads = threads or half_the_cores()
    # The greedy answer plus `samples` sampled ones from fixed seeds, so that one greedy path tipped by the thread
    # count does not decide a prompt. `tunelab eval RUN --prompts travel` varies these settings.
    domain = run_domain_eval(
        run_dir, "travel", planner_decoding(samples=samples), limit=prompts, adapter=False, threads=threads, log=log
    )
    pair = domain["pairs"]["gguf"]
    return {
        **{key: value for key, value in pair.items() if key != "answers"},
        "threads": threads,
        "decoding": domain["decoding"],
    }


def _travel_line(travel: dict | None) -> str:
    from tunelab.eval.stats import describe

    if not travel:
        return ""
    grammar = " under the day-plan grammar" if travel["decoding"].get("day_grammar") else ""
    return (
        f"travel planner, q4_k_m GGUFs{grammar}, tuned vs base: {describe(travel)}; mean rubric score"
        f" {travel['mean_score']['base']:.3f} -> {travel['mean_score']['tuned']:.3f}\n"
        "  per criterion, base -> tuned: "
        + ", ".join(f"{name} {_share(v['base'])} -> {_share(v['tuned'])}" for name, v in travel["criteria"].items())
        + "\n"
    )


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _export_and_serve(run_dir: Path, log) -> None:
    """`make demo` ends here: GGUF q4_k_m (llama.cpp, fastest on CPU) served by the app on 127.0.0.1."""
    from tunelab.export.pipeline import export_run
    from tunelab.models.inference import load_backend
    from tunelab.serve.app import build_app, launch

    gguf = run_dir / "export" / "model-q4_k_m.gguf"
    if not gguf.is_file():
        export_run(run_dir, ["q4_k_m"])
    demo = build_app(load_backend(gguf), run_dir / "feedback.db")
    log(f"serving {gguf} (feedback -> {run_dir / 'feedback.db'}); Ctrl+C to stop")
    launch(demo, block=True)
