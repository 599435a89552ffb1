"""Byte-level language-modelling data from the Python standard library's own sources.

Every Python installation ships its standard library as `.py` files, so this corpus
needs no network. `load_stdlib_corpus()`:

* walks `sysconfig.get_paths()["stdlib"]` for `*.py` files, leaving out
  `site-packages` (third-party code), every folder named `test`, `tests` or
  `idle_test` (test suites: repetitive and partly generated), `idlelib` and
  `turtledemo` (GUI demos), and `__pycache__`;
* splits the files by a hash of their relative path (sha256 of the POSIX path, first 8
  hex digits mod 100): buckets 0-89 train, 90-94 validation, 95-99 test, so a file's
  split never depends on which other files exist;
* concatenates each split's files (sorted by path) into one `uint8` array, each file
  followed by a zero byte (a file separator that never occurs in source text).

`LMWindows` is a `keras.utils.PyDataset` over such an array: batch i is the windows
whose start offsets are row i of a `[num_batches, batch_size]` table, returned as
`(inputs [B, S] int32, targets [B, S] int32)` with targets = inputs shifted by one
byte. Only the batch being served is ever converted from `uint8`.
"""

import hashlib
import os
import sys
import sysconfig

import keras
import numpy as np

SPLITS = ("train", "validation", "test")
EXCLUDED_DIRS = ("site-packages", "test", "tests", "idle_test", "idlelib", "turtledemo", "__pycache__")
SEPARATOR = 0  # byte appended after every file
VOCAB_SIZE = 256


def split_of(relative_path):
    """"train", "validation" or "test" for a file, from a hash of its relative path.

    Args:
        relative_path: Path relative to the stdlib root, with "/" separators.
    """
    bucket = int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < 90:
        return "train"
    return "validation" if bucket < 95 else "test"


def stdlib_files(root=None):
    """Sorted relative POSIX paths of the corpus's `.py` files under `root`.

    Args:
        root: Folder to walk (default: this Python's `sysconfig` stdlib path).
    """
    root = sysconfig.get_paths()["stdlib"] if root is None else root
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in EXCLUDED_DIRS)
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def load_stdlib_corpus(root=None, max_files_per_split=None):
    """The three splits as `uint8` byte arrays, plus a description of the corpus.

    Args:
        root: Folder to read (default: the running Python's stdlib).
        max_files_per_split: Keep only the first N files of each split (sorted by
            path); for tests and tiny runs. None keeps all.

    Returns:
        `(splits, info)`: `splits` maps "train"/"validation"/"test" to a `uint8 [N]`
        array; `info` holds `root`, `python_version`, `excluded_dirs` and per split
        `files` and `bytes`.

    Raises:
        ValueError: When a split ends up with no file (e.g. a nearly empty `root`).
    """
    root = sysconfig.get_paths()["stdlib"] if root is None else root
    by_split = {name: [] for name in SPLITS}
    for path in stdlib_files(root):
        by_split[split_of(path)].append(path)
    splits, info = {}, {
        "root": root,
        "python_version": sys.version.split()[0],
        "excluded_dirs": list(EXCLUDED_DIRS),
        "split_rule": "sha256(relative path)[:8] mod 100: 0-89 train, 90-94 validation, 95-99 test",
    }
    for name, paths in by_split.items():
        if max_files_per_split is not None:
            paths = paths[:max_files_per_split]
        if not paths:
            raise ValueError(f"The {name} split of {root!r} has no .py file; point root at a Python stdlib.")
        chunks = []
        for path in paths:
            with open(os.path.join(root, path), "rb") as f:
                chunks.append(f.read())
            chunks.append(bytes([SEPARATOR]))
        splits[name] = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        info[name] = {"files": len(paths), "bytes": int(splits[name].size)}
    return splits, info


def window_starts(corpus_size, sequence_length):
    """Start offsets of the non-overlapping windows of `sequence_length + 1` bytes.

    Consecutive windows share one byte (the last target of one is the first input of
    the next), so every byte after the first is a target exactly once.
    """
    count = (corpus_size - 1) // sequence_length
    if count < 1:
        raise ValueError(
            f"A corpus of {corpus_size} bytes is too short for sequence_length={sequence_length}."
        )
    return np.arange(count, dtype=np.int64) * sequence_length


def training_order(corpus_size, sequence_length, batch_size, num_batches, seed):
    """`[num_batches, batch_size]` window starts: shuffled passes over all windows.

    The order depends only on the arguments, so every model trained with the same
    seed reads the same bytes in the same order.
    """
    starts = window_starts(corpus_size, sequence_length)
    rng = np.random.default_rng(seed)
    needed = num_batches * batch_size
    passes = [rng.permutation(starts) for _ in range(-(-needed // starts.size))]
    return np.concatenate(passes)[:needed].reshape(num_batches, batch_size)


def evaluation_order(corpus_size, sequence_length, batch_size, num_batches):
    """`[num_batches, batch_size]` window starts spread evenly over a held-out split.

    Raises:
        ValueError: When the split has fewer windows than requested.
    """
    starts = window_starts(corpus_size, sequence_length)
    needed = num_batches * batch_size
    if needed > starts.size:
        raise ValueError(
            f"The held-out split has {starts.size} windows of {sequence_length + 1} bytes; "
            f"{num_batches} batches of {batch_size} need {needed}."
        )
    picks = np.linspace(0, starts.size - 1, needed).round().astype(np.int64)
    return starts[picks].reshape(num_batches, batch_size)


class LMWindows(keras.utils.PyDataset):
    """Batches of next-byte prediction windows from a `uint8` corpus.

    Args:
        corpus: `uint8 [N]` bytes.
        starts: `int [num_batches, B]` window start offsets (see `training_order`).
        sequence_length: S; each window reads S + 1 bytes.

    Batch i is `(inputs [B, S] int32, targets [B, S] int32)`.
    """

    def __init__(self, corpus, starts, sequence_length, **kwargs):
        super().__init__(**kwargs)
        self.corpus = corpus
        self.starts = np.asarray(starts, dtype=np.int64)
        self.sequence_length = sequence_length
        if self.starts.size and int(self.starts.max()) + sequence_length + 1 > corpus.size:
            raise ValueError("A window start lies too close to the end of the corpus.")

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, index):
        offsets = self.starts[index][:, None] + np.arange(self.sequence_length + 1)  # [B, S + 1]
        windows = self.corpus[offsets].astype(np.int32)
        return windows[:, :-1], windows[:, 1:]

    def slice(self, first, last):
        """The batches `first..last-1` as a new `LMWindows` over the same corpus."""
        return LMWindows(self.corpus, self.starts[first:last], self.sequence_length)
