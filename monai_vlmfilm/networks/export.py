"""The whole few-step flow segmentation (ODE, sample mean, TTA) as one module that exports to TorchScript.

``python -m monai.bundle ckpt_export export_network_def ...`` scripts :class:`FlowODESegmenter`; the saved
``model.ts`` maps an image (and, with FiLM, its profile) to the foreground probability and runs with ``torch`` alone.

Why part tracing, part scripting: MONAI's ``DiffusionModelUNet`` cannot be scripted (``torch.jit.script`` stops at
``SpatialAttentionBlock``, whose ``x.reshape(*shape[:2], -1)`` has a list size TorchScript cannot infer, and the
FiLM network applies its heads through forward hooks built with ``functools.partial``). Tracing it works, and the
trace stays valid for any batch and image size (the network has no data-dependent branches; the tests check other
sizes). The ODE around it has loops, padding that depends on the image size, an optional profile and a seeded
noise generator, which a trace would freeze; so that part is scripted, and it calls the traced network.
``torch.jit.script`` calls :meth:`FlowODESegmenter.__prepare_scriptable__` first, which does the tracing.
"""

# no `from __future__ import annotations`: TorchScript reads the annotations of the scripted methods
import contextlib
import copy
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, List, Tuple

import torch
import torch.nn as nn

from monai_vlmfilm.profiles.schema import PROFILE_DIM

from .checkpoint import load_network_state, strip_ddp_prefix, unwrap

__all__ = ["FlowODESegmenter"]

_TTA_MODES = ("none", "flip", "dihedral")  # as monai_vlmfilm.inferers.TTA_MODES (not imported: inferers imports us)


class _VelocityField(nn.Module):
    """The velocity network with and without a profile, as two methods that one ``trace_module`` call records."""

    def __init__(self, network: nn.Module, film: bool) -> None:
        super().__init__()
        self.network = network
        self.film = film

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        if self.film:
            return self.network(x, timesteps=timesteps, profile=profile)
        return self.network(x, timesteps=timesteps)

    def null(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The null profile: a FiLM network without modulation (as ``FiLMFlowUNet(x, t, profile=None)``)."""
        return self.network(x, timesteps=timesteps)


@contextlib.contextmanager
def _timestep_embedding_without_device_constant() -> Iterator[None]:
    """Trace MONAI's diffusion UNet with a timestep embedding that takes its device from ``timesteps`` at run time.

    ``monai.networks.nets.diffusion_model_unet.get_timestep_embedding`` builds its frequencies with
    ``torch.arange(..., device=timesteps.device)``, which a trace records as a constant device: a model traced on
    the CPU would then compute the frequencies on the CPU on a GPU too and fail. While tracing, the function is
    replaced by the same arithmetic (bit-identical results) whose tensor follows ``timesteps`` (``.to(timesteps)``,
    recorded as an operation on the input, not as a constant).
    """
    from monai.networks.nets import diffusion_model_unet

    original = diffusion_model_unet.get_timestep_embedding

    def embedding(timesteps: torch.Tensor, embedding_dim: int, max_period: int = 10000) -> torch.Tensor:
        if timesteps.ndim != 1:
            raise ValueError("Timesteps should be a 1d-array")
        half_dim = embedding_dim // 2
        # 0, 1, ..., half_dim - 1 (exact in float32) on the device and in the dtype of `timesteps`
        steps = torch.ones_like(timesteps[:1]).float().expand(half_dim).cumsum(0) - 1
        freqs = torch.exp(-math.log(max_period) * steps / half_dim)
        args = timesteps[:, None].float() * freqs[None, :]
        out = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if embedding_dim % 2 == 1:
            out = torch.nn.functional.pad(out, (0, 1, 0, 0))
        return out

    diffusion_model_unet.get_timestep_embedding = embedding
    try:
        yield
    finally:
        diffusion_model_unet.get_timestep_embedding = original


class FlowODESegmenter(nn.Module):
    """A velocity network with its few-step ODE, noise sample mean and TTA: ``probability = module(image, profile)``.

    The whole-image mode of :class:`~monai_vlmfilm.inferers.FlowSegInferer` (``roi_size=None``) as one module, so
    ``python -m monai.bundle ckpt_export`` can save all of it as TorchScript (see the module docstring for how). With
    the same settings and seed its output equals ``FlowSegInferer(...)(image, network, profile)``: the image is
    padded (replicating its border) to the network's multiple, ``num_samples`` noise draws are integrated from
    ``t = T`` to 0 with ``num_steps`` Euler or Heun steps, mapped to ``clamp((x + 1) / 2, 0, 1)``, cropped back and
    averaged, over the TTA copies too. The noise comes from a private generator seeded with ``seed`` on every call
    (the same draws as the inferer's, so the exported model is reproducible); ``seed=None`` uses the global RNG.

    ``forward(image, profile=None)``:

    - ``image``: ``[B, C_img, *spatial]`` float tensor (intensities as in training, i.e. scaled to [0, 1]).
    - ``profile``: ``[B, P]`` or ``[P]`` profile vectors (``VLMProfile.to_vector()``) for a FiLM network; None is the
      null profile (no modulation). A network without FiLM ignores it.
    - returns ``[B, C_mask, *spatial]`` float32 foreground probability in [0, 1] (``[B, 2 * C_mask, ...]`` with the
      per-pixel standard deviation over samples appended when ``return_uncertainty``).

    A state dict of the velocity network itself (a bundle ``model.pt``) loads directly (:meth:`load_state_dict`),
    across the ``use_vlm_film`` switch like :func:`~monai_vlmfilm.networks.load_network_weights`.

    Args:
        network: the velocity network, called as ``network(cat([x_t, image], 1), timesteps=t, profile=p)``
            (a :class:`~monai_vlmfilm.networks.FiLMFlowUNet` or a plain ``DiffusionModelUNet``).
        num_steps: ODE steps.
        solver: ``"euler"`` or ``"heun"`` (no correction into ``t = 0``, as in ``FlowSegInferer``).
        num_samples: noise draws per image, averaged.
        tta: ``"none"``, ``"flip"`` or ``"dihedral"`` (2D), as in ``FlowSegInferer``.
        num_train_timesteps: ``T`` of training.
        seed: seed of the noise generator, drawn anew on every call; None: the global RNG.
        return_uncertainty: append the per-pixel standard deviation over samples (and TTA copies).
        divisible_by: pad the image to a multiple of this; None: the network's total downsampling
            (``2 ** (len(block_out_channels) - 1)``).
        spatial_dims: of the network; None reads ``network.spatial_dims`` (2 when absent).
        trace_size: spatial size of the example input that traces the network (any size works afterwards); None:
            four times the padding multiple, at least 16.
    """

    seed: int | None

    def __init__(
        self,
        network: nn.Module,
        num_steps: int = 1,
        solver: str = "euler",
        num_samples: int = 1,
        tta: str = "none",
        num_train_timesteps: int = 1000,
        seed: int | None = 0,
        return_uncertainty: bool = False,
        divisible_by: int | None = None,
        spatial_dims: int | None = None,
        trace_size: int | None = None,
    ) -> None:
        super().__init__()
        if num_steps < 1 or num_samples < 1:
            raise ValueError(f"num_steps and num_samples must be >= 1, got {num_steps} and {num_samples}.")
        if solver not in ("euler", "heun"):
            raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}.")
        if tta not in _TTA_MODES:
            raise ValueError(f"tta must be one of {_TTA_MODES}, got {tta!r}.")
        net = unwrap(network)
        film = bool(getattr(net, "use_vlm_film", False))
        self.velocity = _VelocityField(net, film)
        self.use_film = film
        self.profile_dim = int(getattr(net, "profile_dim", PROFILE_DIM))
        self.mask_channels = int(net.out_channels)
        self.image_channels = int(net.in_channels) - self.mask_channels
        self.spatial_dims = int(spatial_dims if spatial_dims is not None else getattr(net, "spatial_dims", 2))
        if divisible_by is None:
            levels = getattr(net, "block_out_channels", None)
            divisible_by = 2 ** (len(levels) - 1) if levels else 1
        self.multiple = max(int(divisible_by), 1)
        self.trace_size = int(trace_size) if trace_size else max(4 * self.multiple, 16)
        self.num_steps = int(num_steps)
        self.heun = solver == "heun"
        self.num_samples = int(num_samples)
        self.num_train_timesteps = float(num_train_timesteps)
        t_max = float(num_train_timesteps)
        # the integration times of FlowSegInferer.timesteps(), computed here in the same (double) arithmetic
        self.times: List[float] = [t_max * (1.0 - i / num_steps) for i in range(num_steps + 1)]
        self.seed = None if seed is None else int(seed)
        self.return_uncertainty = bool(return_uncertainty)
        # TTA copies in FlowSegInferer's order (dihedral_transforms): every subset of flips, then the same transposed
        self.num_flips = 1 if tta == "none" else 2**self.spatial_dims
        self.num_copies = self.num_flips * (2 if tta == "dihedral" and self.spatial_dims == 2 else 1)

    # ----------------------------------------------------------------------------------------------- export
    def __prepare_scriptable__(self) -> "FlowODESegmenter":
        """A copy whose velocity network is traced (``torch.jit.script`` calls this before compiling ``forward``)."""
        field = self.velocity
        param = next(field.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        size = [2, self.image_channels + self.mask_channels] + [self.trace_size] * self.spatial_dims
        x = torch.rand(size, device=device)
        t = torch.full((2,), 0.5 * self.num_train_timesteps, device=device)
        p = torch.rand(2, self.profile_dim, device=device)
        was_training = field.training
        field.eval()
        with torch.no_grad(), _timestep_embedding_without_device_constant(), warnings.catch_warnings():
            # the input checks of MONAI's blocks and of as_profile_batch (channel counts, profile shape) compare
            # shapes in Python; the trace keeps them as constants, which is right for a fixed network
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace_module(field, {"forward": (x, t, p), "null": (x, t)}, check_trace=False)
        field.train(was_training)
        graph = str(traced.forward.inlined_graph) + str(traced.null.inlined_graph)
        fixed = sorted(set(re.findall(r'Device = prim::Constant\[value="([^"]+)"\]', graph)))
        if fixed:
            warnings.warn(
                f"the traced velocity network holds a fixed device {fixed}: the exported model runs on that device only.",
                stacklevel=2,
            )
        scriptable = copy.copy(self)
        scriptable._modules = dict(self._modules)  # type: ignore[assignment]
        scriptable._modules["velocity"] = traced
        return scriptable

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load this module's state dict, or the velocity network's own (a bundle ``model.pt``).

        ``ckpt_export`` reads the checkpoint and hands its state dict to the exported module; a bundle checkpoint
        holds the network's keys, which load into :attr:`velocity` with
        :func:`~monai_vlmfilm.networks.load_network_state` (FiLM keys dropped or left at identity across the switch).
        """
        sd = strip_ddp_prefix(state_dict)
        if any(k.startswith("velocity.network.") for k in sd):
            return super().load_state_dict(sd, strict=strict, assign=assign)
        return load_network_state(self.velocity.network, sd, source="state dict")

    # ----------------------------------------------------------------------------------------------- forward
    def _tta(self, x: torch.Tensor, k: int, inverse: bool) -> torch.Tensor:
        """TTA copy ``k`` of ``[B, C, *spatial]`` (or its inverse): flips by the bits of ``k``, transposed past them."""
        transposed = k >= self.num_flips
        if inverse and transposed:
            x = x.transpose(2, 3)
        bits = k % self.num_flips
        dims: List[int] = []
        for i in range(self.spatial_dims):
            if (bits >> i) & 1:
                dims.append(2 + i)
        if len(dims) > 0:
            x = torch.flip(x, dims)
        if transposed and not inverse:
            x = x.transpose(2, 3)
        return x

    def _pad(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """``x`` padded (border replicated) symmetrically up to the multiple, and the offsets of the original."""
        lows: List[int] = []
        pads: List[int] = []
        for d in range(2, x.dim()):
            n = x.shape[d]
            extra = (self.multiple - n % self.multiple) % self.multiple
            lows.append(extra // 2)
            pads = [extra // 2, extra - extra // 2] + pads  # F.pad takes the last dim first
        if max(pads) > 0:
            x = torch.nn.functional.pad(x, pads, mode="replicate")
        return x, lows

    def _integrate(self, image: torch.Tensor, noise: torch.Tensor, profile: torch.Tensor | None) -> torch.Tensor:
        """FlowSegInferer.integrate: the ODE from ``noise`` (t = T) to the mask estimate (t = 0), in flow space."""
        x = noise.float()
        for i in range(self.num_steps):
            t_cur = self.times[i]
            t_next = self.times[i + 1]
            dt = (t_cur - t_next) / self.num_train_timesteps
            v = self._velocity(x, t_cur, image, profile)
            if self.heun and t_next > 0:
                v = 0.5 * (v + self._velocity(x + v * dt, t_next, image, profile))
            x = x + v * dt
        return x

    def _velocity(self, x: torch.Tensor, t: float, image: torch.Tensor, profile: torch.Tensor | None) -> torch.Tensor:
        tt = torch.full([x.shape[0]], t, dtype=torch.float32, device=x.device)
        inputs = torch.cat([x.to(image.dtype), image], dim=1)
        if profile is None:
            return self.velocity.null(inputs, tt).float()
        return self.velocity(inputs, tt, profile).float()

    def forward(self, image: torch.Tensor, profile: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            image: ``[B, C_img, *spatial]`` image batch.
            profile: ``[B, P]`` / ``[P]`` profiles, or None (null profile; ignored without FiLM).
        """
        if torch.jit.is_tracing():  # a trace would freeze the image size, the padding and the noise draw
            raise RuntimeError(
                "FlowODESegmenter is exported with torch.jit.script (ckpt_export without --use_trace); "
                "it traces its velocity network itself."
            )
        if image.dim() != self.spatial_dims + 2 or image.shape[1] != self.image_channels:
            raise ValueError(
                f"image must be [B, {self.image_channels}, {self.spatial_dims} spatial dims], got {image.shape}."
            )
        image = image.float()
        b = image.shape[0]
        s = self.num_samples
        c_m = self.mask_channels
        p: torch.Tensor | None = None
        if profile is not None and self.use_film:
            q = profile.to(device=image.device, dtype=torch.float32)
            if q.dim() == 1:
                q = q.unsqueeze(0)
            if q.dim() != 2 or q.shape[1] != self.profile_dim:
                raise ValueError(f"profile must be [B, {self.profile_dim}] or [{self.profile_dim}], got {q.shape}.")
            if q.shape[0] == 1 and b > 1:
                q = q.expand(b, self.profile_dim)
            if q.shape[0] != b:
                raise ValueError(f"profile batch size {q.shape[0]} does not match the image batch size {b}.")
            p = q.repeat_interleave(s, dim=0)
        gen: torch.Generator | None = None
        seed = self.seed
        if seed is not None:
            gen = torch.Generator(device=image.device)
            gen.manual_seed(seed)
        samples: List[torch.Tensor] = []
        for k in range(self.num_copies):
            copy_k = self._tta(image, k, False)
            img, lows = self._pad(copy_k)
            size: List[int] = list(img.shape[2:])
            noise = torch.randn([b, s * c_m] + size, generator=gen, dtype=torch.float32, device=img.device)
            x0 = self._integrate(img.repeat_interleave(s, dim=0), noise.reshape([b * s, c_m] + size), p)
            prob = ((x0 + 1) / 2).clamp(0, 1)
            for d in range(self.spatial_dims):  # crop the padding off, in the copy's own frame
                prob = prob.narrow(2 + d, lows[d], copy_k.shape[2 + d])
            prob = self._tta(prob, k, True)
            samples.append(prob.reshape([b, s, c_m] + list(image.shape[2:])))
        per_sample = torch.cat(samples, dim=1)
        out = per_sample.mean(dim=1)
        if self.return_uncertainty:
            out = torch.cat([out, per_sample.std(dim=1, unbiased=False)], dim=1)
        return out
