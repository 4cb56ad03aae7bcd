"""Tolerant parsing of a profiler's free-text output into a :class:`VLMProfile`.

``parse_profile`` never raises on model output. It looks for JSON-like objects (``{...}``) in the
text and reads them with a small lenient parser that accepts what language models actually write:
code fences and prose around the object, single quotes, unquoted keys, trailing commas, ``//``,
``/* */`` and ``#`` comments, numbers written as strings, percentages (``"80%"``), words such as
``"high"``, ``NaN`` / ``Infinity``, duplicate keys, extra fields, deep nesting and truncated output.

Complexity is linear: the scanned text is capped (``MAX_SCAN_CHARS``), every token is matched by a
regular expression without nested quantifiers, and the number of tokens and candidate objects is
bounded, so a 1 MB input parses in a few milliseconds.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .schema import DEFAULT_PROFILE, FOCUS_KEYS, VLMProfile

__all__ = ["parse_profile", "MAX_SCAN_CHARS"]

#: Characters scanned from the first ``{`` on; a real profile is a few hundred characters.
MAX_SCAN_CHARS = 32768
_MAX_TOKENS = 8000
_MAX_CANDIDATES = 16
_MAX_DEPTH = 16
_MAX_KEY_WORDS = 4

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?(?:\*/|\Z)|\#[^\n]*)
  | (?P<dq>"(?:[^"\\]|\\.)*"?)
  | (?P<sq>'(?:[^'\\]|\\.)*'?)
  | (?P<punct>[{}\[\]:,=])
  | (?P<bare>[^\s{}\[\]:,="'/\#]+)
  | (?P<junk>.)
    """,
    re.S | re.X,
)

_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_WORDS = {
    "none": 0.0,
    "no": 0.0,
    "false": 0.0,
    "verylow": 0.1,
    "low": 0.25,
    "minimal": 0.1,
    "mild": 0.3,
    "medium": 0.5,
    "moderate": 0.5,
    "average": 0.5,
    "high": 0.75,
    "strong": 0.75,
    "veryhigh": 0.9,
    "severe": 0.9,
    "true": 1.0,
    "yes": 1.0,
}
_DIFFICULTY_WORDS = {"veryeasy": 1.0, "easy": 2.0, "medium": 3.0, "moderate": 3.0, "hard": 4.0, "difficult": 4.0}
_DIFFICULTY_WORDS["veryhard"] = 5.0
_DIFFICULTY_WORDS["verydifficult"] = 5.0

_ALIASES = {
    "difficulty": "difficulty",
    "difficultylevel": "difficulty",
    "difficultyscore": "difficulty",
    "segmentationdifficulty": "difficulty",
    "confidence": "confidence",
    "confidencescore": "confidence",
    "focus": "focus",
    "focusareas": "focus",
    "boundary": "boundary",
    "boundaries": "boundary",
    "edges": "boundary",
    "thinstructure": "thin_structure",
    "thinstructures": "thin_structure",
    "thinvessels": "thin_structure",
    "smallobjects": "small_objects",
    "smallobject": "small_objects",
    "clutter": "clutter",
    "backgroundclutter": "clutter",
}


class _Bare(str):
    """An unquoted word (number, identifier, percentage) as opposed to a quoted string."""


class _Obj(list):
    """A parsed object: a list of ``(key, value)`` pairs, so duplicate keys survive parsing."""


class _Missing:
    pass


_MISSING = _Missing()


def _norm_key(key: Any) -> str:
    return "".join(ch for ch in str(key).lower() if ch.isalnum())


def _unquote(tok: str) -> tuple[str, bool]:
    """Inner text of a quoted token and whether it was terminated."""
    quote = tok[0]
    closed = len(tok) >= 2 and tok.endswith(quote) and not tok.endswith("\\" + quote)
    inner = tok[1:-1] if closed else tok[1:]
    if "\\" in inner and len(inner) < 4096:
        cand = inner if quote == '"' else inner.replace("\\'", "'").replace('"', '\\"')
        try:
            inner = json.loads('"' + cand + '"')
        except ValueError:
            pass
    return inner, closed


class _Parser:
    """Lenient recursive-descent parser over a bounded token stream."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)
        self.tokens_left = _MAX_TOKENS
        self.notes: set[str] = set()

    def token(self, pos: int) -> tuple[str, str, int]:
        """(kind, value, end) of the next significant token at ``pos``; kind "eof" at the end."""
        while pos < self.n and self.tokens_left > 0:
            self.tokens_left -= 1
            m = _TOKEN.match(self.text, pos)
            if m is None:  # cannot happen ("junk" matches any char); guard anyway
                return "eof", "", self.n
            kind = m.lastgroup or "junk"
            if kind != "ws":
                return kind, m.group(), m.end()
            pos = m.end()
        return "eof", "", self.n

    def parse_object(self, pos: int, depth: int) -> tuple[_Obj, int]:
        """Parse after an opening ``{`` at ``pos``; returns the object and the position after it."""
        obj = _Obj()
        while True:
            kind, val, end = self.token(pos)
            if kind == "eof":
                self.notes.add("truncated")
                return obj, end
            if val == "}" and kind == "punct":
                return obj, end
            if kind == "punct" and val in ",]:=":
                pos = end
                continue
            if kind == "punct" and val in "{[":  # a value without a key: skip it
                _, pos = self.parse_value(pos, depth)
                continue
            if kind == "junk":
                pos = end
                continue
            # key: one or more words up to ':' / '='
            words = [_unquote(val)[0] if kind in ("dq", "sq") else val]
            pos = end
            kind, val, end = self.token(pos)
            while kind in ("bare", "dq", "sq") and len(words) < _MAX_KEY_WORDS:
                words.append(_unquote(val)[0] if kind in ("dq", "sq") else val)
                pos = end
                kind, val, end = self.token(pos)
            if not (kind == "punct" and val in ":="):
                continue  # stray words: not a key
            value, pos = self.parse_value(end, depth)
            if not isinstance(value, _Missing):
                obj.append((" ".join(words), value))

    def parse_array(self, pos: int, depth: int) -> tuple[list, int]:
        out: list = []
        while True:
            kind, val, end = self.token(pos)
            if kind == "eof":
                self.notes.add("truncated")
                return out, end
            if kind == "punct" and val == "]":
                return out, end
            if kind == "punct" and val in ",:=}":
                pos = end
                continue
            value, pos = self.parse_value(pos, depth)
            if not isinstance(value, _Missing):
                out.append(value)

    def skip_nested(self, pos: int) -> int:
        """Skip a too-deep container iteratively (bracket counting), returning the position after it."""
        level = 0
        while True:
            kind, val, end = self.token(pos)
            if kind == "eof":
                return end
            if kind == "punct" and val in "{[":
                level += 1
            elif kind == "punct" and val in "}]":
                level -= 1
                if level <= 0:
                    return end
            pos = end

    def parse_value(self, pos: int, depth: int) -> tuple[Any, int]:
        kind, val, end = self.token(pos)
        if kind == "eof":
            self.notes.add("truncated")
            return _MISSING, end
        if kind == "punct" and val in "{[":
            if depth >= _MAX_DEPTH:
                self.notes.add("nesting too deep (ignored)")
                return _MISSING, self.skip_nested(pos)
            if val == "{":
                return self.parse_object(end, depth + 1)
            return self.parse_array(end, depth + 1)
        if kind in ("dq", "sq"):
            inner, closed = _unquote(val)
            if not closed:
                self.notes.add("truncated")
                return _MISSING, end
            return inner, end
        if kind == "bare":
            if end >= self.n:  # a number cut by the end of the output may be incomplete ("0.8" -> "0.")
                self.notes.add("truncated")
                return _MISSING, end
            # words separated by spaces ("very high") stay one value when followed by a separator
            return _Bare(val), end
        return _MISSING, end  # punctuation where a value should be


def _to_float(value: Any, key: str, notes: list[str]) -> float | None:
    """A number in the field's native scale, or None when unusable."""
    if isinstance(value, bool) or value is None or isinstance(value, (_Obj, list)):
        return None
    s = str(value).strip().strip("\"'").strip()
    if not s:
        return None
    low = _norm_key(s)
    is_diff = key == "difficulty"
    if low in ("nan", "inf", "infinity", "null"):
        notes.append(f"{key}: non-finite/null")
        return None
    words = _DIFFICULTY_WORDS if is_diff else _WORDS
    if low in words:
        return words[low]
    m = _NUM.match(s)
    if m is None:
        return None
    try:
        v = float(m.group())
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(v):
        notes.append(f"{key}: non-finite")
        return None
    rest = s[m.end() :].strip()
    if rest.startswith("%"):
        v = v / 100.0
        return 1.0 + 4.0 * v if is_diff else v
    if is_diff and rest.startswith("/"):
        d = _NUM.match(rest[1:].strip())
        if d is not None:
            try:
                den = float(d.group())
            except ValueError:
                den = 0.0
            if math.isfinite(den) and den > 0 and den != 5.0:
                return 1.0 + 4.0 * (v / den)
        return v
    if not is_diff and 1.0 < v <= 100.0:  # "confidence": 85 means 85 %
        notes.append(f"{key}: read as percent")
        return v / 100.0
    return v


def _score(obj: _Obj) -> int:
    n = 0
    for k, v in obj:
        name = _ALIASES.get(_norm_key(k))
        if name == "focus" and isinstance(v, _Obj):
            n += sum(1 for fk, _ in v if _ALIASES.get(_norm_key(fk)) in FOCUS_KEYS)
        elif name is not None and name != "focus":
            n += 1
    return n


def _best_object(obj: _Obj, budget: list[int]) -> tuple[_Obj, int]:
    """The (nested) object with the most recognised fields, breadth first, bounded."""
    best, best_score = obj, _score(obj)
    queue = [obj]
    while queue and budget[0] > 0:
        cur = queue.pop(0)
        budget[0] -= 1
        for _, v in cur:
            if isinstance(v, _Obj):
                s = _score(v)
                if s > best_score:
                    best, best_score = v, s
                queue.append(v)
            elif isinstance(v, list):
                queue.extend(x for x in v[:8] if isinstance(x, _Obj))
    return best, best_score


def _extract(obj: _Obj, source: str, notes: list[str]) -> VLMProfile | None:
    values: dict[str, float] = {}
    seen: dict[str, int] = {}

    def take(name: str, raw: Any) -> None:
        seen[name] = seen.get(name, 0) + 1
        n_notes = len(notes)
        v = _to_float(raw, name, notes)
        if v is None:
            if len(notes) == n_notes:
                notes.append(f"{name}: unusable value")
            return
        values[name] = v  # last valid value wins (like json.loads for duplicates)

    for k, v in obj:
        name = _ALIASES.get(_norm_key(k))
        if name is None:
            continue
        if name == "focus":
            if isinstance(v, _Obj):
                for fk, fv in v:
                    fname = _ALIASES.get(_norm_key(fk))
                    if fname in FOCUS_KEYS:
                        take(fname, fv)
            elif isinstance(v, list):  # a list of focus areas: listed ones high, others low
                listed = {_ALIASES.get(_norm_key(x)) for x in v if isinstance(x, str)}
                if listed & set(FOCUS_KEYS):
                    notes.append("focus given as a list")
                    for fk in FOCUS_KEYS:
                        values.setdefault(fk, 0.75 if fk in listed else 0.25)
            continue
        take(name, v)
    dup = sorted(n for n, c in seen.items() if c > 1)
    if dup:
        notes.append("duplicate keys: " + ", ".join(dup))
    if not values:
        return None
    clamped = []
    for name, v in values.items():
        lo, hi = (1.0, 5.0) if name == "difficulty" else (0.0, 1.0)
        if not lo <= v <= hi:
            clamped.append(name)
    if clamped:
        notes.append("clamped: " + ", ".join(sorted(clamped)))
    missing = [n for n in ("difficulty", "confidence", *FOCUS_KEYS) if n not in values]
    if missing:
        notes.append("filled with defaults: " + ", ".join(missing))
    focus = {k: values.get(k, DEFAULT_PROFILE.focus[k]) for k in FOCUS_KEYS}
    return VLMProfile(
        difficulty=values.get("difficulty", DEFAULT_PROFILE.difficulty),
        confidence=values.get("confidence", DEFAULT_PROFILE.confidence),
        focus=focus,
        source=source,
        reason="; ".join(dict.fromkeys(notes)),
    )


def parse_profile(text: Any, source: str = "vlm") -> VLMProfile:
    """Parse a profiler's output into a valid, in-range :class:`VLMProfile`; never raises.

    Args:
        text: the model output (``str``; ``bytes`` are decoded as UTF-8, anything else gives a fallback).
        source: the profiler name recorded in ``VLMProfile.source`` for a successful parse.

    Returns:
        the parsed profile (clamped / filled, with the repairs listed in ``reason``), or
        ``DEFAULT_PROFILE.as_fallback(reason)`` when the text holds no usable profile.
    """
    try:
        return _parse(text, source)
    except Exception as e:  # never raise on model output; the reason keeps the evidence
        return DEFAULT_PROFILE.as_fallback(f"parser error: {type(e).__name__}: {e}"[:200])


def _parse(text: Any, source: str) -> VLMProfile:
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text[: 4 * MAX_SCAN_CHARS]).decode("utf-8", errors="replace")
    if not isinstance(text, str):
        return DEFAULT_PROFILE.as_fallback(f"no text output (got {type(text).__name__})")
    if not text.strip():
        return DEFAULT_PROFILE.as_fallback("empty output")
    start = text.find("{")  # C-speed search over the whole input; the scan itself is capped
    if start < 0:
        return DEFAULT_PROFILE.as_fallback("no JSON object in output")
    window = text[start : start + MAX_SCAN_CHARS]
    capped = len(text) - start > MAX_SCAN_CHARS
    parser = _Parser(window)
    best: _Obj | None = None
    best_score = 0
    pos = 0
    budget = [256]
    for _ in range(_MAX_CANDIDATES):
        pos = window.find("{", pos)
        if pos < 0 or parser.tokens_left <= 0:
            break
        obj, end = parser.parse_object(pos + 1, 1)
        cand, score = _best_object(obj, budget)
        if score > best_score:
            best, best_score = cand, score
        if score >= 2 + len(FOCUS_KEYS):
            break
        pos = max(end, pos + 1)
    if best is None:
        return DEFAULT_PROFILE.as_fallback("no profile fields in output")
    notes = []
    if "truncated" in parser.notes:
        notes.append("output truncated")
    if capped:
        notes.append(f"input longer than {MAX_SCAN_CHARS} chars: scanned the start only")
    notes.extend(sorted(n for n in parser.notes if n != "truncated"))
    prof = _extract(best, source, notes)
    if prof is None:
        return DEFAULT_PROFILE.as_fallback("no usable profile values: " + "; ".join(notes)[:300])
    return prof
