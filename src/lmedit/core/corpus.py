"""Text sources for key statistics: files, folders, JSONL, Hugging Face datasets, and an offline default.

    >>> corpus = resolve_corpus("notes/")                       # every *.txt / *.md / *.jsonl / *.json inside
    >>> corpus = resolve_corpus("data/wiki.jsonl")              # one JSON object per line, field "text"
    >>> corpus = resolve_corpus("hf:wikitext:wikitext-103-raw-v1@train")   # needs `datasets` and a reachable hub
    >>> corpus = resolve_corpus("gensim-wiki")                  # the offline default (see below)
    >>> corpus.id, corpus.version
    >>> for text in corpus.texts(): ...

Every corpus has an ``id`` and a ``version``; both go into the statistics cache key, so statistics computed from
another corpus (or a changed file) are never reused by mistake.

The offline default ``gensim-wiki`` is the English Wikipedia dump fragment that ships inside gensim's wheel
(``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``: 1.7 MB
compressed, 206 articles, about 0.5M words; text CC BY-SA, package LGPL). It is read straight from the installed
package files, never imported: install it with ``pip install --no-deps gensim``. Wiki markup is stripped here.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmedit.errors import ConfigError

GENSIM_WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json")


@dataclass(frozen=True)
class Corpus:
    """A named, versioned stream of documents.

    Attributes:
        id: stable name (a resolved path, ``hf:...`` or ``gensim-wiki``).
        version: changes whenever the content may have changed (file sizes and mtimes, package version, ...).
        texts: callable returning a fresh iterator over documents (deterministic order).
        description: one line for provenance records.
    """

    id: str
    version: str
    texts: Callable[[], Iterator[str]]
    description: str = ""


def _paragraphs(text: str) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", text):
        block = block.strip()
        if block:
            yield block


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                value = row.get(text_field) if isinstance(row, dict) else row
                if not isinstance(value, str):
                    raise ConfigError(
                        f"{path}:{n}: expected a string field {text_field!r} in every JSONL row"
                    )
                yield value
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        for i, row in enumerate(data if isinstance(data, list) else [data]):
            value = row.get(text_field) if isinstance(row, dict) else row
            if not isinstance(value, str):
                raise ConfigError(f"{path}[{i}]: expected a string or an object with field {text_field!r}")
            yield value
    else:
        yield from _paragraphs(path.read_text(encoding="utf-8", errors="replace"))


def _file_version(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def files_corpus(path: str | Path, text_field: str = "text") -> Corpus:
    """A corpus from a text/Markdown/JSON/JSONL file or a folder of them (sorted, recursive)."""
    root = Path(path).expanduser()
    if root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not paths:
            raise ConfigError(f"corpus folder {root} has no {'/'.join(TEXT_SUFFIXES)} files")
    elif root.is_file():
        paths = [root]
    else:
        raise ConfigError(f"corpus {str(path)!r}: no such file or folder")

    def texts() -> Iterator[str]:
        for p in paths:
            yield from _read_file(p, text_field)

    return Corpus(
        id=f"files:{root.resolve()}",
        version=_file_version(paths),
        texts=texts,
        description=f"{len(paths)} file(s) under {root.resolve()}",
    )


def hf_corpus(spec: str, text_field: str = "text") -> Corpus:
    """``hf:NAME[:CONFIG][@SPLIT]`` through the ``datasets`` package (streamed; needs a reachable hub)."""
    body = spec[3:]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"corpus {spec!r} needs the `datasets` package (pip install datasets); or pass a local text file"
        ) from None

    def texts() -> Iterator[str]:
        try:
            ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - the hub raises many kinds of errors
            raise ConfigError(
                f"corpus {spec!r}: could not open the dataset ({type(e).__name__}: {e}). Without network use "
                "a local file/folder or 'gensim-wiki'."
            ) from None
        for row in ds:
            value = row.get(text_field)
            if isinstance(value, str) and value.strip():
                yield value

    return Corpus(id=spec, version=f"datasets-{datasets.__version__}", texts=texts, description=spec)


# ---------------------------------------------------------------------------------------------- wiki markup
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"<[^>]+>")
_FILE_LINK = re.compile(
    r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]"
)
_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


def _drop_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` spans (templates ``{{ }}``, tables ``{| |}``), nesting included."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def strip_wiki_markup(text: str) -> str:
    """Plain text from MediaWiki markup: templates, tables, refs, files, categories and tags removed."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = html.unescape(text).replace("\xa0", " ")
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("*", "#", ":", ";", "|", "!")) or not line:
            lines.append("")  # lists and table debris: dropped, paragraph break kept
            continue
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def gensim_wiki_corpus() -> Corpus:
    """The Wikipedia fragment inside an installed gensim wheel (not imported; see module docstring)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default statistics corpus 'gensim-wiki' needs the gensim wheel's data file: "
            "pip install --no-deps gensim (about 28 MB; only one data file is read). "
            "Or pass --corpus PATH with your own text files."
        )
    path = Path(spec.submodule_search_locations[0]).parent / GENSIM_WIKI
    if not path.is_file():
        raise ConfigError(
            f"gensim is installed but {path} is missing; reinstall gensim (pip install --no-deps)"
        )
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("gensim")
    except PackageNotFoundError:
        pkg_version = "unknown"

    def texts() -> Iterator[str]:
        with bz2.open(path, "rb") as fh:
            for _event, elem in ET.iterparse(fh):
                if elem.tag.rsplit("}", 1)[-1] == "text" and elem.text:
                    body = elem.text
                    if not body.lstrip().lower().startswith("#redirect"):
                        plain = strip_wiki_markup(body)
                        yield from _paragraphs(plain)
                    elem.clear()

    return Corpus(
        id="gensim-wiki",
        version=f"gensim-{pkg_version}-{path.stat().st_size}",
        texts=texts,
        description=f"English Wikipedia fragment from gensim {pkg_version} ({GENSIM_WIKI}), markup stripped",
    )


DEFAULT_CORPUS = "gensim-wiki"


def resolve_corpus(spec: str | Path | Corpus | None = None, text_field: str = "text") -> Corpus:
    """A Corpus from a path, ``hf:NAME[:CONFIG][@SPLIT]``, ``gensim-wiki`` (the default), or a Corpus."""
    if isinstance(spec, Corpus):
        return spec
    spec = str(spec) if spec is not None else DEFAULT_CORPUS
    if spec == "gensim-wiki":
        return gensim_wiki_corpus()
    if spec.startswith("hf:"):
        return hf_corpus(spec, text_field)
    return files_corpus(spec, text_field)
