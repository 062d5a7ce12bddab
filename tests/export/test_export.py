"""Merge, GGUF conversion/quantisation, parity failure detection, dry-run listing and token hygiene."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import wait_for_http
from tunelab.errors import UserError
from tunelab.export.gguf import convert_hf_to_gguf, gguf_metadata, quantize_gguf
from tunelab.export.merge import merge_run
from tunelab.export.parity import ParityError, quantisation_warnings, raise_if_failed, run_parity
from tunelab.export.pipeline import parse_quants

FAKE_TOKEN = "hf_tunelabFAKEtoken0123456789abcdef"


def greedy(model, tokenizer, text: str, n: int = 12) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def corrupt_tensor(gguf_file: Path, name: str = "blk.0.ffn_down.weight") -> None:
    """Overwrite one tensor in place (memory-mapped), as a broken converter or a bit rot would."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file), "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    tensor.data[...] = np.random.default_rng(0).standard_normal(tensor.data.shape).astype(tensor.data.dtype)
    tensor.data.flush() if hasattr(tensor.data, "flush") else None
    del reader


@pytest.fixture(scope="module")
def tiny_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_export")
    merged = out / "merged"
    merge_run(tiny_run, merged)
    f16 = convert_hf_to_gguf(merged, out / "model-f16.gguf")
    return merged, f16


def test_parse_quants_rejects_unknown():
    assert parse_quants("q4_k_m, f16,q4_k_m") == ["q4_k_m", "f16"]
    with pytest.raises(UserError, match="q5_x"):
        parse_quants("q4_k_m,q5_x")


def test_merged_model_matches_adapter_on_base(tiny_run, tiny_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.runs import load_run_model

    merged_dir, _ = tiny_export
    peft_model, tokenizer = load_run_model(tiny_run)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    merged_tok = AutoTokenizer.from_pretrained(str(merged_dir))
    prompt = "Plan a trip to Lisbon."
    expected = greedy(peft_model, tokenizer, prompt)
    assert greedy(merged, merged_tok, prompt) == expected
    with peft_model.disable_adapter():  # the adapter really changes the answer, so the check above means something
        assert greedy(peft_model, tokenizer, prompt) != expected
    assert merged_tok.chat_template == tokenizer.chat_template
    assert merged.generation_config.eos_token_id == merged_tok.convert_tokens_to_ids("<|im_end|>")
    assert (merged_dir / "model.safetensors").is_file()


def test_gguf_keeps_chat_template_and_eos(tiny_export, tmp_path):
    from transformers import AutoTokenizer

    merged_dir, f16 = tiny_export
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    q8 = quantize_gguf(f16, tmp_path / "model-q8_0.gguf", "q8_0", threads=1)
    for path, file_type in ((f16, 1), (q8, 7)):  # LLAMA_FTYPE_MOSTLY_F16 = 1, MOSTLY_Q8_0 = 7
        meta = gguf_metadata(path)
        assert meta["tokenizer.chat_template"] == tokenizer.chat_template
        assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert meta["general.file_type"] == file_type
    assert q8.stat().st_size < 0.8 * f16.stat().st_size  # the vocabulary metadata is the same in both
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files behind


def test_parity_passes_for_the_right_gguf(tiny_export):
    merged_dir, f16 = tiny_export
    report = run_parity(merged_dir, {"f16": f16}, max_new_tokens=16, threads=1)
    row = report["ggufs"][0]
    assert row["passed"] is True and row["exact_matches"] == row["prompts"]
    assert abs(row["ppl_delta_pct"]) < 1.0
    raise_if_failed(report)


def test_parity_fails_for_another_model(tiny_export, tmp_path, make_tiny_model):
    merged_dir, _ = tiny_export
    other = make_tiny_model(tmp_path / "other", seed=1)
    wrong = convert_hf_to_gguf(other, tmp_path / "model-f16.gguf")
    report = run_parity(merged_dir, {"f16": wrong}, max_new_tokens=16, threads=1)
    assert report["ggufs"][0]["passed"] is False
    with pytest.raises(ParityError, match="does not reproduce the merged model"):
        raise_if_failed(report)


def test_quantised_file_that_never_starts_like_the_merged_model_is_warned_about(tiny_export, tmp_path, make_tiny_model):
    """A quantised file is only "info" in the parity table; one whose greedy answers leave the merged model at the
    first token on every prompt (what q4_k_m did to a short Gemma fine-tune) gets a warning line; a faithful one not."""
    merged_dir, f16 = tiny_export
    other = make_tiny_model(tmp_path / "other", seed=1)
    erased = convert_hf_to_gguf(other, tmp_path / "model-q4_k_m.gguf")  # stands for a file that lost the fine-tune
    report = run_parity(merged_dir, {"q4_k_m": erased, "q8_0": f16}, max_new_tokens=8, threads=1)
    by_quant = {row["quant"]: row for row in report["ggufs"]}
    assert [r["first_divergence"] for r in by_quant["q4_k_m"]["results"]] == [0] * by_quant["q4_k_m"]["prompts"]
    assert by_quant["q8_0"]["exact_matches"] == by_quant["q8_0"]["prompts"]
    warnings = quantisation_warnings(report)
    assert len(warnings) == 1
    assert "model-q4_k_m.gguf" in warnings[0] and "first greedy token" in warnings[0] and "q8_0" in warnings[0]
    # one prompt that starts right is ordinary quantisation noise, not an erased fine-tune
    by_quant["q4_k_m"]["results"][0]["first_divergence"] = 3
    assert quantisation_warnings(report) == []


def test_export_fails_loudly_on_a_corrupted_gguf(tiny_run, monkeypatch):
    from tunelab.export import pipeline

    def convert_then_corrupt(hf_dir, out_file, outtype="f16"):
        convert_hf_to_gguf(hf_dir, out_file, outtype)
        corrupt_tensor(out_file)
        return out_file

    monkeypatch.setattr(pipeline, "convert_hf_to_gguf", convert_then_corrupt)
    monkeypatch.setattr(pipeline, "log", lambda *a: None)
    with pytest.raises(ParityError, match="model-f16.gguf does not reproduce"):
        pipeline.export_run(tiny_run, ["f16"], threads=1)
    assert '"passed": false' in (tiny_run / "export" / "parity.json").read_text()


@pytest.fixture(scope="module")
def tiny_cli_export(tiny_run, tmp_path_factory):
    """`tunelab export --push-to-hub --dry-run --space` on the tiny run, with a fake token in the env."""
    from tunelab.cli import app

    space = tmp_path_factory.mktemp("space") / "space"
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", FAKE_TOKEN)
    mp.setenv("HF_ENDPOINT", "https://127.0.0.1")  # nothing listens: any upload attempt would fail
    try:
        result = CliRunner().invoke(
            app,
            [
                "export",
                str(tiny_run),
                "--gguf",
                "q4_k_m,q8_0,f16",
                "--space",
                str(space),
                "--push-to-hub",
                "someone/tiny-chat",
                "--dry-run",
                "--threads",
                "1",
            ],
        )
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    return result.output, space


def test_dry_run_lists_exactly_the_upload(tiny_run, tiny_cli_export):
    output, _ = tiny_cli_export
    listed = [line.split()[0] for line in output.splitlines() if line.startswith("  ") and "<-" in line]
    assert listed == [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "adapter/README.md",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "model-f16.gguf",
        "model-q4_k_m.gguf",
        "model-q8_0.gguf",
        "parity.json",
    ]
    assert "would upload to https://huggingface.co/someone/tiny-chat" in output
    assert "uploaded:" not in output
    assert "gguf" in output and "PASS" in output  # the parity table is printed


def test_token_never_written(tiny_run, tiny_cli_export):
    _, space = tiny_cli_export
    for root in (tiny_run, space):
        for f in root.rglob("*"):
            if f.is_file():
                assert FAKE_TOKEN.encode() not in f.read_bytes(), f"token leaked into {f}"
    card = (tiny_run / "export" / "merged" / "README.md").read_text()
    assert "base_model:" in card and "## How to run" in card


def test_push_without_network_is_one_user_error(tiny_run, tiny_cli_export, monkeypatch):
    from tunelab.hub import push_to_hub, upload_plan

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError) as info:
        push_to_hub("someone/tiny-chat", upload_plan(tiny_run, tiny_run / "export"), private=True)
    message = str(info.value)
    assert "\n" not in message and "cannot reach" in message and FAKE_TOKEN not in message


def test_push_without_token_says_how_to_log_in(tiny_run, monkeypatch, tmp_path):
    from tunelab.hub import push_to_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored login either
    with pytest.raises(UserError, match="HF_TOKEN"):
        push_to_hub("someone/tiny-chat", [], private=False)


def bundle_python(space: Path) -> tuple[list[str], dict[str, str]]:
    """A Python that sees the bundle and site-packages only: `-S` skips the .pth that puts src/ on the path."""
    import site
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPACE_ID", "FEEDBACK_REPO", "TUNELAB_AUTH")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(space), *site.getsitepackages()]),
        GRADIO_ANALYTICS_ENABLED="False",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    return [sys.executable, "-S"], env


def test_space_bundle_is_a_gradio_space_with_the_vendored_app(tiny_cli_export):
    import gradio

    from tunelab.serve.space import vendored_files

    _, space = tiny_cli_export
    readme = (space / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio" in readme and "app_file: app.py" in readme
    assert f"sdk_version: {gradio.__version__}\n" in readme
    requirements = (space / "requirements.txt").read_text().split()
    assert f"gradio=={gradio.__version__}" in requirements and "llama-cpp-python>=0.3" in requirements
    assert not any(r.startswith(("torch", "transformers", "tunelab", "pydantic", "pyyaml")) for r in requirements)
    assert (space / "model-q4_k_m.gguf").stat().st_size > 0
    assert (
        sorted(str(p.relative_to(space / "tunelab")) for p in (space / "tunelab").rglob("*") if p.is_file())
        == vendored_files()
    )
    from tunelab.serve.space import APP_SOURCE

    assert (space / "app.py").read_text() == APP_SOURCE.read_text()  # a real file, copied as it is
    # Import the bundle's app.py (not run as __main__: no model load, no server) without src/ on the path:
    # every module it pulls in must come from the bundle, so the vendored closure is complete.
    cmd, env = bundle_python(space)
    probe = (
        "import runpy, sys, json; runpy.run_path(sys.argv[1], run_name='space_app');"
        "print(json.dumps({m: getattr(sys.modules[m], '__file__', None) "
        "for m in sys.modules if m.startswith('tunelab')}))"
    )
    done = subprocess.run(
        [*cmd, "-c", probe, str(space / "app.py")],
        env=env,
        cwd=space.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert {
        "tunelab.serve.app",
        "tunelab.models.inference",
        "tunelab.serve.feedback_store",
        "tunelab.serve.hub_sync",
    } <= set(modules)
    for name, file in modules.items():
        assert file and Path(file).resolve().is_relative_to(space.resolve()), (name, file)


def load_space_app(space: Path, monkeypatch):
    """The bundle's app.py as a module, with the model, the server and the Hub replaced by recorders."""
    import importlib.util
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))  # app.py prepends the bundle dir; undone after the test
    spec = importlib.util.spec_from_file_location("space_app_under_test", space / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = {}

    class FakeBackend:
        model_id = "model-q4_k_m.gguf"

        def __init__(self, path, threads):
            calls["backend"] = (Path(path).name, threads)

    monkeypatch.setattr(module, "load_backend", FakeBackend)
    monkeypatch.setattr(module, "build_app", lambda backend, db, **kw: calls.update(build=(db, kw)) or "demo")
    monkeypatch.setattr(module, "launch", lambda demo, **kw: calls.update(launch=kw))
    monkeypatch.setattr(module, "start_feedback_sync", lambda db, say: calls.update(sync=db))
    monkeypatch.setattr(module.signal, "signal", lambda *a: None)
    for name in ("SPACE_ID", "TUNELAB_AUTH", "PORT", "GRADIO_SERVER_PORT", "FEEDBACK_DB"):
        monkeypatch.delenv(name, raising=False)
    return module, calls


def test_space_app_binds_and_shares_feedback_by_where_it_runs(tiny_cli_export, monkeypatch, tmp_path):
    _, space = tiny_cli_export
    module, calls = load_space_app(space, monkeypatch)
    monkeypatch.setenv("THREADS", "1")
    monkeypatch.setenv("FEEDBACK_DB", str(tmp_path / "fb.db"))
    module.main()  # locally: loopback, feedback overview shared (it is the owner's machine)
    assert calls["launch"] == {"host": "127.0.0.1", "port": 7860, "auth": None}
    assert calls["build"][1]["share_feedback_data"] is True and calls["build"][0] == tmp_path / "fb.db"
    assert calls["backend"] == ("model-q4_k_m.gguf", 1) and calls["sync"] == tmp_path / "fb.db"

    monkeypatch.setenv("SPACE_ID", "someone/tiny-chat")
    monkeypatch.setenv("PORT", "7861")
    module.main()  # on a Space without a login: every interface, visitors cannot read each other's feedback
    assert calls["launch"] == {"host": "0.0.0.0", "port": 7861, "auth": None}
    assert calls["build"][1]["share_feedback_data"] is False

    monkeypatch.setenv("TUNELAB_AUTH", "alice:secret")
    module.main()
    assert calls["launch"]["auth"] == ("alice", "secret") and calls["build"][1]["share_feedback_data"] is True


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_space_bundle_serves_tunelabs_app(tiny_cli_export, tmp_path):
    """`python DIR/app.py` (bundle only, no src/) on a free loopback port: the real app's API answers."""
    import socket
    import sqlite3

    from gradio_client import Client

    _, space = tiny_cli_export
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd, env = bundle_python(space)
    db = tmp_path / "feedback.db"
    env.update(PORT=str(port), THREADS="1", FEEDBACK_DB=str(db), HF_TOKEN=FAKE_TOKEN)
    log_path = tmp_path / "space.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [*cmd, str(space / "app.py")],
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        try:
            wait_for_http(url, 180, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(log_path.read_text()[-3000:]) from exc
        client = Client(url, verbose=False)
        chatbot, _, status = client.predict("Hello!", "Answer briefly.", 0.0, 0.9, 16, api_name="/chat")
        assert status.startswith("Done"), status
        assert chatbot[-1]["role"] == "assistant"
        status, *_ = client.predict(
            "down", ["too short"], "more please", "Hello! How can I help?", api_name="/chat_feedback"
        )
        assert status.startswith("✅"), status
        plan, status = client.predict(
            "Lisbon", 1, "spring", "mid-range", "relaxed", ["food"], "", 0.0, 16, False, api_name="/plan"
        )
        assert status.startswith("Done"), status
        headline, *_ = client.predict(api_name="/feedback_overview")
        assert "1" in headline
        conn = sqlite3.connect(db)
        rows = conn.execute("SELECT tab, rating, comment, model_id, app_version FROM feedback").fetchall()
        conn.close()
        assert rows == [("chat", -1, "more please", "model-q4_k_m.gguf", rows[0][4])] and "tunelab" in rows[0][4]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: only this server
            proc.wait(timeout=60)
    log = log_path.read_text()
    assert f"running on http://127.0.0.1:{port}" in log
    assert "stored in" in log and "only" in log  # no FEEDBACK_REPO: the log says feedback stays on the disk
    assert FAKE_TOKEN not in log and FAKE_TOKEN.encode() not in db.read_bytes()


def test_export_rejects_a_non_run_folder(tmp_path):
    from tunelab.cli import app

    result = CliRunner().invoke(app, ["export", str(tmp_path)])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_export_recommends_the_fastest_quantisation_within_tolerance_of_q8_0(tiny_run, tiny_cli_export):
    from tunelab.export.quant_choice import PPL_TOLERANCE_PCT

    output, _ = tiny_cli_export
    choice = json.loads((tiny_run / "export" / "export.json").read_text())["recommended_quant"]
    ggufs = {g["quant"]: g for g in json.loads((tiny_run / "export" / "parity.json").read_text())["ggufs"]}
    limit = ggufs["q8_0"]["ppl_gguf"] * (1 + PPL_TOLERANCE_PCT / 100)
    eligible = [q for q, g in ggufs.items() if q != "f16" and g["ppl_gguf"] <= limit]
    assert choice["quant"] in eligible  # within the stated tolerance of q8_0
    assert all(ggufs[q]["decode_tok_s"] <= ggufs[choice["quant"]]["decode_tok_s"] for q in eligible)  # the fastest
    assert "recommended for a CPU Space" in output
