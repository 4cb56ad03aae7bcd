"""The recipe modifiers and profile controls of ``benchmarks/flow_vs_unet.py`` (issue 14's cross-site study)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import flow_vs_unet as fvu  # noqa: E402


def _bar_site(width: int = 8, size: int = 512) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One image with a full-height vertical vessel of ``width`` pixels, dark on a background with a vertical
    gradient (no crop is constant)."""
    mask = torch.zeros(size, size)
    mask[:, size // 2 - width // 2 : size // 2 + width // 2] = 1
    ramp = torch.linspace(0, 0.15, size)[:, None]
    return [0.8 - 0.6 * mask + ramp], [mask]


@pytest.mark.parametrize("scale, expected_width", [(0.5, 4.0), (2.0, 16.0)])
def test_zoom_makes_vessels_scale_times_as_wide_in_about_half_the_crops(scale, expected_width):
    images, masks = _bar_site()
    aug = fvu.GPUAugment(images, masks, crop=128, seed=0, pos_prob=1.0, zoom=(scale, scale))
    _, y = aug(np.zeros(256, dtype=int))
    assert set(y.unique().tolist()) <= {0.0, 1.0} and y.shape == (256, 1, 128, 128)
    # a straight bar through the crop: its width is the mask area over the crop side (rot90 keeps it; the affine
    # part, p 0.3, rotates by up to 15 deg and scales by up to 15 %)
    width = y.sum((1, 2, 3)) / 128
    zoomed = ((width - expected_width).abs() < 0.3 * expected_width).float().mean()
    plain = ((width - 8.0).abs() < 0.2 * 8.0).float().mean()
    assert 0.3 < float(zoomed) < 0.7 and 0.3 < float(plain) < 0.7 and float(zoomed + plain) > 0.9


def test_wide_intensity_and_zscore():
    images, masks = _bar_site()
    rows = np.zeros(64, dtype=int)
    plain, _ = fvu.GPUAugment(images, masks, crop=64, seed=1)(rows)
    wide, _ = fvu.GPUAugment(images, masks, crop=64, seed=1, intensity=True)(rows)
    assert float(wide.mean((1, 2, 3)).std()) > 1.5 * float(plain.mean((1, 2, 3)).std())  # a wider spread of levels
    z, _ = fvu.GPUAugment(images, masks, crop=64, seed=1, znorm=True)(rows)
    torch.testing.assert_close(z.mean((2, 3)), torch.zeros(64, 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std((2, 3)), torch.ones(64, 1), atol=1e-3, rtol=0)
    # an affine change of the intensities leaves the z-scored image as it was: BasicUNet's instance norm property
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(fvu.zscore_channels(0.5 * x + 0.2), fvu.zscore_channels(x), atol=1e-5, rtol=0)


def test_model_names_carry_recipe_modifiers():
    net, info = fvu.build_model("unet+zi", profile_dim=8)
    assert info["kind"] == "unet" and info["aug"] == {"zoom": (0.5, 1.8), "intensity": True}
    net, info = fvu.build_model("flow-s+n:off", profile_dim=8)
    # the flow network normalises inside itself (the bundle's image_norm), not in the augmentation
    assert info["kind"] == "flow" and info["mode"] == "off" and info["aug"] == {} and info["image_norm"] is True
    assert not net.use_vlm_film and net.image_norm
    assert fvu.build_model("unet+n", profile_dim=8)[1]["aug"] == {"znorm": True}
    assert fvu.build_model("flow-s", profile_dim=8)[1]["aug"] == {}
    with pytest.raises(ValueError, match="unknown recipe modifier"):
        fvu.build_model("unet+q", profile_dim=8)
    # d: condition dropout, a network argument of the flow model; the UNet has no profile to drop
    net, info = fvu.build_model("flow-s+nd", profile_dim=8)
    assert net.profile_dropout == 0.5 and net.image_norm and info["aug"] == {} and info["profile_dropout"] == 0.5
    with pytest.raises(ValueError, match="no profile"):
        fvu.build_model("unet+d", profile_dim=8)
    # j: profile jitter, likewise a network argument
    net, info = fvu.build_model("flow-s+nj", profile_dim=8)
    assert (
        net.profile_noise == 0.5 and net.profile_dropout == 0.0 and info["aug"] == {} and info["profile_noise"] == 0.5
    )
    with pytest.raises(ValueError, match="no profile"):
        fvu.build_model("unet+j", profile_dim=8)
    # g: no difficulty gate (the gate's parameters are gone from the network); the bundle's default keeps it
    gated, info = fvu.build_model("flow-s+n", profile_dim=8)
    ungated, info_g = fvu.build_model("flow-s+ng", profile_dim=8)
    assert gated.use_difficulty_gate and info["use_difficulty_gate"] and not info_g["use_difficulty_gate"]
    assert not ungated.use_difficulty_gate and ungated.image_norm and info_g["aug"] == {}
    assert set(ungated.state_dict()) < set(gated.state_dict())  # a proper subset: only the gate's entries go
    with pytest.raises(ValueError, match="no profile"):
        fvu.build_model("unet+g", profile_dim=8)
    # u: raw profile features (the training images' z-scoring is skipped); e: FiLM on every encoder block as well
    _, info = fvu.build_model("flow-s+n", profile_dim=8)
    raw, info_u = fvu.build_model("flow-s+nu", profile_dim=8)
    p_train = np.arange(24, dtype=np.float32).reshape(3, 8)
    mean, std = fvu.profile_normalization(info, p_train)
    np.testing.assert_allclose(mean, p_train.mean(0))
    np.testing.assert_allclose(std, p_train.std(0))
    assert fvu.profile_normalization(info_u, p_train) is None and info_u["aug"] == {} and raw.image_norm
    enc, info_e = fvu.build_model("flow-s+ne", profile_dim=8)
    assert enc.film_encoder_stages == (0, 1, 2) and info_e["film_encoder_stages"] == [0, 1, 2]
    assert set(gated.state_dict()) < set(enc.state_dict())  # the decoder's FiLM stays; encoder heads are added
    off_enc = fvu.build_model("flow-s+ne:off", profile_dim=8)[0]
    assert not any(k.startswith("film_encoder_heads") for k in off_enc.state_dict())  # off: no FiLM anywhere
    for mod in ("u", "e"):
        with pytest.raises(ValueError, match="no profile"):
            fvu.build_model(f"unet+{mod}", profile_dim=8)
    # each modifier of a combination is compared with the combination without it
    assert fvu.modifier_refs("flow-m-ep1+nd:off") == ["flow-m-ep1+d:off", "flow-m-ep1+n:off"]
    assert fvu.modifier_refs("flow-m-ep1+nd") == ["flow-m-ep1+d", "flow-m-ep1+n"]
    assert fvu.modifier_refs("flow-m+n") == []
    # FiLM with a FiLM-only modifier (jitter, dropout, encoder FiLM, ...) is compared with the FiLM-off run it shares
    assert fvu.off_twin("flow-m-ep1+nj") == "flow-m-ep1+n:off" and fvu.off_twin("flow-m+dj") == "flow-m:off"
    assert fvu.off_twin("flow-m+n") == "flow-m+n:off" and fvu.off_twin("flow-m") == "flow-m:off"
    assert fvu.off_twin("flow-m-ep1+nep") == "flow-m-ep1+np:off"  # encoder FiLM goes, the prior input stays


def test_within_site_permutation_keeps_site_information_only():
    items = [{"site": s} for s in ["dca1"] * 6 + ["xcad"] * 6]
    profiles = np.arange(12, dtype=float)[:, None] * np.ones((1, 3))
    out = fvu.within_site_permutation(profiles, items, np.random.default_rng(0))
    assert sorted(out[:6, 0]) == list(range(6)) and sorted(out[6:, 0]) == list(range(6, 12))
    assert (out[:, 0] != profiles[:, 0]).any()  # permuted, not returned as is


def test_drop_small_removes_components_under_min_size_without_deprecation_warnings():
    import warnings

    m = np.zeros((20, 20), bool)
    m[0:5, 0:6] = True  # 30 px
    m[10, 10] = True  # 1 px
    m[12:14, 12:17] = True  # 10 px: exactly min_size, kept (the bundle's RemoveSmallObjectsd keeps it too)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = fvu.drop_small(m, 10)
    assert out.sum() == 40 and not out[10, 10] and out[12:14, 12:17].all()
    assert not fvu.drop_small(np.zeros((4, 4), bool), 10).any()


def test_candidate_features_see_vessel_width_and_a_black_frame():
    """profile_vs_error's candidate statistics: a wider dark line reads as wider, a black border as a frame."""
    import profile_vs_error as pve

    yy, xx = np.mgrid[:128, :128].astype(np.float32)

    def line(width):
        img = 0.8 - 0.5 * np.exp(-0.5 * ((xx - 64) / width) ** 2)  # a dark vertical vessel on a bright background
        return img + 0.01 * np.random.default_rng(0).standard_normal(img.shape).astype(np.float32)

    thin, wide = pve.candidate_features(line(1.0)), pve.candidate_features(line(4.0))
    assert wide["width"] > thin["width"] + 0.3 and wide["wide_share"] > thin["wide_share"]
    framed = line(2.0)
    framed[:8], framed[-8:], framed[:, :8], framed[:, -8:] = 0, 0, 0, 0
    assert pve.candidate_features(framed)["frame"] > 0.9 > 0.1 > pve.candidate_features(line(2.0))["frame"]
    assert all(np.isfinite(v) for v in thin.values())


def _cv_data(n_per_site: int = 10) -> dict[str, list[dict]]:
    return {s: [{"name": f"{s}/{i:02d}", "site": s, "split": "training"} for i in range(n_per_site)] for s in fvu.SITES}


@pytest.mark.parametrize("setting", ["dca1_cv", "mixed_cv", "xcad_to_dca1"])
def test_priors_are_nested_out_of_fold_and_shared(setting):
    """Issue 14 item 5: no prior a +p job sees was made by a UNet that trained on that image or on the job's test
    images, each image gets exactly one prior, and UNets are shared between jobs rather than trained twice."""
    data = _cv_data()
    jobs = fvu.plan_jobs(data, [setting], ["flow-m-ep1+np:off", "flow-m-ep1+n:off"], [0])
    recipe = {"iterations": 10, "batch": 2, "crop": 64, "lr": 1e-3, "ema": 0.99}
    pjobs = fvu.prior_jobs(jobs, fvu.fold_index(data), recipe)
    by_key = {p["prior_key"]: p for p in pjobs}
    assert len(by_key) == len(pjobs) and all(p["setting"] == "prior" and p["model"] == "unet" for p in pjobs)
    prior_users = [j for j in jobs if fvu.uses_prior(j["model"])]
    assert prior_users and not any("priors" in j for j in jobs if not fvu.uses_prior(j["model"]))
    for job in prior_users:
        assert set(job["priors"]) == set(job["train"]) | set(job["test"])
        for name, key in job["priors"].items():
            unet = by_key[key]
            assert name not in unet["train"] and name in unet["test"]
            assert not set(job["test"]) & set(unet["train"])  # the job's test images never train its priors
            assert set(unet["train"]) <= set(job["train"])
        # the test images' prior is the bar's own model: a UNet trained on every training image of the job
        assert {tuple(by_key[job["priors"][n]]["train"]) for n in job["test"]} == {tuple(sorted(job["train"]))}
    if setting == "dca1_cv":  # 5 outer UNets + one per pair of folds: 15, not 5 x 5
        assert len(pjobs) == 15
    assert fvu.uses_prior("flow-m-ep1+np:off@2000") and not fvu.uses_prior("flow-m-ep1+n:off")
    assert not fvu.uses_prior("unet")


def test_calls_complete_whole_seeds_and_start_flows_first():
    """A call that cannot finish a plan completes seed 1 before starting seed 2, and starts its flows before its
    UNets; ``--skip-done`` resumes with exactly the jobs left."""
    data = _cv_data()
    seeds = [1, 2]
    plan = fvu.plan_jobs(data, ["dca1_to_xcad", "dca1_cv"], ["flow-m-ep1+n:off", "unet"], seeds)
    first = fvu.order_jobs(plan, seeds, max_jobs=10)
    assert len(first) == 10 and {j["seed"] for j in first} == {1}
    kinds = [j["model"].startswith("unet") for j in first]
    assert kinds == sorted(kinds) and sum(kinds) == 5
    key = lambda j: (j["setting"], j["fold"], j["seed"], j["model"])  # noqa: E731
    left = [j for j in plan if key(j) not in set(map(key, first))]
    rest = fvu.order_jobs(left, seeds)
    assert sorted(map(key, first + rest)) == sorted(map(key, plan)) and len(rest) == 14
    # the next call finishes seed 1 (dca1_cv fold 4) before any job of seed 2
    assert {(j["fold"], j["seed"]) for j in fvu.order_jobs(left, seeds, max_jobs=2)} == {(4, 1)}


def test_prior_store_round_trip_and_damaged_files_are_not_trusted(tmp_path):
    probs = {"dca1/01": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), "xcad/02": np.zeros((5, 5), np.float32)}
    fvu.save_prior(tmp_path, "k1", probs)
    assert fvu.prior_names(tmp_path, "k1") == set(probs) and not list(tmp_path.glob("*.tmp*"))
    got = fvu.load_priors(tmp_path, {"dca1/01": "k1"})
    assert set(got) == {"dca1/01"} and np.abs(got["dca1/01"] - probs["dca1/01"]).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(FileNotFoundError, match="lack 1 image"):
        fvu.load_priors(tmp_path, {"dca1/01": "k1", "dca1/09": "k1"})
    fvu._prior_file(tmp_path, "k2").write_bytes(b"not an npz")  # damaged: reported as holding nothing, so remade
    assert fvu.prior_names(tmp_path, "k2") == set() and fvu.prior_names(tmp_path, "absent") == set()


def test_prior_channel_moves_with_the_image():
    """+p: the prior takes every spatial step of its image (crop, dihedral, affine) and no intensity step."""
    images, masks = _bar_site(width=8, size=256)
    aug = fvu.GPUAugment(images, masks, crop=64, seed=3, pos_prob=0.5, znorm=True, priors=[masks[0].clone()])
    x, y = aug(np.zeros(64, dtype=int))
    assert x.shape == (64, 2, 64, 64) and y.shape == (64, 1, 64, 64)
    prior = (x[:, 1:] + 1) / 2  # the prior rides as 2 p - 1
    assert float(prior.min()) >= -1e-6 and float(prior.max()) <= 1 + 1e-6  # not z-scored, not gamma'd
    # the prior here is the mask itself: after the same spatial steps it agrees with the label (nearest vs bilinear
    # resampling differ only on edge pixels)
    assert float(((prior > 0.5).float() == y).float().mean()) > 0.98
    torch.testing.assert_close(x[:, :1].mean((2, 3)), torch.zeros(64, 1), atol=1e-4, rtol=0)  # the image is z-scored
    net, info = fvu.build_model("flow-s+np:off", profile_dim=8)
    assert info["prior"] and info["aug"] == {"znorm": True} and not net.image_norm  # z-scored outside, prior kept
    assert net.conv_in.conv.in_channels == 3
    unet, uinfo = fvu.build_model("unet+p", profile_dim=8)
    assert uinfo["prior"] and unet.conv_0.conv_0.conv.in_channels == 2


def test_predictor_feeds_the_prior_as_a_channel_and_as_the_start_state():
    """Predictor: a +p flow gets its prior as an input channel and, with start < 1, as the ODE's start; without a
    prior it refuses both instead of predicting from a missing channel."""

    def randomised(model: str) -> tuple[torch.nn.Module, dict]:
        net, info = fvu.build_model(model, profile_dim=8)
        with torch.no_grad():  # a new network's output layer is zero: give every weight a value so inputs matter
            for p in net.parameters():
                p.normal_(0, 0.05)
        return net.eval(), info

    torch.manual_seed(0)
    net, info = randomised("flow-s+p:off")
    pred = fvu.Predictor(net, info, torch.device("cpu"), amp=False)
    image = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    with pytest.raises(ValueError, match="prior"):
        pred(image, None, tta="none")
    plain, _ = randomised("flow-s:off")
    start = fvu.Predictor(plain, {**info, "prior": False}, torch.device("cpu"), amp=False)
    with pytest.raises(ValueError, match="prior"):
        start(image, None, tta="none", start=0.5)
    pred.prior = np.zeros((32, 32), dtype=np.float32)
    empty = pred(image, None, tta="none")
    pred.prior = np.ones((32, 32), dtype=np.float32)
    full = pred(image, None, tta="none")
    assert empty.shape == (32, 32) and not np.allclose(empty, full)  # the prior channel reaches the network
    # a flow without the prior channel: the prior reaches it only as the start state at 0.5 T (deterministic noise)
    start.prior = np.ones((32, 32), dtype=np.float32)
    from_full = start(image, None, tta="none", start=0.5)
    np.testing.assert_array_equal(from_full, start(image, None, tta="none", start=0.5))
    np.testing.assert_array_equal(start(image, None, tta="none"), start(image, None, tta="none"))
    start.prior = np.zeros((32, 32), dtype=np.float32)
    assert not np.allclose(from_full, start(image, None, tta="none", start=0.5))


def _rows(model: str, seed: int, fold: int, images: list[str], dice: float) -> dict:
    metrics = dict.fromkeys(("cldice", "b0_err", "b1_err", "dice_cc", "b0_err_cc", "dice_notta"), 0.5)
    recs = [{"image": i, "site": "dca1", **metrics, "dice": dice} for i in images]
    return {"setting": "dca1_cv", "fold": fold, "seed": seed, "model": model, "records": recs}


def test_summary_pairs_over_common_seeds_and_folds_filter(tmp_path):
    """Pairs use the seeds both models ran on every shared image; a pair with none is left out (it printed nan);
    ``--summarise --folds`` keeps those CV folds only, so a seed run on some folds can be paired there."""
    a, b = ["a1", "a2", "a3"], ["b1", "b2", "b3"]
    rows = [_rows("unet", 0, 0, a, 0.70), _rows("unet", 0, 1, b, 0.70), _rows("unet", 1, 0, a, 0.74)]
    rows += [_rows("flow-m", 0, 0, a, 0.72), _rows("flow-m", 0, 1, b, 0.72), _rows("flow-m", 1, 0, a, 0.78)]
    rows += [_rows("flow-m+u", 1, 0, a, 0.80)]  # seed 1 on fold 0 only: paired on those images and that seed
    summary, _ = fvu.summarise(rows)
    site = summary["dca1_cv"]["dca1"]
    assert site["flow-m - unet"]["seeds"] == [0]  # seed 1 lacks fold 1: not a complete seed
    assert site["flow-m - unet"]["dice"]["mean"] == pytest.approx(2.0)
    assert site["flow-m+u - flow-m"]["seeds"] == [1] and "flow-m+u - unet" in site
    rows += [_rows("flow-m+j", 1, 0, a, 0.77), _rows("flow-m:off", 1, 0, a, 0.76)]  # jitter: paired with plain off
    assert fvu.summarise(rows)[0]["dca1_cv"]["dca1"]["flow-m+j - flow-m:off"]["dice"]["mean"] == pytest.approx(1.0)
    rows = rows[:-2]
    rows.append(_rows("flow-m:off", 2, 1, b, 0.75))  # shares no seed with the UNet on its images
    assert "flow-m:off - unet" not in fvu.summarise(rows)[0]["dca1_cv"]["dca1"]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert fvu.main(["--summarise", str(jobs), "--folds", "0", "--out", str(tmp_path / "f0")]) == 0
    fold0 = json.loads((tmp_path / "f0" / "summary.json").read_text())["summary"]["dca1_cv"]["dca1"]
    assert fold0["flow-m - unet"]["seeds"] == [0, 1] and fold0["flow-m"]["n_images"] == 3
    assert fold0["flow-m - unet"]["dice"]["mean"] == pytest.approx(3.0)  # (2 + 4) / 2 over the two seeds


def test_fitted_difficulty_is_scored_out_of_sample():
    """profile_vs_error's fitted difficulty: a feature that drives the error is found, and no image's score depends on
    its own error (each fold is scored by a fit on the other folds)."""
    import profile_vs_error as pve
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    y = 0.2 + 0.05 * x[:, 1] + 0.01 * rng.normal(size=60)
    site = np.array(["dca1"] * 30 + ["xcad"] * 30)
    scores, w = pve.fitted_difficulty(x, y, site)
    assert spearmanr(scores, y).statistic > 0.8 and int(np.argmax(np.abs(w))) == 1 and w[1] > 0
    y2 = y.copy()
    y2[0] += 5.0  # one image's error changed: its own score must not move, the others' may
    scores2, _ = pve.fitted_difficulty(x, y2, site)
    assert scores2[0] == pytest.approx(scores[0]) and not np.allclose(scores2[1:], scores[1:])


def test_head_width_timing_network_keeps_the_shipped_weights_in_wider_heads():
    """seg_inference_profile --head-channels: the shipped weights regrouped into wider attention heads (same
    parameters, another function), for timing what a retraining with wider heads would cost."""
    import seg_inference_profile as sip

    shipped = sip.shipped_flow(True, torch.device("cpu"))
    wide = sip.shipped_flow(True, torch.device("cpu"), head_channels=64)
    assert shipped.middle_block.attention.attn.num_heads == 32  # DiffusionModelUNet's default 8 channels per head
    assert wide.middle_block.attention.attn.num_heads == 4  # 256 channels / 64
    a, b = shipped.state_dict(), wide.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t = torch.rand(1, 2, 64, 64), torch.full((1,), 500.0)
    from monai_vlmfilm.profiles import DEFAULT_PROFILE

    profile = torch.as_tensor(DEFAULT_PROFILE.to_vector())[None]
    with torch.no_grad():
        assert not torch.allclose(shipped(x, t, profile=profile), wide(x, t, profile=profile))


def test_profile_swap_per_feature_replaces_exactly_one_value_from_the_named_source():
    """profile_swap_eval --per-feature: each mode is the image's own profile with one value (and only that one) taken
    from the other-site or the same-site profile; is_fallback is never swapped."""
    import profile_swap_eval as pse

    from monai_vlmfilm.profiles import PROFILE_DIM, VECTOR_FIELDS

    own, other, same = (np.full(PROFILE_DIM, v, np.float32) for v in (0.1, 0.7, 0.4))
    swaps = pse.one_value_swaps(own, other, same)
    assert list(swaps) == list(pse.feature_modes())
    assert len(swaps) == 2 * (PROFILE_DIM - 1) and not any(m.startswith("is_fallback") for m in swaps)
    for mode, p in swaps.items():
        field, _, src = mode.partition(" from ")
        k = VECTOR_FIELDS.index(field)
        assert p[k] == pytest.approx(0.7 if src == "other-site" else 0.4)
        assert np.array_equal(np.delete(p, k), np.delete(own, k))
    assert np.all(own == np.float32(0.1))  # the image's own profile is not changed in place


def test_film_gain_is_paired_over_shared_seeds_and_set_against_variables_and_the_unet_error():
    """profile_vs_error's "where does FiLM's gain go": per-image gains over the seeds both models ran on every image,
    their rank correlation with an image variable, and terciles by the same setting's UNet error."""
    import profile_vs_error as pve

    rng = np.random.default_rng(0)
    names = [f"dca1/{i:02d}" for i in range(30)]
    x = rng.permutation(30).astype(float)  # the gain grows with x
    unet_err = rng.permutation(30) / 100.0
    dice = {
        ("dca1", "mixed:flow-m-ep1+n"): {n: {0: 0.7 + x[i] / 1000, 1: 0.7 + x[i] / 1000} for i, n in enumerate(names)},
        ("dca1", "mixed:flow-m-ep1+n:off"): {n: {0: 0.7, 1: 0.7} for n in names},
        ("dca1", "mixed:unet"): {n: {0: 1.0 - unet_err[i]} for i, n in enumerate(names)},
    }
    # a seed only one image has: left out of every image's pairing, not mixed into that image's mean
    dice[("dca1", "mixed:flow-m-ep1+n:off")][names[0]][2] = 0.0
    dice[("dca1", "mixed:flow-m-ep1+n")][names[0]][2] = 0.9
    gains = pve.paired_gains(dice, "dca1", "mixed:flow-m-ep1+n", "mixed:flow-m-ep1+n:off")
    assert gains[names[0]] == pytest.approx(x[0] / 10) and gains[names[5]] == pytest.approx(x[5] / 10)
    assert pve.unet_error(dice, "dca1", "mixed:flow-m-ep1+n")[names[3]] == pytest.approx(unet_err[3])

    per_site = {"dca1": {n: {"feature:x": x[i], "feature:noise": rng.normal()} for i, n in enumerate(names)}}
    rows = {r["variable"]: r for r in pve.gain_rows(dice, per_site) if r["comparison"].endswith(":off")}
    assert rows["feature:x"]["rho"] == pytest.approx(1.0) and rows["feature:x"]["n"] == 30
    assert (
        abs(rows["feature:noise"]["rho"]) < 0.5 and rows["feature:noise"]["ci_lo"] < 0 < rows["feature:noise"]["ci_hi"]
    )
    assert "error:unet" in rows

    pairs = (("mixed:flow-m-ep1+n", "mixed:flow-m-ep1+n:off"),)
    terc = pve.tercile_rows(dice, lambda site, model: pve.unet_error(dice, site, model), pairs)
    by = {r["tercile"]: r for r in terc}
    hard = [i for i in np.argsort(unet_err, kind="stable")[20:]]  # the 10 images the UNet does worst on
    assert by["hardest"]["n"] == 10 and by["hardest"]["mean"] == pytest.approx(np.mean(x[hard] / 10))
    assert by["all"]["mean"] == pytest.approx(np.mean(x / 10))


def test_profile_worth_pairs_the_shipped_recipe_and_reads_synthetic_reports(tmp_path):
    """benchmarks/profile_worth.py: FiLM on − off and encoder − off (against the shipped recipe's off run,
    flow_vs_unet.off_twin) are the per-image paired differences of the rows it is given; synthetic reports become
    points; a missing comparison is named."""
    import profile_worth as pw

    rng = np.random.default_rng(0)
    images = [f"xcad/{i}" for i in range(12)]
    base = rng.uniform(0.6, 0.8, len(images))
    shift = {"flow-m-ep1+n": 0.02, "flow-m-ep1+n:off": 0.0, "flow-m-ep1+ne": 0.03}
    rows = []
    for model, s in shift.items():
        for seed in (0, 1):
            noise = rng.normal(0, 0.002, len(images))
            recs = [
                {
                    "image": n,
                    "site": "xcad",
                    "dice": b + s + e,
                    "cldice": b + 2 * s,
                    "b0_err": 1,
                    "b1_err": 0,
                    "dice_cc": b + s + e,
                    "b0_err_cc": 1,
                    "dice_notta": b,
                }
                for n, b, e in zip(images, base, noise)
            ]
            rows.append({"setting": "mixed_cv", "fold": 0, "seed": seed, "model": model, "records": recs})
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def overall(dice, cldice):  # an ablation report's paired comparison (fractions), as results.json holds it
        return {
            "overall": {
                m: dict(zip(("mean", "ci_lo", "ci_hi"), v), n=240) for m, v in zip(("dice", "cldice"), (dice, cldice))
            }
        }

    paired_modes = {"on.norm": overall((0.0132, 0.0068, 0.0204), (0.0156, 0.0088, 0.0231)),
                    "oracle.norm": overall((0.0159, 0.009, 0.0234), (0.0188, 0.0114, 0.0266))}  # fmt: skip
    report = {"seeds": [0, 1, 2], "analysis": {"paired": paired_modes}}
    syn = tmp_path / "synthetic.json"
    syn.write_text(json.dumps(report))
    out = tmp_path / "out"
    assert pw.main(["--jobs", str(jobs), "--out", str(out)]) == 0
    table = (out / "profile_worth.md").read_text()
    assert (out / "profile_worth.png").stat().st_size > 10_000
    got = {r.split(" | ")[1]: r for r in table.splitlines() if r.startswith("| two-site CV, XCAD images")}
    assert set(got) == {"FiLM on − off", "encoder FiLM − decoder FiLM", "encoder FiLM − off"}  # no shuffle rows ran

    def paired(a, b):  # per-image seed means, then the mean difference, in points
        mean = {
            m: np.mean([[x["dice"] for x in r["records"]] for r in rows if r["model"] == m], axis=0) for m in (a, b)
        }
        return 100 * float(np.mean(mean[a] - mean[b]))

    assert f"| 0, 1 | 12 | {paired('flow-m-ep1+n', 'flow-m-ep1+n:off'):+.2f} [" in got["FiLM on − off"]
    assert f"| {paired('flow-m-ep1+ne', 'flow-m-ep1+n:off'):+.2f} [" in got["encoder FiLM − off"]
    assert "+4.00 [+4.00, +4.00]" in got["FiLM on − off"].split(" | ")[-1]  # clDice: 2 x 2 points, no noise
    assert pw.main(["--jobs", str(jobs), "--synthetic", str(syn), "--out", str(out)]) == 0
    assert (
        "| synthetic | FiLM on − off | 0, 1, 2 | 240 | +1.32 [+0.68, +2.04] | +1.56 [+0.88, +2.31] |"
        in (out / "profile_worth.md").read_text()
    )
    with pytest.raises(KeyError, match="on-vs-shuffle"):  # this report has no shuffle comparison
        pw.main(["--jobs", str(jobs), "--synthetic-shuffle", str(syn), "--out", str(out)])
    jobs.write_text('{"setting": "mixed_cv"\n')
    with pytest.raises(SystemExit, match="jobs.jsonl:1: not a JSON line"):
        pw.main(["--jobs", str(jobs), "--out", str(out)])


def test_profile_worth_pools_ablation_reports_by_image_and_seed(tmp_path):
    """benchmarks/profile_worth.py --synthetic-shuffle A B: two reports of the same images (seeds run apart) are
    analysed as one run with every seed (the ablation's own ``analyse``, paired on seed and image); a (mode, seed)
    in both, or reports of other images, stop with both names."""
    import profile_worth as pw

    from monai_vlmfilm.ablation.stats import analyse

    rng = np.random.default_rng(1)
    images = [f"/data/test_{i:03d}.png" for i in range(30)]
    base = rng.uniform(0.6, 0.9, len(images))
    shift = {"off": 0.0, "on": 0.02, "shuffle": 0.005}
    records = [
        {"mode": m, "seed": seed, "fold": None, "image": img, "difficulty": float(i % 5), "dice": b + s + e,
         "cldice": b + 2 * s}
        for m, s in shift.items()
        for seed in (0, 1, 2)
        for i, (img, b, e) in enumerate(zip(images, base, rng.normal(0, 0.01, len(images))))
    ]  # fmt: skip
    paths = []
    for name, seeds in (("a", (0, 1)), ("b", (2,))):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"seeds": list(seeds), "records": [r for r in records if r["seed"] in seeds]}))
        paths.append(str(p))
    pooled = pw.synthetic_report(paths)
    assert pooled["seeds"] == [0, 1, 2]
    whole = analyse(records, ["off", "on", "shuffle"])["paired"]
    got = pooled["analysis"]["paired"]
    for key in ("on", "shuffle", "on-vs-shuffle"):
        for metric in ("dice", "cldice"):
            assert got[key]["overall"][metric] == pytest.approx(whole[key]["overall"][metric], nan_ok=True)
    on_minus_shuffle = np.mean([b - a for a, b in zip(
        np.mean([[r["dice"] for r in records if r["mode"] == "shuffle" and r["seed"] == s] for s in (0, 1, 2)], 0),
        np.mean([[r["dice"] for r in records if r["mode"] == "on" and r["seed"] == s] for s in (0, 1, 2)], 0))])  # fmt: skip
    assert got["on-vs-shuffle"]["overall"]["dice"]["mean"] == pytest.approx(on_minus_shuffle)
    assert got["on-vs-shuffle"]["overall"]["cldice"]["mean"] == pytest.approx(0.03)

    jobs = tmp_path / "jobs.jsonl"  # a real row is needed for the table; one FiLM pair of one image
    rec = {"image": "x", "site": "xcad", "dice": 0.7, "cldice": 0.7, "b0_err": 1, "b1_err": 0, "dice_cc": 0.7,
           "b0_err_cc": 1, "dice_notta": 0.7}  # fmt: skip
    jobs.write_text("".join(
        json.dumps({"setting": "mixed_cv", "fold": 0, "seed": 0, "model": m, "records": [rec]}) + "\n"
        for m in ("flow-m-ep1+n", "flow-m-ep1+n:off")))  # fmt: skip
    out = tmp_path / "out"
    assert pw.main(["--jobs", str(jobs), "--synthetic-shuffle", *paths, "--out", str(out)]) == 0
    row = next(r for r in (out / "profile_worth.md").read_text().splitlines() if r.startswith("| synthetic"))
    assert row.startswith(f"| synthetic | on − shuffle | 0, 1, 2 | 30 | {100 * on_minus_shuffle:+.2f} [")

    with pytest.raises(ValueError, match=r"b\.json: mode 'off' seed 2 is also in .*c\.json"):
        c = tmp_path / "c.json"
        c.write_text(Path(paths[1]).read_text())
        pw.synthetic_report([str(c), paths[1]])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"records": [dict(r, image="/x/" + r["image"]) for r in records if r["seed"] == 2]}))
    with pytest.raises(ValueError, match=r"other\.json: not the images of .*a\.json"):
        pw.synthetic_report([paths[0], str(other)])
    regenerated = tmp_path / "regenerated.json"  # the same paths, other data behind them (other difficulties)
    regenerated.write_text(json.dumps({"records": [dict(r, difficulty=9.0) for r in records if r["seed"] == 2]}))
    with pytest.raises(ValueError, match=r"regenerated\.json: not the images of .*a\.json"):
        pw.synthetic_report([paths[0], str(regenerated)])


def test_train_loss_gap_pairs_film_jobs_with_their_off_twin(tmp_path):
    """benchmarks/train_loss_gap.py: a FiLM job is paired with the FiLM-off job of the same setting, fold and seed;
    the loss is the mean of the last ``tail`` snapshots, Dice the mean over the job's images (points); jobs without a
    twin, of other models or without records are left out; a jobs file with no pair at all stops with its name."""
    import train_loss_gap as tlg

    def job(model, fold, seed, losses, dices, setting="dca1_cv"):
        recs = [{"image": f"dca1/{i}", "dice": d} for i, d in enumerate(dices)]
        return {"setting": setting, "fold": fold, "seed": seed, "model": model, "losses": losses, "records": recs}

    rows = []
    for fold in range(3):  # FiLM fits better by 0.05 + 0.01 * fold and scores 1 + fold points lower
        rows.append(job("flow-m-ep1+n:off", fold, 0, [9.0] + [0.5] * 10, [0.8, 0.8]))
        rows.append(job("flow-m-ep1+n", fold, 0, [0.0] + [0.45 - 0.01 * fold] * 10, [0.79 - 0.01 * fold] * 2))
    rows.append(job("flow-m-ep1+n", 4, 0, [0.1] * 11, [0.5, 0.5]))  # no off twin: left out
    rows.append(job("unet", 0, 0, [0.1] * 11, [0.9, 0.9]))  # not compared
    rows.append({"setting": "dca1_cv", "fold": 1, "seed": 0, "model": "flow-m-ep1+n:sshuffle", "error": "x"})
    gaps = tlg.loss_gaps(rows, tail=10)
    assert len(gaps) == 1
    g = gaps[0]
    assert (g["setting"], g["comparison"], g["pairs"], g["lower_loss"]) == ("dca1_cv", "FiLM on − off", 3, 3)
    assert g["off_loss"] == pytest.approx(0.5)
    assert g["loss"][0] == pytest.approx(-0.06) and g["loss"][1] <= -0.06 <= g["loss"][2]
    assert g["dice"][0] == pytest.approx(-2.0) and g["dice"][2] < 0
    # tail 11 takes the first snapshot in as well: 9.0 for off, 0.0 for FiLM
    assert tlg.loss_gaps(rows, tail=11)[0]["loss"][0] == pytest.approx(-0.06 * 10 / 11 - 9.0 / 11)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert tlg.main(["--jobs", str(jobs), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "train_loss_gap.md").read_text()
    assert "| dca1_cv | FiLM on − off | 3 | 0.500 | -0.0600 [" in table and "| 3 / 3 | -2.00 [" in table
    lonely = tmp_path / "lonely.jsonl"
    lonely.write_text(json.dumps(rows[-3]) + "\n")
    with pytest.raises(SystemExit, match="lonely.jsonl: no FiLM job has a FiLM-off twin"):
        tlg.main(["--jobs", str(lonely), "--out", str(tmp_path / "out2")])


def test_damaged_jobs_file_stops_naming_file_and_line(tmp_path):
    """--summarise and --skip-done read jobs files through read_job_rows: a damaged line (a run killed mid-write)
    stops with the file and line, before anything is summarised or any job is skipped on a guess."""
    good = json.dumps(_rows("unet", 0, 0, ["a1"], 0.7))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(good + "\n\n" + good[: len(good) // 2] + "\n")
    with pytest.raises(SystemExit, match=r"jobs\.jsonl:3: not a JSON line"):
        fvu.main(["--summarise", str(jobs), "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s" / "summary.md").exists()
    with pytest.raises(SystemExit, match=r"jobs\.jsonl:3: not a JSON line"):
        fvu.main(["--smoke", "--skip-done", str(jobs), "--out", str(tmp_path / "r")])


def test_cross_site_gain_averages_the_seeds_both_film_models_ran(tmp_path):
    """profile_range_check's cross-site FiLM cost: per test image, on - off in Dice points over the seeds both
    models ran; other settings, other models and jobs without records are left out."""
    import profile_range_check as prc

    def job(model, seed, dices, setting="dca1_to_xcad"):
        site = setting.split("_to_")[1]
        recs = [{"image": f"{site}/{i}", "site": site, "dice": d} for i, d in enumerate(dices)]
        return {"setting": setting, "fold": 0, "seed": seed, "model": model, "records": recs}

    rows = [
        job(prc.OFF, 0, [0.70, 0.60]),
        job(prc.ON, 0, [0.66, 0.61]),
        job(prc.OFF, 1, [0.72, 0.62]),
        job(prc.ON, 1, [0.70, 0.59]),
        job(prc.ON, 2, [0.10, 0.10]),  # no off twin for seed 2: not averaged in
        job(prc.SSHUFFLE, 2, [0.05, 0.20]),  # ... but a same-site shuffle twin
        job(prc.ON, 0, [0.0, 0.0], setting="xcad_to_dca1"),
        job("unet", 0, [0.9, 0.9]),
        {"setting": "dca1_to_xcad", "fold": 0, "seed": 3, "model": prc.OFF, "error": "x"},
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    by_ref = prc.cross_site_gains(str(jobs))
    by_setting = by_ref[prc.OFF]
    gains, seeds = by_setting["dca1_to_xcad"]
    assert seeds == [0, 1]
    assert gains == {"xcad/0": pytest.approx(-3.0), "xcad/1": pytest.approx(-1.0)}
    assert by_setting["xcad_to_dca1"] == ({}, [])
    gains, seeds = by_ref[prc.SSHUFFLE]["dca1_to_xcad"]
    assert seeds == [2]
    assert gains == {"xcad/0": pytest.approx(5.0), "xcad/1": pytest.approx(-10.0)}
