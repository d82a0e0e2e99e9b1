"""The embedded default corpus: text that every CPython install carries, built offline.

Documents come from two sources:
- `pydoc_data.topics.topics`: the language reference topics behind `help("if")`;
- docstrings of the standard library: one document per module (its docstring and
  its public functions) and one per public class (its docstring and its methods).

The stdlib is imported in a child interpreter (`python -I this_file out.json`) so
import side effects stay out of the caller. Docstrings are de-duplicated exactly
(re-exports and C/Python twins such as `_pydecimal`/`decimal` appear once),
documents are cleaned, tiny ones dropped, exact duplicates removed, and each
document is assigned to train or validation by a seeded hash of its text, so the
split does not depend on document order and duplicates can never straddle it.
The result is cached as jsonl under `$RQLM_CACHE` (default `~/.cache/rqlm`).

This file must import only the standard library at module level: the child
interpreter runs it as a script.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Bump when the builder changes, so cached corpora (and tokenizers) are rebuilt.
CORPUS_VERSION = 1
PYTHON_VERSION = platform.python_version()  # the stdlib docstrings differ between versions
VALIDATION_FRACTION = 0.05
SPLIT_SEED = 0
MIN_DOC_CHARS = 200
COLLECT_TIMEOUT_S = 300
MAX_DEFAULT_CHARS = 24  # longer default values in signatures print as `...`

# Top-level modules never imported: side effects on import (a browser, a printed poem,
# a GUI, grammar pickles written next to the stdlib), tests, or deprecated shadows.
_SKIP_MODULES = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "lib2to3",
    "distutils",
    "ensurepip",
    "pydoc_data",
    "__main__",
    "__hello__",
    "__phello__",
}
# Submodule name parts never imported: test suites, `python -m` entry points, codec tables.
_SKIP_PARTS = {"test", "tests", "idle_test", "__main__"}
_SKIP_SUBMODULES_OF = {"encodings"}


def default_cache_dir() -> Path:
    """`$RQLM_CACHE` if set, else `~/.cache/rqlm`."""
    return Path(os.environ.get("RQLM_CACHE") or Path.home() / ".cache" / "rqlm")


# ----------------------------------------------------------------------------
# Collection (runs in the child interpreter)


def _stdlib_module_names() -> list[str]:
    """Importable stdlib module names, public ones first, each group sorted; nothing imported."""
    stdlib_dir = Path(os.__file__).parent
    names = []
    for top in sorted(sys.stdlib_module_names - _SKIP_MODULES):
        names.append(top)
        if top not in _SKIP_SUBMODULES_OF and (stdlib_dir / top / "__init__.py").exists():
            names.extend(_submodule_names(stdlib_dir / top, top))
    private = lambda name: any(part.startswith("_") for part in name.split("."))
    return sorted(names, key=lambda name: (private(name), name))


def _submodule_names(package_dir: Path, package: str) -> list[str]:
    """Names of a package's submodules, recursively, found on disk without importing them."""
    import pkgutil

    names = []
    for info in pkgutil.iter_modules([str(package_dir)]):
        if info.name in _SKIP_PARTS:
            continue
        name = f"{package}.{info.name}"
        names.append(name)
        if info.ispkg:
            names.extend(_submodule_names(package_dir / info.name, name))
    return names


def _signature(name: str, obj) -> str:
    """`name(parameters)`; defaults that are not short literals read `...`, so no environment
    (e.g. `environ=os.environ`) or memory address leaks into the corpus; `name` if unknown."""
    import inspect

    try:
        signature = inspect.signature(obj)
    except Exception:  # noqa: BLE001 - C signatures can fail in many ways; the name alone still reads
        return name
    parameters = [
        p if p.default is p.empty or _is_short_literal(p.default) else p.replace(default=_ELIDED)
        for p in signature.parameters.values()
    ]
    return f"{name}{signature.replace(parameters=parameters, return_annotation=signature.empty)}"


class _Elided:
    """A default value shown as `...` in a printed signature."""

    def __repr__(self) -> str:
        return "..."


_ELIDED = _Elided()


def _is_short_literal(value) -> bool:
    """None, bool, number, short str/bytes, or a short tuple of those: safe to print."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, (str, bytes)):
        return len(value) <= MAX_DEFAULT_CHARS
    return isinstance(value, tuple) and len(value) <= 4 and all(map(_is_short_literal, value))


def _member_section(title: str, doc: str) -> str:
    """A member's title line followed by its docstring indented by four spaces."""
    body = "\n".join(f"    {line}" if line else "" for line in doc.splitlines())
    return f"{title}\n{body}"


def _collect_stdlib_documents() -> list[str]:
    """Topic texts, then one document per stdlib module and per public class, in a fixed order."""
    import importlib
    import inspect
    import pydoc_data.topics
    import warnings

    warnings.simplefilter("ignore")
    documents = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    seen_docs: set[str] = set()

    def fresh_doc(obj) -> str | None:
        """The object's own cleaned docstring, once per distinct text in the whole corpus."""
        doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        doc = inspect.cleandoc(doc) if doc else None
        if not doc or doc in seen_docs:
            return None
        seen_docs.add(doc)
        return doc

    for module_name in _stdlib_module_names():
        try:  # whatever an import prints goes to the caller's captured pipes
            module = importlib.import_module(module_name)
        except BaseException:  # noqa: BLE001, S112 - platform-specific or broken modules are skipped
            continue
        members = [
            (name, obj)
            for name, obj in sorted(vars(module).items())
            if not name.startswith("_") and getattr(obj, "__module__", None) == module_name
        ]
        sections = [f"module {module_name}"]
        module_doc = fresh_doc(module)
        if module_doc:
            sections.append(module_doc)
        for name, obj in members:
            if inspect.isroutine(obj) and (doc := fresh_doc(obj)):
                sections.append(_member_section(_signature(f"{module_name}.{name}", obj), doc))
        documents.append("\n\n".join(sections))
        for name, cls in members:
            if inspect.isclass(cls):
                documents.append(_class_document(f"{module_name}.{name}", cls, fresh_doc))
    return documents


def _class_document(qualified_name: str, cls, fresh_doc) -> str:
    """A class's docstring followed by its own public methods' and properties' docstrings."""
    import inspect

    sections = [f"class {_signature(qualified_name, cls)}"]
    class_doc = fresh_doc(cls)
    if class_doc:
        sections.append(class_doc)
    for name, member in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if (inspect.isroutine(member) or isinstance(member, property)) and (doc := fresh_doc(member)):
            title = name if isinstance(member, property) else _signature(name, member)
            sections.append(_member_section(title, doc))
    return "\n\n".join(sections)


# ----------------------------------------------------------------------------
# Cleaning and splitting

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def clean_document(text: str) -> str:
    """Normalise whitespace: unix newlines, tabs expanded, no control chars or trailing spaces."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    text = _CONTROL_CHARS.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text + "\n")
    return _MANY_BLANK_LINES.sub("\n\n", text).strip()


def split_score(text: str, seed: int = SPLIT_SEED) -> float:
    """A seeded hash of a document's text mapped to [0, 1): the same text always scores the same."""
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_validation_document(
    text: str, validation_fraction: float = VALIDATION_FRACTION, seed: int = SPLIT_SEED
) -> bool:
    """Whether a document is held out: its split score is below the validation fraction."""
    return split_score(text, seed) < validation_fraction


def _clean_and_split(documents: list[str], validation_fraction: float, seed: int) -> dict[str, list[str]]:
    """Clean, drop tiny documents, remove exact duplicates (first kept), split by hash."""
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    seen: set[str] = set()
    for text in map(clean_document, documents):
        if len(text) < MIN_DOC_CHARS or text in seen:
            continue
        seen.add(text)
        split = "validation" if is_validation_document(text, validation_fraction, seed) else "train"
        splits[split].append(text)
    return splits


# ----------------------------------------------------------------------------
# Build, cache, statistics (caller side)


def _run_collector() -> list[str]:
    """Collect the raw documents in an isolated child interpreter (no side effects here)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "documents.json"
        result = subprocess.run(
            [sys.executable, "-I", str(Path(__file__).resolve()), str(out)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            text=True,
            timeout=COLLECT_TIMEOUT_S,
        )
        if result.returncode != 0 or not out.exists():
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"collecting the stdlib docstrings failed: {last_line}")
        return json.loads(out.read_text(encoding="utf-8"))


def _corpus_meta() -> dict:
    """What a cached corpus must match to be reused."""
    return {
        "version": CORPUS_VERSION,
        "python": PYTHON_VERSION,
        "validation_fraction": VALIDATION_FRACTION,
        "seed": SPLIT_SEED,
        "min_doc_chars": MIN_DOC_CHARS,
    }


def _write_atomic(path: Path, text: str) -> None:
    """Write a file via a temporary sibling and rename, so concurrent readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def embedded_corpus_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the cached embedded corpus (train.jsonl, validation.jsonl, meta.json)."""
    return Path(cache_dir or default_cache_dir()) / "embedded_corpus"


def build_embedded_corpus(cache_dir: str | os.PathLike | None = None, rebuild: bool = False):
    """The embedded corpus as a `datasets.DatasetDict` with splits train/validation, column "text".

    Built once (a few seconds to half a minute) and cached; later calls read the jsonl files.
    """
    from datasets import Dataset, DatasetDict

    folder = embedded_corpus_dir(cache_dir)
    meta_path = folder / "meta.json"
    meta = _corpus_meta()
    cached = meta_path.exists() and json.loads(meta_path.read_text()).get("corpus") == meta
    if rebuild or not cached:
        start = time.perf_counter()
        splits = _clean_and_split(_run_collector(), VALIDATION_FRACTION, SPLIT_SEED)
        folder.mkdir(parents=True, exist_ok=True)
        for split, texts in splits.items():
            _write_atomic(folder / f"{split}.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
        build = {"corpus": meta, "build_seconds": round(time.perf_counter() - start, 2)}
        _write_atomic(meta_path, json.dumps(build, indent=2))
    splits = {}
    for split in ("train", "validation"):
        with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
            splits[split] = Dataset.from_dict({"text": [json.loads(line)["text"] for line in f]})
    return DatasetDict(splits)


def corpus_statistics(dataset_dict, tokenizer=None, text_column: str = "text") -> dict:
    """Documents, characters and (with a tokenizer) tokens per split, plus characters per token."""
    stats = {}
    for split, dataset in dataset_dict.items():
        texts = list(dataset[text_column])
        split_stats = {"documents": len(texts), "characters": sum(map(len, texts))}
        if tokenizer is not None:
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            split_stats["tokens"] = sum(map(len, encoded))
            split_stats["chars_per_token"] = split_stats["characters"] / max(split_stats["tokens"], 1)
        stats[split] = split_stats
    return stats


if __name__ == "__main__":
    # Child interpreter: `python -I corpus.py OUT.json` writes the raw document list to OUT.json.
    Path(sys.argv[1]).write_text(json.dumps(_collect_stdlib_documents()), encoding="utf-8")
