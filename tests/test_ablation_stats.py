"""Statistics of the ablation on constructed data with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from monai_vlmfilm.ablation.stats import (
    TERCILE_NAMES,
    analyse,
    bootstrap_ci,
    difficulty_terciles,
    mode_summary,
    paired_by_image,
    paired_difference,
    t_interval,
    verdicts,
)


def test_intervals_cover_the_true_mean_at_about_95_percent():
    # 400 experiments of 30 pairs each with true mean difference 0.5: both intervals must cover it ~95% of the time
    rng = np.random.default_rng(1)
    true = 0.5
    cover_boot = cover_t = 0
    n_exp = 400
    for e in range(n_exp):
        d = true + rng.normal(0, 1.0, 30)
        lo, hi = bootstrap_ci(d, n_boot=1000, seed=e)
        cover_boot += lo <= true <= hi
        lo, hi = t_interval(d)
        cover_t += lo <= true <= hi
    # binomial sd at p=0.95, n=400 is 1.1 points; the percentile bootstrap runs slightly narrow at n=30
    assert 0.90 <= cover_t / n_exp <= 0.985
    assert 0.88 <= cover_boot / n_exp <= 0.985


def test_t_interval_matches_textbook_formula():
    d = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    lo, hi = t_interval(d)
    half = 2.7764451051977987 * np.std(d, ddof=1) / math.sqrt(5)  # t_{0.975, 4}
    assert lo == pytest.approx(3.0 - half)
    assert hi == pytest.approx(3.0 + half)


def test_paired_difference_edge_cases():
    p = paired_difference([])
    assert p.n == 0 and math.isnan(p.mean)
    p = paired_difference([0.2, 0.2, 0.2, float("nan"), float("inf")])
    assert p.n == 3 and p.mean == pytest.approx(0.2)
    assert (p.ci_lo, p.ci_hi) == pytest.approx((0.2, 0.2))
    assert p.excludes_zero
    assert math.isnan(paired_difference([1.0]).ci_lo)


def test_terciles_by_rank_with_ties_and_order():
    d = [5, 1, 3, 3, 3, 2, 4, 1, 5]
    t = difficulty_terciles(d)
    assert sorted(np.bincount(t).tolist()) == [3, 3, 3]
    # every image of a higher tercile is at least as hard as every image of a lower one
    for a in range(3):
        for b in range(a + 1, 3):
            assert max(np.asarray(d)[t == a]) <= min(np.asarray(d)[t == b])
    assert t[1] == 0 and t[0] == 2 and t[8] == 2
    assert np.bincount(difficulty_terciles(np.arange(10.0))).tolist() == [4, 3, 3]
    with pytest.raises(ValueError, match="finite"):
        difficulty_terciles([1.0, float("nan")])


def _records(gain_hard: float, n_img: int = 60, seeds=(0, 1, 2), noise: float = 0.002):
    """off vs on, on gains only on the hardest third; seed effects shared by both modes of one seed."""
    rng = np.random.default_rng(0)
    diff = np.linspace(1, 5, n_img)
    recs = []
    for s in seeds:
        seed_shift = 0.01 * s
        for mode in ("off", "on", "shuffle"):
            for i in range(n_img):
                base = 0.9 - 0.05 * diff[i] + seed_shift
                gain = gain_hard if (mode == "on" and i >= 2 * n_img // 3) else 0.0
                recs.append(
                    {
                        "mode": mode,
                        "seed": s,
                        "fold": None,
                        "image": f"i{i:03d}",
                        "difficulty": float(diff[i]),
                        "dice": base + gain + rng.normal(0, noise),
                        "betti1_error": 2.0 + (1.0 if mode == "on" else 0.0),
                    }
                )
    return recs


def test_mode_summary_is_mean_of_seed_means_with_std_across_seeds():
    recs = _records(0.0, noise=0.0)
    s = mode_summary(recs, "off", "dice")
    per_seed = [0.9 - 0.05 * np.mean(np.linspace(1, 5, 60)) + 0.01 * k for k in range(3)]
    assert s["mean"] == pytest.approx(np.mean(per_seed))
    assert s["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert s["n_seeds"] == 3 and s["n_images"] == 60 and s["incomplete_seeds"] == []
    # a seed cut short (half its images) is left out of the table instead of skewing it
    cut = [r for r in recs if not (r["seed"] == 2 and int(r["image"][1:]) >= 30)]
    s2 = mode_summary(cut, "off", "dice")
    assert s2["n_seeds"] == 2 and s2["incomplete_seeds"] == [2]
    assert s2["mean"] == pytest.approx(np.mean(per_seed[:2]))


def test_pairing_is_by_seed_and_image():
    recs = _records(0.03, noise=0.0)
    images, d = paired_by_image(recs, "on", "off", "dice")
    assert len(images) == 60
    # seed shifts cancel in a paired difference: exactly 0 on easy images, exactly the gain on hard ones
    assert np.allclose(d[:40], 0.0, atol=1e-12) and np.allclose(d[40:], 0.03)


def test_analyse_and_verdicts_on_known_effects():
    an = analyse(_records(0.045), ["off", "on", "shuffle"], n_boot=2000)
    on = an["paired"]["on"]
    assert on["overall"]["dice"]["mean"] == pytest.approx(0.015, abs=0.001)  # a third of the images gain 4.5 pt
    assert on["hardest"]["dice"]["mean"] == pytest.approx(0.045, abs=0.001)
    assert on["easiest"]["dice"]["ci_lo"] < 0 < on["easiest"]["dice"]["ci_hi"]
    assert on["hardest"]["dice"]["n"] == 20
    assert "on-vs-shuffle" in an["paired"]
    assert [b[2] for b in an["tercile_bounds"]] == [20, 20, 20]
    v = {x["name"]: x for x in verdicts(an)}
    overall = next(x for n, x in v.items() if n.startswith("on − off") and "overall" in n)
    hardest = next(x for n, x in v.items() if n.startswith("on − off") and "hardest" in n)
    assert overall["met"] is True and "MET" in overall["text"]
    assert hardest["met"] is True
    betti1 = next(x for n, x in v.items() if "Betti-1" in n)
    assert betti1["met"] is False and "NOT MET" in betti1["text"]  # on has one more Betti-1 error everywhere
    shuffle = next(x for n, x in v.items() if n.startswith("shuffle"))
    assert shuffle["met"] is True

    # a gain below the target is NOT MET, even when it is significant
    an_small = analyse(_records(0.015), ["off", "on"], n_boot=2000)
    v_small = verdicts(an_small)
    overall = next(x for x in v_small if x["name"].startswith("on − off") and "overall" in x["name"])
    assert overall["met"] is False and "NOT MET" in overall["text"]
    assert set(TERCILE_NAMES) <= set(an_small["paired"]["on"])


def test_verdicts_without_data_say_so():
    recs = [r for r in _records(0.03) if r["mode"] == "off"]
    an = analyse(
        recs + [{"mode": "on", "seed": 9, "fold": None, "image": "zz", "difficulty": 1.0, "dice": 0.5}],
        ["off", "on"],
        n_boot=100,
    )
    v = verdicts(an)
    assert v and all(x["met"] is None and "NO DATA" in x["text"] for x in v if x["name"].startswith("on − off"))


def test_variant_modes_get_their_own_comparisons_and_verdicts():
    """``on.v`` / ``shuffle.v`` are compared with off and with each other, and judged like the plain modes."""
    recs = []
    for r in _records(0.045):
        recs.append(r)
        if r["mode"] in ("on", "shuffle"):
            recs.append({**r, "mode": r["mode"] + ".v"})
    an = analyse(recs, ["off", "on", "shuffle", "on.v", "shuffle.v"], n_boot=1000)
    assert {"on", "shuffle", "on.v", "shuffle.v", "on-vs-shuffle", "on.v-vs-shuffle.v"} <= set(an["paired"])
    assert an["paired"]["on.v-vs-shuffle.v"]["hardest"]["dice"]["mean"] == pytest.approx(0.045, abs=0.001)
    names = [x["name"] for x in verdicts(an)]
    assert any(n.startswith("on.v − off Dice") for n in names)
    assert any(n.startswith("shuffle.v within noise") for n in names)
    assert any("on.v − shuffle.v" in n for n in names)


def test_extra_comparisons_between_variants_are_reported_not_judged():
    """``--compare on.enc:on.norm``: a variant against another variant, paired over the same seeds and images; it is
    tabulated, and no on − shuffle verdict is drawn from it."""
    recs = []
    for r in _records(0.045):
        if r["mode"] == "on":
            recs += [{**r, "mode": "on.norm"}, {**r, "mode": "on.enc", "dice": r["dice"] + 0.01}]
        recs.append(r)
    modes = ["off", "on", "shuffle", "on.norm", "on.enc"]
    an = analyse(recs, modes, n_boot=1000, compare=[["on.enc", "on.norm"], ["on.enc", "missing"]])
    assert "on.enc-vs-on.norm" in an["paired"] and not any("missing" in k for k in an["paired"])
    d = an["paired"]["on.enc-vs-on.norm"]["overall"]["dice"]
    assert d["mean"] == pytest.approx(0.01) and d["ci_lo"] == pytest.approx(0.01)
    names = [x["name"] for x in verdicts(an)]
    assert any("on − shuffle" in n for n in names) and not any("on.enc − on.norm" in n for n in names)


def _run(gain: float, shift: float = 0.0, difficulty_offset: float = 0.0) -> dict:
    """An ablation results.json: 4 images x 2 seeds, on = off + gain (+ 0.01 * image index on seed 1)."""
    recs = []
    for sd in (0, 1):
        for i in range(4):
            base = {"seed": sd, "fold": None, "image": f"img{i}", "difficulty": 1.0 + i + difficulty_offset}
            off = 0.5 + 0.05 * i + shift
            recs.append({**base, "mode": "off", "dice": off, "betti0_error": 1.0})
            recs.append({**base, "mode": "on", "dice": off + gain + 0.01 * i * sd, "betti0_error": 2.0})
    return {"records": recs}


def test_compare_runs_differences_of_differences(tmp_path):
    from monai_vlmfilm.ablation.compare_runs import compare_runs, main

    a, b = _run(0.03), _run(0.01, shift=0.2)
    rows = compare_runs(a, b, [("on", "off")], ["dice", "betti0_error"])
    dice = next(r for r in rows if r["metric"] == "dice")
    # run a: +3 points, and 1 point per image index more on seed 1 (halved by the seed average)
    expected_a = np.mean([100 * (0.03 + 0.01 * i * 0.5) for i in range(4)])
    assert dice["a"]["mean"] == pytest.approx(expected_a) and dice["b"]["mean"] == pytest.approx(expected_a - 2.0)
    assert dice["a_minus_b"]["mean"] == pytest.approx(2.0) and dice["a_minus_b"]["n"] == 4
    assert dice["a"]["per_seed"] == pytest.approx({"0": 3.0, "1": 3.0 + 1.5})
    assert next(r for r in rows if r["metric"] == "betti0_error")["a_minus_b"]["mean"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="different difficulties"):
        compare_runs(a, _run(0.01, difficulty_offset=0.5), [("on", "off")])
    with pytest.raises(ValueError, match="no \\['shuffle'\\] records"):
        compare_runs(a, b, [("on", "shuffle")])
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    out = tmp_path / "cmp.md"
    assert main([str(pa), str(pb), "--labels", "32 px,64 px", "--metrics", "dice", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| on - off | dice | 4 |" in text and "32 px − 64 px" in text and "+2.00" in text
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["a_minus_b"]["mean"] == pytest.approx(2.0)
    with pytest.raises(SystemExit):
        main([str(pa), str(tmp_path / "missing.json")])
    # --seeds keeps those seeds of both runs: seed 1 alone has run a's per-image extra gain
    assert main([str(pa), str(pb), "--metrics", "dice", "--seeds", "1", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["a"]["mean"] == pytest.approx(4.5)


def test_seeds_in_common_pairs_only_the_seeds_both_models_ran_on_every_shared_image():
    from monai_vlmfilm.ablation.stats import seeds_in_common

    three = {"a": {0: 0.7, 1: 0.8, 2: 0.9}, "b": {0: 0.6, 1: 0.5, 2: 0.4}, "only_here": {5: 0.1}}
    one = {"a": {0: 0.7}, "b": [0, 2]}  # any container of seeds
    assert seeds_in_common(three, one) == [0]  # "b" has 0 and 2 here, "a" only 0; "only_here" is not shared
    assert seeds_in_common(three, {"a": [2, 1], "b": {1: 0, 2: 0}}) == [1, 2]
    assert seeds_in_common(three, {"x": [0]}) == []  # no image in common: nothing to pair
    assert seeds_in_common(three, {"a": [3]}) == []
    assert seeds_in_common() == []
