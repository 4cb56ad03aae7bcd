"""clDice and Betti-number metrics on shapes whose answers are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.handlers import from_engine
from scipy import ndimage

from monai_vlmfilm.metrics import BettiError, BettiErrorMetric, ClDice, ClDiceMetric, betti_numbers, cldice_score

N = 64
YY, XX = np.mgrid[:N, :N]


def disk(cy, cx, r):
    return (YY - cy) ** 2 + (XX - cx) ** 2 <= r * r


def ring(cy, cx, r_in, r_out):
    return disk(cy, cx, r_out) & ~disk(cy, cx, r_in)


def holes_by_flood_fill(mask):
    """Independent b1 for 2D: 4-connected background components that do not reach the image border."""
    _, n = ndimage.label(np.pad(~mask, 1, constant_values=True))  # default structure: 4-connectivity
    return n - 1


def swiss_cheese():
    m = disk(32, 32, 28)
    for cy, cx in [(20, 20), (20, 44), (44, 32)]:
        m &= ~disk(cy, cx, 5)
    return m


def pixels(coords, size=8):
    m = np.zeros((size, size), bool)
    for y, x in coords:
        m[y, x] = True
    return m


SHAPES_2D = {
    "empty": (np.zeros((N, N), bool), (0, 0)),
    "disk": (disk(32, 32, 10), (1, 0)),
    "ring": (ring(32, 32, 8, 12), (1, 1)),
    "two disks": (disk(16, 16, 6) | disk(48, 48, 6), (2, 0)),
    "figure eight": (ring(32, 20, 5, 10) | ring(32, 40, 5, 10), (1, 2)),
    "disk with three holes": (swiss_cheese(), (1, 3)),
    "ring and disk": (ring(20, 20, 5, 9) | disk(48, 48, 5), (2, 1)),
    "two rings": (ring(16, 16, 4, 8) | ring(48, 48, 4, 8), (2, 2)),
    "frame on the border": (np.pad(np.zeros((N - 2, N - 2), bool), 1, constant_values=True), (1, 1)),
    "ring cut by the border": (ring(0, 32, 8, 12), (1, 0)),
    # 8-connected foreground: diagonal neighbours are one component ...
    "diagonal pixels": (pixels([(2, 2), (3, 3)]), (1, 0)),
    # ... and a diamond of four diagonal pixels encloses its 4-connected background centre
    "diamond": (pixels([(2, 3), (3, 2), (3, 4), (4, 3)]), (1, 1)),
}


@pytest.mark.parametrize("name", list(SHAPES_2D))
def test_betti_numbers_2d_known_shapes(name):
    mask, expected = SHAPES_2D[name]
    assert betti_numbers(mask) == expected
    assert betti_numbers(mask)[1] == holes_by_flood_fill(mask)


def test_betti1_agrees_with_flood_fill_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(40):
        m = ndimage.binary_opening(rng.random((40, 40)) < rng.uniform(0.3, 0.7))
        b0, b1 = betti_numbers(m)
        assert b1 == holes_by_flood_fill(m)
        assert b0 == ndimage.label(m, structure=np.ones((3, 3)))[1]


def test_betti_numbers_3d():
    z, y, x = np.mgrid[:32, :32, :32] - 16
    r2 = x**2 + y**2 + z**2
    ball = r2 <= 64
    hollow = (r2 <= 100) & (r2 > 36)
    torus = (np.sqrt(x**2 + y**2) - 8) ** 2 + z**2 <= 9
    assert betti_numbers(ball) == (1, 0, 0)
    assert betti_numbers(hollow) == (1, 0, 1)
    assert betti_numbers(torus) == (1, 1, 0)
    assert betti_numbers(torus | (r2 <= 4)) == (2, 1, 0)


def batch(*masks, prob=True):
    """[B, 1, H, W] soft probabilities (0.8 / 0.3) that threshold back to the masks."""
    arr = np.stack([m.astype(np.float32) for m in masks])[:, None]
    return torch.from_numpy(arr * 0.5 + 0.3 if prob else arr)


def test_betti_error_metric_per_image_and_aggregate():
    gt = batch(ring(32, 32, 8, 12), disk(16, 16, 6) | disk(48, 48, 6), SHAPES_2D["figure eight"][0], prob=False)
    pred = batch(disk(32, 32, 12), disk(16, 16, 6), SHAPES_2D["figure eight"][0])
    m1 = BettiErrorMetric(betti=1)
    values = m1(pred, gt)
    assert values.shape == (3, 1) and values[:, 0].tolist() == [1.0, 0.0, 0.0]
    m0 = BettiErrorMetric(betti=0)
    assert m0(pred, gt)[:, 0].tolist() == [0.0, 1.0, 0.0]
    m0(pred[:1], gt[1:2])  # second call accumulates: disk vs two disks -> 1
    assert m0.aggregate().item() == pytest.approx(2 / 4)
    assert m0.aggregate(reduction="sum").item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="3D"):
        BettiErrorMetric(betti=2)(pred, gt)
    with pytest.raises(ValueError, match="channel"):
        m1(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_two_channel_one_hot_uses_foreground():
    m = ring(32, 32, 8, 12)
    one_hot = torch.from_numpy(np.stack([~m, m]).astype(np.float32))[None]
    assert BettiErrorMetric(betti=1)(one_hot, batch(m)).item() == 0.0


def test_cldice_known_values():
    line = np.zeros((N, N), bool)
    line[30:33, 8:56] = True  # a 3-px thick bar, length 48
    half = line.copy()
    half[:, 32:] = False
    assert cldice_score(line, line) == 1.0
    # the half bar's skeleton lies inside the bar (Tprec = 1); it covers about half of the bar's skeleton
    assert cldice_score(half, line) == pytest.approx(2 * 0.5 / 1.5, abs=0.05)
    assert cldice_score(np.zeros_like(line), line) == 0.0
    assert math.isnan(cldice_score(line, np.zeros_like(line)))
    # a spurious vertical branch outside the bar: Tsens = 1, Tprec = bar skeleton / all skeleton (about 48 / 68)
    spur = line.copy()
    spur[40:60, 10:13] = True
    tprec = 48 / 68
    assert cldice_score(spur, line) == pytest.approx(2 * tprec / (tprec + 1), abs=0.05)


def test_cldice_metric_skips_empty_ground_truth():
    line = np.zeros((N, N), bool)
    line[30:33, 8:56] = True
    metric = ClDiceMetric()
    values = metric(batch(line, line), batch(line, np.zeros_like(line), prob=False))
    assert values[0, 0].item() == 1.0 and math.isnan(values[1, 0].item())
    assert metric.aggregate().item() == 1.0  # nan entries are left out of the mean


def test_ignite_handlers():
    line = np.zeros((N, N), bool)
    line[30:33, 8:56] = True
    pred = batch(line, ring(32, 32, 8, 12))
    gt = batch(line, disk(32, 32, 12), prob=False)

    engine = Engine(lambda e, b: {"pred": pred, "label": gt})
    ClDice(output_transform=from_engine(["pred", "label"])).attach(engine, "cldice")
    BettiError(betti=1, output_transform=from_engine(["pred", "label"])).attach(engine, "betti1")
    BettiError(betti=0, output_transform=from_engine(["pred", "label"])).attach(engine, "betti0")
    engine.run([0, 1], max_epochs=1)
    m = engine.state.metrics
    assert m["betti1"] == pytest.approx(0.5) and m["betti0"] == 0.0
    assert m["cldice"] == pytest.approx((1.0 + cldice_score(ring(32, 32, 8, 12), disk(32, 32, 12))) / 2)
    assert engine.state.metric_details["betti1"].shape == (4, 1)


def test_error_overlay_colours_each_class():
    from monai_vlmfilm.handlers.error_pictures import ERROR_COLOURS, error_overlay

    image = np.linspace(0, 1, 12 * 12, dtype=np.float32).reshape(1, 12, 12)
    label = np.zeros((1, 12, 12), np.float32)
    label[0, 2:10, 5:7] = 1  # a vertical vessel, 2 px wide
    pred = label.copy()
    pred[0, 6:10, 5:7] = 0  # its lower half missed
    pred[0, 1, 1] = 1  # one false pixel
    rgb, counts = error_overlay(image, pred, label)
    assert rgb.shape == (12, 12, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[1, 1]) == ERROR_COLOURS["false_positive"]
    assert tuple(rgb[3, 5]) == ERROR_COLOURS["true_positive"] or tuple(rgb[3, 6]) == ERROR_COLOURS["true_positive"]
    missed = [tuple(rgb[r, c]) for r in range(6, 10) for c in (5, 6)]
    assert ERROR_COLOURS["missed_centreline"] in missed and ERROR_COLOURS["false_negative"] in missed
    assert tuple(rgb[0, 11]) == (rgb[0, 11, 0],) * 3  # background stays grey
    assert counts["true_positive"] == 8 and counts["false_positive"] == 1 and counts["false_negative"] == 8
    assert counts["dice"] == pytest.approx(2 * 8 / (9 + 16))
    with pytest.raises(ValueError, match="same size"):
        error_overlay(image, pred[:, :6], label)
