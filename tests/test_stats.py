"""Key statistics, corpora and solvers: exact against a direct computation, cached, resumable, with provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmedit.core import solvers
from lmedit.core.corpus import Corpus, files_corpus, resolve_corpus, strip_wiki_markup
from lmedit.core.hooks import TraceDict
from lmedit.core.stats import key_stats, token_sequences
from lmedit.errors import ConfigError
from tiny_models import tiny_loaded

TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "Knowledge editing changes one fact of a language model and leaves the rest alone. " * 2,
    "Statistics of keys are accumulated in double precision over many tokens.",
] * 6


@pytest.fixture()
def corpus_file(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(TEXT))
    return p


@pytest.fixture()
def loaded(smol_tok):
    return tiny_loaded("llama", smol_tok)


def _direct(loaded, corpus, layers, n_tokens, seq_len):
    """E[k k^T] by brute force: every sequence alone, keys collected then averaged in float64."""
    names = [loaded.arch.module_name("mlp_out", x) for x in layers]
    ks = {n: [] for n in names}
    for seq in token_sequences(loaded.tokenizer, corpus, seq_len):
        with torch.no_grad(), TraceDict(loaded.model, names, retain_output=False, retain_input=True) as td:
            loaded.model(input_ids=torch.tensor([seq]))
        for n in names:
            ks[n].append(td[n].input[0].double())  # no special prefix for this tokenizer
    out = {}
    for layer, n in zip(layers, names):
        k = torch.cat(ks[n])[:n_tokens]
        out[layer] = (k.T @ k / k.shape[0], k.mean(0), k.shape[0])
    return out


def test_stats_match_direct_computation_and_share_one_pass(loaded, corpus_file, tmp_path):
    corpus = resolve_corpus(corpus_file)
    got = key_stats(loaded, [1, 2], corpus, n_tokens=300, seq_len=32, batch_size=3, cache_root=tmp_path / "c")
    ref = _direct(loaded, corpus, [1, 2], 300, 32)
    for layer in (1, 2):
        mom2, mean, count = ref[layer]
        assert got[layer].count == count == 300
        assert got[layer].mom2.dtype == torch.float64
        torch.testing.assert_close(got[layer].mom2, mom2, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[layer].mean, mean, rtol=1e-5, atol=1e-7)


def test_cache_hit_miss_and_provenance(loaded, corpus_file, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    first = key_stats(loaded, [1], corpus_file, n_tokens=200, seq_len=32, cache_root=root)
    files = sorted(root.rglob("*.json"))
    assert len(files) == 1 and not list(root.rglob("*.partial.*"))
    prov = json.loads(files[0].read_text())
    assert prov["module"] == loaded.arch.module_name("mlp_out", 1)
    assert prov["n_tokens"] == 200 and prov["seq_len"] == 32 and prov["dtype"] == "float64"
    assert prov["corpus"]["id"].startswith("files:") and prov["fingerprint"]
    # hit: no forward pass at all
    calls = []
    monkeypatch.setattr(loaded.model, "forward", lambda *a, **k: calls.append(1))
    again = key_stats(loaded, [1], corpus_file, n_tokens=200, seq_len=32, cache_root=root)
    assert not calls and torch.equal(again[1].mom2, first[1].mom2)
    monkeypatch.undo()
    # refresh: recomputed (a forward pass) although cached, same result, the cache file rewritten
    files[0].write_text(json.dumps(prov | {"marker": 1}))
    counted = []
    real_forward = loaded.model.forward
    monkeypatch.setattr(loaded.model, "forward", lambda *a, **k: counted.append(1) or real_forward(*a, **k))
    fresh = key_stats(loaded, [1], corpus_file, n_tokens=200, seq_len=32, cache_root=root, refresh=True)
    monkeypatch.undo()
    assert counted and torch.equal(fresh[1].mom2, first[1].mom2)
    assert "marker" not in json.loads(files[0].read_text()) and len(sorted(root.rglob("*.json"))) == 1
    # miss: another token count, another sequence length, another corpus version, another model
    key_stats(loaded, [1], corpus_file, n_tokens=100, seq_len=32, cache_root=root)
    key_stats(loaded, [1], corpus_file, n_tokens=200, seq_len=16, cache_root=root)
    corpus_file.write_text(corpus_file.read_text() + "\n\nOne more paragraph changes the version.")
    import os

    os.utime(corpus_file, (1, 1))
    key_stats(loaded, [1], corpus_file, n_tokens=200, seq_len=32, cache_root=root)
    other = tiny_loaded("llama", loaded.tokenizer, seed=1)
    key_stats(other, [1], corpus_file, n_tokens=200, seq_len=32, cache_root=root)
    assert len(sorted(root.rglob("*.json"))) == 5


def test_editing_mlp_out_keeps_the_cache_but_other_weights_do_not(loaded, corpus_file, tmp_path):
    root = tmp_path / "cache"
    key_stats(loaded, [1], corpus_file, n_tokens=100, seq_len=32, cache_root=root)
    with torch.no_grad():
        loaded.model.get_parameter(loaded.arch.module_name("mlp_out", 1) + ".weight").add_(1.0)
        key_stats(loaded, [1], corpus_file, n_tokens=100, seq_len=32, cache_root=root)
        assert (
            len(list(root.rglob("*.json"))) == 1
        )  # the layer's own output projection does not change its keys
        loaded.model.get_parameter(loaded.arch.module_name("mlp_in", 1) + ".weight").add_(1.0)
        key_stats(loaded, [1], corpus_file, n_tokens=100, seq_len=32, cache_root=root)
        assert len(list(root.rglob("*.json"))) == 2


def test_tensor_digests_are_memoised_until_the_tensor_changes(monkeypatch):
    import gc

    from lmedit.core import stats

    calls = []
    real = stats._hash_tensor
    monkeypatch.setattr(stats, "_hash_tensor", lambda t: calls.append(1) or real(t))
    p = torch.nn.Parameter(torch.randn(8, 4))
    first = stats._tensor_digest(p)
    assert stats._tensor_digest(p) == first and len(calls) == 1, "unchanged: not hashed again"
    with torch.no_grad():
        p.mul_(2.0)
    assert stats._tensor_digest(p) != first and len(calls) == 2, "an in-place write is seen"
    p.data = torch.randn(8, 4)
    assert stats._tensor_digest(p) not in (first,) and len(calls) == 3, "a replaced storage is seen"
    twin = torch.nn.Parameter(p.detach().clone())
    assert stats._tensor_digest(twin) == stats._tensor_digest(p), "the digest is of the values"
    key = id(p)
    del p
    gc.collect()
    assert key not in stats._DIGESTS, "entries leave with their tensor"


def test_resume_after_interruption(loaded, corpus_file, tmp_path):
    root = tmp_path / "cache"
    full = key_stats(
        loaded, [1, 2], corpus_file, n_tokens=400, seq_len=32, batch_size=2, cache_root=tmp_path / "x"
    )
    base = files_corpus(corpus_file)
    state = {"n": 0}

    def flaky():
        for t in base.texts():
            state["n"] += 1
            if state["n"] > 12:
                raise KeyboardInterrupt
            yield t

    broken = Corpus(base.id, base.version, flaky)
    with pytest.raises(KeyboardInterrupt):
        key_stats(
            loaded,
            [1, 2],
            broken,
            n_tokens=400,
            seq_len=32,
            batch_size=2,
            cache_root=root,
            checkpoint_every=1,
        )
    partial = list(root.rglob("*.partial.json"))
    assert len(partial) == 2
    assert 0 < json.loads(partial[0].read_text())["n_tokens"] < 400
    resumed = key_stats(loaded, [1, 2], base, n_tokens=400, seq_len=32, batch_size=2, cache_root=root)
    for layer in (1, 2):
        assert resumed[layer].count == 400
        torch.testing.assert_close(resumed[layer].mom2, full[layer].mom2, rtol=1e-6, atol=1e-8)
    assert not list(root.rglob("*.partial.*"))


def test_bad_arguments(loaded, corpus_file, tmp_path):
    with pytest.raises(ConfigError, match="layers"):
        key_stats(loaded, [99], corpus_file, cache_root=tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        key_stats(loaded, [1], tmp_path / "missing.txt", cache_root=tmp_path)


def test_corpus_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first doc"}\n\n{"text": "second doc"}\n')
    (tmp_path / "b.txt").write_text("para one\n\npara two\n")
    assert list(resolve_corpus(tmp_path / "a.jsonl").texts()) == ["first doc", "second doc"]
    assert list(resolve_corpus(tmp_path).texts()) == ["first doc", "second doc", "para one", "para two"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match="text"):
        list(resolve_corpus(tmp_path / "bad.jsonl").texts())


def test_strip_wiki_markup():
    raw = (
        "{{Infobox|name={{nested}}}}'''Anarchism''' is a [[political philosophy]] that [[Liberty|advocates]] "
        "self-rule.<ref>cite</ref> [[File:A.jpg|thumb|x]]\n== History ==\n* list item\nSee [http://x.org site]."
    )
    text = strip_wiki_markup(raw)
    assert text.startswith("Anarchism is a political philosophy that advocates self-rule.")
    assert "History" in text and "{{" not in text and "ref" not in text and "File:" not in text
    assert "list item" not in text and "site" in text


def test_gensim_default_corpus():
    import importlib.util

    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim not installed (pip install --no-deps gensim provides the default corpus)")
    corpus = resolve_corpus(None)
    first = next(iter(corpus.texts()))
    assert corpus.id == "gensim-wiki" and first.startswith("Anarchism") and "[[" not in first


# ----------------------------------------------------------------------------------------------- solvers
def _spd(d, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.T @ x / n


def test_rank_one_maps_key_to_value():
    g = torch.Generator().manual_seed(0)
    w, k, v = torch.randn(8, 16, generator=g), torch.randn(16, generator=g), torch.randn(8, generator=g)
    c = _spd(16)
    left, right = solvers.rank_one(w, c, k, v)
    torch.testing.assert_close((w + torch.outer(left, right)) @ k, v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        right.double(), torch.linalg.solve(c, k.double()).float().double(), rtol=1e-5, atol=1e-6
    )
    k2 = k + 0.1 * torch.randn(16, generator=g)
    left, right = solvers.rank_one(w, c, k, v, k_fix=k2)
    torch.testing.assert_close((w + torch.outer(left, right)) @ k2, v, rtol=1e-4, atol=1e-4)


def test_rank_one_on_keys_adds_delta_at_every_key_with_least_c_norm():
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(16, generator=g) + 0.3 * torch.randn(4, 16, generator=g)  # 4 related keys
    delta, c = torch.randn(8, generator=g), _spd(16)
    left, right = solvers.rank_one_on_keys(c, keys, delta, ridge=0.0)
    upd = torch.outer(left, right)
    torch.testing.assert_close(upd @ keys.T, delta[:, None].expand(8, 4), rtol=1e-4, atol=1e-4)
    # least C-norm: any other u with u^T k_t = 1 has u^T C u at least as large (perturb within the constraints)
    u = right.double()
    q, _ = torch.linalg.qr(keys.double().T, mode="complete")
    other = u + q[:, 4:] @ torch.randn(12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(other @ keys.double().T, torch.ones(4, dtype=torch.float64))
    assert u @ c @ u < other @ c @ other
    # one key: ROME's direction C^-1 k, scaled so that u^T k = 1
    left, right = solvers.rank_one_on_keys(c, keys[:1], delta, ridge=0.0)
    torch.testing.assert_close(right @ keys[0], torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    direction = torch.linalg.solve(c, keys[0].double()).float()
    torch.testing.assert_close(right / right.norm(), direction / direction.norm(), rtol=1e-4, atol=1e-5)


def test_least_squares_and_equality_constrained():
    g = torch.Generator().manual_seed(1)
    k, r, c = torch.randn(16, 5, generator=g), torch.randn(8, 5, generator=g), _spd(16)
    lam = 0.3
    upd = solvers.least_squares(k, r, c, lam)
    # normal equations of min |D K - R|^2 + lam tr(D C D^T):  D (K K^T + lam C) = R K^T
    lhs = upd.double() @ (k.double() @ k.double().T + lam * c)
    torch.testing.assert_close(lhs, (r @ k.T).double(), rtol=1e-4, atol=1e-4)
    eq = solvers.equality_constrained(k, r, c, damping=0.0, gram_damping=0.0)
    torch.testing.assert_close(eq @ k, r, rtol=1e-4, atol=1e-4)


def test_spd_solve_damps_singular_matrices():
    a = torch.zeros(4, 4, dtype=torch.float64)
    a[0, 0] = 1.0  # rank one: plain Cholesky fails
    x = solvers.spd_solve(a, torch.ones(4, dtype=torch.float64))
    assert torch.isfinite(x).all()


def test_projector_spans_small_eigen_directions():
    c = torch.diag(torch.tensor([10.0, 5.0, 1e-4, 1e-5], dtype=torch.float64))
    p, _ = solvers.null_space_projector(c, 1e-2)
    torch.testing.assert_close(p, torch.diag(torch.tensor([0.0, 0, 1, 1], dtype=torch.float64)))
    assert float(solvers.null_space_projector(c, 1e-2, relative=False)[0].trace()) == pytest.approx(2)
    # energy rule: the smallest directions holding at most that share of tr C, and the share reported
    c = torch.diag(torch.tensor([6.0, 2.0, 1.5, 0.5], dtype=torch.float64))  # tr 10
    p, share = solvers.null_space_projector(c, energy=0.2)
    torch.testing.assert_close(p, torch.diag(torch.tensor([0.0, 0, 1, 1], dtype=torch.float64)))
    assert share == pytest.approx(0.2)
    p, share = solvers.null_space_projector(c, energy=0.19)
    assert float(p.trace()) == pytest.approx(1) and share == pytest.approx(0.05)
    assert solvers.null_space_projector(c, 0.3)[1] == pytest.approx(0.2)  # 1.5, 0.5 < 0.3 x 6
    # mean cap: an outlier direction inflates the largest eigenvalue, so the threshold rule admits a direction
    # with above-average variance; the cap keeps only directions below mean_cap x tr C / d
    c = torch.diag(torch.tensor([1000.0, 400.0, 100.0, 0.2], dtype=torch.float64))  # mean 375.05
    assert float(solvers.null_space_projector(c, 0.5)[0].trace()) == pytest.approx(3)  # < 500: 400, 100, 0.2
    p, share = solvers.null_space_projector(c, 0.5, mean_cap=1.0)  # and < 375.05: 100, 0.2
    torch.testing.assert_close(p, torch.diag(torch.tensor([0.0, 0, 1, 1], dtype=torch.float64)))
    assert share == pytest.approx(100.2 / 1500.2)
    assert float(solvers.null_space_projector(c, 0.5, mean_cap=0.2)[0].trace()) == pytest.approx(1)  # < 75
    assert float(solvers.null_space_projector(c, 0.5, energy=0.1, mean_cap=0.2)[0].trace()) == pytest.approx(
        2
    )


def test_cli_stats_precomputes_then_hits_cache(loaded, corpus_file, tmp_path, monkeypatch, capsys):
    from lmedit.cli import main

    folder = tmp_path / "tiny"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    args = ["stats", "--model", str(folder), "--layers", "1,2", "--corpus", str(corpus_file)]
    assert main(args + ["--tokens", "200", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "layer 1:" in out and "layer 2:" in out and "tokens=200" in out
    files = sorted((tmp_path / "cache" / "stats").rglob("*.safetensors"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert main(args + ["--tokens", "200", "--seq-len", "32"]) == 0
    assert [f.stat().st_mtime_ns for f in files] == mtimes
