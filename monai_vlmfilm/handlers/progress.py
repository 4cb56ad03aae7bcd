"""Ignite handler that shows training progress with an ETA (tqdm on a terminal, log lines elsewhere)."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

from monai.utils import IgniteInfo, min_version, optional_import

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
ProgressBar, has_progress_bar = optional_import("ignite.handlers", name="ProgressBar")

__all__ = ["ProgressHandler"]


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:d}:{s % 60:02d}"


class ProgressHandler:
    """Progress with iteration / epoch and ETA for a trainer.

    On a terminal: ignite's tqdm ``ProgressBar`` (``Epoch [e/E]: [i/N] ..% loss=.. [elapsed<ETA]``). Otherwise
    (logs, CI, pipes), one log line every ``log_every`` iterations and at each epoch end, e.g.
    ``epoch 2/5 iter 24/60 (40%) loss 0.41 | 3.1 s/it | elapsed 1:14, ETA 1:51``.

    Args:
        output_transform: engine output -> loss value shown, e.g. ``monai.handlers.from_engine(["loss"], first=True)``.
        use_tqdm: ``None`` = tqdm bar only when stderr is a terminal; True / False to force.
        log_every: iterations between log lines when not using tqdm (0: epoch ends only).
        name: logger name.
    """

    def __init__(
        self,
        output_transform: Any = None,
        use_tqdm: bool | None = None,
        log_every: int = 0,
        name: str = "monai_vlmfilm.progress",
    ) -> None:
        self.output_transform = output_transform
        self.use_tqdm = use_tqdm
        self.log_every = int(log_every)
        self.logger = logging.getLogger(name)
        self._t0 = 0.0
        self._done0 = 0

    def attach(self, engine: Any) -> None:
        use_tqdm = self.use_tqdm if self.use_tqdm is not None else sys.stderr.isatty()
        if use_tqdm and has_progress_bar:
            ot = self.output_transform
            ProgressBar(persist=True).attach(engine, output_transform=(lambda o: {"loss": ot(o)}) if ot else None)
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine: Any) -> None:
        self._t0 = time.perf_counter()
        self._done0 = engine.state.iteration  # resumed runs: time only what runs now

    def _line(self, engine: Any, what: str) -> str:
        st = engine.state
        per_epoch = st.epoch_length or 0
        total = (st.max_epochs or 0) * per_epoch
        done = st.iteration - self._done0
        elapsed = time.perf_counter() - self._t0
        rate = elapsed / done if done else math.nan
        left = (total - st.iteration) * rate if done else math.nan
        loss = ""
        if self.output_transform is not None and st.output is not None:
            try:
                loss = f" loss {float(self.output_transform(st.output)):.4f}"
            except Exception:  # a display helper never stops training
                loss = ""
        eta = _fmt_s(left) if math.isfinite(left) else "?"
        it = (st.iteration - 1) % per_epoch + 1 if per_epoch else st.iteration
        return (
            f"{what} epoch {st.epoch}/{st.max_epochs} iter {it}/{per_epoch} "
            f"({100.0 * st.iteration / total if total else 0:.0f}%){loss} | {rate:.2f} s/it | "
            f"elapsed {_fmt_s(elapsed)}, ETA {eta}"
        )

    def _iteration(self, engine: Any) -> None:
        if self.log_every and engine.state.iteration % self.log_every == 0:
            self.logger.info(self._line(engine, "progress:"))

    def _epoch(self, engine: Any) -> None:
        self.logger.info(self._line(engine, "progress: finished"))
