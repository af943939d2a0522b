"""Real English sentences for text models: the Python language reference and library docstrings that
ship with every CPython (nothing can be downloaded here). Calibration and validation sentences are
disjoint."""

from __future__ import annotations

import importlib
import re

_MODULES = ("pydoc_data.topics", "collections", "functools", "itertools", "json", "logging", "os", "pathlib",
            "subprocess", "threading", "asyncio", "email", "http.client", "urllib.request", "zipfile", "tarfile",
            "argparse", "datetime", "decimal", "fractions", "statistics", "random", "socket", "ssl", "sqlite3",
            "unittest", "typing", "dataclasses", "contextlib", "shutil", "tempfile", "csv", "configparser")


def _texts():
    from pydoc_data.topics import topics

    yield from topics.values()
    for name in _MODULES[1:]:
        module = importlib.import_module(name)
        yield module.__doc__ or ""
        for value in vars(module).values():
            yield getattr(value, "__doc__", None) or ""


def sentences(count: int, skip: int = 0) -> list[str]:
    """``count`` distinct prose sentences (6-40 words, no code), after skipping the first ``skip``."""
    found: dict[str, None] = {}
    for text in _texts():
        if not isinstance(text, str):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            sentence = sentence.strip()
            words = sentence.split()
            if (6 <= len(words) <= 40 and sentence[0].isupper() and sentence[-1] in ".!?"
                    and not re.search(r"[<>{}\[\]=`|\\]|\(\)|>>>|::|\w\.\w+\(", sentence)):
                found.setdefault(sentence)
        if len(found) >= skip + count:
            break
    chosen = list(found)[skip:skip + count]
    if len(chosen) < count:
        raise RuntimeError(f"only {len(chosen)} sentences found")
    return chosen


def licence_sentences(count: int) -> list[str]:
    """``count`` distinct sentences of another domain: the licence texts of the installed distributions
    (legal English, where the docstrings above are technical)."""
    import importlib.metadata

    found: dict[str, None] = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            if "licen" not in file.name.lower() and "copying" not in file.name.lower():
                continue
            try:
                text = file.read_text()
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join((text or "").split())):
                words = sentence.split()
                if 6 <= len(words) <= 40 and sentence[0].isupper() and sentence[-1] in ".!?":
                    found.setdefault(sentence)
    chosen = sorted(found)[:count]
    if len(chosen) < count:
        raise RuntimeError(f"only {len(chosen)} licence sentences found")
    return chosen
