"""Deprecated: the bundle glue moved to the modules that own each concept; this shim re-exports it for one release.

==========================  ===========================================================
old ``bundle_utils`` name   new home
==========================  ===========================================================
``IMAGE_EXTENSIONS``        :mod:`monai_vlmfilm.data.datalist`
``load_split``              :mod:`monai_vlmfilm.data.datalist`
``image_list``              :mod:`monai_vlmfilm.data.datalist`
``EnsureGrayscale2Dd``      :mod:`monai_vlmfilm.transforms`
``VesselOverlayd``          :mod:`monai_vlmfilm.transforms`
``SaveVesselOverlayd``      :mod:`monai_vlmfilm.transforms`
``load_network_weights``    :mod:`monai_vlmfilm.networks.checkpoint`
``FixedTimeVelocity``       :mod:`monai_vlmfilm.networks.fixed_time`
``NetworkCheckpointLoader`` :mod:`monai_vlmfilm.handlers`
``ProgressHandler``         :mod:`monai_vlmfilm.handlers`
``MetricsSummaryJSON``      :mod:`monai_vlmfilm.handlers`
``as_bool``                 ``monai.utils.str2bool`` (the consumers of ``use_vlm_film`` parse it themselves)
==========================  ===========================================================

Bundle configs written against 0.2 name these as ``monai_vlmfilm.bundle_utils.<Name>``; they keep working, with a
``DeprecationWarning`` on import. Update them to the new dotted paths.
"""

from __future__ import annotations

import warnings
from typing import Any

from monai.utils import str2bool

from monai_vlmfilm.data.datalist import IMAGE_EXTENSIONS, image_list, load_split
from monai_vlmfilm.handlers import MetricsSummaryJSON, NetworkCheckpointLoader, ProgressHandler
from monai_vlmfilm.networks.checkpoint import load_network_weights
from monai_vlmfilm.networks.fixed_time import FixedTimeVelocity
from monai_vlmfilm.transforms import EnsureGrayscale2Dd, SaveVesselOverlayd, VesselOverlayd

__all__ = [
    "IMAGE_EXTENSIONS",
    "as_bool",
    "load_split",
    "image_list",
    "EnsureGrayscale2Dd",
    "VesselOverlayd",
    "SaveVesselOverlayd",
    "load_network_weights",
    "NetworkCheckpointLoader",
    "ProgressHandler",
    "MetricsSummaryJSON",
    "FixedTimeVelocity",
]

warnings.warn(
    "monai_vlmfilm.bundle_utils is deprecated and will be removed in the next release: use monai_vlmfilm.transforms, "
    "monai_vlmfilm.handlers, monai_vlmfilm.networks and monai_vlmfilm.data.datalist (see this module's docstring)",
    DeprecationWarning,
    stacklevel=2,
)


def as_bool(value: Any, name: str = "value") -> bool:
    """Deprecated: a config switch as a bool; use ``monai.utils.str2bool(str(value))``.

    Args:
        value: a bool, 0 / 1 or a string such as ``"false"`` (what ``--use_vlm_film false`` gives).
        name: the switch's name, for the error message.

    Raises:
        ValueError: for anything that is not a recognisable boolean, naming ``name``.
    """
    warnings.warn("as_bool is deprecated: use monai.utils.str2bool(str(value))", DeprecationWarning, stacklevel=2)
    try:
        return str2bool(str(value).strip())
    except ValueError as e:
        raise ValueError(f"{name} must be true or false, got {value!r}") from e
