"""Profile encoder and FiLM heads that turn a per-image profile vector into per-channel modulation.

The heads are tiny MLPs run once per forward pass on ``[B, cond_dim]``; their cost does not depend on
the image size. Their last linear layer is zero-initialised, so a freshly built head returns
``gamma = beta = 0`` and the modulated feature map ``h * (1 + gamma) + beta`` equals ``h`` exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from monai_vlmfilm.profiles.schema import PROFILE_DIM

__all__ = ["ProfileEncoder", "AdaptiveFiLMHead", "film_modulate"]


class ProfileEncoder(nn.Module):
    """Embed a profile vector ``[B, profile_dim]`` into a conditioning vector ``[B, cond_dim]``.

    ``clip((p - mean) / std, -clip, clip) -> Linear(profile_dim, hidden_dim) -> SiLU -> Linear(hidden_dim, cond_dim)
    -> SiLU``.

    ``mean`` / ``std`` are buffers (saved in the state_dict, so a checkpoint carries them); they start as the
    identity (0 / 1) and are set from the training set's profiles by ``norm`` or :meth:`set_normalization`. The
    network reads no file: a config loads the statistics with
    :func:`monai_vlmfilm.profiles.normalization.load_profile_norm` and passes them in. A checkpoint saved before
    the buffers existed loads with the identity.

    Args:
        profile_dim: length of the profile vector (``PROFILE_DIM`` of ``monai_vlmfilm.profiles``).
        cond_dim: size of the conditioning vector fed to every FiLM head.
        hidden_dim: hidden width of the MLP (defaults to ``cond_dim``).
        norm: ``None`` (identity), ``(mean, std)`` or a mapping with ``mean`` and ``std`` (e.g. the result of
            ``load_profile_norm``).
        clip: bound of the normalised features: an out-of-distribution profile cannot drive the heads arbitrarily far.
    """

    def __init__(
        self,
        profile_dim: int = PROFILE_DIM,
        cond_dim: int = 256,
        hidden_dim: int | None = None,
        norm: Any = None,
        clip: float = 5.0,
    ) -> None:
        super().__init__()
        if profile_dim < 1 or cond_dim < 1:
            raise ValueError(f"profile_dim and cond_dim must be positive, got {profile_dim} and {cond_dim}.")
        hidden_dim = hidden_dim or cond_dim
        self.profile_dim = profile_dim
        self.cond_dim = cond_dim
        self.clip = float(clip)
        self.register_buffer("feature_mean", torch.zeros(profile_dim))
        self.register_buffer("feature_std", torch.ones(profile_dim))
        if norm is not None:
            self.set_normalization(*_mean_std(norm))
        self.net = nn.Sequential(
            nn.Linear(profile_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, cond_dim), nn.SiLU()
        )

    def set_normalization(self, mean: Any, std: Any) -> None:
        """Use ``(p - mean) / std`` from now on (``std`` must be positive)."""
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.as_tensor(std, dtype=torch.float32).flatten()
        if m.numel() != self.profile_dim or s.numel() != self.profile_dim:
            raise ValueError(f"normalisation needs {self.profile_dim} means and stds, got {m.numel()} and {s.numel()}.")
        if not bool(torch.isfinite(m).all()) or not bool((s > 0).all()):
            raise ValueError("normalisation means must be finite and stds positive.")
        self.feature_mean.copy_(m)
        self.feature_std.copy_(s)

    def zscore(self, profile: torch.Tensor) -> torch.Tensor:
        """``(profile - mean) / std`` before clipping: how far each feature lies from the training profiles."""
        return (profile - self.feature_mean.to(profile.dtype)) / self.feature_std.to(profile.dtype)

    def normalize(self, profile: torch.Tensor) -> torch.Tensor:
        """The encoder's input: ``clip((profile - mean) / std)`` (``profile`` itself with the identity)."""
        return self.zscore(profile).clamp(-self.clip, self.clip)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[no-untyped-def]
        # checkpoints from before the normalisation buffers existed: keep the identity instead of failing strict loads
        for name in ("feature_mean", "feature_std"):
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, profile: torch.Tensor) -> torch.Tensor:
        if profile.ndim != 2 or profile.shape[1] != self.profile_dim:
            raise ValueError(f"profile must have shape [B, {self.profile_dim}], got {tuple(profile.shape)}.")
        return self.net(self.normalize(profile))


class AdaptiveFiLMHead(nn.Module):
    """Per-channel FiLM parameters for one decoder stage, optionally gated by the image difficulty.

    ``gamma_raw, beta_raw = MLP(cond)`` (last layer zero-initialised), then

    - with ``use_difficulty_gate=True``: ``gate = sigmoid(a * d + b)`` where ``d`` in [0, 1] is the
      difficulty scalar (profile element 0, ``(difficulty - 1) / 4``) and ``a``, ``b`` are learnable
      scalars initialised to ``a = gate_init[0] = 4``, ``b = gate_init[1] = -2``: an easy image
      (``d = 0``) starts at gate 0.12, a medium one (``d = 0.5``) at 0.5 and a hard one (``d = 1``)
      at 0.88, so easy images get small modulation; training may move ``a`` and ``b``;
    - without the gate: ``gate = 1``;

    and ``gamma = gate * gamma_raw``, ``beta = gate * beta_raw``, each shaped ``[B, C, 1, 1]`` (2D)
    or ``[B, C, 1, 1, 1]`` (3D), applied as ``h * (1 + gamma) + beta`` (see :func:`film_modulate`).

    Args:
        cond_dim: size of the conditioning vector (output of :class:`ProfileEncoder`).
        channels: number of feature channels of the modulated stage.
        hidden_dim: hidden width of the head MLP.
        use_difficulty_gate: scale gamma and beta by the learnable difficulty gate.
        spatial_dims: 2 or 3; sets the number of trailing singleton dimensions of gamma and beta.
        gate_init: initial ``(a, b)`` of the gate.
    """

    def __init__(
        self,
        cond_dim: int,
        channels: int,
        hidden_dim: int = 256,
        use_difficulty_gate: bool = True,
        spatial_dims: int = 2,
        gate_init: tuple[float, float] = (4.0, -2.0),
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        self.channels = channels
        self.spatial_dims = spatial_dims
        self.use_difficulty_gate = use_difficulty_gate
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 2 * channels))
        # zero init of the last layer: a fresh head is the identity modulation (fresh ON == OFF)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        if use_difficulty_gate:
            self.gate_scale = nn.Parameter(torch.tensor(float(gate_init[0])))
            self.gate_bias = nn.Parameter(torch.tensor(float(gate_init[1])))

    def gate(self, difficulty: torch.Tensor) -> torch.Tensor:
        """``sigmoid(a * d + b)`` for the difficulty scalars ``d`` of shape ``[B]`` (ones without the gate)."""
        if not self.use_difficulty_gate:
            return torch.ones_like(difficulty)
        return torch.sigmoid(self.gate_scale * difficulty + self.gate_bias)

    def forward(
        self, cond: torch.Tensor, difficulty: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            cond: ``[B, cond_dim]`` conditioning vector.
            difficulty: ``[B]`` difficulty scalars in [0, 1]; required when the gate is on.

        Returns:
            ``(gamma, beta, gate)``: gamma and beta ``[B, C, 1, ...]``, gate ``[B]``.
        """
        gamma_beta = self.mlp(cond)
        gamma, beta = gamma_beta.chunk(2, dim=1)
        if self.use_difficulty_gate:
            if difficulty is None:
                raise ValueError("AdaptiveFiLMHead with use_difficulty_gate=True needs the difficulty scalars.")
            gate = self.gate(difficulty.to(gamma.dtype))
            gamma = gamma * gate[:, None]
            beta = beta * gate[:, None]
        else:
            gate = torch.ones(gamma.shape[0], dtype=gamma.dtype, device=gamma.device)
        shape = (gamma.shape[0], self.channels) + (1,) * self.spatial_dims
        return gamma.reshape(shape), beta.reshape(shape), gate


def film_modulate(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``h * (1 + gamma) + beta`` in ``h``'s dtype (exactly ``h`` when gamma and beta are zero).

    One fused ``addcmul`` pass over the feature map instead of a multiply and an add: the map is the large operand
    (decoder stages at full resolution), so the modulation costs one read and one write of it.
    """
    return torch.addcmul(beta.to(h.dtype), h, (1 + gamma).to(h.dtype))


def _mean_std(norm: Any) -> tuple[Any, Any]:
    """``(mean, std)`` of normalisation statistics given as a mapping or a pair (never a file: see ProfileEncoder)."""
    if isinstance(norm, (str, os.PathLike)):
        raise TypeError(
            f"profile normalisation {str(norm)!r} is a path: load it first, e.g. "
            "monai_vlmfilm.profiles.normalization.load_profile_norm(path), and pass the (mean, std) it returns"
        )
    if isinstance(norm, Mapping):
        return norm["mean"], norm["std"]
    mean, std = norm
    return mean, std
