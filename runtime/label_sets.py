"""A requested label set: each label normalised and checked, then the set resolved against one bundle's classes.

A label equal to a bundled class name, or to its display form (underscores as spaces), is that class and answers
under the bundle's name for it; any other label is a new label (its text rows come from the bundle's text graph). Mode
"open" accepts both; "subset" refuses labels that are not bundled classes (for clients that only ever narrow the
bundle's own class list and want a typo to fail). Each label is trimmed and its runs of whitespace become one space;
an empty or overlong label, one with control characters, lone surrogates or unassigned code points, and a label that
repeats another (after normalisation and mapping to class names) are refused with an InputError naming it.
"""
from __future__ import annotations

import unicodedata

from fvgpt.classes import ClassSplit

from .images import InputError

MODES = ("open", "subset")
NOT_TEXT = ("Cc", "Cs", "Cn")  # control characters, lone surrogates, unassigned code points


def is_text(label: str) -> bool:
    """Text a label may hold: anything but control characters, lone surrogates and unassigned code points. Format
    characters (Unicode category Cf: the zero-width joiners of emoji sequences, soft hyphens, the zero-width
    non-joiner of Persian, bidi marks, emoji tag sequences) are part of normal text and are kept."""
    return not any(unicodedata.category(ch) in NOT_TEXT for ch in label)


def normalize(label: str, where: str, max_chars: int) -> str:
    """One label trimmed, its whitespace runs made one space, and checked; `where` names it in errors (labels[3])."""
    text = " ".join(label.split())
    if not text:
        raise InputError(f"{where} is empty")
    if len(text) > max_chars:
        raise InputError(f"{where} is {len(text)} characters long; the limit is {max_chars} (FVGPT_MAX_LABEL_CHARS)")
    if not is_text(text):
        raise InputError(f"{where} contains control characters (or lone surrogates, or unassigned code points)")
    return text


def resolve(labels: list[str] | None, mode: str, classes: ClassSplit) -> list[str] | None:
    """Normalised labels → the label set scored for one bundle, bundled classes under their bundle name; None: every
    bundled class."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if labels is None:
        if mode == "subset":
            raise InputError("mode 'subset' needs labels: the bundled classes to score")
        return None
    resolved: list[str] = []
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        found = classes.find(label)
        if found is None and mode == "subset":
            raise InputError(f"labels[{i}] {label!r} is not a bundled class (mode 'subset'); the bundled classes are: "
                             f"{', '.join(classes.names)}")
        name = label if found is None else classes.names[found]
        if name in seen:
            raise InputError(f"labels[{i}] {label!r} repeats labels[{seen[name]}]")
        seen[name] = i
        resolved.append(name)
    return resolved


def top_k(requested: int | None, n_labels: int, default: int) -> int:
    """How many ranked labels to return: `requested` when it is between 1 and the labels scored, else an
    InputError; None: min(default, labels scored)."""
    if requested is None:
        return min(default, n_labels)
    if not 1 <= requested <= n_labels:
        raise InputError(f"top_k must be between 1 and {n_labels} (the number of labels scored), not {requested}")
    return requested
