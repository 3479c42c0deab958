"""runtime/tokenizer.py against open_clip's own SimpleTokenizer: identical ids on a wide, seeded set of strings, no
torch or open_clip needed at import, and one shared instance per vocabulary content."""
from __future__ import annotations

import json
import random
import shutil
import string
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from fvgpt_runtime.tokenizer import VOCAB_FILE, ClipTokenizer, shared_tokenizer

REPO = Path(__file__).resolve().parents[1]

LABELS = ["golden retriever", "a photo of a cat.", "tabby cat", "Egyptian cat", "fire truck", "hot-air balloon",
          "T-shirt", "iPod", "CD player", "German shepherd dog", "grand piano", "red circle", "yellow cross",
          "spaghetti squash", "jack-o'-lantern", "potter's wheel", "St. Bernard", "Ford Model T", "McDonald's",
          "U.S. mailbox", "New York City", "a bad photo of the dog", "an origami airplane.", "sea_anemone",
          "snake (reptile)", "café au lait", "crème brûlée", "Bernese mountain dog", "yorkshire terrier"]
TEMPLATES = ["{}", "a photo of a {}.", "A PHOTO OF A {}!", "itap of the {}", "a {} in a video game.",
             "art of the {}.", "a close-up photo of a {}?", "  a   blurry\tphoto of\nthe {}  "]
ACCENTED = ["é", "ñ", "ü", "e\u0301", "n\u0303", "u\u0308", "Ångström", "naïve", "façade", "Zoë", "Øresund",
            "Łódź", "Škoda", "İstanbul", "straße", "ﬁne", "Ǆemal", "ǅ", "ΣΊΣΥΦΟΣ", "a\u0300\u0301\u0302\u0303",
            "Ⅻ", "ﬀ", "Ａｂｃ", "𝐇𝐞𝐥𝐥𝐨", "a\u0345b", "ᾳ"]  # U+0345 matches no word pattern: open_clip drops it
SCRIPTS = ["金毛寻回犬", "猫の写真", "고양이 사진", "собака породы хаски", "ЁЛКА", "قطة صغيرة", "कुत्ते की तस्वीर",
           "แมวน้อย", "חתול", "Γάτα", "ქართული", "ትግርኛ", "ᠮᠣᠩᠭᠣᠯ", "𠜎𠜱𠝹", "ひらがな カタカナ ｶﾀｶﾅ"]
EMOJI = ["😀", "🐱", "👩‍🔬", "👨‍👩‍👧", "👍🏽", "👋🏿", "🇯🇵", "🇺🇸🇬🇧", "🏳️‍🌈", "1️⃣", "❤️", "🧑🏻‍🤝‍🧑🏾", "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
         "☃", "✔︎"]
PUNCT = list(string.punctuation) + ["“quoted”", "‘single’", "«guillemets»", "…", "—", "–", "·", "•", "¿", "¡", "§",
                                    "¶", "†", "‽", "※", "©", "®", "™", "°", "±", "×", "÷", "€", "£", "¥", "₹", "∞",
                                    "≈", "≠", "≤", "√", "∑", "∫", "→", "⇒", "♠", "♪", "✓", "、", "。", "「」", "،", "؟"]
NUMBERS = ["0", "7", "42", "2024", "3.14159", "1,000,000", "-17", "+5", "1e-5", "0x1F", "50%", "12:30", "٣٤",
           "१२३", "½", "²", "①", "Ⅳ", "１２３", "4th", "1990s"]
ENTITIES = ["&amp;", "&#39;", "&lt;b&gt;", "&quot;hi&quot;", "&nbsp;", "&amp;amp;", "&amp;lt;", "&#x1F600;",
            "&copy;", "&eacute;", "&#233;", "&bogus;", "&", "AT&T", "&#0;", "&#xD800;"]
CONTRACTIONS = ["it's", "we'll", "they're", "I've", "I'm", "he'd", "don't", "can't", "IT'S", "WE'LL", "it’s",
                "rock'n'roll", "o'clock", "'s", "''", "'", "'ſ", "ſ", "dog's'", "y'all'd've"]
SPECIAL = ["<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<ſtart_of_text>", "<start_of_text><end_of_text>",
           "a<end_of_text>b", "<start_of_text", "</w>", "cat</w>"]
MOJIBAKE = ["cafÃ©", "â€œquotedâ€\x9d", "doesnâ€™t", "Ã¼ber", "naÃ¯ve", "Ã\xa0 la carte", "ðŸ˜€", "Ð¿Ñ€Ð¸Ð²ÐµÑ‚",
            "&Atilde;&copy;", "\ufeffbom", "e\u00ad-mail", "line\u2028sep"]
WHITESPACE = ["", " ", "  ", "\t", "\n", "\r\n", " \t\n ", "\u3000", "\xa0", "\u2003", "\u200b", "\u200d", "\x00",
              "\x1c\x1d", "\x85", "\u2029", "\ufeff"]
SEPARATORS = [" ", "", "  ", "\t", "\n", "-", ", ", "/", "_", "'", "."]
# (first, last) code points: Latin, combining marks, Greek/Cyrillic, Arabic, Devanagari, Thai, general punctuation,
# letterlike/number forms, arrows/maths, CJK, Hangul, private use, half/full width, emoji, maths alphanumerics,
# C0/C1 controls and lone surrogates (which ftfy replaces).
BLOCKS = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF), (0x600, 0x6FF), (0x900, 0x97F),
          (0xE00, 0xE7F), (0x2000, 0x206F), (0x2100, 0x218F), (0x2190, 0x22FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
          (0xE000, 0xE0FF), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x1D400, 0x1D7FF), (0x0, 0x1F), (0x80, 0x9F),
          (0xD800, 0xDFFF)]
POOLS = [LABELS, ACCENTED, SCRIPTS, EMOJI, PUNCT, NUMBERS, ENTITIES, CONTRACTIONS, SPECIAL, MOJIBAKE, WHITESPACE]
CASES = [str, str.lower, str.upper, str.title, str.swapcase, str.capitalize]


def mojibake(text: str) -> str:
    """UTF-8 read back as Windows-1252 (Latin-1 where 1252 has no character): the damage ftfy is there to undo."""
    raw = text.encode("utf-8")
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def random_codepoints(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randint(*rng.choice(BLOCKS))) for _ in range(n))


def corpus() -> list[str]:
    rng = random.Random(20240611)
    fixed = [s for pool in POOLS for s in pool] + [t.format(label) for t in TEMPLATES for label in LABELS]
    words = [w for pool in (LABELS, ACCENTED, SCRIPTS, CONTRACTIONS) for s in pool for w in s.split()]
    mixed = []
    for _ in range(700):
        parts = [rng.choice(rng.choice(POOLS)) for _ in range(rng.randint(1, 6))]
        text = rng.choice(CASES)("".join(p + rng.choice(SEPARATORS) for p in parts))
        mixed.append(mojibake(text) if rng.random() < 0.1 else text)
    codepoints = [random_codepoints(rng, rng.randint(1, 24)) for _ in range(250)]
    # Longer than 77 tokens (truncation with EOT last), and single words of hundreds of characters.
    long_texts = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) for _ in range(30)]
    long_words = ["a" * 200, "supercalifragilisticexpialidocious" * 8, "猫" * 150, "😀" * 90, "!?" * 120,
                  "1234567890" * 12]
    long_words += ["".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(80, 400))) for _ in range(20)]
    return list(dict.fromkeys(fixed + mixed + codepoints + long_texts + long_words))


TEXTS = corpus()


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer(default_bpe())


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer(default_bpe())


def assert_same_ids(expected: np.ndarray, actual: np.ndarray, texts: list[str]) -> None:
    assert actual.dtype == np.int64 and actual.shape == expected.shape
    for text, want, got in zip(texts, expected, actual):
        assert np.array_equal(want, got), f"ids differ for {text!r}:\nopen_clip {want.tolist()}\nours {got.tolist()}"


def test_corpus_is_wide() -> None:
    assert len(TEXTS) >= 1000
    assert "" in TEXTS and "👨‍👩‍👧" in TEXTS and "e\u0301" in TEXTS


def test_identical_to_open_clip(reference: SimpleTokenizer, tokenizer: ClipTokenizer) -> None:
    expected = reference(TEXTS).numpy()
    assert (expected[:, -1] == reference.eot_token_id).any(), "no string exercised truncation"
    assert_same_ids(expected, tokenizer(TEXTS), TEXTS)
    assert [tokenizer.encode(t) for t in TEXTS[:200]] == [reference.encode(t) for t in TEXTS[:200]]
    assert (tokenizer.sot_id, tokenizer.eot_id) == (reference.sot_token_id, reference.eot_token_id)


@pytest.mark.parametrize("context_length", [16, 2])
def test_identical_at_other_context_lengths(reference: SimpleTokenizer, context_length: int) -> None:
    texts = TEXTS[::4]
    ours = ClipTokenizer(default_bpe(), context_length)
    assert ours.context_length == context_length
    assert_same_ids(reference(texts, context_length=context_length).numpy(), ours(texts), texts)


def test_single_string_and_empty_batch(reference: SimpleTokenizer, tokenizer: ClipTokenizer) -> None:
    assert_same_ids(reference("a photo of a cat.").numpy(), tokenizer("a photo of a cat."), ["a photo of a cat."])
    assert tokenizer([]).shape == (0, 77)


def test_rejects_context_without_room_for_sot_and_eot() -> None:
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(default_bpe(), 1)


def test_concurrent_calls_agree(reference: SimpleTokenizer) -> None:
    """Fresh tokenizer (empty cache), eight threads filling it at once: every thread sees open_clip's ids."""
    ours = ClipTokenizer(default_bpe())
    texts = TEXTS[::3]
    expected = reference(texts).numpy()
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(ours(texts))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    for result in results:
        assert_same_ids(expected, result, texts)


# Blocks torch and open_clip (and their submodules), checks the block works, then tokenizes argv[3] (JSON list).
TORCH_FREE = r"""
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "open_clip"):
            raise ImportError(f"{name} is blocked")
        return None

sys.meta_path.insert(0, Block())
try:
    import torch
    sys.exit("the import block does not work")
except ImportError:
    pass
sys.path.insert(0, sys.argv[1])
from fvgpt_runtime.tokenizer import ClipTokenizer
print(json.dumps(ClipTokenizer(sys.argv[2])(json.loads(sys.argv[3])).tolist()))
"""


def test_imports_and_runs_without_torch_or_open_clip(reference: SimpleTokenizer) -> None:
    texts = ["golden retriever", "a photo of a cat.", "👩‍🔬 &amp; cafÃ©", "собака", " ".join(["dog"] * 100)]
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(REPO), default_bpe(), json.dumps(texts)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert_same_ids(reference(texts).numpy(), np.array(json.loads(proc.stdout), dtype=np.int64), texts)


def test_shared_tokenizer_keys_by_content_and_context_length(tmp_path: Path) -> None:
    copies = [tmp_path / name / VOCAB_FILE for name in ("bundle_a", "bundle_b")]
    for copy in copies:
        copy.parent.mkdir()
        shutil.copyfile(default_bpe(), copy)
    first = shared_tokenizer(copies[0])
    assert shared_tokenizer(str(copies[1])) is first
    short = shared_tokenizer(copies[0], context_length=16)
    assert short is not first and short.context_length == 16
    assert shared_tokenizer(copies[1], context_length=16) is short
    assert Path(default_bpe()).name == VOCAB_FILE
