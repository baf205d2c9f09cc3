"""Response traits the simulated world is made of, each measurable from text alone.

Every trait maps a response text to a number in [0, 1]. Simulated users hold
hidden weights over these traits; the simulated LLM measures them in the
responses it reads and writes about them with a fixed phrase vocabulary
(:data:`PHRASES`), which :func:`parse_preferences` reads back. The vocabulary
is shared by the judge's reasoning, the persona writer, the insight extractor
and the style parser, so a persona is only as good as the traits it names.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

TRAITS: tuple[str, ...] = (
    "length",
    "bullets",
    "headings",
    "code",
    "examples",
    "emoji",
    "hedging",
    "questions",
    "formality",
)
"""Trait names, in the order of :func:`trait_vector`."""

PHRASES: dict[str, str] = {
    "length": "long, detailed answers",
    "bullets": "bullet lists",
    "headings": "headings",
    "code": "code blocks",
    "examples": "worked examples",
    "emoji": "emoji",
    "hedging": "hedging",
    "questions": "questions back to the user",
    "formality": "a formal tone",
}
"""What a trait is called when someone likes it."""

OPPOSITE_PHRASES: dict[str, str] = {
    "length": "short, concise answers",
    "formality": "a casual tone",
}
"""Natural wording for liking the *absence* of a trait (only where it reads better than "dislikes X")."""

# ------------------------------------------------------------------ markers

BULLET_RE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S", re.M)
HEADING_RE = re.compile(r"^\s{0,3}#{1,6}\s+\S", re.M)
FENCE_RE = re.compile(r"^\s*```", re.M)
EXAMPLE_RE = re.compile(r"\bfor example\b|\bfor instance\b|\be\.g\.", re.I)
EMOJI_RE = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf\u2b50\u2b55\u2705\u274c]")
HEDGE_WORDS = frozenset({"might", "perhaps", "possibly", "probably", "arguably"})
HEDGE_PHRASES = (
    "it depends",
    "i think",
    "i believe",
    "not entirely sure",
    "in some cases",
    "could be",
    "i'm not certain",
    "may or may not",
)
QUESTION_RE = re.compile(r"\?(?=\s|$|[\U0001f300-\U0001faff\u2600-\u27bf])")
FORMAL_WORDS = frozenset(
    {
        "furthermore",
        "moreover",
        "consequently",
        "accordingly",
        "certainly",
        "therefore",
        "thus",
        "hence",
        "nevertheless",
    }
)
FORMAL_PHRASES = ("in addition", "it is recommended", "one should")
CASUAL_WORDS = frozenset(
    {"honestly", "basically", "hey", "gonna", "kinda", "wanna", "awesome", "cool", "lol", "stuff"}
)
CASUAL_PHRASES = ("so yeah", "oh, and", "oh and", "no worries", "pretty much", "super easy")

LENGTH_MIN_WORDS = 30
LENGTH_SPAN_WORDS = 370
"""``length`` is 0 at 30 words and 1 at 400 words or more."""


def _clip(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def word_count(text: str) -> int:
    """Whitespace-separated tokens (fast; what ``length`` counts)."""
    return len(text.split())


_CODE_BLOCK_RE = re.compile(r"```.*?(?:```|\Z)", re.S)
_LOWER_WORD_RE = re.compile(r"[a-z']+")


def _strip_code(text: str) -> str:
    return _CODE_BLOCK_RE.sub(" ", text) if "```" in text else text


_MARKER_KIND: dict[str, int] = {
    **{w: 0 for w in HEDGE_WORDS},
    **{w: 1 for w in FORMAL_WORDS},
    **{w: 2 for w in CASUAL_WORDS},
}


def _count_markers(low: str, tokens: list[str]) -> tuple[int, int, int]:
    """(hedges, formal, casual) marker counts of lower-cased text."""
    counts = [0, 0, 0]
    get = _MARKER_KIND.get
    for w in tokens:
        k = get(w)
        if k is not None:
            counts[k] += 1
    for k, phrases in enumerate((HEDGE_PHRASES, FORMAL_PHRASES, CASUAL_PHRASES)):
        for p in phrases:
            if p in low:
                counts[k] += len(re.findall(rf"\b{re.escape(p)}\b", low))
    return counts[0], counts[1], counts[2]


def trait_vector(text: str) -> np.ndarray:
    """All traits of ``text`` as a float vector in :data:`TRAITS` order (each in [0, 1]).

    length: words, 0 at 30 and 1 at 400+; bullets: list items /6; headings: markdown heading
    lines /3; code: fenced blocks /2; examples: "for example"/"for instance"/"e.g." /3;
    emoji: emoji characters /4; hedging: hedge words and phrases /4; questions: questions /3;
    formality: (F+1)/(F+C+2) from formal (F) and casual (C) marker words, 0.5 when neutral.
    Lists, headings, examples, hedges, questions and register are counted outside code blocks.
    """
    if not isinstance(text, str):
        text = str(text)
    body = _strip_code(text)
    low = body.lower()
    tokens = _LOWER_WORD_RE.findall(low)
    fences = len(FENCE_RE.findall(text)) // 2 if "```" in text else 0
    examples = low.count("for example") + low.count("for instance") + low.count("e.g.")
    hedges, formal, casual = _count_markers(low, tokens)
    return np.array(
        [
            _clip((word_count(text) - LENGTH_MIN_WORDS) / LENGTH_SPAN_WORDS),
            _clip(len(BULLET_RE.findall(body)) / 6)
            if ("-" in body or "*" in body or "\u2022" in body or "." in body or ")" in body)
            else 0.0,
            _clip(len(HEADING_RE.findall(body)) / 3) if "#" in body else 0.0,
            _clip(fences / 2),
            _clip(examples / 3),
            _clip(len(EMOJI_RE.findall(text)) / 4),
            _clip(hedges / 4),
            _clip(len(QUESTION_RE.findall(body)) / 3) if "?" in body else 0.0,
            (formal + 1) / (formal + casual + 2),
        ],
        dtype=float,
    )


def trait_dict(text: str) -> dict[str, float]:
    """:func:`trait_vector` as ``{trait: value}``."""
    return dict(zip(TRAITS, trait_vector(text).tolist(), strict=True))


def measure(trait: str, text: str) -> float:
    """Measure one trait of ``text`` (in [0, 1])."""
    return float(trait_vector(text)[TRAITS.index(trait)])


def _measure_fn(trait: str) -> Callable[[str], float]:
    def fn(text: str) -> float:
        return measure(trait, text)

    fn.__name__ = f"measure_{trait}"
    fn.__doc__ = f"Measure the {trait!r} trait of a text (in [0, 1])."
    return fn


MEASURES: dict[str, Callable[[str], float]] = {t: _measure_fn(t) for t in TRAITS}
"""One ``measure(text) -> float`` per trait."""


# ------------------------------------------------------------------ reading preference statements

_SYNONYMS: dict[str, list[tuple[str, float]]] = {
    "length": [
        (r"long(?:er)?|lengthy|detailed|thorough|in-depth|comprehensive|depth|detail|elaborate", 1.0),
        (r"short(?:er)?|concise|brief|succinct|terse|to the point|brevity", -1.0),
    ],
    "bullets": [(r"bullet(?:ed)?(?: lists?| points?)?|bullets|lists?", 1.0)],
    "headings": [(r"headings?|headers?|section titles|sections", 1.0)],
    "code": [(r"code(?: blocks?| snippets?| samples?| examples?)?", 1.0)],
    "examples": [(r"(?:worked |concrete )?examples?", 1.0)],
    "emoji": [(r"emojis?|emoticons", 1.0)],
    "hedging": [
        (r"hedg(?:ing|es?)|caveats?|qualifiers|uncertainty", 1.0),
        (r"confident|confidence|decisive|assertive|definitive", -1.0),
    ],
    "questions": [(r"(?:follow-up |clarifying )?questions?(?: back to the user)?", 1.0)],
    "formality": [
        (r"formal|formality|professional", 1.0),
        (r"casual|informal|conversational|chatty|relaxed|playful|laid-back", -1.0),
    ],
}
_TRAIT_RES: list[tuple[str, re.Pattern[str], float]] = [
    (trait, re.compile(rf"\b(?:{pat})\b", re.I), sign)
    for trait, pats in _SYNONYMS.items()
    for pat, sign in pats
]
_POS_CUE = re.compile(
    r"\b(?:prefers?|preferring|preferred|values?|valuing|likes?|enjoys?|wants?|appreciates?|"
    r"favou?rs?|loves?|use|uses|using|include|includes|including|add|give|gives|be|keep|"
    r"responds well to|drawn to|asks? for|benefits from|welcomes?|chose|chooses|picks?|picked)\b",
    re.I,
)
_NEG_CUE = re.compile(
    r"\b(?:dislikes?|disliking|avoids?|avoiding|hates?|no|not|never|without|don't|doesn't|"
    r"do not|does not|skip|less|fewer|minimal|minimi[sz]e|rather than|instead of|put off by|"
    r"annoyed by|dislike|steer clear of)\b",
    re.I,
)
_NEGATOR = re.compile(r"\b(?:not|never|don't|doesn't|do not|does not|no longer)\s+$", re.I)
_STRONG = re.compile(r"\b(?:strongly|very|really|greatly|highly|clearly|much|always|definitely)\b", re.I)
_WEAK = re.compile(
    r"\b(?:somewhat|slightly|mildly|a bit|a little|moderately|tends to|sometimes|a little)\b", re.I
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.;!?\n])\s*")


def _strength(window: str) -> float:
    if _WEAK.search(window):
        return 0.5
    if _STRONG.search(window):
        return 2.0
    return 1.0


def parse_preferences(text: str) -> dict[str, float]:
    """Read preference statements ("strongly prefers bullet lists", "dislikes emoji", "be concise")
    into signed trait weights: likes +, dislikes -, "strongly" 2, plain 1, "somewhat" 0.5.

    Each trait mention is attributed to the nearest preceding cue word in its sentence;
    mentions with no cue are ignored. Traits never mentioned are absent from the result.
    """
    if not isinstance(text, str) or not text.strip():
        return {}
    text = re.sub(r"\be\.g\.", "eg", text, flags=re.I)
    out: dict[str, float] = {}
    for sentence in _SENTENCE_SPLIT.split(text):
        if not sentence.strip():
            continue
        cues: list[tuple[int, int, float]] = []
        for m in _POS_CUE.finditer(sentence):
            before = sentence[max(0, m.start() - 14) : m.start()]
            sign = -1.0 if _NEGATOR.search(before) else 1.0
            cues.append((m.start(), m.end(), sign))
        for m in _NEG_CUE.finditer(sentence):
            cues.append((m.start(), m.end(), -1.0))
        if not cues:
            continue
        cues.sort()
        seen: dict[tuple[int, str], float] = {}
        taken: list[tuple[int, int]] = []
        for trait, rx, tsign in _TRAIT_RES:
            for m in rx.finditer(sentence):
                if any(s <= m.start() < e for s, e in taken):
                    continue
                cue = None
                for c in cues:
                    if c[1] <= m.start():
                        cue = c
                    else:
                        break
                if cue is None:
                    continue
                # a negator right before a positive cue already flipped it; the cue's own window gives strength
                window = sentence[max(0, cue[0] - 25) : cue[1]]
                w = cue[2] * tsign * _strength(window)
                key = (cue[0], trait)
                if key not in seen or abs(w) > abs(seen[key]):
                    seen[key] = w
                taken.append((m.start(), m.end()))
        for (_, trait), w in seen.items():
            out[trait] = out.get(trait, 0.0) + w
    return {t: max(-3.0, min(3.0, w)) for t, w in out.items() if w != 0.0}


def describe_preference(trait: str, weight: float) -> str:
    """Phrase one preference in the shared vocabulary, e.g. ``strongly prefers bullet lists``."""
    mag = abs(weight)
    adverb = "strongly " if mag >= 1.5 else "somewhat " if mag < 0.75 else ""
    if weight >= 0:
        return f"{adverb}prefers {PHRASES[trait]}"
    if trait in OPPOSITE_PHRASES:
        return f"{adverb}prefers {OPPOSITE_PHRASES[trait]}"
    return f"{adverb}dislikes {PHRASES[trait]}"


def join_phrases(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c`` (phrases containing commas are joined with '; ' for clarity)."""
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]
