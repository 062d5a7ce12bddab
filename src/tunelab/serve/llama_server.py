"""llama.cpp's own HTTP server (`llama-server`) as the engine for a GGUF: continuous batching over parallel slots.

    binary = llama_server_binary()                  # cached build, or None with the reason logged once
    with LlamaServer(binary, "model-q4_k_m.gguf", parallel=4, threads=2) as server:
        backend = LlamaServerBackend(server.url)    # a ChatBackend (OpenAI API + grammar + per-request LoRA)

    with contextlib.ExitStack() as stack:           # runs exported with --adapter-gguf from one base
        backends = adapter_backends(stack, [run_a, run_b])  # a backend per run on one server; None: load each

Why not llama-cpp-python's server: it answers one request at a time, so twenty users queue behind each other.
`llama-server` decodes every active slot in one batch, which on a CPU costs little more than one sequence (decode
is memory-bound), so aggregate throughput grows with the slot count. It is built once from the same pinned
llama-cpp-python sdist the converter comes from (vendor/llama.cpp/tools/server), with the same flags as the
wheel, and cached in `~/.cache/tunelab/llama-server/<version>/`. `TUNELAB_LLAMA_SERVER` points at another binary.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tunelab.errors import UserError
from tunelab.hardware import usable_cores
from tunelab.models.openai_backend import OpenAIBackend

# llama.cpp's AMX kernels crash on VMs that advertise AMX without granting it (Makefile: NO_AMX, same reason).
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary to cache
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    # The web UI is either built with npm or downloaded from the Hub at build time; the API needs neither.
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)
START_TIMEOUT_S = 120.0
CONTEXT_PER_SLOT = 2048  # the app's longest exchange (planner prompt + 1024 new tokens) fits with room to spare


def _log(message: str) -> None:
    print(f">> {message}", file=sys.stderr, flush=True)


def default_parallel(cores: int | None = None) -> int:
    """Slots for a CPU: 4 per core, at most 16. Decode on a CPU is bound by reading the weights once per step,
    so a batch of a few sequences per core costs little more than one; past ~8 per core the attention over every
    slot's context starts to dominate and each user's tokens slow down."""
    cores = cores or usable_cores()
    return max(1, min(16, 4 * cores))


def binary_path(version: str | None = None) -> Path:
    from tunelab.io import cache_dir

    version = version or importlib.metadata.version("llama-cpp-python")
    return cache_dir() / "llama-server" / version / "llama-server"


def llama_server_binary(build: bool = True) -> Path | None:
    """The llama-server binary: TUNELAB_LLAMA_SERVER, the cached build, or a fresh build when `build` is set.
    None (with one line saying why) where it cannot be had; callers fall back to llama-cpp-python."""
    override = os.environ.get("TUNELAB_LLAMA_SERVER")
    if override:
        path = Path(override).expanduser()
        if not os.access(path, os.X_OK):
            raise UserError(f"TUNELAB_LLAMA_SERVER={path}: not an executable file")
        return path
    path = binary_path()
    if path.is_file():
        return path
    if not build:
        return None
    try:
        return build_llama_server(path)
    except UserError as exc:
        _log(f"llama-server is not available ({exc}); falling back to llama-cpp-python's one-at-a-time server")
        return None


def build_llama_server(target: Path) -> Path:
    """Build `llama-server` from the pinned llama-cpp-python sdist (5-10 minutes on 2 cores, once)."""
    from tunelab.export.gguf import download_llama_cpp_sdist
    from tunelab.io import atomic_path

    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"building llama-server needs {' and '.join(missing)} (Debian: apt-get install cmake g++)")
    version = target.parent.name
    _log(f"Building llama.cpp's server from the llama-cpp-python {version} source: 5-10 minutes, once ({target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
        work = Path(tmp)
        sdist = download_llama_cpp_sdist(version, work)
        with tarfile.open(sdist) as tar:
            tar.extractall(work / "src", filter="data")
        source = next((work / "src").glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        env = dict(os.environ, CFLAGS=NO_AMX_FLAGS, CXXFLAGS=NO_AMX_FLAGS)
        jobs = str(usable_cores())
        for cmd in (
            ["cmake", "-S", str(source), "-B", str(work / "build"), *CMAKE_OPTIONS],
            ["cmake", "--build", str(work / "build"), "--target", "llama-server", "-j", jobs],
        ):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                tail = " | ".join(done.stderr.strip().splitlines()[-3:])
                raise UserError(f"`{' '.join(cmd[:2])}` failed: {tail}")
        built = work / "build" / "bin" / "llama-server"
        with atomic_path(target) as staged:
            shutil.copy2(built, staged)
    return target


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LlamaServer:
    """A `llama-server` child process on loopback (or `host`), started and stopped with the `with` block.

    The GGUF's own chat template renders prompts (`--jinja`) and generation stops at its end-of-generation
    tokens, as in `tunelab chat`. `loras` are loaded but applied per request only (`--lora-init-without-apply`).
    """

    def __init__(
        self,
        binary: Path,
        gguf: Path,
        *,
        parallel: int | None = None,
        threads: int | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        loras: list[Path] | tuple[Path, ...] = (),
        context_per_slot: int = CONTEXT_PER_SLOT,
    ):
        from tunelab.serve.api import check_chat_template

        gguf = Path(gguf)
        if not gguf.is_file():
            raise UserError(f"{gguf}: GGUF file not found")
        check_chat_template(gguf)
        self.parallel = parallel or default_parallel()
        if self.parallel < 1:
            raise UserError(f"--parallel: must be >= 1 (got {self.parallel})")
        self.threads = threads or usable_cores()
        self.host, self.port = host, port or free_port(host)
        self.api_key = api_key
        self.command = [
            str(binary),
            "--model", str(gguf),
            "--alias", gguf.resolve().name,
            "--host", host,
            "--port", str(self.port),
            "--parallel", str(self.parallel),
            "--ctx-size", str(context_per_slot * self.parallel),  # split evenly between the slots
            "--threads", str(self.threads),
            "--threads-batch", str(self.threads),
            "--jinja",
            # llama-server turns flash attention on by default, llama-cpp-python (`tunelab chat`, the travel judge)
            # leaves it off; the two differ in the last bits, enough to change a greedy answer at a near-tie
            "--flash-attn", "off",
            "--no-webui",
        ]  # fmt: skip
        if api_key:
            self.command += ["--api-key", api_key]
        for lora in loras:
            self.command += ["--lora", str(lora)]
        if loras:
            self.command.append("--lora-init-without-apply")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        # The log goes to an unnamed temp file (gone when closed): read back only if loading fails. A pipe
        # nobody reads would fill up and stall the server.
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                tail = " | ".join(self.log.read().decode(errors="replace").strip().splitlines()[-3:])
                raise UserError(f"llama-server exited with code {self.process.returncode} while loading: {tail}")
            if self.healthy():
                _log(f"llama-server: {self.parallel} slots, {self.threads} threads, on {self.url}")
                return
            time.sleep(0.2)
        self.stop()
        raise UserError(f"llama-server did not become ready within {START_TIMEOUT_S:.0f} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait(self) -> int:
        """Block until the server exits (Ctrl+C stops it), then return its exit code."""
        assert self.process is not None
        with contextlib.suppress(KeyboardInterrupt):
            return self.process.wait()
        return self.stop()

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


class LlamaServerBackend(OpenAIBackend):
    """The OpenAI client plus what only llama.cpp's server takes: a GBNF grammar and per-request LoRA scales."""

    kind = "llama-server"
    takes_grammar = True

    def __init__(self, url: str, *, slots: int = 1, lora_scales: dict[int, float] | None = None, **kwargs):
        super().__init__(url, **kwargs)
        self.concurrency_limit = slots  # the app sends as many requests at once as the server decodes together
        self.lora_scales = lora_scales

    def request_body(self, messages, params, grammar: str | None = None) -> dict:
        body = super().request_body(messages, params, grammar)
        if self.lora_scales is not None:
            body["lora"] = [{"id": i, "scale": s} for i, s in self.lora_scales.items()]
        return body

    def with_lora(self, scales: dict[int, float], model_id: str) -> LlamaServerBackend:
        """A second backend on the same server (same base in memory) whose requests apply other adapter scales."""
        twin = object.__new__(LlamaServerBackend)
        twin.__dict__.update(self.__dict__)
        twin.lora_scales, twin.model_id = dict(scales), model_id
        return twin

    def create_chat_completion(
        self, messages, max_tokens: int, grammar: str | None = None, temperature: float = 0.0,
        top_p: float = 1.0, seed: int | None = None, repeat_penalty: float = 1.0,
    ) -> dict:  # fmt: skip
        """llama-cpp-python's `Llama.create_chat_completion` call (the part eval/domain.answer_in_llama_cpp uses),
        answered whole by the server: the OpenAI response, `finish_reason` included. `grammar`: GBNF text."""
        from tunelab.models.inference import GenerationParams
        from tunelab.models.openai_backend import RemoteModelError

        params = GenerationParams(temperature, top_p, max_tokens, repeat_penalty, seed).validate()
        response = self.client.post("/chat/completions", json={**self.request_body(messages, params, grammar),
                                                                "stream": False})  # fmt: skip
        if response.status_code != 200:
            raise RemoteModelError(f"HTTP {response.status_code} from {self.base_url}: {response.text[:300]}")
        return response.json()


def shared_base(runs: list[Path]) -> tuple[Path, list[Path]] | str:
    """(base GGUF, adapter GGUF of each run) when every run folder's export holds its adapter as a GGUF LoRA
    (`tunelab export RUN --adapter-gguf`) and a byte-identical base GGUF of one type (q4_k_m, what the app ships,
    preferred); otherwise the reason why not."""
    from tunelab.export.gguf import QUANT_TYPES
    from tunelab.export.pipeline import ADAPTER_GGUF, BASE_GGUF
    from tunelab.models.runs import is_run_dir
    from tunelab.serve.fingerprint import model_fingerprint

    not_runs = [str(run) for run in runs if not is_run_dir(run)]
    if not_runs:
        return f"{not_runs[0]} is not a run folder"
    adapters = [run / "export" / ADAPTER_GGUF for run in runs]
    missing = [str(path) for path in adapters if not path.is_file()]
    if missing:
        return f"no {missing[0]} (`tunelab export RUN --adapter-gguf` writes it)"
    for quant in sorted(QUANT_TYPES, key=lambda q: q != "q4_k_m"):
        bases = [run / "export" / BASE_GGUF.format(quant=quant) for run in runs]
        if all(base.is_file() for base in bases) and len({model_fingerprint(base) for base in bases}) == 1:
            return bases[0], adapters
    return f"no {BASE_GGUF.format(quant='*')} file that every export holds byte for byte (different bases)"


def adapter_backends(
    stack: contextlib.ExitStack, runs: list[Path], engine: str = "auto", *, parallel: int | None = None,
    threads: int | None = None, log=_log,
) -> list[LlamaServerBackend] | None:  # fmt: skip
    """One backend per run, all on ONE llama-server (stopped with `stack`): the runs' shared base GGUF in memory
    once, each run's adapter applied per request. None where the runs do not share a base GGUF with adapter GGUFs,
    or the engine is not llama-server; the caller then loads each model on its own. One log line says which."""
    if engine not in ENGINES:
        raise UserError(f"--engine: choose one of {', '.join(ENGINES)} (got {engine!r})")
    found = shared_base(runs)
    binary = None
    if engine == "llama-cpp-python":
        found = "--engine llama-cpp-python"
    elif not isinstance(found, str):
        binary = llama_server_binary(build=engine == "llama-server")
        found = found if binary is not None else f"no llama-server build at {binary_path()} (`make install`)"
    names = " and ".join(run.resolve().name for run in runs)
    if isinstance(found, str):
        log(f"{names}: each loaded as its own model ({found})")
        return None
    base, adapters = found
    server = stack.enter_context(LlamaServer(binary, base, parallel=parallel, threads=threads, loras=adapters))
    log(f"{names}: one llama-server, {base} in memory once, each adapter applied per request")
    backend = LlamaServerBackend(server.url, slots=server.parallel, model=base.name)
    return [
        backend.with_lora({i: float(i == index) for i in range(len(runs))}, model_id=run.resolve().name)
        for index, run in enumerate(runs)
    ]


ENGINES = ("auto", "llama-server", "llama-cpp-python")


def server_for(engine: str) -> Path | None:
    """The llama-server binary that `engine` asks for, or None for llama-cpp-python in-process.

    auto: the binary `make install` built, else one line and llama-cpp-python (never a build at serve time);
    llama-server: that binary, built now if missing, or one clear error."""
    if engine not in ENGINES:
        raise UserError(f"--engine: choose one of {', '.join(ENGINES)} (got {engine!r})")
    if engine == "llama-cpp-python":
        return None
    binary = llama_server_binary(build=engine == "llama-server")
    if binary is None and engine == "llama-server":
        raise UserError("--engine llama-server: no llama-server binary could be built (see the line above)")
    if binary is None:
        _log(
            f"no llama-server build at {binary_path()} (`make install` builds it); "
            "serving with llama-cpp-python, which answers one request at a time"
        )
    return binary
