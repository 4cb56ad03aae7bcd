"""What training logs to MLflow and TensorBoard, read back from their stores.

One tiny FiLM-on bundle training run (``--tracking mlflow``, 2 epochs x 4 iterations, validation every epoch) is
shared by every test: MLflow writes to the local SQLite store that MONAI's default tracking settings use
(``<output_dir>/mlruns.db``), TensorBoard to ``<output_dir>/tensorboard``. The tests read the run's parameters,
metric histories and artifact back through ``MlflowClient`` and the event files through TensorBoard's
``EventAccumulator``, and check that both hold the same numbers.

mlflow-skinny, sqlalchemy and alembic are in the ``test`` extra (``make test`` installs it): a missing package
fails this module instead of skipping it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from mlflow.tracking import MlflowClient
except ImportError as e:  # no skip: CI must run these tests
    raise ImportError(
        "the tracking tests need mlflow-skinny, sqlalchemy and alembic: pip install -e '.[test]' (make test does)"
    ) from e
from monai.utils import path_to_sqlite_uri
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
EPOCHS, ITERS = 2, 4  # 8 training images at batch size 2
STAGES = 3  # up blocks of the tiny network (channels [8, 16, 16])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One FiLM-on training run with MLflow tracking: ``{"client", "run", "root", "tb"}``."""
    root = tmp_path_factory.mktemp("tracking")

    def cli(*args: str) -> None:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    cli("-m", "monai_vlmfilm.data.synthetic", "--out", str(root / "data"), "--n-train", "8", "--n-val", "2",
        "--n-test", "0", "--size", "64", "--seed", "3")  # fmt: skip
    datalist = root / "data" / "datalist.json"
    cli("-m", "monai_vlmfilm.profiles", "precompute", "--datalist", str(datalist), "--cache-dir", str(root / "cache"),
        "--profiler", "heuristic", "--no-progress")  # fmt: skip
    bundle_root = root / "bundle"
    cli("-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "train.yaml"), "--bundle_root", str(bundle_root),
        "--datalist", str(datalist), "--profile_cache_dir", str(root / "cache"),
        "--network_def#channels", "[8,16,16]", "--network_def#attention_levels", "[False,False,False]",
        "--network_def#norm_num_groups", "8",
        "--network_def#cond_dim", "16", "--network_def#film_hidden_dim", "16", "--patch_size", "[64,64]",
        "--num_inference_steps", "1", "--epochs", str(EPOCHS), "--val_interval", "1", "--batch_size", "2",
        "--cache_rate", "0", "--film_log_every", "1",
        "--tracking", "mlflow", "--experiment_name", "vlmfilm_test", "--run_name", "film_on")  # fmt: skip
    out = bundle_root / "eval"
    client = MlflowClient(tracking_uri=path_to_sqlite_uri(out / "mlruns.db"))
    experiment = client.get_experiment_by_name("vlmfilm_test")
    assert experiment is not None, "no MLflow experiment 'vlmfilm_test' in the SQLite store"
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["film_on"]  # trainer and validator log into one run
    return {"client": client, "run": runs[0], "root": root, "tb": tensorboard_scalars(out / "tensorboard")}


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` over every event file in ``log_dir`` (trainer and validator write their own)."""
    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event files in {log_dir}"
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(v) for tag, v in out.items()}


def history(run, name: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one MLflow metric, by step."""
    return sorted((m.step, m.value) for m in run["client"].get_metric_history(run["run"].info.run_id, name))


def film_tags() -> list[str]:
    per_stage = [f"film/stage{i}/{k}" for i in range(STAGES) for k in ("gamma_mean", "gamma_std", "gamma_absmax",
                 "beta_mean", "beta_std", "beta_absmax", "gate_mean", "gate_min", "gate_max")]  # fmt: skip
    features = ("difficulty", "confidence", "boundary", "thin_structure", "small_objects", "clutter")
    profile = [f"film/profile/{f}_{k}" for f in features for k in ("mean", "spread")]
    return per_stage + profile + ["film/cache_hit_rate", "film/fallback_rate"]


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


# ------------------------------------------------------------------------------------------------ MLflow
def test_mlflow_run_params_and_config_artifact(run, tmp_path):
    r = run["client"].get_run(run["run"].info.run_id)
    assert r.info.status == "FINISHED"
    # MONAI's MLFlowHandler logs the trainer's length as parameters ...
    assert r.data.params["max_epochs"] == str(EPOCHS) and r.data.params["epoch_length"] == str(ITERS)
    # ... and the executed bundle config as an artifact: every setting of the run
    (artifact,) = [a.path for a in run["client"].list_artifacts(r.info.run_id)]
    assert artifact.startswith("config_") and artifact.endswith(".json")
    config = json.loads(Path(run["client"].download_artifacts(r.info.run_id, artifact, str(tmp_path))).read_text())
    assert config["use_vlm_film"] is True and config["epochs"] == EPOCHS and config["batch_size"] == 2


def test_mlflow_loss_and_learning_rate(run):
    loss = history(run, "train_loss")
    assert [s for s, _ in loss] == list(range(1, EPOCHS * ITERS + 1))  # one value per iteration
    assert finite(v for _, v in loss) and all(v > 0 for _, v in loss)
    lr = history(run, "lr_group_0")
    assert [s for s, _ in lr] == list(range(1, EPOCHS * ITERS + 1))
    # warm-up then cosine decay from learning_rate (1e-3) towards 0
    assert max(v for _, v in lr) == pytest.approx(1e-3) and lr[-1][1] < 1e-4 and all(v >= 0 for _, v in lr)


def test_mlflow_validation_dice_and_cldice(run):
    for name in ("val_mean_dice", "val_cldice"):
        values = history(run, name)
        assert [s for s, _ in values] == list(range(1, EPOCHS + 1)), name  # one validation per epoch
        assert all(0.0 <= v <= 1.0 for _, v in values), (name, values)


def test_mlflow_film_statistics(run):
    for tag in film_tags():
        values = history(run, tag)
        assert [s for s, _ in values] == list(range(1, EPOCHS + 1)), tag  # per epoch, from engine.state.metrics
        assert finite(v for _, v in values), tag
    for i in range(STAGES):  # the difficulty gate is a sigmoid
        assert all(0.0 < v < 1.0 for _, v in history(run, f"film/stage{i}/gate_mean"))
    assert all(0.0 <= v <= 1.0 for _, v in history(run, "film/profile/difficulty_mean"))
    # every profile came from the precomputed cache, none was a fallback
    assert [v for _, v in history(run, "film/cache_hit_rate")] == [1.0] * EPOCHS
    assert [v for _, v in history(run, "film/fallback_rate")] == [0.0] * EPOCHS


# ------------------------------------------------------------------------------------------------ TensorBoard
def test_tensorboard_holds_what_mlflow_holds(run):
    tb = run["tb"]
    expected_steps = {"train_loss": ITERS * EPOCHS, "lr_group_0": ITERS * EPOCHS, "val_mean_dice": EPOCHS,
                      "val_cldice": EPOCHS, **{t: EPOCHS for t in film_tags()}}  # fmt: skip
    for tag, n in expected_steps.items():
        assert tag in tb, f"{tag} not in TensorBoard (tags: {sorted(tb)})"
        assert [s for s, _ in tb[tag]] == list(range(1, n + 1)), tag
        assert finite(v for _, v in tb[tag]), tag
        # TensorBoard keeps float32, MLflow float64: the same numbers
        mlflow_values = [v for _, v in history(run, tag)]
        assert [v for _, v in tb[tag]] == pytest.approx(mlflow_values, rel=1e-5, abs=1e-7), tag
