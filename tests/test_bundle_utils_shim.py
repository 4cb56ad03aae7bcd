"""The deprecated ``monai_vlmfilm.bundle_utils`` shim: it warns and re-exports the objects of the new homes."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest


def _import_shim():
    sys.modules.pop("monai_vlmfilm.bundle_utils", None)
    with pytest.warns(DeprecationWarning, match="bundle_utils is deprecated"):
        return importlib.import_module("monai_vlmfilm.bundle_utils")


def test_shim_warns_and_reexports_the_new_homes():
    from monai_vlmfilm import data, handlers, networks, transforms

    shim = _import_shim()
    assert shim.load_split is data.datalist.load_split and shim.image_list is data.datalist.image_list
    assert shim.IMAGE_EXTENSIONS is data.datalist.IMAGE_EXTENSIONS
    assert shim.EnsureGrayscale2Dd is transforms.EnsureGrayscale2Dd
    assert shim.SaveVesselOverlayd is transforms.SaveVesselOverlayd and shim.VesselOverlayd is transforms.VesselOverlayd
    assert shim.load_network_weights is networks.load_network_weights
    assert shim.FixedTimeVelocity is networks.FixedTimeVelocity
    for name in ("NetworkCheckpointLoader", "ProgressHandler", "MetricsSummaryJSON"):
        assert getattr(shim, name) is getattr(handlers, name)


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), ("false", False), ("False", False), ("true", True), (" yes ", True), (0, False),
     (1, True), ("no", False), (np.bool_(True), True)],
)  # fmt: skip
def test_as_bool(value, expected):
    shim = _import_shim()
    with pytest.warns(DeprecationWarning, match="str2bool"):
        assert shim.as_bool(value) is expected


@pytest.mark.parametrize("value", ["maybe", 2, None, [True]])
def test_as_bool_rejects(value):
    shim = _import_shim()
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="use_vlm_film must be true or false"):
        shim.as_bool(value, "use_vlm_film")


def test_a_config_naming_the_old_dotted_path_still_builds():
    """User configs written against 0.2 name ``monai_vlmfilm.bundle_utils.<Name>``: they build, with the warning."""
    from monai.bundle import ConfigParser

    from monai_vlmfilm.transforms import EnsureGrayscale2Dd

    sys.modules.pop("monai_vlmfilm.bundle_utils", None)
    parser = ConfigParser({"t": {"_target_": "monai_vlmfilm.bundle_utils.EnsureGrayscale2Dd", "keys": "image"}})
    with pytest.warns(DeprecationWarning, match="bundle_utils is deprecated"):
        assert isinstance(parser.get_parsed_content("t"), EnsureGrayscale2Dd)
