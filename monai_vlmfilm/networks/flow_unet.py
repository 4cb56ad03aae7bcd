"""MONAI's ``DiffusionModelUNet`` with optional FiLM modulation of its decoder by an image profile."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets import DiffusionModelUNet
from monai.utils import str2bool

from monai_vlmfilm.profiles.schema import DIFFICULTY_INDEX, FALLBACK_INDEX, PROFILE_DIM, as_profile_batch

from .film import AdaptiveFiLMHead, ProfileEncoder, film_modulate
from .image_encoder import ImageSkipEncoder, skip_layout

__all__ = ["FiLMFlowUNet", "as_profile_batch", "zscore_channels"]


def _switch(name: str, value: bool | str) -> bool:
    """A boolean argument that may come from the bundle command line as a string (`--use_vlm_film false`)."""
    try:
        return str2bool(str(value).strip())
    except ValueError as e:
        raise ValueError(f"{name} must be true or false, got {value!r}") from e


def zscore_channels(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each channel of each sample of ``[B, C, *spatial]`` to mean 0 and standard deviation 1 over its pixels (a
    constant channel becomes 0)."""
    dims = tuple(range(2, x.ndim))
    xf = x.float()
    mean = xf.mean(dim=dims, keepdim=True)
    std = xf.std(dim=dims, keepdim=True, unbiased=False)
    return ((xf - mean) / (std + eps)).to(x.dtype)


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
      ``h * (1 + gamma_i) + beta_i``: a forward hook on that up block, so ``DiffusionModelUNet.forward`` itself
      runs unchanged. The last head layer is zero-initialised: a fresh ON network gives exactly the OFF outputs
      and an OFF checkpoint warm-starts it (:func:`~monai_vlmfilm.networks.load_off_checkpoint`).
      ``profile=None`` means the null profile: no modulation at all, identical to OFF (MONAI Label calls
      ``inferer(inputs, network)`` with nothing else).

    The profile is detached inside ``forward``: the profiler (VLM) never receives gradients. The network keeps no
    per-call state for observers: :class:`~monai_vlmfilm.handlers.FiLMStatsHandler` reads the FiLM heads through
    forward hooks of its own.

    Args:
        spatial_dims, in_channels, out_channels: as ``DiffusionModelUNet`` (``in_channels`` = mask + image channels).
        use_vlm_film: build and apply the FiLM modules (a bool, or its string form from the command line).
        profile_dim: length of the profile vector.
        cond_dim: size of the profile embedding fed to every head.
        film_hidden_dim: hidden width of the encoder and head MLPs.
        use_difficulty_gate: gate gamma/beta by ``sigmoid(a * profile[:, gate_index] + b)`` (see
            :class:`AdaptiveFiLMHead`).
        gate_index: the profile element that drives the gate (default: the difficulty scalar).
        film_stages: decoder (up) block indices to modulate, 0 being the deepest (lowest resolution) block;
            ``None`` or ``"all"`` means every up block.
        film_encoder_stages: encoder (down) block indices to modulate as well, 0 being the first (full
            resolution) block; ``None`` (default) or ``[]`` modulates no encoder block. A modulated down block's
            output and every skip connection it hands to the decoder become ``h * (1 + gamma) + beta`` (own heads,
            zero-initialised like the decoder's, in the state dict under ``film_encoder_heads``; the FiLM-off
            network has none). Issue 16's "where FiLM acts" measurement; the bundle modulates the decoder only.
        profile_norm: per-feature normalisation of the profile before the encoder: ``None`` (identity),
            ``(mean, std)`` or a mapping with ``mean`` / ``std``; a bundle config loads the JSON of
            ``python -m monai_vlmfilm.profiles stats --norm-out`` with
            :func:`monai_vlmfilm.profiles.normalization.load_profile_norm`. Kept in the state_dict; the gate still
            reads the raw profile.
        image_encoder_channels: widths (one per level) of an :class:`~monai_vlmfilm.networks.ImageSkipEncoder`, a
            ``BasicUNet``-style encoder of the image channels that adds its features to the skip connections and
            the mid block through zero-initialised projections; ``None`` (default) builds none. It is part of the
            segmentation network, not of the profile parts: ON and OFF both have it.
        image_norm: z-score each image channel of each sample (mean 0, std 1 over its pixels) before the network
            sees it, as ``BasicUNet``'s first instance norm does to its input: the segmentation no longer depends on
            the image's brightness and contrast (any ``a * image + b``, ``a > 0``, gives the same output). A network
            built with it holds a ``image_norm_flag`` buffer in its state dict, so a checkpoint trained one way
            does not load into a network built the other way (:func:`~monai_vlmfilm.networks.load_network_weights`
            names the switch). Measured (``benchmarks/BENCHMARKS.md`` sections 9d, 9e, one seed): across sites
            +1.1 (DCA1 -> XCAD) and +1.6 (XCAD -> DCA1) Dice points, on the two-site validation splits +1.0 / +0.9,
            but -0.7 in XCAD cross-validation. Off by default here; the bundle turns it on (``image_norm: true``)
            since 0.6.0, whose ``model.pt`` is trained with it. Part of the segmentation network: ON and OFF alike.
        profile_dropout: in training mode, the probability that a sample's profile is replaced by the training
            profiles' mean (``profile_encoder.feature_mean``, which the encoder normalises to 0; the difficulty gate
            then reads the mean difficulty too), as condition dropout does for classifier-free guidance: the decoder
            must segment well from the average description, and the profile can only add what it knows about this
            image instead of serving as an image identifier to memorise. No effect in eval mode or with FiLM off;
            nothing is stored in the state dict.
        profile_noise: in training mode, the standard deviation of Gaussian noise added to each sample's profile, in
            units of the training profiles' per-feature spread (``profile_encoder.feature_std``): each training image's
            profile then names a neighbourhood of descriptions, not one point. On one site FiLM costs Dice and a
            same-site image's profile costs as much as the image's own (``benchmarks/BENCHMARKS.md`` section 9n), as
            if the decoder memorised each training image by its profile; this option tests that. The fallback flag
            (last feature) is left unchanged. No effect in eval mode or with FiLM off; nothing is stored in the state
            dict. Not yet measured on real images.
        kwargs: any other ``DiffusionModelUNet`` argument (``channels``, ``attention_levels``, ``num_res_blocks``, ...).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        use_vlm_film: bool | str = False,
        profile_dim: int = PROFILE_DIM,
        cond_dim: int = 256,
        film_hidden_dim: int = 256,
        use_difficulty_gate: bool = True,
        gate_index: int = DIFFICULTY_INDEX,
        film_stages: str | Sequence[int] | None = None,
        film_encoder_stages: Sequence[int] | None = None,
        profile_norm: Any = None,
        image_encoder_channels: Sequence[int] | None = None,
        image_norm: bool | str = False,
        profile_dropout: float = 0.0,
        profile_noise: float = 0.0,
        **kwargs: Any,
    ) -> None:
        # the UNet first: an OFF network must consume exactly the RNG stream of DiffusionModelUNet
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
        self.spatial_dims = spatial_dims
        self.mask_channels = out_channels
        self.image_norm = _switch("image_norm", image_norm)
        if self.image_norm:
            if in_channels <= out_channels:
                raise ValueError(f"image_norm needs image channels: in_channels {in_channels} <= out_channels.")
            # no parameter, only a record in the state dict: a checkpoint says whether it was trained with it
            self.register_buffer("image_norm_flag", torch.ones(()))
        # before the FiLM modules: ON and OFF networks with an encoder still share every non-profile weight
        self.image_encoder: ImageSkipEncoder | None = None
        if image_encoder_channels is not None:
            if in_channels <= out_channels:
                raise ValueError(f"an image encoder needs image channels: in_channels {in_channels} <= out_channels.")
            self.image_encoder = ImageSkipEncoder(
                spatial_dims,
                in_channels - out_channels,
                image_encoder_channels,
                skip_layout(self.block_out_channels, self.num_res_blocks),
                self.block_out_channels[-1],
            )
        self.use_vlm_film = _switch("use_vlm_film", use_vlm_film)
        if not 0.0 <= float(profile_dropout) <= 1.0:
            raise ValueError(f"profile_dropout must be in [0, 1], got {profile_dropout}.")
        self.profile_dropout = float(profile_dropout)
        if not float(profile_noise) >= 0.0:
            raise ValueError(f"profile_noise must be >= 0, got {profile_noise}.")
        self.profile_noise = float(profile_noise)
        self.profile_dim = profile_dim
        self.use_difficulty_gate = use_difficulty_gate
        if not 0 <= gate_index < profile_dim:
            raise ValueError(f"gate_index must be in [0, {profile_dim - 1}], got {gate_index}.")
        self.gate_index = int(gate_index)
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
        n_down = len(self.down_blocks)
        enc = sorted({int(s) for s in (film_encoder_stages or [])})
        if isinstance(film_encoder_stages, str) or any(s < 0 or s >= n_down for s in enc):
            raise ValueError(
                f"film_encoder_stages must be a list of down-block indices in [0, {n_down - 1}], "
                f"got {film_encoder_stages!r}."
            )
        self.film_encoder_stages: tuple[int, ...] = tuple(enc)
        # gamma / beta of the forward pass in progress, read by the block hooks and cleared when it returns
        self._film_now: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._film_enc_now: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
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
            for i in self.film_stages:
                self.up_blocks[i].register_forward_hook(functools.partial(self._modulate_up_block, i))
            if self.film_encoder_stages:  # built last: the decoder heads keep the random numbers they had without
                self.film_encoder_heads = nn.ModuleDict(
                    {
                        str(i): AdaptiveFiLMHead(
                            cond_dim, self.block_out_channels[i], film_hidden_dim, use_difficulty_gate, spatial_dims
                        )
                        for i in self.film_encoder_stages
                    }
                )
                for i in self.film_encoder_stages:
                    self.down_blocks[i].register_forward_hook(functools.partial(self._modulate_down_block, i))

    def film_parameters(self, profile: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``{stage: (gamma, beta, gate)}`` for a ``[B, profile_dim]`` profile batch (ON networks only)."""
        if not self.use_vlm_film:
            raise RuntimeError("film_parameters() needs a network built with use_vlm_film=True.")
        return self._film(profile, encoder=False)[0]

    def _film(self, profile: torch.Tensor, encoder: bool) -> tuple[dict, dict]:
        """Decoder and (with ``encoder``) encoder ``{stage: (gamma, beta, gate)}`` from one pass of the profile
        encoder."""
        cond = self.profile_encoder(profile)
        gate_input = profile[:, self.gate_index]
        dec = {i: self.film_heads[str(i)](cond, gate_input) for i in self.film_stages}
        stages = self.film_encoder_stages if encoder else ()
        return dec, {i: self.film_encoder_heads[str(i)](cond, gate_input) for i in stages}

    def _modulate_down_block(self, stage: int, module: nn.Module, args: tuple, output: tuple) -> tuple | None:
        film = self._film_enc_now.get(stage)
        if film is None:
            return None
        h, res_samples = output  # the path down and the skips to the decoder, all with the block's channels
        return film_modulate(h, film[0], film[1]), [film_modulate(r, film[0], film[1]) for r in res_samples]

    def _modulate_up_block(
        self, stage: int, module: nn.Module, args: tuple, output: torch.Tensor
    ) -> torch.Tensor | None:
        film = self._film_now.get(stage)
        return None if film is None else film_modulate(output, film[0], film[1])

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
        if self.image_norm:
            x = torch.cat([x[:, : self.mask_channels], zscore_channels(x[:, self.mask_channels :])], dim=1)
        if self.image_encoder is not None:
            skips, mid = self.image_encoder(x[:, self.mask_channels :])
            if down_block_additional_residuals is not None:
                skips = [a + b for a, b in zip(skips, down_block_additional_residuals)]
            if mid_block_additional_residual is not None:
                mid = mid + mid_block_additional_residual
            down_block_additional_residuals, mid_block_additional_residual = tuple(skips), mid
        args = (x, timesteps, context, class_labels, down_block_additional_residuals, mid_block_additional_residual)
        if not self.use_vlm_film or profile is None:
            return super().forward(*args)
        p = as_profile_batch(profile, x.shape[0], self.profile_dim, device=x.device)
        if self.training and self.profile_dropout > 0:
            drop = torch.rand(p.shape[0], device=p.device) < self.profile_dropout
            p = torch.where(drop[:, None], self.profile_encoder.feature_mean.to(p.dtype), p)
        if self.training and self.profile_noise > 0:
            noise = torch.randn_like(p) * self.profile_encoder.feature_std.to(p.dtype) * self.profile_noise
            if p.shape[1] > FALLBACK_INDEX:
                noise[:, FALLBACK_INDEX] = 0.0  # a flag, not a measurement
            p = p + noise
        self._film_now, self._film_enc_now = self._film(p, encoder=True)
        try:
            return super().forward(*args)
        finally:
            self._film_now, self._film_enc_now = {}, {}
