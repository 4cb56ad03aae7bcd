"""The 2D grayscale and overlay transforms (``monai_vlmfilm.transforms``)."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from monai_vlmfilm.transforms import EnsureGrayscale2Dd, VesselOverlayd


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
