"""Second moments of MLP keys, C = E[k k^T], streamed over a corpus in float64 and cached on disk.

    >>> stats = key_stats(loaded, layers=[3, 4, 5], corpus="gensim-wiki", n_tokens=100_000)
    >>> stats[4].mom2.shape                   # [d_ff, d_ff], float64, E[k k^T] over 100k tokens
    >>> stats[4].provenance["corpus"]["id"]

k is the input of a layer's MLP output projection (``ArchSpec.mlp_out``), the "key" that locate-then-edit
methods write values for. All requested layers come from ONE pass over the corpus: a ``TraceDict`` retains the
keys of every requested layer and stops the forward pass after the highest one, so the layers above it, the
final norm and the (262k-vocabulary) LM head never run.

The pass is chunked (``batch_size`` sequences of ``seq_len`` tokens; memory never depends on the model's maximum
context), checkpointed every ``checkpoint_every`` batches (an interrupted run resumes where it stopped), and the
result is cached under ``cache_dir()/stats/`` keyed by (model fingerprint, module, corpus id + version, token
count, sequence length, dtype), with a provenance JSON beside each file.

The model fingerprint covers the config and every weight the keys of that layer depend on (embeddings, the
layers below, the layer's own attention and MLP input), except the MLP output projections: those are the
tensors locate-then-edit methods write, and the methods use statistics of the pre-edit model (as the ROME/MEMIT
papers do), so a session of edits keeps hitting the cache while statistics are never shared between different
models. Positions of the tokenizer's leading special tokens (BOS) are excluded: their keys are outliers
(attention-sink activations) that would otherwise dominate C.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmedit.core.corpus import Corpus, resolve_corpus
from lmedit.core.hooks import TraceDict
from lmedit.errors import ConfigError
from lmedit.models import tokens

log = logging.getLogger(__name__)

STATS_FORMAT = 1
_SAMPLE_LIMIT = 1 << 22  # tensors larger than this are fingerprinted from a strided sample + exact sum


@dataclass
class KeyStats:
    """Uncentred second moment of one layer's keys.

    Attributes:
        layer: decoder layer index.
        module: full module name of the MLP output projection.
        mom2: E[k k^T], [d_in, d_in] float64.
        mean: E[k], [d_in] float64.
        count: number of key vectors (tokens) averaged.
        provenance: how it was computed (model, corpus, sizes, timing, versions).
    """

    layer: int
    module: str
    mom2: torch.Tensor
    mean: torch.Tensor
    count: int
    provenance: dict = field(default_factory=dict)


#: id(tensor) -> (weak reference, state it was hashed in, digest): a parameter is re-hashed only after it changed
_DIGESTS: dict[int, tuple[weakref.ref, tuple, bytes]] = {}


def _tensor_digest(t: torch.Tensor) -> bytes:
    """SHA-256 of ``t``'s dtype, shape and values, memoised per tensor object until it changes.

    The memo is keyed on the tensor's storage address and version counter: every in-place write (``add_``,
    ``copy_``, an applied patch) bumps the counter and ``p.data = ...`` moves the storage, so a changed
    parameter is hashed again; an unchanged one costs nothing (hashing Gemma 3 270M's 12 layers took 1.6 s).
    """
    state = (t.data_ptr(), t._version, t.dtype, tuple(t.shape))
    key = id(t)
    hit = _DIGESTS.get(key)
    if hit is not None and hit[0]() is t and hit[1] == state:
        return hit[2]
    digest = _hash_tensor(t)
    _DIGESTS[key] = (weakref.ref(t, lambda _ref, k=key: _DIGESTS.pop(k, None)), state, digest)
    return digest


def _hash_tensor(t: torch.Tensor) -> bytes:
    t = t.detach()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.reshape(-1)
    if flat.numel() > _SAMPLE_LIMIT:
        step = flat.numel() // _SAMPLE_LIMIT + 1
        h.update(f"{float(flat.double().sum()):.17g}|{step}|".encode())
        flat = flat[::step]
    h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.digest()


def _config_text(model) -> str:
    return model.config.to_json_string(use_diff=False) if hasattr(model.config, "to_json_string") else ""


def layer_fingerprints(loaded, layers: Sequence[int]) -> dict[int, str]:
    """Fingerprint of everything the keys of each layer depend on (see module docstring), 16 hex digits."""
    model, arch = loaded.model, loaded.arch
    h = hashlib.sha256(_config_text(model).encode())
    h.update(_tensor_digest(next(iter(dict(model.named_parameters()).values()))))
    for name, p in model.named_parameters():
        if name.startswith(arch.embed + "."):
            h.update(name.encode() + _tensor_digest(p))
    mlp_out = arch.mlp_out
    out: dict[int, str] = {}
    for layer in range(max(layers) + 1):
        prefix = arch.module_name("layer", layer) + "."
        own = []
        for name, p in model.named_parameters():
            if name.startswith(prefix) and not name.startswith(prefix + mlp_out + "."):
                own.append(name.encode() + _tensor_digest(p))
        layer_h = h.copy()
        for d in own:
            layer_h.update(d)
        if layer in layers:
            out[layer] = layer_h.hexdigest()[:16]
        # weights of layer `layer` (including its mlp_out) feed the keys of every layer above it
        mlp_out_name = arch.module_name("mlp_out", layer) + "."
        for name, p in model.named_parameters():
            if name.startswith(mlp_out_name):
                own.append(name.encode() + _tensor_digest(p))
        for d in own:
            h.update(d)
    return out


def model_fingerprint(loaded) -> str:
    """Fingerprint of the whole model (config, every parameter's digest as in ``layer_fingerprints``, device
    type), 16 hex digits: what a saved evaluation of the unedited model is checked against."""
    model = loaded.model
    h = hashlib.sha256(f"{_config_text(model)}|{torch.device(loaded.device).type}|".encode())
    for name, p in model.named_parameters():
        h.update(name.encode() + _tensor_digest(p))
    return h.hexdigest()[:16]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[-60:]


def stats_location(
    root: Path, fingerprint: str, module: str, corpus: Corpus, n_tokens: int, seq_len: int, dtype: str
) -> Path:
    """Path stem (without suffix) of a cached statistics file; every cache-key field is in the name or hash."""
    key = json.dumps(
        {
            "fingerprint": fingerprint,
            "module": module,
            "corpus": corpus.id,
            "corpus_version": corpus.version,
            "n_tokens": n_tokens,
            "seq_len": seq_len,
            "dtype": dtype,
            "format": STATS_FORMAT,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return root / fingerprint / module / f"{_slug(corpus.id)}-{n_tokens}x{seq_len}-{dtype}-{digest}"


def token_sequences(tok, corpus: Corpus, seq_len: int) -> Iterator[list[int]]:
    """Documents packed back to back into sequences of ``seq_len`` ids, each starting with the special prefix."""
    prefix = tokens.special_prefix(tok)
    body = seq_len - len(prefix)
    if body < 1:
        raise ConfigError(f"seq_len={seq_len} leaves no room after the {len(prefix)} special prefix token(s)")
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    buf: list[int] = []
    for text in corpus.texts():
        buf.extend(tok(text, add_special_tokens=False)["input_ids"])
        buf.extend(sep)
        while len(buf) >= body:
            yield prefix + buf[:body]
            buf = buf[body:]
    if buf:
        yield prefix + buf


def _save(path: Path, stats: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(stats, str(tmp) + ".safetensors", metadata={"format": str(STATS_FORMAT)})
    Path(str(tmp) + ".json").write_text(json.dumps(meta, indent=2))
    os.replace(str(tmp) + ".safetensors", str(path) + ".safetensors")
    os.replace(str(tmp) + ".json", str(path) + ".json")


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    from safetensors.torch import load_file

    st, js = Path(str(path) + ".safetensors"), Path(str(path) + ".json")
    if not (st.exists() and js.exists()):
        return None
    return load_file(str(st)), json.loads(js.read_text())


def key_stats(
    loaded,
    layers: Sequence[int],
    corpus: str | Path | Corpus | None = None,
    n_tokens: int = 100_000,
    seq_len: int = 256,
    batch_size: int = 8,
    dtype: str = "float64",
    product_dtype: str = "float32",
    cache: bool = True,
    cache_root: str | Path | None = None,
    checkpoint_every: int = 25,
    progress: bool = True,
    refresh: bool = False,
) -> dict[int, KeyStats]:
    """E[k k^T] of the MLP-output-projection inputs of ``layers``, from cache or from one corpus pass.

    Args:
        loaded: a LoadedModel.
        layers: decoder layer indices.
        corpus: anything ``resolve_corpus`` takes (default: the offline ``gensim-wiki`` fragment).
        n_tokens: key vectors (tokens, special prefix excluded) to average over.
        seq_len: tokens per sequence (documents are packed; memory is ``batch_size x seq_len`` activations).
        batch_size: sequences per forward pass.
        dtype: accumulation dtype, ``"float64"`` (default) or ``"float32"``.
        product_dtype: dtype of each batch's K^T K (``batch_size x seq_len`` tokens) before it is added to the
            accumulator: ``"float32"`` (default; about 1e-7 relative error per batch, 2-4x faster on CPU) or
            ``"float64"`` (exact products; costs more than the forward pass for several layers of a small model).
        cache: read and write the on-disk cache (``cache_root`` or ``cache_dir()/stats``).
        checkpoint_every: batches between resumable checkpoints (0: never).
        progress: show a progress bar.
        refresh: with ``cache``, recompute from the start even when cached (or partial) statistics exist, and
            overwrite them (a timed pass that also fills the cache).

    Returns:
        ``{layer: KeyStats}``.
    """
    from lmedit.core.patch import versions
    from lmedit.models.load import cache_dir

    layers = sorted(set(int(x) for x in layers))
    n_layers = loaded.arch.n_layers(loaded.model)
    bad = [x for x in layers if not 0 <= x < n_layers]
    if not layers or bad:
        raise ConfigError(f"layers {bad or layers} invalid: the model has layers 0..{n_layers - 1}")
    for name, value in (("dtype", dtype), ("product_dtype", product_dtype)):
        if value not in ("float64", "float32"):
            raise ConfigError(f"{name} must be 'float64' or 'float32', got {value!r}")
    if n_tokens < 1 or seq_len < 2 or batch_size < 1:
        raise ConfigError("n_tokens >= 1, seq_len >= 2 and batch_size >= 1 are required")
    acc_dtype = getattr(torch, dtype)
    prod_dtype = getattr(torch, product_dtype)
    corpus = resolve_corpus(corpus)
    root = Path(cache_root) if cache_root is not None else cache_dir() / "stats"
    fps = layer_fingerprints(loaded, layers)
    modules = {layer: loaded.arch.module_name("mlp_out", layer) for layer in layers}
    dtype_key = dtype if product_dtype == "float32" else f"{dtype}-exact"
    paths = {
        layer: stats_location(root, fps[layer], modules[layer], corpus, n_tokens, seq_len, dtype_key)
        for layer in layers
    }
    out: dict[int, KeyStats] = {}
    for layer in layers:
        hit = _load(paths[layer]) if cache and not refresh else None
        if hit is not None:
            t, meta = hit
            log.info("statistics for %s: cache hit %s", modules[layer], paths[layer])
            out[layer] = KeyStats(layer, modules[layer], t["mom2"], t["mean"], int(t["count"].item()), meta)
    todo = [layer for layer in layers if layer not in out]
    if not todo:
        return out

    model, tok = loaded
    device = loaded.device
    n_prefix = len(tokens.special_prefix(tok))
    # running sums, per layer: sum k k^T [d, d], sum k [d], count, sequences consumed
    sums: dict[int, dict] = {}
    for layer in todo:
        part = _load(Path(str(paths[layer]) + ".partial")) if cache and not refresh else None
        if part is not None:
            t, meta = part
            sums[layer] = {
                "mom2": t["mom2"].to(device),
                "sum": t["sum"].to(device),
                "count": int(t["count"].item()),
                "seqs": int(meta["sequences_done"]),
            }
            log.info("resuming %s from %d tokens", modules[layer], sums[layer]["count"])
        else:
            sums[layer] = {"count": 0, "seqs": 0, "mom2": None, "sum": None}
    start_seq = min(s["seqs"] for s in sums.values())
    names = [modules[layer] for layer in todo]

    def meta_for(layer: int, seconds: float) -> dict:
        s = sums[layer]
        return {
            "format": STATS_FORMAT,
            "quantity": "E[k k^T] and E[k] of the input k of the module, over corpus tokens",
            "model": loaded.name,
            "model_type": getattr(model.config, "model_type", None),
            "fingerprint": fps[layer],
            "module": modules[layer],
            "layer": layer,
            "corpus": {"id": corpus.id, "version": corpus.version, "description": corpus.description},
            "n_tokens_requested": n_tokens,
            "n_tokens": s["count"],
            "sequences_done": s["seqs"],
            "seq_len": seq_len,
            "excluded_positions": f"the first {n_prefix} (tokenizer special prefix) of each sequence",
            "dtype": dtype,
            "product_dtype": product_dtype,
            "seconds": round(seconds, 3),
            "versions": versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def checkpoint(seconds: float) -> None:
        for layer in todo:
            s = sums[layer]
            if s["mom2"] is None:
                continue
            tensors = {"mom2": s["mom2"].cpu(), "sum": s["sum"].cpu(), "count": torch.tensor(s["count"])}
            _save(Path(str(paths[layer]) + ".partial"), tensors, meta_for(layer, seconds))

    t0 = time.perf_counter()
    done_tokens = min(s["count"] for s in sums.values())
    bar = tqdm(total=n_tokens, initial=done_tokens, desc="key statistics", unit="tok", disable=not progress)
    seq_iter = token_sequences(tok, corpus, seq_len)
    batch: list[list[int]] = []
    seq_index = 0
    n_batches = 0

    def run(batch: list[list[int]], first_index: int) -> None:
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), tokens.pad_id(tok), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        keep = mask.bool()
        keep[:, :n_prefix] = False
        with (
            torch.no_grad(),
            TraceDict(model, names, retain_output=False, retain_input=True, stop=True) as td,
        ):
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        for layer in todo:
            s = sums[layer]
            rows = [i for i in range(len(batch)) if first_index + i >= s["seqs"]]
            if not rows:
                continue
            k = td[modules[layer]].input[rows]  # [rows, pos, d]
            sel = keep[rows].to(k.device)
            need = n_tokens - s["count"]
            k = k[sel][:need].to(prod_dtype)  # [tokens, d]
            if s["mom2"] is None:
                d = k.shape[-1]
                s["mom2"] = torch.zeros(d, d, dtype=acc_dtype, device=k.device)
                s["sum"] = torch.zeros(d, dtype=acc_dtype, device=k.device)
            s["mom2"] += (k.T @ k).to(acc_dtype)  # [d, d] += [d, n] @ [n, d]
            s["sum"] += k.sum(0).to(acc_dtype)
            s["count"] += k.shape[0]
            s["seqs"] = first_index + len(batch)

    for seq in seq_iter:
        if seq_index < start_seq:
            seq_index += 1
            continue
        batch.append(seq)
        if len(batch) == batch_size:
            before = min(s["count"] for s in sums.values())
            run(batch, seq_index - len(batch) + 1)
            after = min(s["count"] for s in sums.values())
            bar.update(after - before)
            batch = []
            n_batches += 1
            if cache and checkpoint_every and n_batches % checkpoint_every == 0:
                checkpoint(time.perf_counter() - t0)
        seq_index += 1
        if all(s["count"] >= n_tokens for s in sums.values()):
            break
    if batch and any(s["count"] < n_tokens for s in sums.values()):
        before = min(s["count"] for s in sums.values())
        run(batch, seq_index - len(batch))
        bar.update(min(s["count"] for s in sums.values()) - before)
    bar.close()
    seconds = time.perf_counter() - t0
    for layer in todo:
        s = sums[layer]
        if s["count"] == 0:
            raise ConfigError(f"corpus {corpus.id!r} produced no tokens")
        if s["count"] < n_tokens:
            log.warning(
                "corpus %s ran out after %d of %d tokens for %s",
                corpus.id,
                s["count"],
                n_tokens,
                modules[layer],
            )
        mom2 = (s["mom2"] / s["count"]).to(torch.float64).cpu()
        mean = (s["sum"] / s["count"]).to(torch.float64).cpu()
        meta = meta_for(layer, seconds)
        meta["tokens_per_second"] = round(s["count"] / max(seconds, 1e-9), 1)
        if cache:
            tensors = {"mom2": mom2, "mean": mean, "count": torch.tensor(s["count"])}
            _save(paths[layer], tensors, meta)
            for suffix in (".partial.safetensors", ".partial.json"):
                Path(str(paths[layer]) + suffix).unlink(missing_ok=True)
        out[layer] = KeyStats(layer, modules[layer], mom2, mean, s["count"], meta)
    log.info("key statistics for layers %s: %d tokens in %.1f s", todo, n_tokens, seconds)
    return out


def covariances(
    loaded,
    layers: Sequence[int],
    corpus: str | Path | Corpus | None,
    n_tokens: int,
    seq_len: int = 256,
    progress: bool = False,
) -> tuple[dict[int, torch.Tensor], dict[int, dict]]:
    """``({layer: E[k k^T] [d_in, d_in] float64 on the model's device}, {layer: provenance})`` for methods."""
    stats = key_stats(loaded, layers, corpus, n_tokens=n_tokens, seq_len=seq_len, progress=progress)
    dev = loaded.device
    return (
        {layer: s.mom2.to(dev) for layer, s in stats.items()},
        {
            layer: {
                k: s.provenance.get(k) for k in ("fingerprint", "module", "corpus", "n_tokens", "seq_len")
            }
            for layer, s in stats.items()
        },
    )
