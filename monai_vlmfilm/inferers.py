"""Few-step ODE inference for a flow-matching segmentation network."""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, sliding_window_inference
from monai.utils import ensure_tuple, str2bool

from monai_vlmfilm.networks.checkpoint import unwrap
from monai_vlmfilm.profiles.schema import FALLBACK_INDEX, PROFILE_KEY, VECTOR_FIELDS, as_profile_batch

logger = logging.getLogger(__name__)

__all__ = [
    "ExportedSegmenterInferer",
    "FlowSegInferer",
    "TTA_MODES",
    "cpu_has_native_bf16",
    "dihedral_transforms",
    "pad_to_multiple",
    "profile_from_inputs",
    "profile_range_z",
    "warn_profiles_out_of_range",
]


def _flag(value: Any) -> bool:
    """``bool(value)``, reading strings as MONAI's ``str2bool`` does ("false" is False)."""
    return str2bool(value) if isinstance(value, str) else bool(value)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX tiles or AVX-512 BF16).

    Only there does bf16 autocast speed convolutions up; elsewhere oneDNN emulates it, slower than float32. Reads
    PyTorch's own CPU capability probes (``torch.cpu._is_amx_tile_supported`` / ``_is_avx512_bf16_supported``);
    a PyTorch without them answers False.
    """
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:  # a build without the probe's backend
            continue
    return False


def profile_range_z(encoder: Any, profile: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` z-scores of ``profile`` against a :class:`~monai_vlmfilm.networks.ProfileEncoder`'s training
    statistics, as the range check reads them: float32, the fallback flag set to 0 (a fallback profile is reported
    where it is made, not as out of range)."""
    z = encoder.zscore(profile.detach().float().to(encoder.feature_mean.device))
    if z.shape[1] > FALLBACK_INDEX:
        z[:, FALLBACK_INDEX] = 0.0
    return z


def warn_profiles_out_of_range(network: Any, profile: torch.Tensor, inputs: Any = None) -> list[int]:
    """Log a warning for every profile beyond the clip of ``network``'s profile encoder (see ``FlowSegInferer``).

    Args:
        network: the (unwrapped) network; nothing is checked unless it applies FiLM (``use_vlm_film``) through a
            ``profile_encoder`` with ``zscore`` and ``clip``.
        profile: ``[B, P]`` profiles.
        inputs: the image batch; a MetaTensor's ``filename_or_obj`` names the images in the message.

    Returns:
        the batch indices of the profiles out of range.
    """
    encoder = getattr(network, "profile_encoder", None)
    if not getattr(network, "use_vlm_film", False) or not hasattr(encoder, "zscore"):
        return []
    with torch.no_grad():
        z = profile_range_z(encoder, profile)
        worst, which = z.abs().max(dim=1)
        bad = (worst > encoder.clip).nonzero().flatten().tolist()
    if bad:
        names = inputs.meta.get("filename_or_obj") if isinstance(inputs, MetaTensor) else None
        names = [names] if isinstance(names, str) else names
        for i in bad:
            name = names[i] if isinstance(names, (list, tuple)) and i < len(names) else f"batch item {i}"
            field = VECTOR_FIELDS[int(which[i])] if int(which[i]) < len(VECTOR_FIELDS) else f"feature {int(which[i])}"
            logger.warning(
                f"{name}: its profile lies outside the range the FiLM network was trained on ({field} at "
                f"{float(z[i, which[i]]):+.1f} standard deviations of the training profiles; the network clips at "
                f"{encoder.clip:g}): the image is unlike the training images, its conditioning is clipped and the mask "
                "may be worse. Check the mask, or fine-tune on images like it."
            )
    return bad


#: test-time augmentation modes: none, the flips (4 in 2D) or the dihedral group (8 in 2D: rot90 x flip).
TTA_MODES = ("none", "flip", "dihedral")

#: the key under which AttachVLMProfiled stores the profile in an image's meta dict (MONAI Label route).
META_PROFILE_KEY = PROFILE_KEY


def dihedral_transforms(spatial_dims: int, mode: str = "dihedral") -> list[tuple[Callable, Callable]]:
    """``(forward, inverse)`` pairs of exact, invertible array transforms for test-time augmentation.

    ``"none"``: the identity. ``"flip"``: every subset of spatial-axis flips (``2**spatial_dims``). ``"dihedral"``
    (2D): the flips times a transpose, i.e. the 8 symmetries of the square (rot90 x flip); in 3D it equals
    ``"flip"``. They act on ``[B, C, *spatial]`` tensors; vessel masks are equivariant under all of them and the
    image profile is unchanged by them.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {mode!r}.")
    ident = (lambda x: x, lambda x: x)
    if mode == "none":
        return [ident]
    axes = [2 + i for i in range(spatial_dims)]
    out: list[tuple[Callable, Callable]] = []
    for k in range(2**spatial_dims):
        dims = [a for i, a in enumerate(axes) if k >> i & 1]
        if dims:
            out.append((lambda x, d=dims: torch.flip(x, d), lambda x, d=dims: torch.flip(x, d)))
        else:
            out.append(ident)
    if mode == "dihedral" and spatial_dims == 2:
        out = out + [(lambda x, f=f: f(x).transpose(2, 3), lambda x, i=i: i(x.transpose(2, 3))) for f, i in list(out)]
    return out


def profile_from_inputs(inputs: torch.Tensor, profile: Any = None) -> torch.Tensor | None:
    """The ``[B, P]`` profile of an inferer call: ``profile`` itself, else ``inputs.meta["vlm_profile"]``, else None.

    Args:
        inputs: the image batch (a MetaTensor may carry the profile in its meta data: the MONAI Label route).
        profile: ``[B, P]`` / ``[P]`` profile or None.
    """
    if profile is None and isinstance(inputs, MetaTensor):
        profile = inputs.meta.get(META_PROFILE_KEY)
    if profile is None:
        return None
    return as_profile_batch(profile, inputs.shape[0], device=inputs.device)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "replicate") -> tuple[torch.Tensor, list[slice]]:
    """Pad the spatial dims of ``[B, C, *spatial]`` symmetrically up to a multiple; returns the crop that undoes it."""
    if multiple <= 1:
        return x, [slice(None)] * x.ndim
    pads, crop = [], [slice(None), slice(None)]
    for n in x.shape[2:]:
        extra = (-n) % multiple
        lo = extra // 2
        pads.append((lo, extra - lo))
        crop.append(slice(lo, lo + n))
    flat = [v for lo_hi in reversed(pads) for v in lo_hi]  # F.pad takes the last dim first
    if any(flat):
        x = torch.nn.functional.pad(x, flat, mode=mode)
    return x, crop


class FlowSegInferer(Inferer):
    """Segment by integrating the learned velocity from noise (``t = T``) to the mask (``t = 0``).

    Time convention of MONAI's ``RFlowScheduler`` / :class:`~monai_vlmfilm.engines.FlowMatchingPrepareBatch`:
    the network is called as ``network(cat([x_t, image], 1), timesteps=t, profile=p)`` and predicts
    ``v = x0 - noise``; a step from ``t_i`` to ``t_{i+1}`` is ``x += v * (t_i - t_{i+1}) / T`` (Euler, exactly
    ``RFlowScheduler.step``) or its trapezoidal correction (Heun, two network calls per step, except the last
    step into ``t = 0``, which is an Euler step). The times are
    ``t_i = T * (1 - i / num_steps)``. The final mask estimate in [-1, 1] is mapped to a foreground
    probability ``clamp((x + 1) / 2, 0, 1)``.

    Output: ``[B, C, *spatial]`` probability in [0, 1] (mean over ``num_samples`` noise draws), where ``C`` is
    the network's ``out_channels``. With ``return_uncertainty=True`` the output is ``[B, 2C, *spatial]``:
    channels ``[:C]`` the mean probability and ``[C:]`` the per-pixel standard deviation of the probability
    over the samples (0 everywhere when ``num_samples=1``); slice channel ``[:C]`` before thresholding.
    A MetaTensor input gives a MetaTensor output carrying the input's meta data.

    The profile: the ``profile`` argument (``[B, P]`` or ``[P]``), else ``inputs.meta["vlm_profile"]`` when
    ``inputs`` is a MetaTensor that carries one (MONAI Label calls ``inferer(inputs, network)`` with nothing
    else), else none (the network's null profile). It is omitted from the network call when None, so a
    plain ``DiffusionModelUNet`` works too. With sliding windows every window gets its own image's profile.

    Args:
        num_steps: ODE steps (network evaluations: ``num_steps`` for Euler, ``2 * num_steps - 1`` for Heun).
        solver: ``"euler"`` or ``"heun"``.
        num_samples: noise draws per image, averaged.
        roi_size: sliding-window size; None runs the whole image at once. The noise is drawn for the whole
            image first, so overlapping windows integrate the same noise.
        sw_batch_size, overlap, mode, sigma_scale, padding_mode, cval: as ``monai.inferers.sliding_window_inference``.
        return_uncertainty: append the per-pixel standard deviation over samples (see above).
        num_train_timesteps: ``T`` of training.
        seed: seed of a private ``torch.Generator`` drawn anew on every call (reproducible output, the global
            RNG untouched); None draws from the global RNG.
        mask_channels: channels of the mask; None reads ``network.out_channels``.
        tta: test-time augmentation, one of ``TTA_MODES``: each flipped / rotated copy of the image is segmented
            (with the image's own profile) and the probabilities mapped back and averaged with the samples.
        divisible_by: whole-image inference (``roi_size=None``) pads the image (replicating its border) up to a
            multiple of this and crops the output back; None uses the network's total downsampling
            (``2 ** (len(block_out_channels) - 1)`` for a ``DiffusionModelUNet``, else 1).
        channels_last: 2D only: run the network in the ``channels_last`` memory format (its weights are converted in
            place on the first call, the input per call). The same computation in another memory layout: on the
            2-core CPU the shipped network took 0.79x (304²) and 0.84x (512²) the time of the default layout,
            probabilities within 2e-4 (``benchmarks/BENCHMARKS.md`` section 9b). Meant for inference; a network that keeps training is
            better left in its own layout.
        check_profile_range: with a FiLM network whose profile encoder carries training statistics, log a warning
            naming every image whose profile lies beyond the encoder's clip (``|z| > 5`` on a feature, the
            fallback flag aside): the image is unlike the images the network was trained on and its conditioning
            is clipped. Measured on the two real sites: no training image of either site is flagged; 51 % of DCA1
            images are flagged against XCAD's statistics, where a model trained on XCAD alone fell from 77 to 51 Dice
            points (``benchmarks/BENCHMARKS.md`` section 9c). One host sync per call.
        cpu_bf16: on a CPU that computes bfloat16 in hardware (:func:`cpu_has_native_bf16`: AMX or AVX-512 BF16), run
            the network under ``torch.autocast("cpu", dtype=torch.bfloat16)``, as the GPU runs it under bf16 AMP; on
            other CPUs (where bf16 is emulated and slower than float32) and on GPUs it changes nothing. The ODE
            state and the output stay float32. On the 2-core AMX machine the shipped network took 0.42x the
            float32 time per 512² image (both ``channels_last``), masks 99.99 % equal, validation Dice unchanged
            (``benchmarks/BENCHMARKS.md`` section 13).
        compile_mode: ``torch.compile`` the network with this mode for inference (None, or a CLI string "none" /
            "false": not compiled). ``"reduce-overhead"`` records CUDA graphs on a GPU, where the batch-1 pass is
            bound by kernel launches: on one H200 it cut the shipped network's pass from 20.0 to 2.3 ms at 304² and
            from 19.1 to 3.8 ms at 512² (bf16, batch 1; ``BasicUNet`` uncompiled 6.5 / 6.8 ms, compiled 1.7 / 1.4 ms;
            ``benchmarks/BENCHMARKS.md`` section 13b). The first call for each input shape compiles (about 25 s
            there, 30 s for a tiny network on the 2-core CPU), so it pays for batch jobs and long-running servers, not
            for one image; it needs the C++ compiler (CPU) or Triton (GPU) that ``torch.compile`` needs. The
            compiled module shares the network's weights; one is kept per network while the network lives.
        start_time: the fraction of ``T`` the integration starts from (``0 < start_time <= 1``). Below 1 the call
            needs ``init``, a prior foreground probability map, and starts from the flow state of that time,
            ``x = (1 - s) * (2 * init - 1) + s * noise`` (SDEdit-style: a supervised model's map refined by the
            flow, issue 14 item 5). Meant for a network trained at such times too (``endpoint_fraction < 1``); a
            network trained at ``t = T`` only has never seen a state that holds signal.
    """

    def __init__(
        self,
        num_steps: int = 4,
        solver: str = "euler",
        num_samples: int = 1,
        roi_size: Sequence[int] | int | None = None,
        sw_batch_size: int = 4,
        overlap: Sequence[float] | float = 0.25,
        return_uncertainty: bool = False,
        num_train_timesteps: int = 1000,
        seed: int | None = None,
        mode: str = "constant",
        sigma_scale: Sequence[float] | float = 0.125,
        padding_mode: str = "constant",
        cval: float = 0.0,
        mask_channels: int | None = None,
        tta: str = "none",
        divisible_by: int | None = None,
        channels_last: bool = False,
        cpu_bf16: bool = False,
        check_profile_range: bool = True,
        compile_mode: str | None = None,
        start_time: float = 1.0,
    ) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        if solver not in ("euler", "heun"):
            raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}.")
        if not 0.0 < float(start_time) <= 1.0:
            raise ValueError(f"start_time must lie in (0, 1], got {start_time}.")
        self.start_time = float(start_time)
        self.tta = tta
        self.divisible_by = None if divisible_by is None else int(divisible_by)
        self.num_steps = num_steps
        self.solver = solver
        self.num_samples = num_samples
        self.roi_size = roi_size
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.return_uncertainty = return_uncertainty
        self.num_train_timesteps = num_train_timesteps
        self.seed = seed
        self.mode = mode
        self.sigma_scale = sigma_scale
        self.padding_mode = padding_mode
        self.cval = cval
        self.mask_channels = mask_channels
        self.channels_last = bool(channels_last)
        # a bundle CLI override (`--inferer#check_profile_range false`) arrives as a string
        self.cpu_bf16 = _flag(cpu_bf16) and cpu_has_native_bf16()
        self.check_profile_range = _flag(check_profile_range)
        mode_ = None if compile_mode is None else str(compile_mode).strip()
        self.compile_mode = None if mode_ is None or mode_.lower() in ("", "none", "null", "false", "0") else mode_
        self._compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict:
        """Picklable (e.g. for worker processes): the compiled modules stay behind and are rebuilt on first use."""
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._compiled = weakref.WeakKeyDictionary()

    def _network_for_call(self, network: Callable) -> Callable:
        """``network`` itself, or with ``compile_mode`` its compiled module (built once per network)."""
        if self.compile_mode is None or not isinstance(network, torch.nn.Module):
            return network
        compiled = self._compiled.get(network)
        if compiled is None:
            compiled = torch.compile(network, mode=self.compile_mode, dynamic=False)
            self._compiled[network] = compiled
        return compiled

    def timesteps(self) -> list[float]:
        """``[start_time * T, ..., 0]``: the ``num_steps + 1`` integration times."""
        n, t_max = self.num_steps, float(self.num_train_timesteps) * self.start_time
        return [t_max * (1.0 - i / n) for i in range(n + 1)]

    def integrate(
        self, network: Callable, image: torch.Tensor, noise: torch.Tensor, profile: torch.Tensor | None, **kwargs: Any
    ) -> torch.Tensor:
        """Run the ODE from ``noise`` (the state at the first of :meth:`timesteps`) conditioned on ``image``;
        returns the final mask estimate in flow space."""
        x = noise.float()
        ts = self.timesteps()
        extra = dict(kwargs)
        if profile is not None:
            extra["profile"] = profile

        layout = torch.channels_last if self.channels_last and image.ndim == 4 else torch.contiguous_format

        def velocity(x_: torch.Tensor, t: float) -> torch.Tensor:
            tt = torch.full((x_.shape[0],), t, device=x_.device, dtype=torch.float32)
            xin = torch.cat([x_.to(image.dtype), image], dim=1).contiguous(memory_format=layout)
            # entered only when on: a disabled autocast region would also switch off a caller's own CPU autocast
            bf16 = self.cpu_bf16 and xin.device.type == "cpu"
            if self.compile_mode is not None:
                torch.compiler.cudagraph_mark_step_begin()  # each pass is a new step: earlier outputs were copied
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                v = network(xin, timesteps=tt, **extra)
            # a CUDA-graph replay overwrites its output buffer: copy it before the next pass (Heun holds two)
            return (
                v.float().clone(memory_format=torch.contiguous_format) if self.compile_mode else v.float().contiguous()
            )

        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            dt = (t_cur - t_next) / self.num_train_timesteps
            v = velocity(x, t_cur)
            # no correction into t = 0: there the ideal field is x0 itself, not x0 - noise, and a trapezoid with
            # it would leave noise * dt / 2 in the mask (EDM's Heun sampler ends with an Euler step likewise)
            if self.solver == "heun" and t_next > 0:
                v = 0.5 * (v + velocity(x + v * dt, t_next))
            x = x + v * dt
        return x

    def _profile_from(self, inputs: torch.Tensor, profile: Any) -> torch.Tensor | None:
        return profile_from_inputs(inputs, profile)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable,
        profile: Any = None,
        *args: Any,
        init: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """
        Args:
            inputs: image batch ``[B, C_img, *spatial]`` (the network's conditioning image).
            network: velocity network called as ``network(cat([x_t, image], 1), timesteps=t, profile=p, **kwargs)``.
            profile: ``[B, P]`` / ``[P]`` profile, or None (see the class docstring).
            init: with ``start_time < 1``, the prior foreground probability ``[B, C_mask, *spatial]`` in [0, 1] the
                flow starts from; it takes every test-time augmentation step with the image.
            kwargs: further keyword arguments for the network.
        """
        if args:
            raise TypeError(f"FlowSegInferer passes no positional arguments to the network, got {len(args)}.")
        if (init is None) != (self.start_time == 1.0):
            raise ValueError(
                "start_time < 1 needs init (a prior probability map to start from), and init needs start_time < 1; "
                f"got start_time={self.start_time} and init {'missing' if init is None else 'given'}."
            )
        p = self._profile_from(inputs, profile)
        image = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        net = unwrap(network)
        if self.check_profile_range and p is not None:
            warn_profiles_out_of_range(net, p, inputs)
        c_m = self.mask_channels or getattr(net, "out_channels", None)
        if c_m is None:
            raise ValueError("set mask_channels: the network has no out_channels attribute.")
        in_ch = getattr(net, "in_channels", None)
        if in_ch is not None and in_ch != c_m + image.shape[1]:
            raise ValueError(
                f"network expects {in_ch} input channels but mask ({c_m}) + image ({image.shape[1]}) give "
                f"{c_m + image.shape[1]}."
            )
        if self.channels_last and image.ndim == 4 and isinstance(net, torch.nn.Module):
            layout = torch.channels_last
            if any(w.ndim == 4 and not w.is_contiguous(memory_format=layout) for w in net.parameters()):
                net.to(memory_format=layout)  # in place, once: later calls find every weight converted
        call_net = self._network_for_call(network)
        s = self.num_samples
        b, c_img, *spatial = image.shape
        multiple = self.divisible_by
        if multiple is None:  # a DiffusionModelUNet halves the size at every level but the last
            levels = getattr(net, "block_out_channels", None)
            multiple = 2 ** (len(levels) - 1) if levels else 1
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=image.device)
            gen.manual_seed(int(self.seed))

        def predict(rows: list[int], img: torch.Tensor, nz: torch.Tensor) -> torch.Tensor:
            n = img.shape[0]
            img_s = img.repeat_interleave(s, dim=0)
            nz_s = nz.reshape(n * s, c_m, *nz.shape[2:])
            p_s = None if p is None else p[rows].repeat_interleave(s, dim=0)
            x0 = self.integrate(call_net, img_s, nz_s, p_s, **kwargs)
            prob = ((x0 + 1) / 2).clamp(0, 1)
            return prob.reshape(n, s * c_m, *prob.shape[2:])

        if init is not None:
            init = init.as_tensor() if isinstance(init, MetaTensor) else init  # (a LoadImaged map, say)
            init = torch.as_tensor(init, device=image.device, dtype=torch.float32)
            if tuple(init.shape) != (b, c_m, *spatial):
                raise ValueError(f"init must have shape {(b, c_m, *spatial)} (batch, mask channels, image size), "
                                 f"got {tuple(init.shape)}.")  # fmt: skip
            # the image and its prior travel together through TTA and padding: split again in segment()
            image = torch.cat([image, init.to(image.dtype)], dim=1)

        def segment(img: torch.Tensor) -> torch.Tensor:
            """``[B, s * c_m, *spatial]`` sample probabilities of one (possibly transformed) image batch."""
            crop = None
            if self.roi_size is None:  # whole image: padded to the network's multiple, cropped back below
                img, crop = pad_to_multiple(img, multiple)
            nz = torch.randn((b, s * c_m, *img.shape[2:]), generator=gen, device=img.device, dtype=torch.float32)
            if init is not None:  # the state at start_time: the prior (in [-1, 1]) with that time's share of noise
                img, prior = img[:, :c_img], img[:, c_img:].float()
                st = self.start_time
                nz = (1 - st) * (2 * prior.repeat(1, s, *[1] * (prior.ndim - 2)) - 1) + st * nz
            if crop is not None:
                return predict(list(range(b)), img, nz.to(img.dtype))[tuple(crop)]

            def window(win: torch.Tensor, coords: list) -> torch.Tensor:
                rows = [int(c[0].start) for c in coords]
                return predict(rows, win[:, :c_img], win[:, c_img:])

            return sliding_window_inference(
                torch.cat([img, nz.to(img.dtype)], dim=1),
                roi_size=ensure_tuple(self.roi_size) if not isinstance(self.roi_size, int) else self.roi_size,
                sw_batch_size=self.sw_batch_size,
                predictor=window,
                overlap=self.overlap,
                mode=self.mode,
                sigma_scale=self.sigma_scale,
                padding_mode=self.padding_mode,
                cval=self.cval,
                with_coord=True,
            )

        # every TTA copy adds its samples: the mean and the spread run over copies x noise draws
        copies = [inverse(segment(forward(image))) for forward, inverse in dihedral_transforms(len(spatial), self.tta)]
        per_sample = torch.cat([c.float().reshape(b, s, c_m, *spatial) for c in copies], dim=1)
        out = per_sample.mean(dim=1)
        if self.return_uncertainty:
            out = torch.cat([out, per_sample.std(dim=1, unbiased=False)], dim=1)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out).copy_meta_from(inputs)
        return out


class ExportedSegmenterInferer(Inferer):
    """Run a whole-segmentation module: ``network(image)`` or ``network(image, profile)`` gives the probability.

    For the TorchScript ``model.ts`` that ``python -m monai.bundle ckpt_export export_network_def`` writes (a
    :class:`~monai_vlmfilm.networks.FlowODESegmenter`, which holds the ODE, the sample mean and TTA itself), or the
    un-exported module. The profile is found as in :class:`FlowSegInferer` (argument, else the MetaTensor's meta
    data, else none); the module gets a plain tensor and its output carries the input's meta data, so the bundle's
    post-processing (``SaveImaged``) treats it like ``FlowSegInferer``'s.

    Args:
        return_uncertainty: what the module returns: the probability alone (False) or with the per-pixel spread over
            samples appended (True, a ``FlowODESegmenter`` exported with ``return_uncertainty``). It does not change
            the call; it tells the caller, like ``FlowSegInferer.return_uncertainty``, what the output holds.
    """

    def __init__(self, return_uncertainty: bool = False) -> None:
        self.return_uncertainty = bool(return_uncertainty)

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable, profile: Any = None, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        Args:
            inputs: image batch ``[B, C_img, *spatial]``.
            network: the exported (or Python) segmenter.
            profile: ``[B, P]`` / ``[P]`` profile, or None.
        """
        if args or kwargs:
            raise TypeError("an exported segmenter takes only the image and the profile.")
        p = profile_from_inputs(inputs, profile)
        image = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        out = network(image) if p is None else network(image, p)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out).copy_meta_from(inputs)
        return out
