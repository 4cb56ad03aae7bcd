"""MONAI's ``DiffusionModelUNet`` with optional FiLM modulation of its decoder by an image profile."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

from monai_vlmfilm.profiles.schema import PROFILE_DIM, as_profile_batch

from .film import AdaptiveFiLMHead, ProfileEncoder, difficulty_of, film_modulate

__all__ = ["FiLMFlowUNet", "as_profile_batch"]

logger = logging.getLogger(__name__)


class FiLMFlowUNet(DiffusionModelUNet):
    """Flow-matching segmentation UNet: MONAI ``DiffusionModelUNet`` plus profile FiLM in the decoder.

    The network sees ``x = cat([x_t, image], dim=1)`` (noisy mask and the image), the flow time
    ``timesteps`` (``[B]``, in ``[0, num_train_timesteps]``) and predicts the velocity.

    - ``use_vlm_film=False`` (OFF): no extra module is built; the state_dict (keys and values under the
      same seed) and the outputs are bit-identical to ``DiffusionModelUNet(**same kwargs)``. A ``profile``
      passed to an OFF network is ignored.
    - ``use_vlm_film=True`` (ON): a :class:`ProfileEncoder` (``profile -> [B, cond_dim]``) and one
      :class:`AdaptiveFiLMHead` per chosen decoder stage, built after the UNet (so the UNet consumes the
      same random numbers as the OFF network). After up block ``i`` the features become
      ``h * (1 + gamma_i) + beta_i``. The last head layer is zero-initialised: a fresh ON network gives
      exactly the OFF outputs and an OFF checkpoint warm-starts it (:func:`load_off_checkpoint`).
      ``profile=None`` means the null profile: no modulation at all, identical to OFF (MONAI Label calls
      ``inferer(inputs, network)`` with nothing else).

    The profile is detached inside ``forward``: the profiler (VLM) never receives gradients.

    Args:
        spatial_dims, in_channels, out_channels: as ``DiffusionModelUNet`` (``in_channels`` = mask + image channels).
        use_vlm_film: build and apply the FiLM modules.
        profile_dim: length of the profile vector.
        cond_dim: size of the profile embedding fed to every head.
        film_hidden_dim: hidden width of the encoder and head MLPs.
        use_difficulty_gate: gate gamma/beta by ``sigmoid(a * difficulty + b)`` (see :class:`AdaptiveFiLMHead`).
        film_stages: decoder (up) block indices to modulate, 0 being the deepest (lowest resolution) block;
            ``None`` or ``"all"`` means every up block.
        profile_norm: per-feature normalisation of the profile before the encoder: ``None`` (identity), a JSON
            file from ``python -m monai_vlmfilm.profiles stats --norm-out`` or a mapping with ``mean`` / ``std``
            (see :mod:`monai_vlmfilm.profiles.normalization`). Kept in the state_dict; the difficulty gate still
            reads the raw difficulty.
        kwargs: any other ``DiffusionModelUNet`` argument (``channels``, ``attention_levels``, ``num_res_blocks``, ...).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        use_vlm_film: bool = False,
        profile_dim: int = PROFILE_DIM,
        cond_dim: int = 256,
        film_hidden_dim: int = 256,
        use_difficulty_gate: bool = True,
        film_stages: str | Sequence[int] | None = None,
        profile_norm: Any = None,
        **kwargs: Any,
    ) -> None:
        # the UNet first: an OFF network must consume exactly the RNG stream of DiffusionModelUNet
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
        self.spatial_dims = spatial_dims
        self.use_vlm_film = bool(use_vlm_film)
        self.profile_dim = profile_dim
        self.use_difficulty_gate = use_difficulty_gate
        #: record the last gamma/beta/gate per stage for FiLMStatsHandler (detached references, no copies).
        self.record_film_stats = True
        self._last_film_stats: dict[str, Any] = {}
        n_up = len(self.up_blocks)
        if film_stages is None or (isinstance(film_stages, str) and film_stages == "all"):
            stages = list(range(n_up))
        elif isinstance(film_stages, str):
            raise ValueError(f"film_stages must be None, 'all' or a list of up-block indices, got {film_stages!r}.")
        else:
            stages = sorted({int(s) for s in film_stages})
            if not stages or any(s < 0 or s >= n_up for s in stages):
                raise ValueError(f"film_stages {list(film_stages)} must be non-empty indices in [0, {n_up - 1}].")
        self.film_stages: tuple[int, ...] = tuple(stages)
        if self.use_vlm_film:
            stage_channels = list(reversed(self.block_out_channels))
            self.profile_encoder = ProfileEncoder(profile_dim, cond_dim, film_hidden_dim, norm=profile_norm)
            self.film_heads = nn.ModuleDict(
                {
                    str(i): AdaptiveFiLMHead(
                        cond_dim, stage_channels[i], film_hidden_dim, use_difficulty_gate, spatial_dims
                    )
                    for i in self.film_stages
                }
            )

    def film_parameters(self, profile: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``{stage: (gamma, beta, gate)}`` for a ``[B, profile_dim]`` profile batch (ON networks only)."""
        if not self.use_vlm_film:
            raise RuntimeError("film_parameters() needs a network built with use_vlm_film=True.")
        cond = self.profile_encoder(profile)
        d = difficulty_of(profile)
        return {i: self.film_heads[str(i)](cond, d) for i in self.film_stages}

    def last_film_stats(self) -> dict[str, Any]:
        """Detached tensors of the last ON forward pass with a profile.

        ``{"profile": [B, P], "stages": {i: {"gamma": [B, C], "beta": [B, C], "gate": [B]}}}``;
        empty when the last forward pass applied no FiLM (OFF network or null profile).
        """
        return self._last_film_stats

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        profile: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        down_block_additional_residuals: tuple[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``cat([x_t, image], 1)``, shape ``[B, in_channels, *spatial]``.
            timesteps: ``[B]`` flow times (``num_train_timesteps`` = noise, 0 = mask).
            profile: ``[B, profile_dim]`` (or ``[profile_dim]``, broadcast) profile vectors, or None (null profile).
            context, class_labels, down_block_additional_residuals, mid_block_additional_residual: as
                ``DiffusionModelUNet.forward``.
        """
        if not self.use_vlm_film or profile is None:
            self._last_film_stats = {}
            return super().forward(
                x, timesteps, context, class_labels, down_block_additional_residuals, mid_block_additional_residual
            )
        p = as_profile_batch(profile, x.shape[0], self.profile_dim, device=x.device)
        film = self.film_parameters(p)
        if self.record_film_stats:
            self._last_film_stats = {
                "profile": p,
                "stages": {
                    i: {"gamma": g.detach().flatten(1), "beta": b.detach().flatten(1), "gate": gt.detach()}
                    for i, (g, b, gt) in film.items()
                },
            }

        # the body below follows DiffusionModelUNet.forward (MONAI 1.5/1.6) with FiLM after the chosen up blocks
        t_emb = get_timestep_embedding(timesteps, self.block_out_channels[0])
        t_emb = t_emb.to(dtype=x.dtype)
        emb = self.time_embed(t_emb)
        if self.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when num_class_embeds > 0")
            emb = emb + self.class_embedding(class_labels).to(dtype=x.dtype)
        h = self.conv_in(x)
        if context is not None and self.with_conditioning is False:
            raise ValueError("model should have with_conditioning = True if context is provided")
        down_block_res_samples: list[torch.Tensor] = [h]
        for downsample_block in self.down_blocks:
            h, res_samples = downsample_block(hidden_states=h, temb=emb, context=context)
            down_block_res_samples.extend(res_samples)
        if down_block_additional_residuals is not None:
            down_block_res_samples = [s + r for s, r in zip(down_block_res_samples, down_block_additional_residuals)]
        h = self.middle_block(hidden_states=h, temb=emb, context=context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for i, upsample_block in enumerate(self.up_blocks):
            idx: int = -len(upsample_block.resnets)  # type: ignore
            res_samples = down_block_res_samples[idx:]
            down_block_res_samples = down_block_res_samples[:idx]
            h = upsample_block(hidden_states=h, res_hidden_states_list=res_samples, temb=emb, context=context)
            if i in film:
                gamma, beta, _ = film[i]
                h = film_modulate(h, gamma, beta)
        output: torch.Tensor = self.out(h)
        return output
