"""Chat inference behind one small interface: llama.cpp for `.gguf`, transformers (+PEFT) for folders.

    backend = load_backend("runs/quickstart", threads=2)   # run folder, merged HF folder or .gguf file
    for piece in backend.stream_chat(messages, GenerationParams(temperature=0.7)):
        print(piece, end="", flush=True)

`messages` is the canonical conversation (see docs/design.md) without the final assistant turn.
Both backends render the prompt with the model's own chat template (the run's tokenizer, the merged
folder's tokenizer, or `tokenizer.chat_template` in the GGUF metadata) and stop at the model's EOS.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tunelab.errors import UserError

Messages = list[dict[str, str]]


@dataclass
class GenerationParams:
    """Sampling settings shared by both backends. temperature 0 means greedy decoding."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    repetition_penalty: float = 1.1
    seed: int | None = None

    def validate(self) -> GenerationParams:
        if self.temperature < 0:
            raise UserError(f"temperature: must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p: must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens: must be >= 1 (got {self.max_new_tokens})")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty: must be > 0 (got {self.repetition_penalty})")
        return self


class ChatBackend(Protocol):
    """A backend that can also constrain decoding with a grammar (llama.cpp GBNF text) sets `takes_grammar = True`
    and accepts `stream_chat(messages, params, grammar=...)`; only LlamaCppBackend does (see `takes_grammar`)."""

    model_id: str  # a short name for logs and the app (file or folder name)
    kind: str  # "llama.cpp", "transformers" or "openai-api"

    def stream_chat(self, messages: Messages, params: GenerationParams | None = None) -> Iterator[str]:
        """Yield the assistant reply as text pieces, as they are generated."""
        ...


def takes_grammar(backend: ChatBackend) -> bool:
    """Whether `backend.stream_chat` takes `grammar=` (GBNF text). Callers check first and pass it only then."""
    return getattr(backend, "takes_grammar", False)


def llama_grammar(gbnf: str | None):
    """GBNF text -> a llama_cpp.LlamaGrammar for one request (None stays None): the one way tunelab hands a
    grammar to llama.cpp (the app's backend and `eval/domain.answer_in_llama_cpp`)."""
    if gbnf is None:
        return None
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_string(gbnf, verbose=False)


def load_backend(model_path: str | Path, threads: int | None = None) -> ChatBackend:
    """`.gguf` -> llama.cpp; run folder (adapter/ + config.yaml) or HF model folder -> transformers."""
    path = Path(model_path).expanduser()
    if threads is not None and threads < 1:
        raise UserError(f"threads: must be >= 1 (got {threads})")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        return LlamaCppBackend(path, threads)
    from tunelab.models.runs import is_run_dir  # after the .gguf case: the Space bundle vendors serve/ only

    if is_run_dir(path) or (path / "config.json").is_file():
        return TransformersBackend(path, threads)
    raise UserError(
        f"{path}: not a .gguf file, a run folder (adapter/ + config.yaml) or a HF model folder (config.json)"
    )


# ------------------------------------------------------------------------------------ llama.cpp
_llama_load_lock = threading.Lock()


def amx_build_needs_plain_buffers() -> bool:
    """True when libllama was built with AMX kernels and we should not let it use them.

    ggml's AMX "extra buffer type" is picked automatically for quantised weights (q8_0, q4_K, ...) when the
    build machine had AMX. In some VMs (seen on Firecracker guests) those kernels die with SIGILL/SIGSEGV even
    though the CPU reports AMX, so by default we load with plain CPU buffers (f16 is unaffected). Builds
    without AMX (CMAKE_ARGS="-DGGML_AMX_INT8=OFF ...") keep llama.cpp's faster repacked buffers.
    TUNELAB_LLAMA_EXTRA_BUFTS=1 forces the extra buffer types back on.
    """
    import llama_cpp

    if os.environ.get("TUNELAB_LLAMA_EXTRA_BUFTS") == "1":
        return False
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@contextlib.contextmanager
def _plain_cpu_buffers():
    # Llama() does not expose `use_extra_bufts`; it reads llama_model_default_params() in __init__, so we
    # hand it defaults with extra buffer types off, only while one Llama is being constructed.
    import llama_cpp.llama as llama_module

    original = llama_module.llama_cpp.llama_model_default_params

    def defaults_without_extra_bufts():
        params = original()
        params.use_extra_bufts = False
        return params

    with _llama_load_lock:
        llama_module.llama_cpp.llama_model_default_params = defaults_without_extra_bufts
        try:
            yield
        finally:
            llama_module.llama_cpp.llama_model_default_params = original


def open_llama(gguf_path: str | Path, threads: int | None = None, n_ctx: int = 2048, **kwargs):
    """llama_cpp.Llama for a GGUF, quiet, with the thread count for both prompt and decode."""
    from llama_cpp import Llama

    guard = _plain_cpu_buffers() if amx_build_needs_plain_buffers() else contextlib.nullcontext()
    try:
        with guard:
            return Llama(
                model_path=str(gguf_path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
                **kwargs,
            )
    except ValueError as exc:
        raise UserError(f"{gguf_path}: llama.cpp cannot load this GGUF ({exc})") from None


class LlamaCppBackend:
    kind = "llama.cpp"
    takes_grammar = True

    def __init__(self, gguf_path: Path, threads: int | None = None, n_ctx: int = 2048):
        self.model_id = gguf_path.name
        # chat_format=None: llama-cpp-python formats with the GGUF's own `tokenizer.chat_template`
        # and stops at its EOS token, so the GGUF file alone defines the conversation format.
        self.llm = open_llama(gguf_path, threads, n_ctx, chat_format=None)
        if "tokenizer.chat_template" not in self.llm.metadata:
            raise UserError(f"{gguf_path}: the GGUF has no tokenizer.chat_template; re-export it with `tunelab export`")

    def stream_chat(
        self, messages: Messages, params: GenerationParams | None = None, grammar: str | None = None
    ) -> Iterator[str]:
        """`grammar`: GBNF text the reply must match (llama.cpp then allows only end-of-turn once it is complete)."""
        params = (params or GenerationParams()).validate()
        chunks = self.llm.create_chat_completion(
            messages=messages,
            stream=True,
            temperature=params.temperature,  # llama.cpp samples greedily at 0
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            repeat_penalty=params.repetition_penalty,
            seed=params.seed,
            grammar=llama_grammar(grammar),
        )
        for chunk in chunks:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece


# --------------------------------------------------------------------------------- transformers
def load_hf_model_and_tokenizer(path: Path):
    """A run folder gives base + adapter (PeftModel); any other folder is a plain HF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.runs import is_run_dir, load_run_model

    if is_run_dir(path):
        return load_run_model(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except OSError as exc:
        raise UserError(f"{path}: cannot load the model ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model, tokenizer


def turn_end_ids(model, tokenizer) -> list[int]:
    """Every id that ends an assistant turn: the tokenizer's EOS (<|im_end|> for ChatML) first, then the
    generation config's. The one definition for generation, the exported generation_config and the parity check."""
    ids = [tokenizer.eos_token_id]
    configured = model.generation_config.eos_token_id
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def chat_prompt(tokenizer, messages: Messages) -> dict:
    """The prompt tensors (input_ids, attention_mask; batch of one) for `messages` in the model's chat template."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def greedy_tokens(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> tuple[list[int], bool]:
    """Greedy decoding in transformers: the new tokens before the first of `eos_ids`, and whether one was reached
    (False: cut at `max_new_tokens`). With a `seed`: one answer sampled at `temperature`/`top_p`, reproducibly.
    The one HF decode outside the streaming backend: `tunelab eval`'s samples, the domain eval's adapter answers
    (`greedy_reply`) and the export parity check's reference."""
    import torch

    ids = torch.tensor([prompt_ids], device=model.device)
    sampling = {"do_sample": False}
    if seed is not None:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **sampling,
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos_ids,
            pad_token_id=pad_id if pad_id is not None else eos_ids[0],
        )
    new = out[0, len(prompt_ids) :].tolist()
    stop = next((i for i, token in enumerate(new) if token in eos_ids), None)
    return (new, False) if stop is None else (new[:stop], True)


def greedy_reply(
    model, tokenizer, messages: Messages, max_new_tokens: int, repetition_penalty: float = 1.0, **sampling
) -> tuple[str, bool]:
    """The greedy assistant reply to `messages` (chat template, turn-end ids) and whether it ended its turn;
    `sampling` (seed, temperature, top_p) as in `greedy_tokens`."""
    prompt = chat_prompt(tokenizer, messages)["input_ids"][0].tolist()
    tokens, finished = greedy_tokens(
        model,
        prompt,
        max_new_tokens,
        turn_end_ids(model, tokenizer),
        tokenizer.pad_token_id,
        repetition_penalty,
        **sampling,
    )
    return tokenizer.decode(tokens, skip_special_tokens=True).strip(), finished


class _StopWhenSet:
    """A StoppingCriteria that ends generate() once the reader has gone away (e.g. the app's Stop button)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class TransformersBackend:
    kind = "transformers"

    def __init__(self, path: Path, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)  # process-wide: torch has no per-model thread pool
        self.model_id = path.resolve().name
        self.model, self.tokenizer = load_hf_model_and_tokenizer(path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"{path}: the tokenizer has no chat template")
        self.eos_ids = turn_end_ids(self.model, self.tokenizer)

    def prompt_ids(self, messages: Messages):
        return chat_prompt(self.tokenizer, messages)

    def stream_chat(self, messages: Messages, params: GenerationParams | None = None) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        params = (params or GenerationParams()).validate()
        inputs = self.prompt_ids(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        sampling = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        kwargs = dict(
            **inputs,
            **sampling,
            max_new_tokens=params.max_new_tokens,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0],
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
        )
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the reader's thread below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.set()
            worker.join()
        if errors:
            raise errors[0]
