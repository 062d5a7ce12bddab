"""HF folder -> GGUF with llama.cpp's own converter, then quantisation with the llama.cpp library.

The converter (`convert_hf_to_gguf.py` + its `conversion/` package + the matching `gguf-py`) is not part of
the llama-cpp-python wheel, only of its source distribution. We download that sdist once with pip, keep just
the converter files in `~/.cache/tunelab/llama.cpp/<version>/`, and run the converter as a subprocess so its
own gguf-py (not necessarily PyPI's `gguf`) is the one imported. `TUNELAB_LLAMA_CPP_SRC` points at an
existing llama.cpp checkout instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tunelab.errors import UserError
from tunelab.hardware import usable_cores
from tunelab.io import atomic_folder, atomic_path

# What the converter needs from the sdist (paths under vendor/llama.cpp/).
CONVERTER_FILES = (
    "convert_hf_to_gguf.py",
    "convert_lora_to_gguf.py",  # a PEFT adapter -> a GGUF LoRA that llama.cpp applies at run time
    "conversion/",
    "gguf-py/",
    "models/templates/",
    "LICENSE",
)
QUANT_TYPES = ("f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0")


def _log(message: str) -> None:
    print(f">> {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- converter source
def llama_cpp_source_dir() -> Path:
    """A folder holding convert_hf_to_gguf.py and gguf-py/, fetched once if needed."""
    override = os.environ.get("TUNELAB_LLAMA_CPP_SRC")
    if override:
        src = Path(override).expanduser()
        if not (src / "convert_hf_to_gguf.py").is_file() or not (src / "gguf-py").is_dir():
            raise UserError(
                f"TUNELAB_LLAMA_CPP_SRC={src}: needs convert_hf_to_gguf.py and gguf-py/ (a llama.cpp checkout)"
            )
        return src
    from tunelab.io import cache_dir

    version = importlib.metadata.version("llama-cpp-python")
    target = cache_dir() / "llama.cpp" / version
    if not all((target / name.rstrip("/")).exists() for name in CONVERTER_FILES):
        fetch_converter(version, target)
    return target


def download_llama_cpp_sdist(version: str, into: Path) -> Path:
    """The llama-cpp-python `version` source distribution, downloaded with pip into the folder `into`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(into)]
    done = subprocess.run([*cmd, f"llama-cpp-python=={version}"], capture_output=True, text=True)
    sdists = list(Path(into).glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not sdists:
        last = (done.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
        raise UserError(
            f"cannot download the llama-cpp-python {version} source (needs PyPI access): {last}; "
            "or set TUNELAB_LLAMA_CPP_SRC to a llama.cpp checkout"
        )
    return sdists[0]


def fetch_converter(version: str, target: Path) -> None:
    _log(
        f"Fetching llama.cpp's GGUF converters (once): the llama-cpp-python {version} source distribution "
        f"from PyPI (~75 MB), keeping only the converters in {target}"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        sdist = download_llama_cpp_sdist(version, Path(tmp))
        with atomic_folder(target) as staged:
            _extract_converter(sdist, staged)


def _extract_converter(sdist: Path, out: Path) -> None:
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/<rest>
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not member.isfile():
                continue
            rest = parts[3]
            if any(rest == f or (f.endswith("/") and rest.startswith(f)) for f in CONVERTER_FILES):
                member.name = rest
                tar.extract(member, out, filter="data")
    if not (out / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"{sdist.name}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")


# ---------------------------------------------------------------------------------- conversion
def convert_hf_to_gguf(hf_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    """Run llama.cpp's converter on a HF folder; the GGUF carries the tokenizer, chat template and EOS."""
    src = llama_cpp_source_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(src)]))
    with atomic_path(out_file) as tmp, converter_input(hf_dir) as model_dir:
        cmd = [
            sys.executable,
            str(src / "convert_hf_to_gguf.py"),
            str(model_dir),
            "--outfile",
            str(tmp),
            "--outtype",
            outtype,
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not tmp.stat().st_size:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise UserError(f"llama.cpp's convert_hf_to_gguf.py failed on {hf_dir}:\n{tail}")
    return out_file


def convert_lora_to_gguf(adapter_dir: Path, config_dir: Path, out_file: Path) -> Path:
    """A PEFT adapter -> a GGUF LoRA (f16) with llama.cpp's own converter, for llama.cpp to apply at run time
    (`llama-server --lora`, per request). `config_dir`: any HF folder with the base's config.json (the merged
    export has it; no weights are read)."""
    src = llama_cpp_source_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(src)]))
    with atomic_path(out_file) as tmp:
        cmd = [sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", str(config_dir),
               "--outfile", str(tmp), "--outtype", "f16", str(adapter_dir)]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not tmp.stat().st_size:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise UserError(f"llama.cpp's convert_lora_to_gguf.py failed on {adapter_dir}:\n{tail}")
    return out_file


def user_defined_pieces(tokenizer_model: Path) -> dict[str, int]:
    """The USER_DEFINED pieces of a SentencePiece model (Gemma: "\\n", "\\n\\n", runs of spaces...): {piece: id}."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(tokenizer_model.read_bytes())
    user_defined = spm_pb2.ModelProto.SentencePiece.USER_DEFINED
    return {p.piece: i for i, p in enumerate(proto.pieces) if p.type == user_defined}


@contextlib.contextmanager
def converter_input(hf_dir: Path):
    """The folder to hand llama.cpp's converter: `hf_dir` itself, or for a SentencePiece tokenizer with
    user-defined pieces a side folder of links to its files plus an `added_tokens.json` naming them.

    The converter keeps a piece USER_DEFINED (matched whole by llama.cpp, as Hugging Face's tokenizer does) only
    when added_tokens.json or tokenizer_config.json lists it; a folder saved by transformers 5 lists neither
    (its added tokens live in tokenizer.json), so "\\n\\n" would turn into an ordinary piece that llama.cpp's SPM
    merges never produce and the GGUF would tokenise text differently from training. added_tokens.json is not
    written into `hf_dir` itself: transformers would then add its entries a second time."""
    spm = hf_dir / "tokenizer.model"
    pieces = user_defined_pieces(spm) if spm.is_file() and not (hf_dir / "added_tokens.json").exists() else {}
    if not pieces:
        yield hf_dir
        return
    with tempfile.TemporaryDirectory(prefix="convert-input-", dir=hf_dir.parent) as tmp:
        staged = Path(tmp) / hf_dir.name  # the converter names the model after its folder
        staged.mkdir()
        for item in hf_dir.iterdir():
            (staged / item.name).symlink_to(item.resolve())
        (staged / "added_tokens.json").write_text(json.dumps(pieces, ensure_ascii=False), encoding="utf-8")
        yield staged


@contextlib.contextmanager
def native_stderr_captured():
    """Send C-level stderr (fd 2) to a temp file: the quantiser prints one warning per tensor that falls back
    to another type (576-wide rows are not q4_K-able); we show that text only if quantising fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryDirectory() as tmp:
        log_file = Path(tmp) / "stderr.txt"
        with open(log_file, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield log_file
            finally:
                os.dup2(saved, 2)
                os.close(saved)


def quantize_gguf(src_file: Path, out_file: Path, qtype: str, threads: int | None = None) -> Path:
    """Quantise with libllama's own quantiser (the same code as the `llama-quantize` tool)."""
    import logging

    import llama_cpp

    # libllama logs every tensor while quantising; keep only errors (llama-cpp-python's logger).
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    # q4_0: llama.cpp repacks it at load time into interleaved layouts for its AVX2/AVX-512 kernels (REPACK builds)
    ftypes = {
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
        "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
        "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
        "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    }
    if qtype not in ftypes:
        raise UserError(f"--gguf: unknown type `{qtype}` (known: {', '.join(QUANT_TYPES)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[qtype]
    params.nthread = threads or usable_cores()
    with atomic_path(out_file) as tmp:
        with native_stderr_captured() as captured:
            status = llama_cpp.llama_model_quantize(str(src_file).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0 or not tmp.stat().st_size:
            tail = "\n".join(captured.read_text(errors="replace").strip().splitlines()[-10:])
            raise UserError(f"llama.cpp could not quantise {src_file} to {qtype} (status {status}):\n{tail}")
    return out_file


def gguf_metadata(path: Path) -> dict[str, object]:
    """Scalar and string metadata of a GGUF (read with the gguf package; no model load)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out: dict[str, object] = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name.endswith(("tokens", "scores", "token_type", "merges")):
            continue  # the vocabulary arrays: large and not needed here
        try:
            out[name] = field.contents()
        except Exception:  # exotic field types we never read
            continue
    return out
