"""monai-vlmfilm: VLM-profile FiLM conditioning for flow-matching vessel segmentation (MONAI plugin)."""

__version__ = "0.6.6"
