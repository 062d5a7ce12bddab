"""`tunelab export RUN --adapter-gguf`: the adapter as a GGUF LoRA beside the unmerged base, applied per request by
llama.cpp's server, answers as the merged GGUF does; with the adapter's scale at 0 it answers as the base."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.models.inference import GenerationParams, LlamaCppBackend
from tunelab.serve.llama_server import LlamaServer, LlamaServerBackend, llama_server_binary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MESSAGES = [{"role": "user", "content": "Plan a day in Porto."}]
GREEDY = GenerationParams(temperature=0.0, top_p=1.0, max_new_tokens=16, repetition_penalty=1.0, seed=0)


def answer(backend) -> str:
    return "".join(backend.stream_chat(MESSAGES, GREEDY))


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("adapter-gguf") / "run"
    shutil.copytree(tiny_run, run)  # the shared tiny run's own export/ stays as the other tests left it
    result = CliRunner().invoke(app, ["export", str(run), "--gguf", "f16", "--adapter-gguf", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return run / "export"


def test_export_writes_the_lora_and_its_base(exported):
    from gguf import GGUFReader

    lora = GGUFReader(str(exported / "adapter-f16.gguf"))
    assert str(bytes(lora.fields["general.type"].parts[-1]), "utf-8") == "adapter"
    assert any(t.name.endswith(".lora_a") for t in lora.tensors)
    base = GGUFReader(str(exported / "base-f16.gguf"))
    assert "tokenizer.chat_template" in base.fields  # the training template, as in the merged GGUF
    assert not [p.name for p in exported.iterdir() if p.name.startswith(".") or p.name == "base"]  # nothing left over


def test_the_travel_eval_base_is_the_same_file_as_the_exported_base(exported, tmp_path):
    """One producer of a run's base GGUF: the travel eval's (made by the quickstart check and sweeps) and the one
    `export --adapter-gguf` writes are the same bytes, named `base` rather than after a temp folder."""
    from gguf import GGUFReader

    from tunelab.experiments.travel_eval import export_base_gguf

    made = export_base_gguf(exported.parent, threads=1, log=lambda _: None, target=tmp_path / "b.gguf", quant="f16")
    assert made.read_bytes() == (exported / "base-f16.gguf").read_bytes()
    name = GGUFReader(str(made)).fields["general.name"]
    assert str(bytes(name.parts[name.data[0]]), "utf-8") == "Base"
    assert [p.name for p in tmp_path.iterdir()] == ["b.gguf"]


def test_adapter_applied_per_request_answers_as_the_merged_model(exported):
    binary = llama_server_binary(build=False)
    assert binary is not None, "no llama-server build: `make install` builds it"
    merged = LlamaCppBackend(exported / "model-f16.gguf", threads=1)
    base = LlamaCppBackend(exported / "base-f16.gguf", threads=1)
    merged_answer, base_answer = answer(merged), answer(base)
    assert merged_answer != base_answer  # the adapter changes the answer, so the comparison below means something
    lora = exported / "adapter-f16.gguf"
    with LlamaServer(binary, exported / "base-f16.gguf", parallel=2, threads=1, loras=[lora]) as server:
        tuned = LlamaServerBackend(server.url, slots=2, lora_scales={0: 1.0})
        assert answer(tuned) == merged_answer
        assert answer(tuned.with_lora({0: 0.0}, model_id="base")) == base_answer  # one base in memory, two models


# ------------------------------------------------------------------ champion and challenger on one base
@pytest.fixture(scope="module")
def challenger(exported, tmp_path_factory):
    """A second run on the champion's base: its adapter with the update negated (lora_B x -1), exported alike."""
    from safetensors.torch import load_file, save_file

    run = tmp_path_factory.mktemp("challenger") / "challenger"
    shutil.copytree(exported.parent, run, ignore=shutil.ignore_patterns("export"))
    weights = run / "adapter" / "adapter_model.safetensors"
    save_file({k: -v if "lora_B" in k else v for k, v in load_file(weights).items()}, weights)
    result = CliRunner().invoke(app, ["export", str(run), "--gguf", "f16", "--adapter-gguf", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return run


def llama_server_children(pid: int) -> list:
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "llama-server"]


def test_side_by_side_of_two_runs_serves_both_adapters_from_one_base(exported, challenger, tmp_path):
    """`tunelab serve CHAMPION --candidate CHALLENGER`: one llama-server holds the shared base and both adapters,
    and each side's greedy answer is its merged model's own, decoded by llama.cpp in this process."""
    from gradio_client import Client

    from tests.helpers import serve_process
    from tunelab.serve.feedback_store import FeedbackStore
    from tunelab.serve.handlers import ChatApp

    champion, db = exported.parent, tmp_path / "fb.db"
    chat = ("Plan a day in Porto.", "", 0.0, 0.9, 16)  # message, system prompt, temperature, top_p, max new tokens
    args = ["--candidate", str(challenger), "--engine", "llama-server", "--parallel", "2"]
    with serve_process(champion, db, extra_args=args, env={"TMPDIR": str(tmp_path)}) as served:
        [server] = llama_server_children(served.proc.pid)
        assert server.cmdline().count("--lora") == 2
        client = Client(served.url, verbose=False)
        *_, status = client.predict(*chat, api_name="/chat_compare")
        assert status.startswith("Done"), status
        assert client.predict("a", [], "", "", api_name="/chat_pick")[0].startswith("✅")
        assert len(llama_server_children(served.proc.pid)) == 1
        assert "one llama-server" in served.log()
    [pick] = FeedbackStore(db).pairwise_rows()
    answers = {pick["model_a_id"]: pick["answer_a"], pick["model_b_id"]: pick["answer_b"]}

    request = ChatApp(None, FeedbackStore(tmp_path / "reference.db")).chat_request(*chat, [])
    merged = {
        run.name: "".join(LlamaCppBackend(run / "export" / "model-f16.gguf", threads=1).stream_chat(
            request.messages, request.params))
        for run in (champion, challenger)
    }  # fmt: skip
    assert merged[champion.name] != merged[challenger.name]  # two different models, so a swap would show
    assert answers == merged


def test_promote_rubric_answers_both_runs_from_one_base(exported, challenger, monkeypatch):
    """The rubric gate of `tunelab promote CHALLENGER --over CHAMPION` runs both adapters on one llama-server; each
    side's greedy answer is its merged GGUF's in llama.cpp in this process."""
    import tunelab.eval.domain as domain
    from tunelab.config import PromoteConfig
    from tunelab.eval.rubric import load_travel_prompts
    from tunelab.experiments.promote import rubric_check
    from tunelab.experiments.travel_eval import planner_decoding
    from tunelab.models.inference import GenerationParams
    from tunelab.serve import limits

    started, summaries, lines = [], [], []
    real_start, real_compare = LlamaServer.start, domain.compare_pair
    monkeypatch.setattr(LlamaServer, "start", lambda self: started.append(self.command) or real_start(self))
    monkeypatch.setattr(
        domain, "compare_pair", lambda *a, **k: summaries.append(real_compare(*a, **k)) or summaries[-1]
    )
    # Under a repetition penalty or a grammar, llama-server's and llama-cpp-python's answers part after a few tokens
    # (a random tiny model), so this check of which adapter answered decodes plainly; that the gate decodes as the
    # app does is tests/experiments/test_promote.py's.
    monkeypatch.setattr(GenerationParams, "repetition_penalty", 1.0)
    monkeypatch.setattr(limits, "PLANNER_DAY_FORMAT", False)
    gates = PromoteConfig(rubric_prompts=2, rubric_max_new_tokens=12, rubric_samples=1)
    check = rubric_check(challenger, exported.parent, gates, 1, log=lines.append)
    assert check.passed is not None and "one llama-server" in check.note
    assert len(started) == 1 and started[0].count("--lora") == 2
    assert [line for line in lines if "in memory once" in line] == [
        f"run and challenger: one llama-server, {exported / 'base-f16.gguf'} in memory once, "
        "each adapter applied per request"
    ]

    decoding = planner_decoding(gates.rubric_max_new_tokens, gates.rubric_samples)
    prompts = load_travel_prompts("travel")[:2]
    for side, run in (("base", exported.parent), ("tuned", challenger)):  # compare_pair's names: current, candidate
        reference = domain.gguf_generator(run / "export" / "model-f16.gguf", decoding, threads=1)
        assert [row[side]["text"] for row in summaries[0]["answers"]] == [reference(p, None).text for p in prompts]
