"""The text a prompt asks to see drawn in the image, for the text check (``atelier.engines.text_check``).

A prompt asks for text in two ways, and both are read here:

* **Quoted**: ``a neon sign "OPEN LATE"``, curly quotes ``“…”`` and ``‘…’``, guillemets ``«…»``, and
  single quotes that open after a space (so the apostrophe in ``don't`` opens nothing). Every quoted
  piece counts, in order.
* **After a cue, unquoted**: ``that says``, ``which reads``, ``saying``, ``with the words``, ``with the
  text``, ``reading``, ``the word``... The text runs to the end of the clause (a comma, full stop,
  semicolon, colon...) and, for lower-case text, stops before a word that starts the scene again (``in``,
  ``on``, ``with``, ``against``...). An all-capitals run (``that says WELCOME TO PARIS in red``) stops
  where the capitals stop, so its own small words stay in.

When a prompt has quoted text, only that is taken: a cue then usually introduces the quote. Prompts that
ask for no text give ``()``, and the check does not run for them. Quoting a style (``in the style of
"ukiyo-e"``) reads as asking for text: quotes are how callers ask, and a check that runs needlessly
costs time, never quality (its first candidate is the image the engine would have made anyway).
"""

from __future__ import annotations

import re

# Opening and closing quote pairs. ASCII quotes close with themselves; a single one must open after a
# space or bracket and close before one (or punctuation), so apostrophes inside words never pair up.
_QUOTED = re.compile(
    r"\"(?P<d>[^\"\n]+)\""
    r"|“(?P<c>[^”\n]+)”"
    r"|„(?P<g>[^“”\n]+)[“”]"
    r"|«\s*(?P<f>[^»\n]+?)\s*»"
    r"|‘(?P<s>[^’\n]+)’"
    r"|(?:(?<=^)|(?<=[\s(\[:]))'(?P<a>[^'\n]+)'(?=$|[\s.,;:!?)\]])"
)
_CUE = re.compile(
    r"\b(?:that|which)\s+(?:says|reads|spells(?:\s+out)?)\s+"
    r"|\b(?:saying|reading|spelling(?:\s+out)?)\s+"
    r"|\b(?:with|showing|bearing|displaying)\s+the\s+(?:words?|text|phrase|letters|caption|title)\s+"
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
    """The pieces of text ``prompt`` asks to see drawn, in order; ``()`` when it asks for none."""
    quoted = tuple(piece for piece in _quoted(prompt) if piece)
    if quoted:
        return quoted
    return tuple(piece for piece in (_after_cue(prompt, m.end()) for m in _CUE.finditer(prompt)) if piece)


def joined(pieces: tuple[str, ...]) -> str:
    """The pieces as one line, as the check compares them with what was read."""
    return " ".join(pieces)


def _quoted(prompt: str) -> list[str]:
    found = []
    for match in _QUOTED.finditer(prompt):
        text = next(group for group in match.groups() if group is not None)
        found.append(" ".join(text.split()))
    return found


def _after_cue(prompt: str, start: int) -> str:
    """The unquoted text after a cue: an all-capitals run, else the clause up to a scene word."""
    rest = prompt[start:]
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
