"""Export of the whole few-step segmentation to TorchScript (``FlowODESegmenter``, ``ckpt_export``, ``inference_ts.yaml``).

The module-scoped fixture writes a FiLM-on and a FiLM-off checkpoint of a tiny random network and exports both
with the real ``python -m monai.bundle ckpt_export`` command; the tests load the ``model.ts`` files in a process
that cannot import ``monai_vlmfilm`` (nor ``monai``) and run the bundle's inference with the Python network and with
the exported one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_vlmfilm.inferers import ExportedSegmenterInferer, FlowSegInferer
from monai_vlmfilm.networks import FiLMFlowUNet, FlowODESegmenter

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
PY = sys.executable

# four levels without attention, like the shipped network_def, but narrow
NET = dict(channels=[8, 16, 16, 16], attention_levels=[False] * 4, norm_num_groups=8, cond_dim=8, film_hidden_dim=8)
NET_KW = dict(spatial_dims=2, in_channels=2, out_channels=1, num_res_blocks=1, **NET)
NET_OVERRIDES = [
    "--network_def#channels", "[8,16,16,16]",
    "--network_def#attention_levels", "[False,False,False,False]",
    "--network_def#norm_num_groups", "8",
    "--network_def#cond_dim", "8",
    "--network_def#film_hidden_dim", "8",
]  # fmt: skip
# the inference settings exported through the bundle: 2 Heun steps x 2 noise samples (TTA and the other solver
# settings are compared with FlowSegInferer in-process, where it costs less)
ODE = dict(num_steps=2, solver="heun", num_samples=2, tta="none", seed=0)
ODE_OVERRIDES = ["--num_inference_steps", "2", "--solver", "heun", "--num_samples", "2", "--tta", "none"]


def run_cli(args: list[str], timeout: int = 300) -> str:
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"command failed ({proc.returncode}): {' '.join(args)}\n{out[-6000:]}"
    return out


def random_network(use_vlm_film: bool, seed: int = 0, image_norm: bool = False, **kw) -> FiLMFlowUNet:
    """A tiny network with every weight random (a fresh one has a zero output layer and zero FiLM heads)."""
    torch.manual_seed(seed)
    net = FiLMFlowUNet(use_vlm_film=use_vlm_film, image_norm=image_norm, **NET_KW, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.15)
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{"on"|"off": {"ckpt", "ts", "net"}}``, plus ``"data"``: 3 synthetic 60x60 test images (60 pads to 64)."""
    from monai_vlmfilm.data.synthetic import main as synthetic

    root = tmp_path_factory.mktemp("export")
    assert (
        synthetic(["--out", str(root / "data"), "--n-train", "1", "--n-val", "1", "--n-test", "3", "--size", "60"]) == 0
    )
    out: dict = {"root": root, "data": root / "data" / "datalist.json"}
    for name, film in (("on", True), ("off", False)):
        net = random_network(film, seed=int(film), image_norm=True)  # exported with the bundle's image_norm: true
        ckpt = root / f"model_{name}.pt"
        torch.save(net.state_dict(), ckpt)
        ts = root / f"model_{name}.ts"
        run_cli([PY, "-m", "monai.bundle", "ckpt_export", "export_network_def", "--bundle_root", str(REPO / "bundle"),
                 "--config_file", str(CONFIGS / "inference.yaml"), "--ckpt_file", str(ckpt), "--filepath", str(ts),
                 "--use_vlm_film", str(film), *NET_OVERRIDES, *ODE_OVERRIDES])  # fmt: skip
        out[name] = {"ckpt": ckpt, "ts": ts, "net": net}
    return out


# ------------------------------------------------------------------------------------------------ the module itself
@pytest.mark.parametrize(
    "film, ode",
    [
        (True, dict(num_steps=1, num_samples=4)),
        (True, dict(num_steps=2, solver="heun", num_samples=2, tta="dihedral")),
        (False, dict(num_steps=3, num_samples=1, tta="flip")),
    ],
)
def test_scripted_segmenter_equals_flow_inferer(film, ode, tmp_path, one_thread):
    net = random_network(film)
    module = FlowODESegmenter(net, seed=5, **ode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scripted = torch.jit.script(module)
    assert not [w for w in caught if "fixed device" in str(w.message)]  # the trace holds no device constant
    torch.jit.save(scripted, str(tmp_path / "m.ts"))
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    inferer = FlowSegInferer(seed=5, **ode)
    image = torch.rand(2, 1, 30, 45)  # odd sizes: padded to the multiple of 8 and cropped back
    profile = torch.rand(2, 7)
    with torch.no_grad():
        for args in ((image, profile), (image,)):  # FiLM network with its profile, and the null profile
            expected = inferer(args[0], net, *args[1:])
            assert torch.equal(module(*args), expected)
            got = loaded(*args)
            assert got.shape == (2, 1, 30, 45)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            assert torch.equal(got > 0.5, expected > 0.5)
        # one profile for the whole batch, as FlowSegInferer broadcasts it
        torch.testing.assert_close(loaded(image, profile[0]), inferer(image, net, profile[0]), rtol=0, atol=1e-6)
    if film:  # the profile matters (the check above is not vacuous)
        assert not torch.allclose(loaded(image, profile), loaded(image))


def test_scripted_segmenter_with_encoder_film(one_thread):
    """A network trained with ``--film_encoder_stages`` scripts too, and its encoder heads act in the module."""
    net = random_network(True, film_encoder_stages=[0, 1, 2, 3])
    scripted = torch.jit.script(FlowODESegmenter(net, seed=5, num_steps=1))
    image, profile = torch.rand(2, 1, 30, 45), torch.rand(2, 7)
    with torch.no_grad():
        got = scripted(image, profile)
        torch.testing.assert_close(got, FlowSegInferer(seed=5, num_steps=1)(image, net, profile))
        for head in net.film_encoder_heads.values():  # identity encoder heads (the scripted module shares them)
            head.mlp[-1].weight.zero_(), head.mlp[-1].bias.zero_()
        assert not torch.allclose(scripted(image, profile), got)


def test_scripted_segmenter_keeps_image_norm(tmp_path, one_thread):
    """An ``image_norm`` network exports with its normalisation: the TorchScript module gives the inferer's output
    and, like the network, ignores the image's brightness and contrast."""
    torch.manual_seed(0)
    net = FiLMFlowUNet(use_vlm_film=True, image_norm=True, **NET_KW)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.15)
    net.eval()
    scripted = torch.jit.script(FlowODESegmenter(net, seed=5, num_steps=1))
    torch.jit.save(scripted, str(tmp_path / "m.ts"))
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    image, profile = torch.rand(1, 1, 30, 45), torch.rand(1, 7)
    with torch.no_grad():
        expected = FlowSegInferer(seed=5, num_steps=1)(image, net, profile)
        torch.testing.assert_close(loaded(image, profile), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded(0.5 * image + 0.3, profile), expected, rtol=0, atol=1e-4)


def test_segmenter_uncertainty_and_input_checks():
    net = random_network(True)
    module = torch.jit.script(FlowODESegmenter(net, num_samples=3, return_uncertainty=True))
    image, profile = torch.rand(1, 1, 16, 24), torch.rand(7)
    out = module(image, profile)
    with torch.no_grad():
        expected = FlowSegInferer(num_steps=1, num_samples=3, return_uncertainty=True, seed=0)(image, net, profile)
    assert out.shape == (1, 2, 16, 24)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out[:, 1] >= 0).all() and out[:, 1].max() > 0
    with pytest.raises(Exception, match="image must be"):
        module(torch.rand(1, 2, 16, 16))
    with pytest.raises(Exception, match="profile must be"):
        module(image, torch.rand(1, 5))


def test_tracing_the_segmenter_is_refused():
    with pytest.raises(RuntimeError, match="without --use_trace"):
        torch.jit.trace(FlowODESegmenter(random_network(False)), (torch.rand(1, 1, 16, 16),))


def test_seed_none_uses_global_rng():
    module = torch.jit.script(FlowODESegmenter(random_network(False), seed=None))
    image = torch.rand(1, 1, 16, 16)
    torch.manual_seed(1)
    a = module(image)
    torch.manual_seed(1)
    assert torch.equal(module(image), a)
    assert not torch.equal(module(image), a)


def test_segmenter_loads_network_checkpoints_across_the_switch():
    on, off = random_network(True), random_network(False)
    # a FiLM-on checkpoint into a FiLM-off segmenter: FiLM keys dropped
    seg_off = FlowODESegmenter(FiLMFlowUNet(**NET_KW))
    res = seg_off.load_state_dict(on.state_dict())
    assert res["ignored"] and all(
        torch.equal(v, on.state_dict()[k]) for k, v in seg_off.velocity.network.state_dict().items()
    )
    # a FiLM-off checkpoint into a FiLM-on segmenter: heads stay at identity
    seg_on = FlowODESegmenter(FiLMFlowUNet(use_vlm_film=True, **NET_KW))
    assert seg_on.load_state_dict(off.state_dict())["missing"]
    # the segmenter's own state dict (prefixed keys) loads as usual
    seg_on.load_state_dict(FlowODESegmenter(random_network(True)).state_dict())


# ------------------------------------------------------------------------------------------------ ckpt_export
# The exported model in a Python that cannot import monai_vlmfilm or monai: torch alone runs it.
_STANDALONE = textwrap.dedent(
    """
    import sys
    sys.modules["monai_vlmfilm"] = None  # any import of them fails
    sys.modules["monai"] = None
    import json, torch
    ts_path, inputs, out = sys.argv[1:4]
    extra = {"inference.json": "", "metadata.json": ""}
    model = torch.jit.load(ts_path, map_location="cpu", _extra_files=extra)
    x = torch.load(inputs)
    results = {"with_profile": model(x["image"], x["profile"]), "without": model(x["image"])}
    torch.save(results, out)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("monai", "monai_vlmfilm") and sys.modules[m])
    print(json.dumps({"config": json.loads(extra["inference.json"])["export_network_def"],
                      "version": json.loads(extra["metadata.json"])["version"], "loaded": loaded}))
    """
)


@pytest.mark.parametrize("name", ["on", "off"])
def test_ckpt_export_runs_without_the_package(exported, name, tmp_path):
    image = torch.rand(2, 1, 60, 52)
    profile = torch.rand(2, 7)
    torch.save({"image": image, "profile": profile}, tmp_path / "inputs.pt")
    script = tmp_path / "standalone.py"
    script.write_text(_STANDALONE)
    # run from an empty folder, so neither the repository nor an editable install puts the package in reach
    proc = subprocess.run(
        [PY, "-I", str(script), str(exported[name]["ts"]), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={"PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["loaded"] == []
    assert info["config"]["_target_"] == "monai_vlmfilm.networks.FlowODESegmenter"  # ckpt_export saved the config
    assert info["version"]
    got = torch.load(tmp_path / "out.pt")
    net = exported[name]["net"]
    # 2 samples: exported like inference.yaml's inferer, with the spread appended (save_uncertainty)
    inferer = FlowSegInferer(**ODE, return_uncertainty=True)
    with torch.no_grad():
        expected = {"with_profile": inferer(image, net, profile), "without": inferer(image, net)}
    for key in expected:
        assert got[key].shape == (2, 2, 60, 52)  # probability, spread over the samples
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)
        assert torch.equal(got[key][:, :1] > 0.5, expected[key][:, :1] > 0.5)
    assert torch.equal(got["with_profile"], got["without"]) is (name == "off")


@pytest.mark.parametrize("name", ["on", "off"])
def test_inference_with_model_ts_gives_the_python_masks(exported, name):
    import nibabel as nib

    root = exported["root"] / f"infer_{name}"
    common = ["--bundle_root", str(REPO / "bundle"), "--datalist", str(exported["data"]),
              "--profile_cache_dir", str(root / "profiles"), "--use_vlm_film", str(name == "on"),
              "--min_component_size", "0", *NET_OVERRIDES, *ODE_OVERRIDES]  # fmt: skip
    # the exported module computes in float32: compare it with the Python path in float32 (no CPU bf16 autocast)
    run_cli([PY, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.yaml"), *common,
             "--cpu_bf16", "false", "--ckpt_path", str(exported[name]["ckpt"]),
             "--output_dir", str(root / "python")])  # fmt: skip
    overlay = f"['{CONFIGS / 'inference.yaml'}','{CONFIGS / 'inference_ts.yaml'}']"
    log = run_cli([PY, "-m", "monai.bundle", "run", "--config_file", overlay, *common,
                   "--ts_path", str(exported[name]["ts"]), "--output_dir", str(root / "ts")])  # fmt: skip
    assert "inference: wrote 3 masks (*_seg.nii.gz), overlays (*_overlay.png) and uncertainty maps" in log
    masks = sorted((root / "python").glob("*_seg.nii.gz"))
    assert len(masks) == 3
    fractions = []
    for m in masks:
        a = np.asarray(nib.load(str(m)).dataobj)
        b = np.asarray(nib.load(str(root / "ts" / m.name)).dataobj)
        assert a.shape == b.shape == (60, 60) and np.array_equal(a, b), m.name
        fractions.append(a.mean())
        # the uncertainty maps (spread over the 2 noise samples) agree as well
        u_name = m.name.replace("_seg.nii.gz", "_uncertainty.nii.gz")
        u_py, u_ts = (np.asarray(nib.load(str(root / d / u_name)).dataobj) for d in ("python", "ts"))
        np.testing.assert_allclose(u_ts, u_py, rtol=0, atol=1e-5)
        assert u_py.max() > 0
    assert 0 < np.mean(fractions) < 1  # not a constant mask: the comparison means something


def test_exported_inferer_passes_meta_and_profile():
    from monai.data import MetaTensor

    seen = {}

    def model(image, profile=None):
        seen["types"] = (type(image), profile)
        return image * 0.5

    image = MetaTensor(torch.rand(1, 1, 8, 8), meta={"filename_or_obj": "a.png", "vlm_profile": torch.rand(1, 7)})
    out = ExportedSegmenterInferer()(image, model)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "a.png"
    assert seen["types"][0] is torch.Tensor and seen["types"][1].shape == (1, 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_export_runs_on_gpu(exported):
    """An export made on the CPU (as ckpt_export does) runs on a GPU: no device is fixed in the traced network."""
    cpu = torch.jit.load(str(exported["on"]["ts"]))
    gpu = torch.jit.load(str(exported["on"]["ts"]), map_location="cuda")
    image, profile = torch.rand(1, 1, 60, 60), torch.rand(1, 7)
    out = gpu(image.cuda(), profile.cuda())
    assert out.device.type == "cuda" and out.shape == (1, 2, 60, 60) and torch.isfinite(out).all()
    # a CUDA generator draws other noise than the CPU's: compare the velocity network on the same inputs
    x, t = torch.rand(2, 2, 64, 64), torch.full((2,), 1000.0)
    p = torch.rand(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(
            gpu.velocity(x.cuda(), t.cuda(), p.cuda()).cpu(), cpu.velocity(x, t, p), rtol=1e-3, atol=1e-3
        )
        torch.testing.assert_close(
            gpu.velocity.null(x.cuda(), t.cuda()).cpu(), cpu.velocity.null(x, t), rtol=1e-3, atol=1e-3
        )
