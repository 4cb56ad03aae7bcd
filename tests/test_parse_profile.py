"""parse_profile: a table of damaged model outputs, a seeded fuzz, and a bound on worst-case time."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from monai_vlmfilm.profiles import DEFAULT_PROFILE, FOCUS_KEYS, VLMProfile, parse_profile

CLEAN = {
    "difficulty": 4,
    "confidence": 0.8,
    "focus": {"boundary": 0.2, "thin_structure": 0.9, "small_objects": 0.1, "clutter": 0.3},
}
CLEAN_JSON = json.dumps(CLEAN)
EXPECT = (4.0, 0.8, 0.2, 0.9, 0.1, 0.3)


def _vals(p: VLMProfile) -> tuple[float, ...]:
    return (p.difficulty, p.confidence, *(p.focus[k] for k in FOCUS_KEYS))


def _in_range(p: VLMProfile) -> bool:
    v = p.to_vector()
    return bool(np.isfinite(v).all() and (v >= 0).all() and (v <= 1).all()) and set(p.focus) == set(FOCUS_KEYS)


# text, expected (difficulty, confidence, boundary, thin, small, clutter) or None for fallback, reason substring
TABLE = [
    (CLEAN_JSON, EXPECT, ""),
    ("```json\n" + CLEAN_JSON + "\n```", EXPECT, ""),
    ("Sure! Here is the profile you asked for:\n" + CLEAN_JSON + "\nLet me know if you need more.", EXPECT, ""),
    (CLEAN_JSON.replace('"', "'"), EXPECT, ""),
    (CLEAN_JSON[:-2] + ",},}", EXPECT, ""),
    (
        '{"difficulty": 4, // how hard\n "confidence": 0.8, /* block */ "focus": {"boundary": 0.2, # hash\n'
        '"thin_structure": 0.9, "small_objects": 0.1, "clutter": 0.3}}',
        EXPECT,
        "",
    ),
    (
        '{"difficulty": "4", "confidence": "0.8", "focus": {"boundary": "0.2", "thin_structure": "0.9", '
        '"small_objects": "0.1", "clutter": "0.3"}}',
        EXPECT,
        "",
    ),
    (
        '{"difficulty": 4, "confidence": "80%", "focus": {"boundary": "20%", "thin_structure": "90 %", '
        '"small_objects": "10%", "clutter": "30%"}}',
        EXPECT,
        "",
    ),
    (
        "{difficulty: 4, confidence: 0.8, focus: {boundary: 0.2, thin_structure: 0.9, small_objects: 0.1, clutter: 0.3}}",
        EXPECT,
        "",
    ),
    (
        '{"Difficulty": 4, "Confidence": 0.8, "Focus": {"Boundary": 0.2, "thin structure": 0.9, "small-objects": 0.1, '
        '"Clutter": 0.3}, "notes": "extra field", "extra": [1, 2, {"x": null}]}',
        EXPECT,
        "",
    ),
    (
        '{"difficulty": 9, "confidence": 1.7e3, "focus": {"boundary": -0.5, "thin_structure": 0.9, "small_objects": 0.1,'
        ' "clutter": 0.3}}',
        (5.0, 1.0, 0.0, 0.9, 0.1, 0.3),
        "clamped",
    ),
    ('{"difficulty": 4, "confidence": 0.8}', (4.0, 0.8, 0.5, 0.5, 0.5, 0.5), "filled with defaults"),
    (
        '{"difficulty": 4, "confidence": 0.8, "focus": {"boundary": 0.2, "thin_str',
        (4.0, 0.8, 0.2, 0.5, 0.5, 0.5),
        "truncated",
    ),
    ('{"difficulty": 4, "confidence": 0.8, "focus": {"boundary": 0.', (4.0, 0.8, 0.5, 0.5, 0.5, 0.5), "truncated"),
    (
        '{"difficulty": NaN, "confidence": Infinity, "focus": {"boundary": -Infinity, "thin_structure": 0.9, '
        '"small_objects": 0.1, "clutter": 0.3}}',
        (3.0, 0.5, 0.5, 0.9, 0.1, 0.3),
        "non-finite",
    ),
    (
        '{"difficulty": 1e999, "confidence": 0.8, "focus": {"boundary": 0.2, "thin_structure": 0.9, '
        '"small_objects": 0.1, "clutter": 0.3}}',
        (3.0, 0.8, 0.2, 0.9, 0.1, 0.3),
        "difficulty",
    ),
    (
        '{"difficulty": 2, "difficulty": 4, "confidence": 0.8, "focus": {"boundary": 0.2, "thin_structure": 0.9, '
        '"small_objects": 0.1, "clutter": 0.3}}',
        EXPECT,
        "duplicate",
    ),
    (
        '{"profile": {"difficulty": 4, "confidence": 0.8, "focus": {"boundary": 0.2, "thin_structure": 0.9, '
        '"small_objects": 0.1, "clutter": 0.3}}}',
        EXPECT,
        "",
    ),
    (
        '{"difficulty": "hard", "confidence": "high", "focus": {"boundary": "low", "thin_structure": "high", '
        '"small_objects": "none", "clutter": "medium"}}',
        (4.0, 0.75, 0.25, 0.75, 0.0, 0.5),
        "",
    ),
    (
        '{"difficulty": "4/5", "confidence": 80, "focus": {"boundary": 0.2, "thin_structure": 0.9, '
        '"small_objects": 0.1, "clutter": 0.3}}',
        EXPECT,
        "percent",
    ),
    ('I think the image is hard. {"note": 1} and then ' + CLEAN_JSON, EXPECT, ""),
    (
        '[{"difficulty": 4, "confidence": 0.8, "focus": {"boundary": 0.2, "thin_structure": 0.9, '
        '"small_objects": 0.1, "clutter": 0.3}}]',
        EXPECT,
        "",
    ),
    ("", None, "empty"),
    ("   \n ", None, "empty"),
    ("The vessels are clearly visible and the difficulty is moderate.", None, "no JSON"),
    ("{}", None, "no profile fields"),
    ('{"foo": 1, "bar": {"baz": 2}}', None, "no profile fields"),
    ('{"difficulty": null, "confidence": "n/a"}', None, "no usable"),
    ("{" * 5000, None, ""),
    ("}}}}{{{{]]]:::,,,", None, ""),
    (None, None, "no text"),
    (b'{"difficulty": 4, "confidence": 0.8}', (4.0, 0.8, 0.5, 0.5, 0.5, 0.5), "filled"),
    (12345, None, "no text"),
]


@pytest.mark.parametrize("text, expected, reason", TABLE, ids=[f"case{i}" for i in range(len(TABLE))])
def test_damaged_outputs(text, expected, reason):
    p = parse_profile(text, source="qwen2_5_vl")
    assert _in_range(p)
    if expected is None:
        assert p.is_fallback and p.reason, p
        assert _vals(p) == _vals(DEFAULT_PROFILE)
    else:
        assert not p.is_fallback and p.source == "qwen2_5_vl", p
        np.testing.assert_allclose(_vals(p), expected, atol=1e-9)
    assert reason.lower() in p.reason.lower(), (p.reason, reason)


def test_clean_output_has_no_reason():
    assert parse_profile(CLEAN_JSON).reason == ""


def _damage(rng: random.Random) -> str:
    base = rng.choice(
        [
            CLEAN_JSON,
            CLEAN_JSON.replace('"', "'"),
            "```json\n" + json.dumps(CLEAN, indent=2) + "\n```",
            "Answer: " + CLEAN_JSON + " done",
        ]
    )
    op = rng.randrange(9)
    if op == 0:  # truncation
        return base[: rng.randrange(len(base) + 1)]
    if op == 1:  # random bytes spliced in
        i = rng.randrange(len(base) + 1)
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))).decode("latin-1")
        return base[:i] + junk + base[i:]
    if op == 2:  # unicode noise
        return "".join(c if rng.random() > 0.1 else chr(rng.randrange(0x20, 0x2FFF)) for c in base)
    if op == 3:  # nested junk
        d = rng.randrange(1, 60)
        return "[" * d + "{" * rng.randrange(d) + base + "}" * rng.randrange(d)
    if op == 4:  # huge / non-finite numbers
        v = rng.choice(["1e309", "-1e309", "NaN", "Infinity", "-Infinity", "9" * 500, "0x1F", "1e-400", '""', "true"])
        return base.replace("0.8", v).replace("4", v, rng.randrange(2))
    if op == 5:  # duplicate keys
        return base.replace('"confidence": 0.8', '"confidence": 0.8, "confidence": 0.1, "confidence": "x"')
    if op == 6:  # character deletions
        return "".join(c for c in base if rng.random() > 0.08)
    if op == 7:  # swapped punctuation
        table = str.maketrans({":": "=", ",": ";", "{": "(", "}": ")"})
        return "".join(c.translate(table) if rng.random() < 0.2 else c for c in base)
    return "".join(rng.choice("{}[]:,\"'0123456789.-eE%abc \n/*#") for _ in range(rng.randrange(200)))


def test_seeded_fuzz_never_raises_and_stays_in_range():
    rng = random.Random(1234)
    n_fallback = 0
    for _ in range(3000):
        text = _damage(rng)
        p = parse_profile(text)
        assert _in_range(p), (text, p)
        assert isinstance(p.reason, str)
        n_fallback += p.is_fallback
    # clean-ish bases dominate: most damaged outputs must still give a (partial) profile
    assert 0 < n_fallback < 2000


@pytest.mark.parametrize(
    "big",
    [
        "{" * 1_000_000,
        "[" * 1_000_000,
        "a" * 1_000_000,
        '{"a": "' + "x" * 1_000_000,
        '{"difficulty": ' + "9" * 1_000_000 + "}",
        "{" + '"a": 1, ' * 130_000,
        "{" + "/*" * 500_000,
        "{'" * 500_000,
        '{"' + "\\" * 1_000_000,
        '{"difficulty": 3' + " " * 1_000_000,
    ],
    ids=[
        "braces",
        "brackets",
        "letters",
        "long-string",
        "long-number",
        "many-keys",
        "comments",
        "quotes",
        "backslashes",
        "spaces",
    ],
)
@pytest.mark.timeout(60)  # catastrophic regex backtracking would never finish; speed itself is not asserted here
def test_one_megabyte_inputs_parse(big):
    assert _in_range(parse_profile(big))


def test_profile_values_are_finite_floats():
    p = parse_profile('{"difficulty": "3.5", "confidence": ".25"}')
    assert p.difficulty == 3.5 and p.confidence == 0.25
    assert all(isinstance(v, float) and math.isfinite(v) for v in p.to_vector().tolist())
