"""The MONAI bundle through the real `python -m monai.bundle` CLI (subprocesses), on tiny synthetic data.

One session fixture generates 64x64 synthetic angiograms and precomputes heuristic profiles; a FiLM-off and a
FiLM-on training run are shared by the inference, evaluation and resume tests. Tiny network sizes come in as
command-line overrides, exactly as a user would pass them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
PY = sys.executable

# tiny network and schedule, as command-line overrides (they exist in train.yaml and inference.yaml alike)
TINY_NET = [
    "--network_def#channels", "[8,16,16]",
    "--network_def#attention_levels", "[False,False,False]",
    "--network_def#norm_num_groups", "8",
    "--network_def#cond_dim", "16",
    "--network_def#film_hidden_dim", "16",
    "--patch_size", "[64,64]",
    "--num_inference_steps", "2",
]  # fmt: skip
TINY_TRAIN = ["--epochs", "1", "--val_interval", "1", "--batch_size", "2", "--cache_rate", "0"]


def run_cli(args: list[str], timeout: int = 300, env: dict | None = None) -> str:
    """Run a command from the repository root; return stdout+stderr, fail the test with its tail on error."""
    proc = subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"command failed ({proc.returncode}): {' '.join(args)}\n{out[-6000:]}"
    return out


def bundle_run(config_file: str | list[str], *overrides: str, timeout: int = 300) -> str:
    cfg = config_file if isinstance(config_file, str) else "[" + ",".join(f"'{c}'" for c in config_file) + "]"
    return run_cli([PY, "-m", "monai.bundle", "run", "--config_file", cfg, *overrides], timeout=timeout)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Synthetic 64x64 data set (8 train / 2 val / 2 test) with precomputed heuristic profiles."""
    root = tmp_path_factory.mktemp("bundle_data")
    run_cli([PY, "-m", "monai_vlmfilm.data.synthetic", "--out", str(root / "data"), "--n-train", "8", "--n-val", "2",
             "--n-test", "2", "--size", "64", "--seed", "3"])  # fmt: skip
    datalist = root / "data" / "datalist.json"
    cache = root / "profiles"
    run_cli([PY, "-m", "monai_vlmfilm.profiles", "precompute", "--datalist", str(datalist), "--cache-dir", str(cache),
             "--profiler", "heuristic", "--no-progress"])  # fmt: skip
    return {"root": root, "datalist": datalist, "cache": cache}


def _common(data, bundle_root: Path) -> list[str]:
    return ["--bundle_root", str(bundle_root), "--datalist", str(data["datalist"]),
            "--profile_cache_dir", str(data["cache"]), *TINY_NET]  # fmt: skip


@pytest.fixture(scope="session")
def run_off(data):
    """FiLM-off training (plain train.yaml, switch given as the string "false" as typed on a shell)."""
    root = data["root"] / "run_off"
    log = bundle_run(str(CONFIGS / "train.yaml"), *_common(data, root), *TINY_TRAIN,
                     "--use_vlm_film", "false")  # fmt: skip
    return {"root": root, "log": log}


@pytest.fixture(scope="session")
def run_on(data):
    """FiLM-on training through the experiment overlay configs/flow_vlm.yaml."""
    root = data["root"] / "run_on"
    log = bundle_run([str(CONFIGS / "train.yaml"), str(REPO / "configs" / "flow_vlm.yaml")],
                     *_common(data, root), *TINY_TRAIN, "--film_log_every", "1")  # fmt: skip
    return {"root": root, "log": log}


def tensorboard_scalars(bundle_root: Path) -> dict[str, list[float]]:
    """``{tag: values}`` of what the bundle's TensorBoard handlers wrote under ``<bundle_root>/eval/tensorboard``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for f in sorted((bundle_root / "eval" / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def _tiny_unet_kwargs() -> dict:
    return {"spatial_dims": 2, "in_channels": 2, "out_channels": 1, "channels": (8, 16, 16),
            "attention_levels": (False, False, False), "num_res_blocks": 1, "norm_num_groups": 8}  # fmt: skip


# ------------------------------------------------------------------------------------------------ metadata / network
def test_verify_metadata():
    from shared_data import SCHEMA, looked_in

    if not SCHEMA.is_file():  # no machine here can download it: it lives in the project's shared/ folder
        pytest.skip(f"bundle metadata schema not found (looked in {looked_in('schema/meta_schema_20240725.json')})")
    out = run_cli([PY, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"),
                   "--filepath", str(SCHEMA)])  # fmt: skip
    assert "metadata is verified with no error" in out
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert list(meta["network_data_format"]["inputs"]) == ["image", "timesteps", "profile"]  # forward()'s arguments
    assert list(meta["network_data_format"]["outputs"]) == ["pred"]


def test_verify_net_in_out():
    # inference.yaml's network_def (what MONAI Label builds); train.yaml's is the same item (test_switch_in_parsed_config)
    out = run_cli([PY, "-m", "monai.bundle", "verify_net_in_out", "network_verify", "--meta_file",
                   str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.yaml"),
                   "--device", "cpu"])  # fmt: skip
    assert "data shape of network is verified with no error" in out


def test_one_network_def_for_training_and_inference():
    """MONAI Label builds inference.yaml's network_def and loads train.yaml's checkpoints into it: the two must agree."""
    from monai.bundle import ConfigParser

    train, infer = ConfigParser(), ConfigParser()
    train.read_config(str(CONFIGS / "train.yaml"))
    infer.read_config(str(CONFIGS / "inference.yaml"))
    assert train["network_def"] == infer["network_def"]
    assert train["network_def"]["_target_"] == "monai_vlmfilm.networks.FiLMFlowUNet"


def test_encoder_film_is_one_switch_in_both_configs():
    """``--film_encoder_stages "[0,1,2,3]"`` builds FiLM heads on the encoder blocks in training and inference alike
    (MONAI Label builds inference.yaml's network); the default is the shipped model's decoder-only FiLM."""
    from monai.bundle import ConfigParser

    for name in ("train.yaml", "inference.yaml"):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / name))
        parser["profile_norm"] = None  # train.yaml's default reads the training images' profiles
        for k, v in {"channels": [8, 16, 16, 16], "norm_num_groups": 8, "cond_dim": 16, "film_hidden_dim": 16}.items():
            parser[f"network_def#{k}"] = v
        assert parser["film_encoder_stages"] == []
        assert not hasattr(parser.get_parsed_content("network_def", lazy=False), "film_encoder_heads")
        parser["film_encoder_stages"] = [0, 1, 2, 3]
        net = parser.get_parsed_content("network_def", lazy=False)
        assert net.film_encoder_stages == (0, 1, 2, 3) and sorted(net.film_encoder_heads) == ["0", "1", "2", "3"]
        parser["use_vlm_film"] = False  # off is still exactly the plain network
        assert not hasattr(parser.get_parsed_content("network_def", lazy=False), "film_encoder_heads")


def test_profile_jitter_is_one_training_switch():
    """``--profile_noise 0.5`` (one-site advice, BENCHMARKS 9o) reaches FiLMFlowUNet in both configs; the default is
    off (the shipped model.pt was trained without it) and the weights are the same either way."""
    from monai.bundle import ConfigParser

    for name in ("train.yaml", "inference.yaml"):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / name))
        parser["profile_norm"] = None
        for k, v in {"channels": [8, 16, 16, 16], "norm_num_groups": 8, "cond_dim": 16, "film_hidden_dim": 16}.items():
            parser[f"network_def#{k}"] = v
        plain = parser.get_parsed_content("network_def", lazy=False)
        assert parser["profile_noise"] == 0.0 and plain.profile_noise == 0.0
        parser["profile_noise"] = 0.5
        jittered = parser.get_parsed_content("network_def", lazy=False)
        assert jittered.profile_noise == 0.5 and jittered.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize(
    "device, expected",
    [("cpu", True), ("cuda:0", False), ("$torch.device('cpu')", True), ("$torch.device('cuda:0')", False)],
)
def test_inference_channels_last_follows_the_device(device, expected):
    """channels_last is on for the CPU only, whether ``device`` is a torch.device (bundle run) or the plain string
    MONAI Label puts there (a string once broke every /infer with a 500)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    parser["device"] = device
    inferer = parser.get_parsed_content("inferer")
    assert inferer.channels_last is expected
    # bf16 autocast is configured on, and the inferer keeps it only where the CPU computes bf16 in hardware
    from monai_vlmfilm.inferers import cpu_has_native_bf16

    assert parser["cpu_bf16"] is True and inferer.cpu_bf16 is cpu_has_native_bf16()
    parser["cpu_bf16"] = "false"  # as `--cpu_bf16 false` arrives from the command line: a string, not a bool
    assert parser.get_parsed_content("inferer", lazy=False).cpu_bf16 is False
    # torch.compile is opt-in: off by default, `--compile_mode reduce-overhead` reaches the inferer as given
    assert parser["compile_mode"] is None and inferer.compile_mode is None
    parser["compile_mode"] = "reduce-overhead"
    assert parser.get_parsed_content("inferer", lazy=False).compile_mode == "reduce-overhead"


def test_switch_in_parsed_config(data, tmp_path):
    """use_vlm_film switches transform, FiLM heads and handler; OFF has exactly DiffusionModelUNet's state_dict keys."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import DiffusionModelUNet

    from monai_vlmfilm.handlers import FiLMStatsHandler
    from monai_vlmfilm.transforms import AttachVLMProfiled

    def parsed(flag):
        p = ConfigParser()
        p.read_config(str(CONFIGS / "train.yaml"))
        p.update({"use_vlm_film": flag, "datalist": str(data["datalist"]), "bundle_root": str(tmp_path),
                  "profile_cache_dir": str(data["cache"]), "cache_rate": 0})  # fmt: skip
        return p

    for flag, on in ((True, True), ("false", False), (False, False), ("true", True)):
        p = parsed(flag)
        net = p.get_parsed_content("network_def")
        transforms = p.get_parsed_content("train#deterministic_transforms")
        handlers = p.get_parsed_content("train#handlers") + p.get_parsed_content("train#log_handlers")
        assert any(isinstance(t, AttachVLMProfiled) for t in transforms) is on
        assert any(isinstance(h, FiLMStatsHandler) for h in handlers) is on
        if (
            on
        ):  # the handler reads the cache counters of the very transform in the pipeline (a named id, not a position)
            film = next(h for h in handlers if isinstance(h, FiLMStatsHandler))
            assert film.profile_stats is p.get_parsed_content("profile_transform")
            assert any(t is film.profile_stats for t in p.get_parsed_content("train#preprocessing").transforms)
        assert net.use_vlm_film is on
        kwargs = {k: p[f"network_def#{k}"] for k in ("spatial_dims", "in_channels", "out_channels", "channels",
                                                     "attention_levels", "num_res_blocks", "norm_num_groups")}  # fmt: skip
        # the bundle's own part (image_norm, on since 0.6.0: the input z-score and its record) in ON and OFF alike;
        # OFF is that network with the profile parts removed (a plain DiffusionModelUNet when image_norm is off)
        ref_keys = set(DiffusionModelUNet(**kwargs).state_dict()) | ({"image_norm_flag"} if net.image_norm else set())
        keys = set(net.state_dict())
        if on:
            extra = keys - ref_keys
            assert ref_keys < keys and extra and all(k.startswith(("profile_encoder.", "film_heads.")) for k in extra)
        else:
            assert keys == ref_keys
    with pytest.raises(Exception) as err:  # MONAI wraps the config error; the cause names the key
        parsed("maybe").get_parsed_content("network_def")
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    # the network's own check, or (profile_norm's default reads the switch first) MONAI's str2bool inside the
    # expression that names the key: either way the user is told which switch got which value
    assert any("use_vlm_film must be true or false, got 'maybe'" in m for m in chain) or (
        any("use_vlm_film" in m for m in chain) and any('Got "maybe", expected a value from' in m for m in chain)
    ), chain


def test_profile_norm_follows_the_training_items(data, tmp_path):
    """train.yaml's default profile_norm is over the images training uses (``train#dataset#data``), so an override of
    those items (MONAI Label's, or a subset) changes the statistics with them; FiLM off: none."""
    from monai.bundle import ConfigParser

    from monai_vlmfilm.data.datalist import load_split
    from monai_vlmfilm.profiles import HeuristicProfiler, ProfileStore
    from monai_vlmfilm.profiles.normalization import compute_profile_norm

    p = ConfigParser()
    p.read_config(str(CONFIGS / "train.yaml"))
    p.update({"use_vlm_film": True, "datalist": str(data["datalist"]), "bundle_root": str(tmp_path),
              "profile_cache_dir": str(data["cache"]), "cache_rate": 0,
              "train#dataset#data": "$monai_vlmfilm.data.datalist.load_split(@datalist, 'training')[:3]"})  # fmt: skip
    norm = p.get_parsed_content("profile_norm")
    store, fp = ProfileStore(data["cache"], read_only=True), HeuristicProfiler().fingerprint
    first3 = load_split(data["datalist"], "training")[:3]
    expected = compute_profile_norm([store.lookup(d["image"], fp).profile.to_vector() for d in first3])
    assert norm["images"] == 3 and norm["source"] == "profiles of 3 training images"
    np.testing.assert_allclose(norm["mean"], expected["mean"], atol=1e-6)
    np.testing.assert_allclose(norm["std"], expected["std"], atol=1e-6)
    p["use_vlm_film"] = "false"
    assert p.get_parsed_content("profile_norm", lazy=False) is None


def test_profile_norm_can_be_turned_off_from_the_command_line(data, tmp_path):
    """`--profile_norm none` (or false) gives a FiLM network without normalisation. `--profile_norm None` cannot:
    MONAI's bundle command line passes its overrides through update_kwargs, which drops None values, so the
    config's default (training-set statistics) stays; 0.6.1 documented None, and the ablation passed it."""
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import update_kwargs

    assert update_kwargs({}, profile_norm=None) == {}  # why "none": what `--profile_norm None` reaches the config as

    def encoder_buffers(**override):
        p = ConfigParser()
        p.read_config(str(CONFIGS / "train.yaml"))
        p.update({"use_vlm_film": True, "datalist": str(data["datalist"]), "bundle_root": str(tmp_path),
                  "profile_cache_dir": str(data["cache"]), "cache_rate": 0,
                  "train#dataset#data": "$monai_vlmfilm.data.datalist.load_split(@datalist, 'training')[:3]"})  # fmt: skip
        p.update(update_kwargs({}, **override))
        enc = p.get_parsed_content("network_def").profile_encoder
        return enc.feature_mean, enc.feature_std

    mean, std = encoder_buffers()  # the default: the training images' statistics
    assert float(std.min()) < 1.0 or float(mean.abs().max()) > 0
    for off in ("none", "None ", "false", False, "null"):
        mean, std = encoder_buffers(profile_norm=off)
        assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(std, torch.ones_like(std)), off
    with pytest.raises(Exception) as err:  # MONAI wraps the expression's error; the cause names the file
        encoder_buffers(profile_norm=str(tmp_path / "missing.json"))
    assert "missing.json" in str(err.value.__cause__) and "not readable JSON" in str(err.value.__cause__)


# ------------------------------------------------------------------------------------------------ training
def test_train_off(run_off):
    models = run_off["root"] / "models"
    assert (models / "model.pt").is_file() and (models / "checkpoint_final.pt").is_file()
    sd = torch.load(models / "model.pt", weights_only=True)
    from monai.networks.nets import DiffusionModelUNet

    # OFF: the DiffusionModelUNet plus the record of the bundle's image_norm (default since 0.6.0), no profile part
    assert set(sd) == set(DiffusionModelUNet(**_tiny_unet_kwargs()).state_dict()) | {"image_norm_flag"}
    scalars = tensorboard_scalars(run_off["root"])
    assert len(scalars["val_mean_dice"]) == 1 and 0.0 <= scalars["val_mean_dice"][0] <= 1.0  # one validation
    assert len(scalars["val_cldice"]) == 1
    assert not any(tag.startswith("film/") for tag in scalars)  # FiLM off: no FiLM statistics handler
    assert "progress: finished epoch 1/1" in run_off["log"]  # the progress / ETA line (console only by design)


def test_train_on_overlay(run_on, data):
    sd = torch.load(run_on["root"] / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("film_heads.") for k in sd) and any(k.startswith("profile_encoder.") for k in sd)
    scalars = tensorboard_scalars(run_on["root"])
    assert "film/stage0/gamma_mean" in scalars
    # every profile came from the precomputed cache (same image content + heuristic fingerprint)
    assert scalars["film/cache_hit_rate"] == [1.0]
    assert scalars["film/fallback_rate"] == [0.0]
    # the default profile_norm: the training split's statistics, as `profiles stats --norm-out` computes them from
    # the same cache, kept in the checkpoint (the shipped model.pt was trained with such statistics too)
    from monai_vlmfilm.data.datalist import load_split
    from monai_vlmfilm.profiles import HeuristicProfiler, ProfileStore
    from monai_vlmfilm.profiles.normalization import compute_profile_norm

    store, fp = ProfileStore(data["cache"], read_only=True), HeuristicProfiler().fingerprint
    items = load_split(data["datalist"], "training")
    expected = compute_profile_norm([store.lookup(d["image"], fp).profile.to_vector() for d in items])
    torch.testing.assert_close(sd["profile_encoder.feature_mean"], torch.tensor(expected["mean"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(sd["profile_encoder.feature_std"], torch.tensor(expected["std"]), atol=1e-5, rtol=0)
    assert float(sd["profile_encoder.feature_std"][:-1].min()) < 1.0  # not the identity the encoder starts from


def test_resume(data, run_off, tmp_path):
    """Resume from a folder whose newest checkpoint was cut short (a crash mid-write without atomic saving)."""
    folder = tmp_path / "old_models"
    shutil.copytree(run_off["root"] / "models", folder)
    ckpt = folder / "checkpoint_final.pt"
    damaged = folder / "checkpoint_checkpoint_epoch=9.pt"
    damaged.write_bytes(ckpt.read_bytes()[:1000])
    log = bundle_run(str(CONFIGS / "train.yaml"), *_common(data, tmp_path), "--epochs", "2",
                     "--batch_size", "2", "--cache_rate", "0", "--use_vlm_film", "False", "--val_interval", "5",
                     "--resume_from", str(folder))  # fmt: skip
    assert f"resume: skipped {damaged}" in log and "is damaged" in log
    assert f"Restored all variables from {ckpt}" in log
    assert "Epoch: 2/2, Iter: 1/" in log and "Epoch: 1/2" not in log
    final = torch.load(tmp_path / "models" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["max_epochs"] == 2 and final["trainer"]["iteration"] == 8  # 2 epochs x 4 iterations


# ------------------------------------------------------------------------------------------------ inference / evaluation
def test_inference_png_and_nifti(data, run_on, tmp_path):
    import nibabel as nib
    from PIL import Image

    src = json.loads(Path(data["datalist"]).read_text())["test"][0]["image"]
    png = Path(data["datalist"]).parent / src
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(png, inputs / "case_png.png")
    arr = np.asarray(Image.open(png)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr.T.copy(), np.eye(4)), str(inputs / "case_nii.nii.gz"))  # MONAI's (W, H) layout
    out_dir = tmp_path / "out"
    log = bundle_run(str(CONFIGS / "inference.yaml"), "--bundle_root", str(run_on["root"]),
                     "--datalist", str(inputs), "--output_dir", str(out_dir),
                     "--profile_cache_dir", str(data["cache"]), *TINY_NET)  # fmt: skip
    assert "inference: wrote 2 masks" in log
    for stem in ("case_png", "case_nii"):
        seg = np.asarray(nib.load(str(out_dir / f"{stem}_seg.nii.gz")).dataobj)
        assert seg.shape == arr.T.shape and seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1}
        overlay = np.asarray(Image.open(out_dir / f"{stem}_overlay.png"))
        assert overlay.shape == (*arr.shape, 3) and overlay.dtype == np.uint8
        # the overlay shows the image in its own orientation (gray where the mask is 0)
        bg = seg.T == 0
        assert np.corrcoef(overlay[..., 1][bg].astype(float), arr[bg])[0, 1] > 0.99
        tinted = overlay[..., 0][~bg].astype(int) - overlay[..., 1][~bg].astype(int)
        assert (tinted > 0).all()
    # one sample, no TTA: no spread to show, so no uncertainty files
    assert not list(out_dir.glob("*uncertainty*"))


def test_inference_uncertainty(data, run_on, tmp_path):
    """With several noise samples the spread is written as NIfTI (values) and heat-map PNG, named after the input."""
    import nibabel as nib

    src = json.loads(Path(data["datalist"]).read_text())["test"][0]["image"]
    png = Path(data["datalist"]).parent / src
    out_dir = tmp_path / "out"
    log = bundle_run(str(CONFIGS / "inference.yaml"), "--bundle_root", str(run_on["root"]),
                     "--datalist", str(png), "--output_dir", str(out_dir), "--num_samples", "3",
                     "--profile_cache_dir", str(data["cache"]), *TINY_NET)  # fmt: skip
    assert "uncertainty maps" in log
    stem = png.stem
    seg = np.asarray(nib.load(str(out_dir / f"{stem}_seg.nii.gz")).dataobj)
    unc = np.asarray(nib.load(str(out_dir / f"{stem}_uncertainty.nii.gz")).dataobj)
    assert unc.shape == seg.shape and unc.dtype == np.float32
    # a standard deviation of probabilities: in [0, 0.5], and three noise draws of an untrained-ish net disagree
    assert np.isfinite(unc).all() and unc.min() >= 0 and unc.max() <= 0.5 and unc.max() > 0
    heat = np.asarray(Image.open(out_dir / f"{stem}_uncertainty.png"))
    assert heat.shape == (*seg.T.shape, 3) and heat.dtype == np.uint8
    # the heat map is the NIfTI's values through the colour map: brighter where the spread is larger
    lum = heat.astype(float).mean(-1).T
    assert np.corrcoef(lum.ravel(), unc.ravel())[0, 1] > 0.8
    # the mask is still binary and the same shape: the spread channel never reaches the mask writer
    assert set(np.unique(seg)) <= {0, 1}


def test_evaluate(data, run_on, tmp_path):
    log = bundle_run([str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")],
                     *_common(data, tmp_path), "--ckpt_path", str(run_on["root"] / "models" / "model.pt"))  # fmt: skip
    eval_dir = tmp_path / "eval" / "evaluation"
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert set(summary["metrics"]) == {"dice", "cldice", "betti0_error", "betti1_error", "hd95"}
    assert summary["num_images"] == 2 and summary["extra"]["use_vlm_film"] is True
    with open(eval_dir / "dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["filename"]).name for r in rows] == ["test_0000.png", "test_0001.png"]
    per_image = [float(r["class0"]) for r in rows]
    assert all(0.0 <= d <= 1.0 for d in per_image)
    assert summary["metrics"]["dice"] == pytest.approx(np.mean(per_image), abs=1e-5)
    for name in ("cldice", "betti0_error", "betti1_error", "hd95"):
        assert (eval_dir / f"{name}_raw.csv").is_file() and (eval_dir / f"{name}_summary.csv").is_file()
    assert "evaluation summary (2 images)" in log
    # pictures of the errors: one per image, named in errors.csv (worst first), and the worst / best sheet
    with open(eval_dir / "errors" / "errors.csv") as f:
        pics = list(csv.DictReader(f))
    assert sorted(r["image"] for r in pics) == ["test_0000", "test_0001"]
    assert [float(r["dice"]) for r in pics] == sorted(float(r["dice"]) for r in pics)
    for r in pics:
        with Image.open(r["picture"]) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
    assert (eval_dir / "errors" / "errors_summary.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------------------ multi-process
def test_torchrun_two_processes_gloo(data, tmp_path):
    torchrun = str(Path(PY).parent / "torchrun")
    out = run_cli([torchrun, "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run",
                   "--config_file", f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'multi_gpu_train.yaml'}']",
                   *_common(data, tmp_path), *TINY_TRAIN], timeout=400)  # fmt: skip
    # 8 training images over 2 ranks at batch size 2: 2 iterations per rank and epoch (4 in one process)
    assert "Epoch: 1/1, Iter: 2/2" in out and "Iter: 3/" not in out
    assert (tmp_path / "models" / "model.pt").is_file()
    sd = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in sd) and any(k.startswith("film_heads.") for k in sd)
