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
