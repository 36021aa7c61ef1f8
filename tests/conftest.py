from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def smol_tok():
    """The real SmolLM2 tokenizer (byte-level BPE, no BOS), from lmedit's model cache."""
    from lmedit.models.load import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_tok():
    """The real Gemma 3 tokenizer (SentencePiece-style, adds BOS)."""
    from lmedit.models.load import load_tokenizer

    return load_tokenizer("gemma3-270m")


@pytest.fixture(scope="session")
def gemma():
    import lmedit

    return lmedit.load_model("gemma3-270m")


@pytest.fixture(scope="session")
def smollm():
    import lmedit

    return lmedit.load_model("smollm2-135m")


#: A small text corpus for key statistics on tiny models (repeated so 2000 tokens are available).
STATS_CORPUS = " ".join(
    [
        "Paris is the capital of France.",
        "The tower was built in 1889 for the fair.",
        "She speaks French and English.",
    ]
    * 40
)


@pytest.fixture(scope="module")
def stats_env(smol_tok, tmp_path_factory):
    """A private statistics cache and a small corpus; yields the method settings that use them."""
    root = tmp_path_factory.mktemp("lmedit-cache")
    corpus = root / "corpus.txt"
    corpus.write_text(STATS_CORPUS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMEDIT_CACHE", str(root))
        yield {"stats_corpus": str(corpus), "stats_tokens": 2000, "stats_seq_len": 64}
