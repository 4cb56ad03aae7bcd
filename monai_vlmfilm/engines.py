"""``prepare_batch`` callables for MONAI engines: rectified-flow training and profile-aware evaluation.

Both follow MONAI's ``PrepareBatch`` protocol and return ``(inputs, targets, args, kwargs)``;
``SupervisedTrainer`` / ``SupervisedEvaluator`` then call ``inferer(inputs, network, *args, **kwargs)``,
which for the default ``SimpleInferer`` is ``network(inputs, **kwargs)``. The profile travels as the
keyword ``profile`` and only when the batch holds one, so a FiLM-off pipeline (no ``vlm_profile`` in
the batch) calls the network exactly as a plain ``DiffusionModelUNet``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.networks.schedulers import RFlowScheduler

from monai_vlmfilm.profiles.schema import PROFILE_KEY, as_profile_batch

__all__ = ["FlowMatchingPrepareBatch", "ProfilePrepareBatch", "label_to_flow_space"]


def label_to_flow_space(label: torch.Tensor) -> torch.Tensor:
    """Map a mask to the flow's data space [-1, 1]: ``clamp(label, 0, 1) * 2 - 1``.

    Binary masks stored as {0, 1} or {0, 255} both land on {-1, 1}; soft labels in [0, 1] keep their values.
    """
    return label.float().clamp(0, 1) * 2 - 1


def _get(batchdata: Mapping, key: str, what: str) -> Any:
    if not isinstance(batchdata, Mapping):
        raise TypeError(f"prepare_batch expects a dict batch (keys {key!r}, ...), got {type(batchdata).__name__}.")
    if key not in batchdata:
        raise KeyError(f"batch has no {what} key {key!r}; keys present: {sorted(map(str, batchdata))}.")
    return batchdata[key]


def _profile_kwargs(batchdata: Mapping, profile_key: str | None, device: Any, non_blocking: bool, **kwargs) -> dict:
    if profile_key is None or profile_key not in batchdata or batchdata[profile_key] is None:
        return {}
    # detached: the profile is an input, never something to learn through (keeps the VLM out of the graph)
    return {"profile": as_profile_batch(batchdata[profile_key], device=device, non_blocking=non_blocking)}


class FlowMatchingPrepareBatch(PrepareBatch):
    """Rectified-flow training pairs for mask generation conditioned on the image.

    Conventions of MONAI's :class:`~monai.networks.schedulers.RFlowScheduler` (which this class uses
    for timestep sampling and noising): timesteps ``t`` in ``[0, num_train_timesteps)``, with
    ``s = t / num_train_timesteps``::

        x0  = clamp(label, 0, 1) * 2 - 1          # mask in [-1, 1]
        x_t = (1 - s) * x0 + s * noise            # t = T: pure noise, t = 0: the mask
        v   = x0 - noise                          # velocity target; sampling integrates dx = v * ds from s=1 to 0

    Returns ``(cat([x_t, image], 1), target, (), {"timesteps": t, "profile": p})`` for ``SupervisedTrainer``;
    ``"profile"`` is present only when the batch has ``profile_key``. ``target`` is ``v`` (``target="velocity"``,
    for ``MSELoss``) or the mapping ``{"velocity": v, "x_t": x_t, "sigma": t / T, "mask": label}`` (``target="flow"``)
    that :class:`~monai_vlmfilm.losses.FlowSegLoss` needs for its segmentation loss on ``x0_hat = x_t + s * v_hat``.

    Few-step inference starts at ``t = T`` (pure noise), a time the logit-normal sampler practically never draws:
    ``endpoint_fraction`` of each batch (rounded, at least one sample when positive) is trained exactly there.

    Args:
        num_train_timesteps: length of the time axis (``RFlowScheduler.num_train_timesteps``).
        timestep_sampling: ``"uniform"`` or ``"logit-normal"`` (``t / T = sigmoid(N(loc, scale))``, which
            concentrates training on intermediate times, as in Stable Diffusion 3).
        image_key, label_key, profile_key: batch keys; ``profile_key=None`` never passes a profile.
        use_discrete_timesteps: integer timesteps as ``RFlowScheduler``'s default; False keeps them continuous.
        loc, scale: logit-normal parameters.
        use_timestep_transform, transform_scale, base_img_size_numel: ``RFlowScheduler``'s resolution-dependent
            timestep shift (off by default).
        scheduler: use this ``RFlowScheduler`` instead of building one from the arguments above.
        endpoint_fraction: share of each batch trained at ``t = T`` (the start of few-step inference), in [0, 1].
        target: ``"velocity"`` (the velocity tensor) or ``"flow"`` (the mapping for ``FlowSegLoss``), see above.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        timestep_sampling: str = "uniform",
        image_key: str = "image",
        label_key: str = "label",
        profile_key: str | None = PROFILE_KEY,
        use_discrete_timesteps: bool = True,
        loc: float = 0.0,
        scale: float = 1.0,
        use_timestep_transform: bool = False,
        transform_scale: float = 1.0,
        base_img_size_numel: int = 32 * 32,
        scheduler: RFlowScheduler | None = None,
        endpoint_fraction: float = 0.0,
        target: str = "velocity",
    ) -> None:
        if not 0.0 <= float(endpoint_fraction) <= 1.0:
            raise ValueError(f"endpoint_fraction must be in [0, 1], got {endpoint_fraction}.")
        if target not in ("velocity", "flow"):
            raise ValueError(f"target must be 'velocity' or 'flow', got {target!r}.")
        self.endpoint_fraction = float(endpoint_fraction)
        self.target = target
        if scheduler is None:
            scheduler = RFlowScheduler(
                num_train_timesteps=num_train_timesteps,
                use_discrete_timesteps=use_discrete_timesteps,
                sample_method=timestep_sampling,
                loc=loc,
                scale=scale,
                use_timestep_transform=use_timestep_transform,
                transform_scale=transform_scale,
                base_img_size_numel=base_img_size_numel,
            )
        self.scheduler = scheduler
        self.num_train_timesteps = scheduler.num_train_timesteps
        self.image_key = image_key
        self.label_key = label_key
        self.profile_key = profile_key

    def get_noise(self, x0: torch.Tensor) -> torch.Tensor:
        """Standard normal noise like ``x0`` (override for other source distributions)."""
        return torch.randn_like(x0)

    def sample_timesteps(self, x0: torch.Tensor) -> torch.Tensor:
        """``[B]`` timesteps from the scheduler, with ``endpoint_fraction`` of them (random rows) set to ``T``."""
        timesteps = self.scheduler.sample_timesteps(x0).to(x0.device)
        n_end = int(round(self.endpoint_fraction * x0.shape[0]))
        if self.endpoint_fraction > 0:
            n_end = max(n_end, 1)
        if n_end:
            rows = torch.randperm(x0.shape[0], device=x0.device)[:n_end]
            timesteps = timesteps.clone()
            timesteps[rows] = self.num_train_timesteps
        return timesteps

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any, tuple, dict]:
        image = _get(batchdata, self.image_key, "image").to(device=device, non_blocking=non_blocking, **kwargs)
        label = _get(batchdata, self.label_key, "label").to(device=device, non_blocking=non_blocking, **kwargs)
        if image.shape[0] != label.shape[0] or image.shape[2:] != label.shape[2:]:
            raise ValueError(
                f"image {tuple(image.shape)} and label {tuple(label.shape)} must share batch and spatial size."
            )
        x0 = label_to_flow_space(label).to(image.dtype)
        noise = self.get_noise(x0)
        timesteps = self.sample_timesteps(x0)
        x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        target: Any = x0 - noise
        if self.target == "flow":
            sigma = timesteps.float() / self.num_train_timesteps
            target = {"velocity": target, "x_t": x_t, "sigma": sigma, "mask": (x0 + 1) / 2}
        infer_kwargs = {"timesteps": timesteps}
        infer_kwargs.update(_profile_kwargs(batchdata, self.profile_key, device, non_blocking))
        return torch.cat([x_t, image], dim=1), target, (), infer_kwargs


class ProfilePrepareBatch(PrepareBatch):
    """Evaluation ``prepare_batch``: ``(image, label, (), {"profile": p})``, or ``(image, label)`` without a profile.

    With it, ``SupervisedEvaluator`` calls ``inferer(image, network, profile=p)`` (e.g. :class:`FlowSegInferer`).

    Args:
        image_key, label_key, profile_key: batch keys; a missing label gives ``None`` as target.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", profile_key: str | None = PROFILE_KEY):
        self.image_key = image_key
        self.label_key = label_key
        self.profile_key = profile_key

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple:
        image = _get(batchdata, self.image_key, "image").to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata.get(self.label_key)
        if isinstance(label, torch.Tensor):
            label = label.to(device=device, non_blocking=non_blocking, **kwargs)
        extra = _profile_kwargs(batchdata, self.profile_key, device, non_blocking)
        if not extra:
            return image, label
        return image, label, (), extra
