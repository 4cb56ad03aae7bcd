"""The 2D grayscale and overlay transforms (``monai_vlmfilm.transforms``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_vlmfilm.transforms import EnsureGrayscale2Dd, SaveUncertaintyMapd, SplitUncertaintyd, VesselOverlayd


def test_grayscale_and_overlay():
    rgb = MetaTensor(torch.rand(3, 8, 6), meta={"filename_or_obj": "x.png"})
    d = EnsureGrayscale2Dd(keys="image")({"image": rgb})
    expected = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    assert d["image"].shape == (1, 8, 6) and torch.allclose(d["image"][0], expected)
    assert EnsureGrayscale2Dd(keys="image")({"image": torch.rand(1, 8, 6, 1)})["image"].shape == (1, 8, 6)
    with pytest.raises(ValueError, match="vol.nii: expected a 2D image"):
        EnsureGrayscale2Dd(keys="image")(
            {"image": MetaTensor(torch.rand(1, 8, 6, 5), meta={"filename_or_obj": "vol.nii"})}
        )

    image = MetaTensor(torch.linspace(0, 1, 48).reshape(1, 8, 6), meta={"filename_or_obj": "x.png"})
    mask = torch.zeros(1, 8, 6)
    mask[0, 2:4, 1:3] = 1
    out = VesselOverlayd(keys="pred")({"image": image, "pred": mask})["overlay"]
    assert out.shape == (3, 8, 6) and out.meta["filename_or_obj"] == "x.png"
    bg = mask[0] == 0
    assert torch.allclose(out[0][bg], image[0][bg]) and torch.allclose(out[1][bg], image[0][bg])
    assert (out[0][~bg] > out[1][~bg]).all()  # red tint on the mask


def test_split_uncertainty():
    mask = torch.rand(1, 8, 6)
    spread = torch.rand(1, 8, 6) * 0.2
    pred = MetaTensor(torch.cat([mask, spread]), meta={"filename_or_obj": "case.png"})
    d = SplitUncertaintyd("pred")({"pred": pred, "result": {"kept": 1}})
    assert torch.equal(d["pred"].as_tensor(), mask) and torch.equal(d["uncertainty"].as_tensor(), spread)
    assert d["uncertainty"].meta["filename_or_obj"] == "case.png"  # so SaveImaged names the file after the input
    assert d["result"]["kept"] == 1  # the response JSON is extended, not replaced
    assert d["result"]["uncertainty_mean"] == pytest.approx(float(spread.mean()), abs=1e-5)
    assert d["result"]["uncertainty_max"] == pytest.approx(float(spread.max()), abs=1e-5)
    assert 0 < d["result"]["uncertainty_p95"] <= d["result"]["uncertainty_max"]
    # no spread appended: passes through untouched
    d = SplitUncertaintyd("pred")({"pred": mask})
    assert d["pred"] is mask and "uncertainty" not in d and "result" not in d
    with pytest.raises(ValueError, match="3 channels"):
        SplitUncertaintyd("pred")({"pred": torch.rand(3, 4, 4)})


def test_uncertainty_heat_map(tmp_path):
    from PIL import Image

    u = torch.zeros(1, 10, 12)
    u[0, 2:4, 3:9] = 0.05
    img = MetaTensor(u, meta={"filename_or_obj": str(tmp_path / "angio.png")})
    SaveUncertaintyMapd("uncertainty", output_dir=str(tmp_path / "out"), print_log=False)({"uncertainty": img})
    heat = np.asarray(Image.open(tmp_path / "out" / "angio_uncertainty.png")).astype(int)
    # MONAI's PNG writer takes the array as (W, H), like its reader gives it: the file is 12 high, 10 wide
    assert heat.shape == (12, 10, 3)
    hot = heat.sum(-1).T  # back to the array's layout: the hot band bright, the rest the colour map's dark end
    assert hot[2:4, 3:9].min() > 3 * hot[6:, :].max()
    # nothing to save under a missing key: no file, no error
    SaveUncertaintyMapd("uncertainty", output_dir=str(tmp_path / "none"), print_log=False)({"pred": img})
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").iterdir())
