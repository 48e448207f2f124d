"""The text a prompt asks to see drawn in the image, for the text check (``atelier.engines.text_check``).

A prompt asks for text in two ways, and both are read here:

* **Quoted**: ``a neon sign "OPEN LATE"``, curly quotes ``“…”`` and ``‘…’``, guillemets ``«…»``, and
  single quotes that open and close outside a word (so the apostrophe in ``don't`` opens nothing, and
  ``'Joe's Diner'`` is one piece). Every quoted piece counts, in order.
* **After a cue, unquoted**: ``that says``, ``which reads``, ``saying``, ``with the words``, ``with the
  text``, ``reading``, ``titled``, ``labeled``... The text runs to the end of the clause (a comma, full stop,
  semicolon, colon...) and, for lower-case text, stops before a word that starts the scene again (``in``,
  ``on``, ``with``, ``against``...). An all-capitals run (``that says WELCOME TO PARIS in red``) stops
  where the capitals stop, so its own small words stay in.

When a prompt has quoted text, only that is taken: a cue then usually introduces the quote. Prompts that
ask for no text give ``()``, and the check does not run for them. Quoting a style (``in the style of
"ukiyo-e"``) reads as asking for text: quotes are how callers ask, and a check that runs needlessly
costs time, never quality (its first candidate is the image the engine would have made anyway).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

# Opening and closing quote pairs. ASCII quotes close with themselves; a single one must open after a
# space or bracket and close before one (or punctuation), so apostrophes inside words never pair up.
# Every piece is at most MAX_PIECE characters: text to draw is short, and the bound keeps the search
# linear in the prompt's length (a 32,000-character prompt of unclosed quotes would otherwise take minutes).
MAX_PIECE = 120
MAX_PIECES = 8
_QUOTED = re.compile(
    r"\"(?P<d>[^\"\n]{1,120}+)\""
    r"|“(?P<c>[^”\n]{1,120}+)”"
    r"|„(?P<g>[^“”\n]{1,120}+)[“”]"
    r"|«(?P<f>[^»\n]{1,120}+)»"
    r"|‘(?P<s>[^’\n]{1,120}+)’"
    r"|(?<!\w)'(?P<a>(?:[^'\n]|'(?=\w)){1,120}+)'(?!\w)"
)
_CUE = re.compile(
    r"\b(?:that|which)\s+(?:says|reads|spells(?:\s+out)?)\s+"
    r"|\b(?:saying|reading|spelling(?:\s+out)?|(?:en)?titled|label(?:l)?ed)\s+"
    r"|\b(?:with|showing|bearing|displaying)\s+the\s+(?:words?|text|phrase|letters|caption|title|slogan|headline)\s+"
    r"|\b(?:text|caption|title|lettering|words?)\s*:\s*",
    re.IGNORECASE,
)
_CLAUSE_END = re.compile(r"[,.;:!?()\[\]\n]")
_CAPS_WORD = r"[A-Z0-9][A-Z0-9&'’!\-]*(?!\w)"
_CAPS_RUN = re.compile(rf"{_CAPS_WORD}(?:\s+{_CAPS_WORD})*")
# Words that start describing the scene again after unquoted lower-case text.
_SCENE_WORDS = frozenset(
    [
        "in",
        "on",
        "with",
        "at",
        "against",
        "above",
        "below",
        "under",
        "over",
        "beside",
        "behind",
        "near",
        "next",
        "written",
        "painted",
        "printed",
        "carved",
        "drawn",
        "in-front",
        "and",
        "while",
        "as",
    ]
)


def asked_text(prompt: str) -> tuple[str, ...]:
    """The pieces of text ``prompt`` asks to see drawn, in order (at most ``MAX_PIECES``); ``()`` when it
    asks for none."""
    quoted = tuple(itertools.islice((piece for piece in _quoted(prompt) if piece), MAX_PIECES))
    if quoted:
        return quoted
    found = (_after_cue(prompt, match.end()) for match in _CUE.finditer(prompt))
    return tuple(itertools.islice((piece for piece in found if piece), MAX_PIECES))


def joined(pieces: tuple[str, ...]) -> str:
    """The pieces as one line, as the check compares them with what was read."""
    return " ".join(pieces)


def _quoted(prompt: str) -> Iterator[str]:
    for match in _QUOTED.finditer(prompt):
        text = next(group for group in match.groups() if group is not None)
        yield " ".join(text.split())


def _after_cue(prompt: str, start: int) -> str:
    """The unquoted text after a cue: an all-capitals run, else the clause up to a scene word."""
    rest = prompt[start : start + MAX_PIECE]
    clause = _CLAUSE_END.split(rest, maxsplit=1)[0].strip()
    caps = _CAPS_RUN.match(clause)
    if caps is not None and sum(c.isalpha() for c in caps.group()) >= 2:
        return caps.group().strip()
    words: list[str] = []
    for word in clause.split():
        if words and word.lower() in _SCENE_WORDS:
            break
        words.append(word)
    return " ".join(words)
