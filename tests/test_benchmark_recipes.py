"""The recipe modifiers and profile controls of ``benchmarks/flow_vs_unet.py`` (issue 14's cross-site study)."""

from __future__ import annotations

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
    # g: no difficulty gate (the gate's parameters are gone from the network); the bundle's default keeps it
    gated, info = fvu.build_model("flow-s+n", profile_dim=8)
    ungated, info_g = fvu.build_model("flow-s+ng", profile_dim=8)
    assert gated.use_difficulty_gate and info["use_difficulty_gate"] and not info_g["use_difficulty_gate"]
    assert not ungated.use_difficulty_gate and ungated.image_norm and info_g["aug"] == {}
    assert set(ungated.state_dict()) < set(gated.state_dict())  # a proper subset: only the gate's entries go
    with pytest.raises(ValueError, match="no profile"):
        fvu.build_model("unet+g", profile_dim=8)
    # each modifier of a combination is compared with the combination without it
    assert fvu.modifier_refs("flow-m-ep1+nd:off") == ["flow-m-ep1+d:off", "flow-m-ep1+n:off"]
    assert fvu.modifier_refs("flow-m-ep1+nd") == ["flow-m-ep1+d", "flow-m-ep1+n"]
    assert fvu.modifier_refs("flow-m+n") == []


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
