"""``python -m monai_vlmfilm.ablation``: train and evaluate FiLM off / on / shuffle / oracle over seeds, then report.

Steps:

1. profiles, once: the configured profiler's (``--profiler``, default heuristic) and, when every item carries
   ``factors`` (synthetic data), the oracle's, each in a :class:`~monai_vlmfilm.profiles.store.ProfileStore` under
   ``DIR/profiles/``; ``shuffle`` is a third store whose entries hold the profiler's profiles permuted across
   images by a seeded derangement (same keys, same multiset of profiles, no per-image information);
2. one job per (mode, seed[, fold]): the bundle's own training (``python -m monai.bundle run``) then its
   evaluate config on the evaluation split, each a subprocess with its own log, K jobs per GPU in parallel;
   a finished job is skipped on a rerun, a failing one is reported with its log and does not stop the others;
3. per job: per-image metrics from the evaluate run's MetricsSaver CSVs, FiLM γ/β magnitudes from the trained
   checkpoint's heads run on the evaluation images' profiles;
4. ``DIR/report.md``, ``DIR/results.json`` and PNG plots (see :mod:`monai_vlmfilm.ablation.report`).

Settings, each one command:

* one ``--datalist``: train on its ``training`` split, evaluate on ``--eval-split`` (default ``test``, else
  ``validation``), or ``--folds K`` cross-validation over training+validation;
* mixed-site: ``--datalist`` once per site (``PATH``, site named after its folder, or ``NAME=PATH``). Without folds,
  training is the union of the sites' training splits and evaluation the union of their evaluation splits; with
  ``--folds K`` the folds are stratified by site (fold ``f`` holds out fold ``f`` of every site, each site split by
  the same ``--fold-seed``). Each record carries its image's site and the report adds per-site tables and CIs;
* cross-site: ``--test-datalist [NAME=]PATH``: train on every training+validation item of the ``--datalist`` sites,
  evaluate on every item of the test datalist (no ``--folds``).

With more than one site, ``shuffle`` permutes profiles within each site (``--no-shuffle-within-site``: across all
images): the profile acts mostly as a site indicator, so an across-site shuffle would also remove the site
information and ``on - shuffle`` would no longer measure per-image information alone.

Examples::

    python -m monai_vlmfilm.ablation --datalist data/datalist.json --out runs/ablation \\
        --modes off,on,shuffle,oracle --seeds 0,1,2 --max-iterations 2000 --gpus 0,1 --jobs-per-gpu 4
    python -m monai_vlmfilm.ablation --datalist ../shared/data/dca1/datalist.json \\
        --datalist ../shared/data/xcad/datalist.json --folds 5 --out runs/mixed --modes off,on,shuffle
    python -m monai_vlmfilm.ablation --datalist ../shared/data/dca1/datalist.json \\
        --test-datalist ../shared/data/xcad/datalist.json --out runs/dca1_to_xcad --modes off,on,shuffle
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import data as D
from .collect import FINAL_CHECKPOINT, JobCollector, coerce, metric_name, parse_metric_csvs
from .jobs import Job, JobOutcome, Step, make_slots, run_jobs
from .report import write_report
from .sources import ProfileSource, ProfileSources

__all__ = ["MODES", "BUNDLE_KEYS", "parse_args", "parse_variant", "main", "parse_metric_csvs", "metric_name"]

MODES: tuple[str, ...] = ("off", "on", "shuffle", "oracle")
CALIBRATIONS: tuple[str, ...] = ("default", "train")
PROFILE_NORMS: tuple[str, ...] = ("none", "train")
VARIANT_MODES: tuple[str, ...] = ("on", "shuffle", "oracle")
#: the folder holding this ``monai_vlmfilm`` package (a checkout or site-packages): the jobs' PYTHONPATH, so the
#: bundle subprocesses import the same package as this process
PACKAGE_PARENT = Path(__file__).resolve().parents[2]

#: Names of the bundle config keys the ablation sets (one place to change if the bundle renames them).
BUNDLE_KEYS: dict[str, str] = {
    "switch": "use_vlm_film",
    "seed": "seed",
    "datalist": "datalist",
    "ckpt_dir": "ckpt_dir",
    "output_dir": "output_dir",
    "cache_dir": "profile_cache_dir",
    "profiler": "profiler",
    "profile_norm": "profile_norm",
    "on_missing": "profile_on_missing",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "patch_size": "patch_size",
    "val_interval": "val_interval",
    "ckpt_interval": "ckpt_interval",
    "ckpt_path": "ckpt_path",
    "eval_dir": "eval_dir",
    "data_split": "data_split",
}
NEVER = 10**9  # an epoch interval that never fires

# ------------------------------------------------------------------------------------------------------ arguments


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip() != ""]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m monai_vlmfilm.ablation",
        description="Train and evaluate FiLM off / on / shuffle / oracle over seeds (and folds) with the bundle, "
        "then write DIR/report.md, DIR/results.json and PNG plots.",
    )
    p.add_argument(
        "--datalist",
        required=True,
        action="append",
        metavar="[NAME=]PATH",
        help="MONAI datalist JSON (training / validation [/ test]); give it once per site for mixed-site training "
        "(site name: NAME, else the datalist's folder name)",
    )
    p.add_argument(
        "--test-datalist",
        default=None,
        metavar="[NAME=]PATH",
        help="cross-site: train on every training+validation item of --datalist, evaluate on every item of this "
        "datalist (another site; no --folds)",
    )
    p.add_argument(
        "--shuffle-within-site",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shuffle permutes profiles only among images of the same site (default: on with more than one site, "
        "so on - shuffle measures per-image information, not the site the profile gives away)",
    )
    p.add_argument("--out", required=True, help="output folder (rerunning with the same folder resumes)")
    p.add_argument("--modes", default="off,on,shuffle,oracle", help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated training seeds")
    p.add_argument("--profiler", default="heuristic", help="profiler for on/shuffle (default heuristic)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int, default=None, help="training epochs per job")
    g.add_argument(
        "--max-iterations",
        type=int,
        default=None,
        help="training iterations per job (rounded to whole epochs; the bundle counts epochs)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="square training patch and sliding-window size (the bundle's patch_size)",
    )
    p.add_argument("--gpus", default="auto", help="'auto' (every visible GPU, else CPU), 'cpu', or e.g. 0,1")
    p.add_argument("--jobs-per-gpu", type=int, default=1, help="parallel jobs per GPU (small models leave room)")
    p.add_argument("--cpu-jobs", type=int, default=1, help="parallel jobs without a GPU")
    p.add_argument("--folds", type=int, default=None, help="K-fold CV over training+validation items")
    p.add_argument("--fold-seed", type=int, default=0, help="seed of the fold split (fixed across training seeds)")
    p.add_argument(
        "--eval-split", default=None, help="split to evaluate without --folds (default test, else validation)"
    )
    p.add_argument("--bundle-root", default=None, help="bundle folder (default: ./bundle when it exists)")
    p.add_argument("--train-config", default=None, help="default <bundle>/configs/train.yaml")
    p.add_argument("--eval-config", default=None, help="default <bundle>/configs/evaluate.yaml")
    p.add_argument("--overlay-off", default=None, help="extra config overlay for off (default: none)")
    p.add_argument("--overlay-on", default=None, help="extra config overlay for on/shuffle/oracle (default: none)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra bundle override for training and evaluation (repeatable), e.g. --override num_workers=4",
    )
    p.add_argument(
        "--train-validation",
        action="store_true",
        help="keep the bundle's per-epoch validation and interim checkpoints during training (off by default: "
        "the ablation evaluates the final checkpoint on its own split)",
    )
    p.add_argument(
        "--calibration",
        choices=CALIBRATIONS,
        default="default",
        help="heuristic profiler calibration: 'default' (built in, measured on DCA1) or 'train' (measured on this "
        "datalist's training images, no labels used)",
    )
    p.add_argument(
        "--profile-norm",
        choices=PROFILE_NORMS,
        default="none",
        help="'train': normalise each profile feature by its mean / std over the training images' profiles "
        "(bundle key profile_norm; per fold and per profile source)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[;KEY=VALUE...]",
        help="an extra setting of the conditioned modes, run as modes '<mode>.NAME' beside the plain ones (repeatable); "
        "KEY is calibration (default|train), profile_norm (none|train) or any bundle key, e.g. "
        "'nogate:network_def#use_difficulty_gate=False' or 'coarse:network_def#film_stages=[0]'; NAME@on+shuffle limits the "
        "variant to those modes",
    )
    p.add_argument(
        "--variant-modes",
        default="on,oracle",
        help="conditioned modes each --variant runs in (subset of on,shuffle,oracle that is also in --modes)",
    )
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="MODE:BASE",
        help="an extra paired comparison for the report, MODE − BASE over the same seeds and images (repeatable), "
        "e.g. 'on.enc:on.norm' (every mode is always compared with off, on with shuffle)",
    )
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the shuffle derangement")
    p.add_argument("--job-timeout", type=float, default=None, help="kill a job step after this many seconds")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds after the start when no new job starts; the report covers the jobs that finished "
        "(jobs run seed by seed, so the first seeds are complete); rerun the same command to finish the rest",
    )
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples for the CIs")
    p.add_argument("--title", default=None, help="report title")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished jobs; train nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (errors exit with a message, as argparse does)."""
    p = _build_parser()
    a = p.parse_args(argv)
    a.mode_list = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.mode_list if m not in MODES]
    if bad or not a.mode_list:
        p.error(f"--modes: unknown {bad}; choose from {','.join(MODES)}")
    if len(set(a.mode_list)) != len(a.mode_list):
        p.error("--modes lists a mode twice")
    if not a.seeds:
        p.error("--seeds is empty")
    for kv in a.override:
        if "=" not in kv or not kv.split("=", 1)[0]:
            p.error(f"--override expects KEY=VALUE, got {kv!r}")
    if a.folds is not None and a.folds < 2:
        p.error("--folds must be >= 2")
    if a.test_datalist is not None and a.folds is not None:
        p.error(
            "--test-datalist evaluates on another site's datalist, so it takes no --folds: train on all of --datalist "
            "and test on all of --test-datalist, or drop --test-datalist for cross-validation"
        )
    if a.test_datalist is not None and a.eval_split is not None:
        p.error("--eval-split does not apply with --test-datalist (every item of the test datalist is evaluated)")
    vmodes = [m.strip() for m in a.variant_modes.split(",") if m.strip()]
    if any(m not in VARIANT_MODES for m in vmodes):
        p.error(f"--variant-modes: choose from {','.join(VARIANT_MODES)}, got {a.variant_modes!r}")
    a.variant_mode_list = [m for m in vmodes if m in a.mode_list]
    a.variants, a.variant_modes_of = {}, {}
    for spec in a.variant:
        try:
            name, settings = parse_variant(spec)
        except ValueError as e:
            p.error(f"--variant {spec!r}: {e}")
        name, at, own = name.partition("@")
        if name in a.variants:
            p.error(f"--variant {name!r} is given twice")
        modes = own.split("+") if at else a.variant_mode_list
        if any(m not in VARIANT_MODES for m in modes):
            p.error(f"--variant {spec!r}: modes after '@' must be among {','.join(VARIANT_MODES)} joined by '+'")
        a.variants[name] = settings
        a.variant_modes_of[name] = [m for m in modes if m in a.mode_list]
        if not a.variant_modes_of[name]:
            p.error(f"--variant {spec!r} runs in none of --modes")
    every = list(a.mode_list) + [f"{m}.{v}" for v in a.variants for m in a.variant_modes_of[v]]
    a.compare_pairs = []
    for spec in a.compare:
        mode, colon, base = (x.strip() for x in spec.partition(":"))
        if not colon or mode not in every or base not in every or mode == base:
            p.error(f"--compare {spec!r}: expected MODE:BASE, two different modes of this run ({', '.join(every)})")
        a.compare_pairs.append([mode, base])
    return a


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``"NAME[@MODES]:KEY=VALUE;KEY=VALUE"`` -> ``(NAME[@MODES], {KEY: VALUE})`` (values stay strings, as on the bundle
    CLI). ``@on+shuffle`` after the name restricts the variant to those modes (default: ``--variant-modes``).

    Raises:
        ValueError: a missing or odd name, no settings, a setting without ``=``, or a bad calibration / profile_norm.
    """
    name, colon, rest = spec.partition(":")
    name = name.strip()
    label = name.partition("@")[0]
    if not colon or not label or not all(c.isalnum() or c in "-+@" for c in name):
        raise ValueError(
            "expected NAME[@MODE+MODE]:KEY=VALUE[;KEY=VALUE...] with NAME made of letters, digits, '-' and '+'"
        )
    settings: dict[str, str] = {}
    for kv in rest.split(";"):
        if not kv.strip():
            continue
        k, eq, v = kv.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"setting {kv!r} is not KEY=VALUE")
        settings[k.strip()] = v.strip()
    if not settings:
        raise ValueError("no settings")
    if settings.get("calibration", "default") not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}")
    if settings.get("profile_norm", "none") not in PROFILE_NORMS:
        raise ValueError(f"profile_norm must be one of {PROFILE_NORMS}")
    return name, settings


# ------------------------------------------------------------------------------------------------------ the run


def _gpus(spec: str) -> list[int]:
    if spec == "cpu":
        return []
    if spec == "auto":
        try:
            import torch

            return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        except Exception:  # a broken CUDA set-up means CPU, not a crash
            return []
    return _int_list(spec)


def _card(gpus: Sequence[int]) -> str:
    if not gpus:
        return "CPU"
    try:
        import torch

        names = [torch.cuda.get_device_name(g) for g in gpus]
        return f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    except Exception:
        return f"GPU {list(gpus)}"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"  # fire (the bundle CLI) reads True/False, not true/false
    return str(v)


def bundle_cmd(bundle_root: Path, configs: Sequence[Path], overrides: Mapping[str, Any]) -> list[str]:
    """``python -m monai.bundle run --bundle_root ... --config_file "[...]" --key value ...`` (the configs' ``run``)."""
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--bundle_root",
        str(bundle_root),
        "--config_file",
        json.dumps([str(c) for c in configs]),
    ]
    for k, v in overrides.items():
        cmd += [f"--{k}", _fmt(v)]
    return cmd


class Ablation:
    """One ablation run (see the module docstring); ``main`` drives it."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str]) -> None:
        self.args = args
        self.argv = list(argv)
        self.out = Path(args.out).resolve()
        self.bundle_root = bundle_root_of(args.bundle_root)
        cfg = self.bundle_root / "configs"
        self.train_config = Path(args.train_config).resolve() if args.train_config else cfg / "train.yaml"
        self.eval_config = Path(args.eval_config).resolve() if args.eval_config else cfg / "evaluate.yaml"
        # the switch itself is an override of every job (use_vlm_film); these are optional extra overlays
        self.overlay_off = Path(args.overlay_off).resolve() if args.overlay_off else None
        self.overlay_on = Path(args.overlay_on).resolve() if args.overlay_on else None
        for f in (self.train_config, self.eval_config):
            if not f.is_file():
                raise ValueError(f"bundle config {str(f)!r} does not exist (see --bundle-root / --train-config)")
        self.check_override_keys()
        #: the training sites (one per --datalist) and the cross-site test site (--test-datalist), or None
        self.sites = D.load_sites(args.datalist)
        self.test_site = D.load_sites([args.test_datalist], taken=self.sites)[0] if args.test_datalist else None
        self.setting = "cross-site" if self.test_site else ("mixed-site" if len(self.sites) > 1 else "single")
        all_sites = self.sites + ([self.test_site] if self.test_site else [])
        #: site name -> its datalist with every item tagged with its ``site`` (empty for a single datalist, whose
        #: items, commands and outputs stay as they were before sites existed)
        self.site_datalists: dict[str, dict[str, Any]] = {}
        #: absolute image path -> site name (empty for a single datalist)
        self.site_of: dict[str, str] = {}
        if self.setting == "single":
            self.datalist_path = self.sites[0].path
            self.datalist = self.sites[0].datalist
        else:
            self.site_datalists = {s.name: D.tag_site(s.datalist, s.name) for s in all_sites}
            self.datalist = self._site_datalist()
            self.datalist_path = self.out / "datalists" / "sites.json"  # written once the settings are checked
            self.site_of = {os.path.abspath(it["image"]): it["site"] for it in D.unique_images(self.datalist)}
        self.synthetic = D.has_factors(D.unique_images(self.datalist))
        if "oracle" in args.mode_list and not self.synthetic:
            lacking = [s.path for s in all_sites if not D.has_factors(D.unique_images(s.datalist))]
            raise ValueError(
                f"mode 'oracle' needs ground-truth 'factors' (with 'difficulty') on every item of "
                f"{', '.join(repr(str(p)) for p in lacking or [self.datalist_path])}; real data has none: "
                "leave oracle out of --modes"
            )
        #: the evaluated split of each site (mixed-site without folds) and the report's summary of them
        self.eval_splits: dict[str, str] = {}
        if args.folds:
            self.eval_split = "held-out fold"
        elif self.setting == "cross-site":
            self.eval_split = f"every split of the test datalist (site {self.test_site.name})"
        elif self.setting == "mixed-site":
            for s in self.sites:
                try:
                    self.eval_splits[s.name] = D.eval_split_of(s.datalist, args.eval_split)
                except ValueError as e:
                    raise ValueError(f"site {s.name!r} ({str(s.path)!r}): {e}") from e
            names = set(self.eval_splits.values())
            self.eval_split = (
                names.pop() if len(names) == 1 else ", ".join(f"{k}: {v}" for k, v in self.eval_splits.items())
            )
        else:
            self.eval_split = D.eval_split_of(self.datalist, args.eval_split)
        if self.setting != "single":
            lists = {k: v for k, v in self.datalist.items() if isinstance(v, list)}
            D.write_fold_datalist(self.datalist_path, lists, self.datalist["description"])
        # across sites a shuffled profile still tells the network which site an image comes from (the profile acts
        # mostly as a site indicator): within each site only the per-image information is broken
        within = args.shuffle_within_site if args.shuffle_within_site is not None else len(all_sites) > 1
        self.shuffle_within_site = bool(within and len(all_sites) > 1)
        self.sources = ProfileSources(
            self.out,
            self.datalist_path,
            self.datalist,
            self.synthetic,
            args.profiler,
            args.calibration,
            self.calibration_of,
            args.shuffle_seed,
            self.site_of if self.shuffle_within_site else None,
        )
        #: (fold, datalist, evaluation items) of every split, set by run()
        self.split_list: list[tuple[int | None, Path, list[dict[str, Any]]]] = []
        #: image -> difficulty (1-5) of the report's terciles, and where it comes from; filled by prepare_difficulty()
        self.difficulty: dict[str, float] = {}
        self.difficulty_source = ""
        self.collector = JobCollector(
            self.bundle_root, lambda mode: self.configs(mode, self.train_config), self.sources, self.difficulty
        )

    # -------------------------------------------------------------------- splits
    def _site_datalist(self) -> dict[str, Any]:
        """Every site's items (tagged) in one datalist, the contents of ``DIR/datalists/sites.json``.

        Mixed-site: each split is the concatenation of the sites' splits. Cross-site: ``training`` is every
        training+validation item of the training sites, ``test`` every item of the test datalist. The profile stores,
        the oracle, a ``train`` calibration and the difficulty terciles read this one datalist.
        """
        dls = [self.site_datalists[s.name] for s in self.sites]
        if self.test_site is None:
            desc = "mixed-site: " + ", ".join(f"{s.name} = {s.path}" for s in self.sites)
            doc = D.merge_datalists(dls, desc)
        else:
            desc = (
                "cross-site: training = training+validation of "
                + ", ".join(f"{s.name} = {s.path}" for s in self.sites)
                + f"; test = every item of {self.test_site.name} = {self.test_site.path}"
            )
            doc = {
                "description": desc,
                "training": [it for dl in dls for it in D.training_pool(dl)],
                "test": D.unique_images(self.site_datalists[self.test_site.name]),
            }
        return doc

    def splits(self) -> list[tuple[int | None, Path, list[dict[str, Any]]]]:
        """``[(fold, datalist path, evaluation items)]``: one entry without ``--folds``, else one per fold.

        The written datalists hold absolute paths; the evaluated items sit in both ``validation`` and ``test``,
        so the bundle's evaluate config finds them whichever split it reads. With several sites the folds are
        stratified by site (:func:`~monai_vlmfilm.ablation.data.make_site_folds`); cross-site is one split.
        """
        a, dl = self.args, self.datalist
        out = []
        if self.setting == "cross-site":
            train, ev = list(dl["training"]), list(dl["test"])
            path = D.write_fold_datalist(
                self.out / "datalists" / "cross_site.json",
                {"training": train, "validation": ev, "test": ev},
                f"cross-site: train on {', '.join(s.name for s in self.sites)}, test on {self.test_site.name}",
            )
            out.append((None, path, ev))
        elif a.folds:
            if self.setting == "mixed-site":
                pools = {n: D.training_pool(self.site_datalists[n]) for n in (s.name for s in self.sites)}
                folds = D.make_site_folds(pools, a.folds, a.fold_seed)
                pool = [it for p in pools.values() for it in p]
                source = f"stratified by site over training+validation of {', '.join(pools)}"
            else:
                pool = D.training_pool(dl)
                folds = D.make_folds(pool, a.folds, a.fold_seed)
                source = f"over training+validation of {self.datalist_path}"
            for k, held in enumerate(folds):
                held_set = {it["image"] for it in held}
                train = [it for it in pool if it["image"] not in held_set]
                path = D.write_fold_datalist(
                    self.out / "datalists" / f"fold{k}.json",
                    {"training": train, "validation": held, "test": held},
                    f"fold {k} of {a.folds} (seed {a.fold_seed}) {source}",
                )
                out.append((k, path, list(held)))
        elif self.setting == "mixed-site":
            train, val, ev = [], [], []
            for s in self.sites:
                sdl = self.site_datalists[s.name]
                sev = list(sdl[self.eval_splits[s.name]])
                train += sdl["training"]
                val += sdl.get("validation") or sev
                ev += sev
            path = D.write_fold_datalist(
                self.out / "datalists" / "main.json",
                {"training": train, "validation": val, "test": ev},
                "mixed-site: the sites' training splits; test = "
                + ", ".join(f"{n}'s {sp!r}" for n, sp in self.eval_splits.items()),
            )
            out.append((None, path, ev))
        else:
            split = D.eval_split_of(dl, a.eval_split)
            ev = list(dl[split])
            path = D.write_fold_datalist(
                self.out / "datalists" / "main.json",
                {"training": dl["training"], "validation": dl.get("validation") or ev, "test": ev},
                f"{self.datalist_path} with absolute paths; test = its {split!r} split",
            )
            out.append((None, path, ev))
        return out

    # -------------------------------------------------------------------- profiles
    def variant_settings(self, mode: str) -> dict[str, str]:
        """The ``--variant`` settings of a mode such as ``on.norm`` (empty for the plain modes)."""
        return self.args.variants.get(mode.partition(".")[2], {})

    def calibration_of(self, mode: str) -> str:
        return self.variant_settings(mode).get("calibration", self.args.calibration)

    def profile_norm_of(self, mode: str) -> str:
        return self.variant_settings(mode).get("profile_norm", self.args.profile_norm)

    def all_modes(self) -> list[str]:
        """``--modes`` then ``<mode>.<variant>`` for every variant and variant mode."""
        a = self.args
        return list(a.mode_list) + [f"{m}.{v}" for v in a.variants for m in a.variant_modes_of[v]]

    def prepare_profiles(self) -> dict[str, ProfileSource]:
        """Fill the profile stores every mode reads (see :class:`~monai_vlmfilm.ablation.sources.ProfileSources`)."""
        return self.sources.prepare(self.all_modes())

    def profile_norm_file(self, mode: str, fold: int | None, train_items: Sequence[Mapping[str, Any]]) -> Path | None:
        """The normalisation JSON of a mode's profile store over a split's training images, or None."""
        if self.profile_norm_of(mode) != "train" or mode == "off":
            return None
        return self.sources.norm_file(mode, fold, train_items)

    def check_override_keys(self) -> None:
        """Refuse an ``--override`` or ``--variant`` key the bundle's configs do not define (a new argument of a
        component, such as ``network_def#film_stages``, is allowed: its constructor checks it).

        MONAI's ``ConfigParser`` adds an unknown id as a new, unused entry, so a misspelt or misplaced key (a top-level
        ``use_difficulty_gate`` where the network reads ``network_def#use_difficulty_gate``) would train every job
        of that variant exactly like the plain mode and report the difference as a finding.

        Raises:
            ValueError: naming the option, the key, and the config ids that end in the same name.
        """
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(
            [str(c) for c in [self.train_config, self.eval_config, self.overlay_on, self.overlay_off] if c]
        )
        flat: list[str] = []

        def walk(node: Any, prefix: str) -> None:
            items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            for k, v in items:
                flat.append(f"{prefix}{k}")
                walk(v, f"{prefix}{k}#")

        walk(parser.get(), "")
        given = [("--override", kv.split("=", 1)[0].strip()) for kv in self.args.override]
        given += [
            (f"--variant {name}", k)
            for name, settings in self.args.variants.items()
            for k in settings
            if k not in ("calibration", "profile_norm")
        ]
        for option, key in given:
            parent = parser.get(key.rpartition("#")[0]) if "#" in key else None
            # a new argument of a component (``network_def#film_stages``) reaches its constructor, which refuses
            # one it does not take; anything else new is never read
            if key in parser or (isinstance(parent, dict) and "_target_" in parent):
                continue
            leaf = key.split("#")[-1]
            near = [f for f in flat if f.split("#")[-1] == leaf]
            hint = f"; did you mean {' or '.join(repr(n) for n in near[:3])}?" if near else ""
            raise ValueError(
                f"{option}: {key!r} is not a key of {str(self.train_config)!r} or its overlays, so the bundle would "
                f"add it unused and the jobs would run unchanged{hint}"
            )

    # -------------------------------------------------------------------- jobs
    def bundle_value(self, key: str) -> Any:
        """A top-level value of the training config (with overlays and ``--override``), e.g. ``batch_size``."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config([str(c) for c in self.configs("off", self.train_config)])
        for kv in self.args.override:
            k, v = kv.split("=", 1)
            parser[k] = coerce(v)
        return parser.get_parsed_content(key) if key in parser else None

    def epochs_for(self, n_train: int) -> int:
        """``--epochs``, or ``--max-iterations`` turned into whole epochs of ``n_train`` items."""
        a = self.args
        if a.epochs is not None:
            return a.epochs
        bs = int(self.bundle_value(BUNDLE_KEYS["batch_size"]) or 1)
        per_epoch = max(1, -(-n_train // bs))  # DataLoader keeps the last partial batch
        return max(1, round(a.max_iterations / per_epoch))

    def overrides(
        self, mode: str, seed: int, datalist: Path, run_dir: Path, n_train: int, norm_file: Path | None = None
    ) -> dict[str, Any]:
        """Bundle overrides of one job (training; evaluation adds its own on top)."""
        a, K = self.args, BUNDLE_KEYS
        ov: dict[str, Any] = {
            K["switch"]: mode != "off",
            K["seed"]: seed,
            K["datalist"]: str(datalist),
            K["ckpt_dir"]: str(run_dir),
            K["output_dir"]: str(run_dir),
        }
        st = self.sources.of(mode)
        if st is not None:
            ov[K["cache_dir"]] = str(st.dir)
            ov[K["profiler"]] = st.spec
            # every image was profiled ahead: a miss would silently recompute (shuffle would see true profiles)
            ov[K["on_missing"]] = "error"
        if a.epochs is not None or a.max_iterations is not None:
            ov[K["epochs"]] = self.epochs_for(n_train)
        if a.image_size is not None:
            ov[K["patch_size"]] = f"[{a.image_size},{a.image_size}]"
        if not a.train_validation:
            # the ablation evaluates the final checkpoint itself: no validation or interim checkpoints in training
            ov[K["val_interval"]] = NEVER
            ov[K["ckpt_interval"]] = NEVER
        # always said, as "none": the bundle's default (the training split's statistics) is not what "none" means,
        # and MONAI's command line drops a None override, which kept that default in every "none" job of 0.6.1
        ov[K["profile_norm"]] = str(norm_file) if norm_file is not None else "none"
        for kv in a.override:
            k, v = kv.split("=", 1)
            ov[k] = v
        for k, v in self.variant_settings(mode).items():
            if k not in ("calibration", "profile_norm"):
                ov[k] = v
        return ov

    def configs(self, mode: str, base: Path, evaluate: bool = False) -> list[Path]:
        ov = self.overlay_off if mode == "off" else self.overlay_on
        # evaluate.yaml is an overlay of train.yaml (network, transforms, inferer come from training)
        return [base] + ([self.eval_config] if evaluate else []) + ([ov] if ov is not None else [])

    def make_jobs(self, splits: Sequence[tuple[int | None, Path, list[dict[str, Any]]]]) -> list[Job]:
        a, K = self.args, BUNDLE_KEYS
        jobs = []
        pythonpath = os.pathsep.join(p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")) if p)
        # seed-major order: a run cut short still holds complete (off, on, ...) sets for the first seeds
        for seed in a.seeds:
            for fold, dl_path, ev_items in splits:
                train_items = json.loads(dl_path.read_text())["training"]
                n_train = len(train_items)
                for mode in self.all_modes():
                    name = f"{mode}_seed{seed}" + (f"_fold{fold}" if fold is not None else "")
                    wd = self.out / "jobs" / name
                    norm = self.profile_norm_file(mode, fold, train_items)
                    ov = self.overrides(mode, seed, dl_path, wd / "train", n_train, norm)
                    train = bundle_cmd(self.bundle_root, self.configs(mode, self.train_config), ov)
                    ev_ov = {
                        **ov,
                        K["output_dir"]: str(wd / "eval"),
                        K["ckpt_path"]: str(wd / "train" / FINAL_CHECKPOINT),
                        K["eval_dir"]: str(wd / "eval"),
                        K["data_split"]: "test",
                    }
                    evaluate = bundle_cmd(self.bundle_root, self.configs(mode, self.train_config, evaluate=True), ev_ov)
                    info = {
                        "mode": mode,
                        "seed": seed,
                        "fold": fold,
                        "eval_items": ev_items,
                        "epochs": ov.get(K["epochs"]),
                        "n_train": n_train,
                        "overrides": ov,
                    }
                    steps = [
                        Step("train", train, a.job_timeout),
                        Step("evaluate", evaluate, a.job_timeout),
                        Step("collect", self.collector),
                    ]
                    _invalidate_if_changed(wd, {"train": train, "evaluate": evaluate})
                    jobs.append(Job(name, wd, steps, info, {"PYTHONPATH": pythonpath}))
        return jobs

    # -------------------------------------------------------------------- difficulty
    def prepare_difficulty(self) -> None:
        """Each image's difficulty for the report: ground truth on synthetic data, else the profiler's estimate."""
        items = D.unique_images(self.datalist)
        if self.synthetic:
            self.difficulty.update({it["image"]: float(it["factors"]["difficulty"]) for it in items})
            self.difficulty_source = "factors.difficulty (the synthetic generator's ground truth, 1-5)"
            return
        name = self.sources.profiler_name
        st = self.sources.stores[name]
        vecs = D.profile_vectors(st.dir, items, st.profiler)
        self.difficulty.update({it["image"]: float(1.0 + 4.0 * v[0]) for it, v in zip(items, vecs)})
        self.difficulty_source = f"{name} profile difficulty (1-5; no ground truth for real images)"

    # -------------------------------------------------------------------- report
    def results(self, outcomes: Sequence[JobOutcome], wall: float, card: str) -> dict[str, Any]:
        a = self.args
        records: list[dict[str, Any]] = []
        film: list[dict[str, Any]] = []
        jobs = []
        for o in outcomes:
            j = {
                "name": o.job.name,
                "mode": o.job.info["mode"],
                "seed": o.job.info["seed"],
                "fold": o.job.info["fold"],
                "status": o.status,
                "wall_s": round(o.wall_s, 1),
                "slot": o.slot,
                "step_s": o.steps,
                "epochs": o.job.info.get("epochs"),
                "n_train": o.job.info.get("n_train"),
                "log": o.log,
                "error": o.error,
            }
            res = o.job.workdir / "result.json"
            if o.status in ("ok", "skipped") and res.is_file():
                doc = json.loads(res.read_text())
                records += doc["records"]
                if doc.get("film"):
                    film.append({"mode": doc["mode"], "seed": doc["seed"], "fold": doc["fold"], "stages": doc["film"]})
            elif o.status not in ("failed", "not_run"):
                j["status"], j["error"] = "failed", f"no result.json in {o.job.workdir}"
            jobs.append(j)
        if self.site_of:
            # the site of each evaluated image, for the per-site results (also of jobs collected before a rerun)
            for r in records:
                r["site"] = self.site_of[os.path.abspath(r["image"])]
        eval_items = {it["image"]: it for _, _, ev in self.split_list for it in ev}
        ev_list = sorted(eval_items.values(), key=lambda it: it["image"])
        profiles = {}
        for src, st in self.sources.stores.items():
            v = D.profile_vectors(st.dir, ev_list, st.profiler)
            from monai_vlmfilm.profiles.schema import VECTOR_FIELDS

            profiles[src] = {
                "fields": list(VECTOR_FIELDS),
                "images": [it["image"] for it in ev_list],
                "vectors": v.tolist(),
            }
        settings = {
            "epochs": a.epochs,
            "max_iterations": a.max_iterations,
            "image_size": a.image_size,
            "overrides": a.override,
            "bundle_root": str(self.bundle_root),
            "train_configs": [str(c) for c in self.configs("on", self.train_config)],
            "gpus": a.gpus,
            "jobs_per_gpu": a.jobs_per_gpu,
        }
        sites: dict[str, Any] = {}
        if self.setting != "single":
            # only with several sites, so a single datalist's results.json stays as it was
            sites = {
                "setting": self.setting,
                "sites": {s.name: str(s.path) for s in self.sites},
                "shuffle_within_site": self.shuffle_within_site,
            }
            if self.test_site is not None:
                sites["test_site"] = {self.test_site.name: str(self.test_site.path)}
            if self.eval_splits:
                sites["eval_splits"] = self.eval_splits
        return {
            "title": a.title,
            "command": "python -m monai_vlmfilm.ablation " + " ".join(shlex.quote(x) for x in self.argv),
            "datalist": str(self.datalist_path),
            **sites,
            "card": card,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "wall_time_s": wall,
            "modes": self.all_modes(),
            "variants": a.variants,
            "compare": a.compare_pairs,
            "calibration": a.calibration,
            "profile_norm": a.profile_norm,
            "seeds": a.seeds,
            "folds": a.folds,
            "profiler": self.sources.profiler_name,
            "eval_split": self.eval_split,
            "difficulty_source": self.difficulty_source,
            "settings": {k: v for k, v in settings.items() if v not in (None, [], "")},
            "jobs": jobs,
            "records": records,
            "film": film,
            "profiles": profiles,
        }

    def run(self) -> int:
        t0 = time.time()
        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "command.txt").write_text(
            " ".join(shlex.quote(x) for x in [sys.executable, "-m", "monai_vlmfilm.ablation", *self.argv]) + "\n"
        )
        self.split_list = self.splits()
        self.prepare_profiles()
        self.prepare_difficulty()
        jobs = self.make_jobs(self.split_list)
        gpus = _gpus(a.gpus)
        card = _card(gpus)
        slots = make_slots(gpus, a.jobs_per_gpu, a.cpu_jobs)
        if a.report_only:
            outcomes = [
                JobOutcome(
                    j,
                    "skipped" if j.done_file.exists() else "failed",
                    0.0,
                    error="" if j.done_file.exists() else "not run (--report-only)",
                )
                for j in jobs
            ]
        else:
            print(f"[ablation] {len(jobs)} jobs on {len(slots)} slot(s) ({card}); logs under {self.out / 'jobs'}")

            n_done = [0]

            def show(o: JobOutcome) -> None:
                n_done[0] += 1
                if a.no_progress:  # one line per job instead of the bar (logs of non-interactive runs)
                    steps = " ".join(f"{k}={v:.0f}s" for k, v in o.steps.items())
                    print(f"[ablation] {n_done[0]}/{len(jobs)} {o.job.name} {o.status} on {o.slot} {steps}", flush=True)
                if o.status == "failed":
                    print(f"\n[ablation] FAILED {o.job.name}: {o.error}\n  log: {o.log}", file=sys.stderr)

            deadline = t0 + a.time_budget if a.time_budget is not None else None
            outcomes = run_jobs(jobs, slots, progress=not a.no_progress, on_done=show, deadline=deadline)
        results = self.results(outcomes, time.time() - t0, card)
        report = write_report(results, self.out, n_boot=a.n_boot)
        print(f"[ablation] report: {report}")
        for v in results.get("verdicts", []):
            print("  " + v["text"].replace("**", ""))
        n_failed = sum(1 for j in results["jobs"] if j["status"] == "failed")
        n_not_run = sum(1 for j in results["jobs"] if j["status"] == "not_run")
        if n_failed:
            print(f"[ablation] {n_failed} job(s) failed; see the report's job list", file=sys.stderr)
        if n_not_run:
            print(f"[ablation] {n_not_run} job(s) not started (--time-budget); rerun the same command to resume")
        return 1 if n_failed else 0


def bundle_root_of(given: str | None) -> Path:
    """The bundle folder: ``--bundle-root``, else ``./bundle`` when it exists.

    Args:
        given: the ``--bundle-root`` value, or None.

    Raises:
        ValueError: neither names a bundle (a folder with ``configs/train.yaml``), saying what to pass.
    """
    root = Path(given if given else "bundle").resolve()
    if not (root / "configs" / "train.yaml").is_file():
        hint = "" if given else " (no ./bundle here)"
        raise ValueError(
            f"{str(root)!r} is not a MONAI bundle folder (no configs/train.yaml){hint}: pass --bundle-root <bundle>, "
            "e.g. the bundle/ folder of the monai-vlmfilm repository or a downloaded copy of it"
        )
    return root


def _invalidate_if_changed(workdir: Path, spec: Mapping[str, Any]) -> None:
    """Resume only what the same commands produced: a job folder from other settings is run again.

    Its earlier outputs are moved, not deleted, to ``superseded/<n>/`` inside the folder (with their ``spec.json``):
    a resumed command that differs by mistake, or only in how it spells a setting, costs no finished result.
    """
    path = workdir / "spec.json"
    text = json.dumps(spec, indent=1)
    if path.is_file() and path.read_text() != text:
        keep = workdir / "superseded"
        dest = keep / str(1 + sum(1 for _ in keep.iterdir()) if keep.is_dir() else 1)
        dest.mkdir(parents=True)
        for entry in workdir.iterdir():
            if entry != keep:
                entry.rename(dest / entry.name)
        print(
            f"[ablation] {workdir.name}: settings changed since the last run; its outputs moved to {dest}, "
            "running it again",
            file=sys.stderr,
        )
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        return Ablation(args, argv).run()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
