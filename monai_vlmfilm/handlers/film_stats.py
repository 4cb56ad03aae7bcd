"""Ignite handler that reports what the FiLM heads do and what profiles the network sees."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_vlmfilm.networks.checkpoint import unwrap
from monai_vlmfilm.profiles.schema import FALLBACK_INDEX, PROFILE_KEY, VECTOR_FIELDS

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["FiLMStatsHandler"]


class FiLMStatsHandler:
    """Per-stage FiLM statistics, profile statistics, fallback and cache-hit rates.

    Every ``log_every`` iterations it computes (one host sync per computation):

    - ``{tag_prefix}stage{i}/gamma_mean``, ``gamma_std``, ``gamma_absmax``, the same for ``beta``, and
      ``gate_mean``, ``gate_min``, ``gate_max`` for every FiLM stage ``i`` (observed through forward hooks that the
      handler registers on the network's FiLM heads for the iterations it computes and removes afterwards;
      absent while the network applies no FiLM: OFF network or null profile);
    - ``{tag_prefix}profile/{field}_mean`` and ``{field}_spread`` (std across the batch) for every profile
      vector field (``difficulty``, ``confidence``, ``boundary``, ...);
    - ``{tag_prefix}fallback_rate``: share of fallback profiles in the batch (vector element ``is_fallback``);
    - ``{tag_prefix}cache_hit_rate``: ``hits / (hits + misses)`` from ``profile_stats`` when given.

    Where the values go:

    - ``engine.state.metrics``: the running mean of each value over the current epoch (reset at
      ``EPOCH_STARTED``), so MONAI's ``StatsHandler``, ``TensorBoardStatsHandler`` and ``MLFlowHandler``
      print / write them with the epoch metrics whatever their attachment order (they read
      ``engine.state.metrics`` at ``EPOCH_COMPLETED``; nothing needs to be listed in their
      ``state_attributes``). Set ``write_metrics=False`` to keep them out of the metrics.
    - ``engine.state.film_stats``: the values of the latest computed iteration (a dict).
    - the ``logging`` logger ``name`` (console), one line per computation.
    - ``summary_writer`` (a TensorBoard ``SummaryWriter``), when given, per iteration.

    Args:
        network: the FiLM network; None uses ``engine.network`` (MONAI workflows).
        profile_key: batch key of the profile vectors ``[B, P]`` (``engine.state.batch[profile_key]``); when
            absent, the profile the network's encoder received is used.
        tag_prefix: prefix of every value name.
        log_every: compute every ``log_every`` iterations.
        profile_stats: where cache counters live: a mapping, or an object (e.g. the ``AttachVLMProfiled``
            transform of the main process) with a ``stats`` mapping / method, holding ``hits`` and ``misses``.
            Counters of DataLoader worker processes are not visible from here.
        summary_writer: optional TensorBoard writer for iteration-level scalars.
        write_metrics: write epoch running means into ``engine.state.metrics``.
        name: logger name.
    """

    def __init__(
        self,
        network: torch.nn.Module | None = None,
        profile_key: str = PROFILE_KEY,
        tag_prefix: str = "film/",
        log_every: int = 1,
        profile_stats: Any = None,
        summary_writer: Any = None,
        write_metrics: bool = True,
        name: str | None = "FiLMStatsHandler",
    ) -> None:
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}.")
        self.network = network
        self.profile_key = profile_key
        self.tag_prefix = tag_prefix
        self.log_every = log_every
        self.profile_stats = profile_stats
        self.summary_writer = summary_writer
        self.write_metrics = write_metrics
        self.logger = logging.getLogger(name)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._hooks: list[Any] = []
        self._seen: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_STARTED(every=self.log_every), self.observe)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.log_every), self)

    def observe(self, engine: Engine) -> None:
        """Register forward hooks on the network's profile encoder and FiLM heads for this iteration.

        Args:
            engine: the engine whose network (``self.network`` or ``engine.network``) is observed.
        """
        self.stop_observing()
        network = unwrap(self.network if self.network is not None else getattr(engine, "network", None))
        heads = getattr(network, "film_heads", None)
        if heads is None:  # OFF network: nothing to observe
            return

        def keep(name: str) -> Any:
            def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
                self._seen[name] = args[0].detach() if name == "profile" else tuple(o.detach() for o in output)

            return hook

        self._hooks = [network.profile_encoder.register_forward_hook(keep("profile"))]
        self._hooks += [head.register_forward_hook(keep(f"stage{i}")) for i, head in heads.items()]

    def stop_observing(self) -> None:
        """Remove the hooks and forget what they saw."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._seen = [], {}

    def reset(self, engine: Engine | None = None) -> None:
        self._sums, self._counts = {}, {}

    def _cache_counts(self) -> tuple[float, float] | None:
        src = self.profile_stats
        if src is None:
            return None
        stats = src if isinstance(src, Mapping) else getattr(src, "stats", None)
        if callable(stats):
            stats = stats()
        if not isinstance(stats, Mapping) or "hits" not in stats or "misses" not in stats:
            return None
        return float(stats["hits"]), float(stats["misses"])

    def _batch_profile(self, batch: Any) -> torch.Tensor | None:
        """``[B, P]`` profiles of the batch, collated (dict) or decollated by MONAI workflows (list of dicts)."""
        if isinstance(batch, Mapping):
            p = batch.get(self.profile_key)
            return torch.as_tensor(p) if p is not None else None
        if isinstance(batch, (list, tuple)) and batch and all(isinstance(b, Mapping) for b in batch):
            rows = [b.get(self.profile_key) for b in batch]
            if all(r is not None for r in rows):
                return torch.stack([torch.as_tensor(r).reshape(-1) for r in rows])
        return None

    def compute(self, engine: Engine) -> dict[str, float]:
        """The values of the current iteration (see the class docstring)."""
        names: list[str] = []
        parts: list[torch.Tensor] = []

        def add(name: str, value: torch.Tensor) -> None:
            names.append(self.tag_prefix + name)
            parts.append(value.detach().float().reshape(1))

        stages = {int(k[len("stage") :]): v for k, v in self._seen.items() if k.startswith("stage")}
        for i, (gamma, beta, gate) in sorted(stages.items()):
            for key, t in (("gamma", gamma), ("beta", beta)):
                v = t.float().flatten(1)
                add(f"stage{i}/{key}_mean", v.mean())
                add(f"stage{i}/{key}_std", v.std(unbiased=False))
                add(f"stage{i}/{key}_absmax", v.abs().max())
            g = gate.float()
            add(f"stage{i}/gate_mean", g.mean())
            add(f"stage{i}/gate_min", g.min())
            add(f"stage{i}/gate_max", g.max())

        profile = self._batch_profile(getattr(engine.state, "batch", None))
        if profile is None:
            profile = self._seen.get("profile")
        if isinstance(profile, torch.Tensor) and profile.ndim == 2 and profile.shape[1] == len(VECTOR_FIELDS):
            p = profile.detach().float()
            means, spreads = p.mean(0), p.std(0, unbiased=False)
            for j, field in enumerate(VECTOR_FIELDS):
                if j == FALLBACK_INDEX:
                    continue
                add(f"profile/{field}_mean", means[j])
                add(f"profile/{field}_spread", spreads[j])
            add("fallback_rate", means[FALLBACK_INDEX])

        # the batch profile may sit on the CPU while FiLM stats live on the GPU: gather on one device, then one sync
        dev = parts[0].device if parts else None
        values = dict(zip(names, torch.cat([q.to(dev) for q in parts]).cpu().tolist())) if parts else {}
        counts = self._cache_counts()
        if counts is not None and sum(counts) > 0:
            values[self.tag_prefix + "cache_hit_rate"] = counts[0] / sum(counts)
        return values

    def __call__(self, engine: Engine) -> None:
        values = self.compute(engine)
        self.stop_observing()
        engine.state.film_stats = values
        if not values:
            return
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
            self._counts[k] = self._counts.get(k, 0) + 1
        if self.write_metrics:
            for k in values:
                engine.state.metrics[k] = self._sums[k] / self._counts[k]
        if self.summary_writer is not None:
            for k, v in values.items():
                self.summary_writer.add_scalar(k, v, engine.state.iteration)
        shown = {k[len(self.tag_prefix) :]: v for k, v in values.items() if not k.endswith(("_min", "_max"))}
        self.logger.info(
            f"Epoch[{engine.state.epoch}] Iter[{engine.state.iteration}] FiLM: "
            + " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        )
