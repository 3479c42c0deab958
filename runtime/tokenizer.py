"""CLIP's byte-level BPE tokenizer without torch: the text side of the bundle runtime.

The runtime that serves bundles must not import torch or open_clip, yet labels sent at request time have to be
tokenized exactly as they were when the bundle was exported. This module reimplements open_clip's
`SimpleTokenizer` (open_clip_torch 3.3.0) with its defaults, 'lower' cleaning and plain truncation, on NumPy, and
produces identical ids (tests/test_tokenizer.py pins it to open_clip on a large set of strings). The vocabulary is
open_clip's own merges file, which the exporter copies into every bundle under the name `VOCAB_FILE`.
"""
from __future__ import annotations

import gzip
import hashlib
import html
import threading
from pathlib import Path

import ftfy
import numpy as np
import regex

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"

SOT = "<start_of_text>"
EOT = "<end_of_text>"
# CLIP's vocabulary is 49,408 entries: 256 byte symbols, the same 256 with "</w>", 48,894 merges, SOT and EOT.
_N_MERGES = 49152 - 256 - 2
# Words are split as CLIP does: the special tokens, English contractions, runs of letters, single digits and runs of
# anything else that is not whitespace. IGNORECASE is kept because it changes ids even on lowercased text: the regex
# package folds case, so "'ſ" matches "'s", and U+0345 (folds to a letter, is not one) matches nothing and is dropped.
_PATTERN = regex.compile(rf"""{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+""",
                         regex.IGNORECASE)
# Words whose BPE is cached per tokenizer. Labels repeat, so the cache pays off; the cap keeps a server that is sent
# arbitrary text from growing without bound (past it, new words are simply computed every time).
_CACHE_LIMIT = 65_536


def _byte_symbols() -> dict[int, str]:
    """GPT-2's reversible map from UTF-8 bytes to printable characters, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, NBSP, soft hyphen) take the
    code points from U+0100 on, so BPE never sees whitespace or control characters. The dict's insertion order is the
    order of the first 256 vocabulary entries: printable bytes first, then the remapped ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def _clean(text: str) -> str:
    """open_clip's 'lower' cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lowercase.

    open_clip also strips before and after collapsing; `str.split()` already drops that whitespace.
    """
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


class ClipTokenizer:
    """Text → CLIP token ids, identical to `open_clip.tokenizer.SimpleTokenizer()` with the same vocabulary file."""

    def __init__(self, vocab_path: str | Path, context_length: int = 77) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must leave room for {SOT} and {EOT}, got {context_length}")
        # The file's first line is a version header; open_clip reads exactly the merges that fill 49,408 entries.
        lines = gzip.decompress(Path(vocab_path).read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:_N_MERGES + 1]]
        if len(merges) != _N_MERGES:
            raise ValueError(f"{vocab_path} holds {len(merges)} BPE merges, CLIP's vocabulary needs {_N_MERGES}")
        byte_symbols = _byte_symbols()
        vocab = [*byte_symbols.values(), *(s + "</w>" for s in byte_symbols.values()),
                 *("".join(merge) for merge in merges), SOT, EOT]
        self._ids: dict[str, int] = {symbol: i for i, symbol in enumerate(vocab)}
        self._ranks: dict[tuple[str, ...], int] = {merge: rank for rank, merge in enumerate(merges)}
        # str.translate table: applied to a word's UTF-8 bytes read as Latin-1, it yields the byte symbols.
        self._byte_table: dict[int, str] = dict(byte_symbols)
        self.sot_id: int = self._ids[SOT]
        self.eot_id: int = self._ids[EOT]
        self.context_length: int = context_length
        # Word → ids. The special tokens are seeded, not computed: BPE would split them, and open_clip seeds them too,
        # so "<start_of_text>" typed in a label becomes the SOT id there as here.
        # Thread safety: each dict.get / dict.setdefault is atomic in CPython (the GIL, or the per-dict lock of the
        # free-threaded build), and a word's ids never change, so a race only computes a word twice and can overshoot
        # the cap by a few entries; no lock is needed.
        self._cache: dict[str, tuple[int, ...]] = {SOT: (self.sot_id,), EOT: (self.eot_id,)}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without SOT / EOT and without truncation."""
        ids: list[int] = []
        for word in _PATTERN.findall(_clean(text)):
            ids.extend(self._word_ids(word.encode("utf-8").decode("latin-1").translate(self._byte_table)))
        return ids

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        """int64 (N, context_length): SOT, the ids, EOT, zero padded.

        Text too long for the context keeps its first context_length - 2 ids and still ends in EOT, which is
        open_clip's truncate-to-context_length-then-overwrite-the-last-id-with-EOT, stated directly.
        """
        texts = [texts] if isinstance(texts, str) else texts
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in zip(out, texts):
            ids = [self.sot_id, *self.encode(text)[:self.context_length - 2], self.eot_id]
            row[:len(ids)] = ids
        return out

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            ids = tuple(self._ids[symbol] for symbol in self._bpe(word))
            if len(self._cache) < _CACHE_LIMIT:
                self._cache.setdefault(word, ids)
        return ids

    def _bpe(self, word: str) -> list[str]:
        """Merge adjacent symbols, always the pair with the lowest merge rank, until no known pair is left.

        The last character carries "</w>" (end of word), so word-final pieces have their own vocabulary entries.
        Every occurrence of the chosen pair is merged left to right in one pass, as in open_clip.
        """
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            rank, first, second = min((self._ranks.get(pair, _N_MERGES), *pair) for pair in zip(symbols, symbols[1:]))
            if rank == _N_MERGES:  # no adjacent pair is a known merge
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols


_shared: dict[tuple[str, int], ClipTokenizer] = {}
_shared_lock = threading.Lock()


def shared_tokenizer(vocab_path: str | Path, context_length: int = 77) -> ClipTokenizer:
    """One tokenizer per (vocabulary content, context_length) for the whole process.

    Every bundle ships its own copy of the same vocabulary file, and a tokenizer holds some 18 MB of dicts, so a
    server with many bundles keys instances by the file's sha256 rather than its path. The lock makes concurrent
    first calls build one instance, not several.
    """
    key = (hashlib.sha256(Path(vocab_path).resolve().read_bytes()).hexdigest(), context_length)
    with _shared_lock:
        tokenizer = _shared.get(key)
        if tokenizer is None:
            tokenizer = _shared[key] = ClipTokenizer(vocab_path, context_length)
        return tokenizer
