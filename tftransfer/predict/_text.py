"""What `predict` takes for a text model: sentences, `.txt` files or folders of them.

A string is a sentence unless it names an existing `.txt` file or a folder
(then its `.txt` files, recursively, sorted); `os.PathLike` items are always
paths. Each result keeps its `path` (files) or its `text` (sentences).
"""

import os
import pathlib

import numpy as np

TEXT_EXTENSIONS = (".txt",)


def text_items(texts):
    """`[(text or None, path or None)]` for any accepted `texts` form."""
    if isinstance(texts, (str, os.PathLike)):
        texts = [texts]
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    if not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError(
            "A text model takes a sentence, a list of sentences, or paths to .txt files or "
            f"folders of them. Received: texts={texts!r}"
        )
    items = []
    for item in texts:
        if isinstance(item, bytes):
            item = item.decode("utf-8", "replace")
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"`texts` must hold strings or paths. Received: {item!r}")
        items += _expand(item)
    return items


def _expand(item):
    path = os.fspath(item)
    is_path = isinstance(item, os.PathLike) or (
        "\n" not in path and len(path) < 4096 and os.path.exists(path)
        and (os.path.isdir(path) or path.lower().endswith(TEXT_EXTENSIONS)))
    if not is_path:
        return [(path, None)]
    if os.path.isdir(path):
        files = sorted(str(p) for p in pathlib.Path(path).rglob("*")
                       if p.is_file() and p.suffix.lower() in TEXT_EXTENSIONS)
        if not files:
            raise ValueError(f"`texts` names a folder with no .txt files. Received: {path!r}")
        return [(None, f) for f in files]
    if not os.path.isfile(path):
        raise ValueError(f"`texts` names a file that does not exist. Received: {path!r}")
    return [(None, path)]


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"The file {path!r} is not UTF-8 text ({error}).") from None


def text_batches(items, batch_size):
    """Batches of strings (files read as they come) for `items` from `text_items`."""
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        yield [text if path is None else _read(path) for text, path in chunk]


def cli_items(sentences, paths):
    """The CLI's `--text` sentences and positional paths (always paths) as `texts`."""
    return list(sentences or []) + [pathlib.Path(p) for p in paths]


def predict_texts(predictor, texts, top_k, batch_size, result_of):
    """`predict` for a text model: one result per sentence or file, with `text` or `path`."""
    items = text_items(texts)
    results = []
    for batch in text_batches(items, batch_size):
        results += [result_of(row, predictor, top_k) for row in predictor(batch)]
    for result, (text, path) in zip(results, items):
        result.update({"text": text} if path is None else {"path": path})
    return results
