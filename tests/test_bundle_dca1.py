"""The bundle on real angiograms: a few training iterations on DCA1 (300x300 PNGs, 0/255 masks), FiLM on.

Skips when ../shared/data/dca1 is absent (it is not part of the package).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shared_data import DCA1
from test_bundle import tensorboard_scalars

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.dca1


@pytest.mark.skipif(not (DCA1 / "datalist.json").is_file(), reason=f"DCA1 not found at {DCA1}")
def test_train_few_iterations_on_dca1(tmp_path):
    # 8 training images (64x64 crops of the 300x300 angiograms), 2 validation images as whole images (sliding windows)
    args = [
        sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(tmp_path),
        "--config_file", f"['{REPO / 'bundle/configs/train.yaml'}','{REPO / 'configs/flow_vlm.yaml'}']",
        "--datalist", str(DCA1 / "datalist.json"), "--profile_cache_dir", str(tmp_path / "profiles"),
        "--train#dataset#data", "$monai_vlmfilm.data.datalist.load_split(@datalist, 'training')[:8]",
        "--validate#dataset#data", "$monai_vlmfilm.data.datalist.load_split(@datalist, 'validation')[:2]",
        "--epochs", "1", "--val_interval", "1", "--batch_size", "4", "--cache_rate", "0", "--patch_size", "[64,64]",
        "--num_inference_steps", "1", "--film_log_every", "1",
        "--network_def#channels", "[8,16,16]", "--network_def#attention_levels", "[False,False,False]",
        "--network_def#norm_num_groups", "8",
        "--network_def#cond_dim", "16", "--network_def#film_hidden_dim", "16",
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "Epoch: 1/1, Iter: 2/2" in log
    scalars = tensorboard_scalars(tmp_path)
    assert len(scalars["val_mean_dice"]) == 1 and 0.0 <= scalars["val_mean_dice"][0] <= 1.0
    # profiles were computed on the fly (empty cache) from the real images, none fell back to the default
    assert scalars["film/fallback_rate"] == [0.0]
    assert len(list((tmp_path / "profiles").rglob("*.json"))) >= 10
    sd = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("film_heads.") for k in sd)
