"""Per-job results of the ablation: per-image metrics from the evaluate run, FiLM magnitudes from the checkpoint."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import data as D
from .jobs import Job
from .sources import ProfileSources
from .stats import METRICS

__all__ = ["FINAL_CHECKPOINT", "JobCollector", "metric_name", "parse_metric_csvs", "coerce"]

#: the final training checkpoint (CheckpointSaver ``save_final``): evaluated instead of the best-on-validation
#: ``model.pt``, because without a test split the validation images are the evaluation images (no selection bias)
FINAL_CHECKPOINT = "checkpoint_final.pt"

#: canonical metric name -> substrings of a MetricsSaver file name that identify it (first match wins, in order)
_METRIC_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cldice", ("cldice", "cl_dice")),
    ("betti0_error", ("betti0", "betti_0", "b0_error")),
    ("betti1_error", ("betti1", "betti_1", "b1_error")),
    ("hd95", ("hd95", "hausdorff")),
    ("dice", ("dice",)),
)


def metric_name(file_stem: str) -> str | None:
    """Canonical metric name of a MetricsSaver ``<name>_raw.csv`` stem, or None when it is not one of ours."""
    s = file_stem.lower().replace("-", "_")
    for name, pats in _METRIC_PATTERNS:
        if any(p in s for p in pats):
            return name
    return None


def parse_metric_csvs(folder: Path) -> dict[str, dict[str, float]]:
    """``{image path: {metric: value}}`` from MetricsSaver's ``*_raw.csv`` files in ``folder`` (searched recursively).

    Each file has a header ``filename,class0[,...],mean`` and one row per image; the ``mean`` column is used.

    Raises:
        ValueError: when no metric CSV is found (the message names the folder).
    """
    import csv

    out: dict[str, dict[str, float]] = {}
    files = sorted(folder.rglob("*_raw.csv"))
    for f in files:
        name = metric_name(f.name[: -len("_raw.csv")])
        if name is None:
            continue
        with open(f, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            continue
        header = rows[0]
        col = header.index("mean") if "mean" in header else len(header) - 1
        for row in rows[1:]:
            if len(row) < len(header):
                continue
            try:
                v = float(row[col])
            except ValueError:
                v = float("nan")
            out.setdefault(os.path.abspath(row[0]), {})[name] = v
    if not out:
        raise ValueError(f"no per-image metric CSV (*_raw.csv from MetricsSaver) found under {str(folder)!r}")
    return out


def coerce(v: Any) -> Any:
    """An override value as the bundle CLI (fire) would parse it: True/False/None/numbers/lists, else the string."""
    if not isinstance(v, str):
        return v
    import ast

    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


class JobCollector:
    """The ``collect`` step of every job: ``<job>/result.json`` with per-image records and FiLM magnitudes.

    Args:
        bundle_root: the bundle folder (for building the trained network).
        configs: a mode -> the training config files of its jobs (base config plus overlays).
        sources: the filled profile stores (FiLM magnitudes are measured on the evaluation images' profiles).
        difficulty: image path -> difficulty (1-5) recorded with each image's metrics; filled before jobs run.
    """

    def __init__(
        self,
        bundle_root: Path,
        configs: Callable[[str], list[Path]],
        sources: ProfileSources,
        difficulty: Mapping[str, float],
    ) -> None:
        self.bundle_root = bundle_root
        self.configs = configs
        self.sources = sources
        self.difficulty = difficulty
        self._lock = threading.Lock()

    def __call__(self, job: Job, env: Mapping[str, str]) -> None:
        self.collect(job, env)

    def checkpoint_of(self, job: Job) -> Path:
        path = job.workdir / "train" / FINAL_CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"training left no {FINAL_CHECKPOINT} in {path.parent}")
        return path

    def collect(self, job: Job, env: Mapping[str, str]) -> None:
        """Per-image records and FiLM magnitudes of a finished job -> ``<job>/result.json``."""
        info = job.info
        metrics = parse_metric_csvs(job.workdir / "eval")
        by_path = {os.path.abspath(it["image"]): it for it in info["eval_items"]}
        by_base: dict[str, list[str]] = {}
        for pth in by_path:
            by_base.setdefault(os.path.basename(pth), []).append(pth)
        records = []
        unmatched = []
        for fname, vals in metrics.items():
            path = fname if fname in by_path else None
            if path is None and len(by_base.get(os.path.basename(fname), [])) == 1:
                path = by_base[os.path.basename(fname)][0]
            if path is None:
                unmatched.append(fname)
                continue
            rec = {
                "mode": info["mode"],
                "seed": info["seed"],
                "fold": info["fold"],
                "image": path,
                "difficulty": self.difficulty[path],
            }
            rec.update({k: vals.get(k) for k in METRICS if k in vals})
            records.append(rec)
        if unmatched:
            raise ValueError(f"evaluate wrote metrics for images not in the evaluation split: {unmatched[:3]}")
        if len(records) != len(by_path):
            missing = sorted(set(by_path) - {r["image"] for r in records})[:3]
            raise ValueError(f"evaluate wrote {len(records)} of {len(by_path)} images; missing e.g. {missing}")
        film = None
        if info["mode"] != "off":
            with self._lock:  # one network at a time in this process
                film = self.film_stats(job)
        doc = {"mode": info["mode"], "seed": info["seed"], "fold": info["fold"], "records": records, "film": film}
        tmp = job.workdir / "result.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, allow_nan=True))
        tmp.replace(job.workdir / "result.json")

    def film_stats(self, job: Job) -> dict[str, Any]:
        import torch
        from monai.bundle import ConfigParser

        from monai_vlmfilm.networks.checkpoint import load_network_weights

        from .film import film_magnitudes

        mode = job.info["mode"]
        parser = ConfigParser()
        parser.read_config([str(c) for c in self.configs(mode)])
        ov = job.info["overrides"]
        parser.update({"bundle_root": str(self.bundle_root), **{k: coerce(v) for k, v in ov.items()}})
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        net = parser.get_parsed_content("network_def", instantiate=True)
        load_network_weights(net, self.checkpoint_of(job))
        st = self.sources.of(mode)
        if st is None:
            raise ValueError(f"mode {mode!r} reads no profiles: no FiLM statistics")
        vecs = D.profile_vectors(st.dir, job.info["eval_items"], st.profiler)
        return film_magnitudes(net, vecs)
