"""VLMProfile: ranges, JSON round trip, vector layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monai_vlmfilm.profiles import DEFAULT_PROFILE, FALLBACK_INDEX, FOCUS_KEYS, PROFILE_DIM, VECTOR_FIELDS, VLMProfile


def test_vector_layout():
    p = VLMProfile(5.0, 0.25, {"boundary": 0.1, "thin_structure": 0.2, "small_objects": 0.3, "clutter": 0.4}, "x")
    v = p.to_vector()
    assert v.dtype == np.float32 and v.shape == (PROFILE_DIM,) and PROFILE_DIM == 7
    np.testing.assert_allclose(v, [1.0, 0.25, 0.1, 0.2, 0.3, 0.4, 0.0])
    assert VECTOR_FIELDS[0] == "difficulty" and FALLBACK_INDEX == 6
    fb = p.as_fallback("why")
    assert fb.is_fallback and fb.reason == "why" and fb.to_vector()[FALLBACK_INDEX] == 1.0
    assert DEFAULT_PROFILE.to_vector()[0] == pytest.approx(0.5)


def test_construction_clamps_and_fills():
    p = VLMProfile(difficulty=9, confidence=float("nan"), focus={"boundary": -3, "extra": 5})
    assert p.difficulty == 5.0 and p.confidence == 0.5
    assert set(p.focus) == set(FOCUS_KEYS) and p.focus["boundary"] == 0.0 and p.focus["clutter"] == 0.5


def test_json_round_trip_and_strict_reader():
    p = VLMProfile(
        2.5, 0.7, {"boundary": 0.1, "thin_structure": 0.9, "small_objects": 0.0, "clutter": 1.0}, "heuristic"
    )
    q = VLMProfile.from_json(p.to_json())
    assert q == p
    seed = json.loads(p.to_json())
    assert set(seed) >= {"difficulty", "confidence", "focus"}
    bad = dict(seed, difficulty=7)
    with pytest.raises(ValueError, match="difficulty"):
        VLMProfile.from_json_dict(bad)
    with pytest.raises(ValueError, match="focus"):
        VLMProfile.from_json_dict(dict(seed, focus={"boundary": 0.5}))
