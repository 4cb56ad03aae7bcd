"""End-to-end check of the bundle inside a real MONAI Label server (``monaibundle`` sample app).

Run by ``scripts/e2e_monailabel.sh`` with the interpreter of a virtual env that has ``monailabel`` and this
package installed. Nothing is mocked: it lays out a studies folder in MONAI Label's datastore layout, copies
the sample app and our ``bundle/`` twice into ``<app>/model/`` (``use_vlm_film`` on and off), starts
``monailabel start_server`` on 127.0.0.1 offline, runs ``/infer`` for both models, sends a handful of hostile
uploads (each must get a 4xx naming the problem, or a correct mask for a valid 16-bit / RGB image), a one-epoch
``/train``, and stops the server's whole process group. The HTTP part uses only ``urllib``. The client helpers
and hostile cases here are also used by ``benchmarks/reliability_monailabel.py`` (load and the full hostile set).

Exit status 0 only when every check passed; the last lines printed are a summary.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class E2EError(RuntimeError):
    """A check of the end-to-end run failed."""


# ----------------------------------------------------------------------------------------------- data
def make_studies(work: Path, size: int, n_train: int = 4, n_test: int = 1) -> tuple[Path, list[str], list[str]]:
    """Synthetic angiograms in MONAI Label's local datastore layout.

    Labelled images (``n_train`` train + 1 val) go to ``studies/`` with masks in ``studies/labels/final/`` (same
    file name), the ``n_test`` test images go to ``studies/`` without a label (what an annotator would open).
    Returns the studies folder, the labelled ids and the unlabelled ids.
    """
    synth = work / "synthetic"
    cmd = [
        sys.executable,
        "-m",
        "monai_vlmfilm.data.synthetic",
        "--out",
        str(synth),
        "--n-train",
        str(n_train),
        "--n-val",
        "1",
        "--n-test",
        str(n_test),
        "--size",
        str(size),
    ]
    log("generating synthetic data: " + " ".join(cmd[2:]))
    subprocess.run(cmd, check=True, timeout=300, cwd=REPO)
    datalist = json.loads((synth / "datalist.json").read_text())
    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True, exist_ok=True)
    labelled, unlabelled = [], []
    for split in ("training", "validation", "test"):
        for item in datalist.get(split, []):
            img = synth / item["image"]
            shutil.copy2(img, studies / img.name)
            image_id = img.name.split(".")[0]
            if split == "test":
                unlabelled.append(image_id)
            else:
                shutil.copy2(synth / item["label"], studies / "labels" / "final" / img.name)
                labelled.append(image_id)
    if not labelled or not unlabelled:
        raise E2EError(f"synthetic data set in {synth} has no labelled or no test images")
    return studies, labelled, unlabelled


# ------------------------------------------------------------------------------------------------ app
def sample_app_dir() -> Path:
    """The ``monaibundle`` app shipped in the monailabel wheel (``<venv>/monailabel/sample-apps``)."""
    import monailabel

    candidates = [
        Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle",
        Path(monailabel.__file__).parent / "sample-apps" / "monaibundle",
    ]
    for c in candidates:
        if (c / "main.py").is_file():
            return c
    raise E2EError(f"monaibundle sample app not found in {[str(c) for c in candidates]}")


def set_use_vlm_film(config_file: Path, value: bool) -> None:
    """Rewrite a copied bundle config with ``use_vlm_film`` set (MONAI Label reads exactly one config file)."""
    from monai.bundle import ConfigParser

    cfg = ConfigParser.load_config_file(str(config_file))
    if "use_vlm_film" not in cfg:
        raise E2EError(f"{config_file}: no top-level 'use_vlm_film' key to switch")
    cfg["use_vlm_film"] = value
    ConfigParser.export_config_file(cfg, str(config_file), fmt="yaml", sort_keys=False)


def ensure_checkpoint(bundle_dir: Path) -> str:
    """MONAI Label only serves a bundle that has ``models/model.pt``; say where ours comes from."""
    ckpt = bundle_dir / "models" / "model.pt"
    if ckpt.is_file():
        return f"the bundle's models/model.pt ({ckpt.stat().st_size / 1e6:.1f} MB)"
    # No shipped checkpoint yet: save the freshly initialised network so the server can still be exercised.
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(bundle_dir)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), ckpt)
    return "FRESHLY INITIALISED network (bundle/models/model.pt not shipped yet)"


def make_app(work: Path, models: dict[str, bool], bundle: Path) -> tuple[Path, str]:
    app = work / "apps" / "monaibundle"
    shutil.copytree(sample_app_dir(), app, ignore=shutil.ignore_patterns("__pycache__"))
    ckpt_source = ""
    for name, on in models.items():
        dst = app / "model" / name
        shutil.copytree(bundle, dst, ignore=shutil.ignore_patterns("__pycache__", "eval", "runs", "mlruns"))
        for cfg in ("inference.yaml", "train.yaml"):
            if not (dst / "configs" / cfg).is_file():
                raise E2EError(f"{bundle}/configs/{cfg} is missing")
            set_use_vlm_film(dst / "configs" / cfg, on)
        ckpt_source = ensure_checkpoint(dst)
        log(f"bundle copy {dst} (use_vlm_film={on}; weights: {ckpt_source})")
    return app, ckpt_source


# --------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(
    app: Path, studies: Path, models: list[str], port: int, logfile: Path, tmpdir: Path | None = None
) -> subprocess.Popen:
    """``monailabel start_server`` on 127.0.0.1 in its own process group.

    ``tmpdir`` becomes the server's ``TMPDIR``: MONAI Label copies uploads and writes results there, and a refused
    upload's copy is never removed (its removal is a background task that runs only after a successful answer),
    so a run that keeps its temp files in its work folder leaves nothing in the system's ``/tmp``.
    """
    env = dict(os.environ)
    if tmpdir is not None:
        tmpdir.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # the `monailabel` launcher runs `python` from PATH
    env["MONAILABEL_PYEXE"] = sys.executable
    env["BUNDLE_DOWNLOAD_SRC"] = "github"  # anything but "monaihosting": no zoo look-up (MONAILabel issue 1490)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("PYTHONPATH", "")  # monailabel's train task reads it unguarded
    cmd = [
        str(Path(bindir) / "monailabel"),
        "start_server",
        "--app",
        str(app),
        "--studies",
        str(studies),
        "--conf",
        "models",
        ",".join(models),
        "--conf",
        "zoo_source",
        "github",
        "--conf",
        "sam2",
        "false",  # SAM2 tasks would download weights at start-up
        "--conf",
        "preload",
        "false",
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    log("starting: " + " ".join(cmd))
    fh = open(logfile, "w")
    # own session / process group: the server's training subprocesses are stopped with it
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(app))


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    pgid = proc.pid  # start_new_session: the process group id is the leader's pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log("server did not stop on SIGTERM; SIGKILL")
    deadline = time.time() + timeout
    while time.time() < deadline and group_members(pgid):
        time.sleep(0.5)
    if group_members(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(1.0)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def group_members(pgid: int, marker: str | None = None) -> list[str]:
    """Processes (``pid cmd``) still in the process group ``pgid`` or naming ``marker`` (the app folder), from ``ps``."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    left = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 3 or parts[2].startswith("Z") or int(parts[0]) == os.getpid():
            continue
        if parts[1] == str(pgid) or (marker and len(parts) > 3 and marker in parts[3]):
            left.append(f"{parts[0]} {parts[3] if len(parts) > 3 else ''}")
    return left


# ----------------------------------------------------------------------------------------------- http
def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60.0):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.headers, r.read()


def wait_info(base: str, proc: subprocess.Popen, logfile: Path, timeout: float) -> dict:
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        if proc.poll() is not None:
            raise E2EError(f"server exited with {proc.returncode} before /info/ answered; log tail:\n{tail(logfile)}")
        try:
            _, _, data = http("GET", f"{base}/info/", timeout=10)
            return json.loads(data)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last = str(e)
        time.sleep(2.0)
    raise E2EError(f"/info/ did not answer within {timeout:.0f} s ({last}); log tail:\n{tail(logfile)}")


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]] | None = None) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body of text ``fields`` and ``files`` (``name: (file name, content)``)."""
    boundary = uuid.uuid4().hex
    buf = io.BytesIO()
    for k, v in fields.items():
        buf.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (filename, content) in (files or {}).items():
        buf.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        buf.write(content)
        buf.write(b"\r\n")
    buf.write(f"--{boundary}--\r\n".encode())
    return buf.getvalue(), f"multipart/form-data; boundary={boundary}"


def post_infer(
    base: str,
    model: str,
    params: dict,
    image_id: str = "",
    upload: tuple[str, bytes] | None = None,
    timeout: float = 300.0,
) -> tuple[int, bytes, float]:
    """One ``/infer`` request (an image id, or an uploaded ``file`` as ``(file name, bytes)``): HTTP status, body
    and latency. Never raises for an HTTP error or a dropped connection (status 0, the exception as the body)."""
    import urllib.parse

    body, ctype = multipart({"params": json.dumps(params)}, {"file": upload} if upload else None)
    query = urllib.parse.urlencode({"image": image_id, "output": "image"})
    t0 = time.perf_counter()
    try:
        status, _, data = http("POST", f"{base}/infer/{model}?{query}", body, {"Content-Type": ctype}, timeout)
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read()
    except Exception as e:  # noqa: BLE001 - a refused / reset connection is a failed request, counted by callers
        status, data = 0, f"{type(e).__name__}: {e}".encode()
    return status, data, time.perf_counter() - t0


def infer(base: str, model: str, image_id: str, timeout: float, params: dict | None = None) -> tuple[bytes, float]:
    status, data, dt = post_infer(base, model, {"device": "cpu", **(params or {})}, image_id=image_id, timeout=timeout)
    if status != 200:
        raise E2EError(f"/infer/{model} answered {status}: {data[:2000]!r}")
    return data, dt


def decode_mask(data: bytes) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def detail(data: bytes) -> str:
    """The ``detail`` of a FastAPI error answer, or the start of the body."""
    try:
        return str(json.loads(data).get("detail"))
    except Exception:  # noqa: BLE001 - not JSON
        return data[:300].decode(errors="replace")


# ------------------------------------------------------------------------------------------ hostile uploads
#: each hostile upload: (HTTP status class expected, a word the answer must contain; None = a valid image whose mask
#: must equal the 8-bit original's)
HOSTILE_EXPECTED: dict[str, tuple[int, str | None]] = {
    "valid_8bit": (200, None),
    "truncated_png": (400, "truncated"),
    "zero_bytes": (400, "empty (0 bytes)"),
    "text_named_png": (400, "cannot identify image file"),
    "png_16bit": (200, None),
    "png_rgb": (200, None),
    "huge_8000x8000": (400, "too large"),
    "nan_nifti": (400, "NaN"),
    "name_with_dotdot": (200, None),
    "image_id_dotdot": (400, "unknown image id"),
    "image_id_abs_path": (400, "cannot read image file"),
}


def hostile_inputs(
    ref_png: Path, names: tuple[str, ...] | None = None
) -> dict[str, tuple[str, tuple[str, bytes] | None]]:
    """The hostile ``/infer`` inputs of issue 18 built from one valid 8-bit angiogram PNG: name -> (image id,
    upload as ``(file name, bytes)`` or None)."""
    import tempfile

    import nibabel as nib
    import numpy as np
    from PIL import Image

    names = tuple(HOSTILE_EXPECTED) if names is None else names
    raw = ref_png.read_bytes()
    arr = np.asarray(Image.open(ref_png))

    def png(a: Any) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    def nan_nifti() -> bytes:
        nan = arr.astype(np.float32).T.copy()  # NIfTI axes (W, H), as MONAI reads a PNG's pixels
        nan[5:9, 5:9] = np.nan
        with tempfile.TemporaryDirectory() as d:
            nib.save(nib.Nifti1Image(nan, np.eye(4)), f"{d}/nan.nii.gz")
            return Path(f"{d}/nan.nii.gz").read_bytes()

    def huge() -> bytes:
        h = np.zeros((8000, 8000), np.uint8)
        h[::97, :] = 255  # not all zero; still a ~60 kB upload
        return png(h)

    build = {
        "valid_8bit": lambda: ("", ("angiogram.png", raw)),
        "truncated_png": lambda: ("", ("truncated.png", raw[: len(raw) // 2])),
        "zero_bytes": lambda: ("", ("empty.png", b"")),
        "text_named_png": lambda: ("", ("notes.png", b"this is a text file, not an image\n" * 40)),
        "png_16bit": lambda: ("", ("sixteen.png", png(arr.astype(np.uint16) * 257))),
        "png_rgb": lambda: ("", ("rgb.png", png(np.stack([arr, arr, arr], -1)))),
        "huge_8000x8000": lambda: ("", ("huge.png", huge())),
        "nan_nifti": lambda: ("", ("nan.nii.gz", nan_nifti())),
        "name_with_dotdot": lambda: ("", ("../../../escape.png", raw)),
        "image_id_dotdot": lambda: ("../../etc/passwd", None),  # an id, not a file: resolves to "" in the datastore
        "image_id_abs_path": lambda: ("/etc/passwd", None),  # MONAI Label reads any existing path it is given
    }
    return {n: build[n]() for n in names}


def hostile_uploads(
    base: str,
    model: str,
    params: dict,
    ref_png: Path,
    ref_id: str,
    ref_mask: Any,
    names: tuple[str, ...] | None = None,
    log_fn: Any = log,
) -> list[dict[str, Any]]:
    """Send each hostile input to ``/infer/<model>`` and check the answer, then that the next normal request of
    ``ref_id`` still gives ``ref_mask``. A row per input with ``pass``: a 4xx whose message contains the expected
    word, or (valid images) a 200 mask equal to the 8-bit original's; and the server still serving."""
    import numpy as np

    rows = []
    for name, (image_id, upload) in hostile_inputs(ref_png, names).items():
        status, data, dt = post_infer(base, model, params, image_id=image_id, upload=upload)
        row: dict[str, Any] = {"model": model, "input": name, "status": status, "latency_s": round(dt, 2)}
        want_status, word = HOSTILE_EXPECTED[name]
        if status == 200:
            try:
                mask = decode_mask(data)
                row["mask_shape"] = list(mask.shape)
                row["mask_equals_8bit_reference"] = bool(mask.shape == ref_mask.shape and (mask == ref_mask).all())
            except Exception as e:  # noqa: BLE001 - a 200 that is not an image
                row["answer"] = f"undecodable 200 answer: {e}"
        else:
            row["answer"] = detail(data)
        if word is None:
            row["pass"] = status == 200 and bool(row.get("mask_equals_8bit_reference"))
        else:
            row["pass"] = want_status <= status < want_status + 100 and word.lower() in row.get("answer", "").lower()
        s2, d2, _ = post_infer(base, model, params, image_id=ref_id)
        row["next_request_ok"] = bool(s2 == 200 and np.array_equal(decode_mask(d2), ref_mask))
        row["pass"] = row["pass"] and row["next_request_ok"]
        log_fn(
            f"hostile {model} {name}: {status} {row.get('answer', '')[:160]} (next request ok: {row['next_request_ok']})"
        )
        rows.append(row)
    return rows


def check_mask(data: bytes, ref_image: Path, what: str, truth: Path | None = None) -> tuple[dict[str, Any], Any]:
    """Decode a returned label file and check it is a mask of the image's shape with some vessel pixels.

    With ``truth`` (the generator's label of that image) the Dice against it is reported, not checked: it
    depends on the served weights.
    """
    import numpy as np
    from PIL import Image

    try:
        mask = np.asarray(Image.open(io.BytesIO(data)))
    except Exception as e:  # noqa: BLE001 - report whatever came back
        raise E2EError(f"{what}: response is not an image ({len(data)} bytes: {data[:200]!r})") from e
    ref = np.asarray(Image.open(ref_image))
    vessel = int((mask > 0).sum())
    info = {
        "shape": list(mask.shape),
        "dtype": str(mask.dtype),
        "vessel_pixels": vessel,
        "values": sorted(set(np.unique(mask).tolist()))[:5],
    }
    if mask.shape != ref.shape[:2]:
        raise E2EError(f"{what}: mask shape {mask.shape} != image shape {ref.shape[:2]}")
    if vessel == 0:
        raise E2EError(f"{what}: mask has no vessel pixels")
    if vessel == mask.size:
        raise E2EError(f"{what}: every pixel is vessel")
    if truth is not None and truth.is_file():
        t = np.asarray(Image.open(truth)) > 0
        m = mask > 0
        info["dice_vs_truth"] = round(2.0 * float((t & m).sum()) / max(float(t.sum() + m.sum()), 1.0), 4)
    return info, mask


def probe_profile(bundle_dir: Path, image: Path, film_on: bool) -> dict[str, Any]:
    """Which profile reaches the network on MONAI Label's own inference path.

    Runs MONAI Label's ``BundleInferTask`` (the class the server uses for ``/infer``) in this process with a
    forward pre-hook on the network it builds, so the check sees exactly the ``profile`` argument the network
    gets when MONAI Label calls ``inferer(inputs, network)``. ON: the image's own profile (the configured
    profiler's, not the fallback); OFF: none.
    """
    import numpy as np
    from monailabel.tasks.infer.bundle import BundleInferTask

    from monai_vlmfilm.profiles import DEFAULT_PROFILE, FALLBACK_INDEX, HeuristicProfiler, canonical_image

    task = BundleInferTask(str(bundle_dir), {"preload": "false"})
    if not task.is_valid():
        raise E2EError(f"MONAI Label's BundleInferTask rejects {bundle_dir}")
    net = task._get_network("cpu", None)  # cached by the task; the same object runs below
    seen: list[Any] = []

    def hook(_module, _args, kwargs):
        p = kwargs.get("profile")
        seen.append(None if p is None else p.detach().cpu().numpy().copy())

    handle = net.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        task({"image": str(image), "device": "cpu", "skip_writer": True})
    finally:
        handle.remove()
    if not seen:
        raise E2EError(f"{bundle_dir.name}: the network was never called")
    if not film_on:
        if any(p is not None for p in seen):
            raise E2EError(f"{bundle_dir.name}: use_vlm_film off but the network got a profile")
        return {"network_calls": len(seen), "profile": None}
    if any(p is None for p in seen):
        raise E2EError(f"{bundle_dir.name}: use_vlm_film on but MONAI Label's call passed no profile to the network")
    vec = seen[0][0]
    if vec[FALLBACK_INDEX] != 0.0 or np.allclose(vec, DEFAULT_PROFILE.to_vector()):
        raise E2EError(f"{bundle_dir.name}: the network got the fallback/default profile {vec.tolist()}")
    expected = HeuristicProfiler().profile([canonical_image(str(image))])[0].to_vector()
    return {
        "network_calls": len(seen),
        "profile": [round(float(v), 4) for v in vec],
        "equals_heuristic_profile_of_image": bool(np.allclose(vec, expected, atol=1e-5)),
    }


def bundle_cli_mask(bundle_dir: Path, image: Path, out_dir: Path) -> Any:
    """The same bundle's own ``python -m monai.bundle run`` on the same image: its NIfTI mask.

    Returned in display orientation ``(H, W)`` (MONAI reads PNGs as ``(W, H)``; MONAI Label's PNG writer
    transposes back), so it must equal what ``/infer`` returned pixel for pixel.
    """
    import nibabel as nib
    import numpy as np

    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--bundle_root",
        str(bundle_dir),
        "--config_file",
        str(bundle_dir / "configs" / "inference.yaml"),
        "--meta_file",
        str(bundle_dir / "configs" / "metadata.json"),
        "--datalist",
        str(image),
        "--output_dir",
        str(out_dir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(out_dir.parent))
    if proc.returncode != 0:
        raise E2EError(f"bundle CLI inference failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    found = sorted(out_dir.rglob(image.name.split(".")[0] + "*_seg.nii.gz"))
    if not found:
        raise E2EError(f"bundle CLI inference wrote no *_seg.nii.gz in {out_dir}")
    arr = np.asarray(nib.load(str(found[0])).dataobj)
    return np.squeeze(arr).T


def train(base: str, model: str, params: dict, ckpt_dir: Path, timeout: float, logfile: Path) -> dict[str, Any]:
    before = {p: p.stat().st_mtime for p in ckpt_dir.glob("*.pt")}
    t0 = time.time()
    try:
        _, _, data = http(
            "POST",
            f"{base}/train/{model}",
            json.dumps(params).encode(),
            {"Content-Type": "application/json"},
            timeout=60,
        )
    except urllib.error.HTTPError as e:
        raise E2EError(f"/train/{model} answered {e.code}: {e.read()[:2000]!r}") from e
    task = json.loads(data)
    task_id = task.get("id")
    log(f"training task {task_id} submitted: {task.get('status')}")
    deadline = time.time() + timeout
    status = task
    while time.time() < deadline:
        time.sleep(3.0)
        try:
            _, _, data = http("GET", f"{base}/train/?all=true", timeout=30)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                continue
            raise
        tasks = json.loads(data)
        tasks = tasks if isinstance(tasks, list) else [tasks]
        status = next((t for t in tasks if t.get("id") == task_id), status)
        if status.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
    else:
        http("DELETE", f"{base}/train/", timeout=30)
        raise E2EError(f"training did not finish within {timeout:.0f} s; log tail:\n{tail(logfile)}")
    wall = time.time() - t0
    details = "\n".join(status.get("details", []) or [])
    if status.get("status") != "DONE":
        raise E2EError(f"training ended with status {status.get('status')}; last lines:\n{details}\n{tail(logfile)}")
    written = sorted(p for p in ckpt_dir.glob("*.pt") if p.stat().st_mtime > before.get(p, 0.0))
    if not written:
        raise E2EError(f"training finished but wrote no checkpoint in {ckpt_dir}; last lines:\n{details}")
    return {"wall_s": round(wall, 1), "checkpoints": [str(p) for p in written]}


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="scratch folder (studies, app copy, logs)")
    p.add_argument("--bundle", default=str(REPO / "bundle"), help="bundle folder to serve (default: this repo's)")
    p.add_argument("--size", type=int, default=128, help="synthetic image size")
    p.add_argument("--train-model", default="vlmfilm_on", help="model trained through /train ('' to skip)")
    p.add_argument("--max-epochs", type=int, default=1)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--infer-timeout", type=float, default=300.0)
    p.add_argument("--train-timeout", type=float, default=900.0)
    args = p.parse_args(argv)

    t_start = time.time()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = {"vlmfilm_on": True, "vlmfilm_off": False}
    studies, labelled, unlabelled = make_studies(work, args.size)
    app, ckpt_source = make_app(work, models, Path(args.bundle).resolve())
    port = free_port()
    base = f"http://{HOST}:{port}"
    logfile = work / "server.log"
    summary: dict[str, Any] = {"weights": ckpt_source, "infer": {}, "train": None}
    proc = start_server(app, studies, list(models), port, logfile, tmpdir=work / "server_tmp")
    pgid = proc.pid
    ok = False
    try:
        t0 = time.time()
        info = wait_info(base, proc, logfile, args.start_timeout)
        summary["server_start_s"] = round(time.time() - t0, 1)
        served = sorted(info.get("models", {}))
        log(f"/info/ after {summary['server_start_s']} s: models {served}, trainers {sorted(info.get('trainers', {}))}")
        for m in models:
            if m not in info.get("models", {}):
                raise E2EError(f"model {m} not served (models: {served}); log tail:\n{tail(logfile)}")
            log(f"{m}: labels {info['models'][m].get('labels')}, dimension {info['models'][m].get('dimension')}")
        image_id = unlabelled[0]
        ref = next(studies.glob(image_id + ".*"))
        truth = work / "synthetic" / "labels" / ref.name  # the test image's label, kept out of the studies
        masks = {}
        runs = [(m, m, None) for m in models] + [("vlmfilm_on+request_off", "vlmfilm_on", {"use_vlm_film": False})]
        for label, m, params in runs:
            data, dt = infer(base, m, image_id, args.infer_timeout, params)
            res, masks[label] = check_mask(data, ref, f"/infer/{m} {params or ''}", truth)
            res["latency_s"] = round(dt, 2)
            summary["infer"][label] = res
            log(f"/infer/{m}?image={image_id} params {params or {}}: {res}")
        a, b = summary["infer"]["vlmfilm_on"]["vessel_pixels"], summary["infer"]["vlmfilm_off"]["vessel_pixels"]
        same = "equal, as expected when the FiLM heads of the served weights are zero"
        log(f"vessel pixels on/off: {a}/{b} ({'differ' if a != b else same})")
        # displayable_configs#use_vlm_film=false on the FiLM bundle: no profile -> null profile == the OFF bundle
        toggled_equal = bool((masks["vlmfilm_on+request_off"] == masks["vlmfilm_off"]).all())
        summary["request_toggle_off_equals_off_bundle"] = toggled_equal
        if not toggled_equal:
            raise E2EError("vlmfilm_on with use_vlm_film=false in the request differs from the vlmfilm_off bundle")
        log("vlmfilm_on with request use_vlm_film=false gives the vlmfilm_off mask exactly")
        # drop-in: MONAI Label serves exactly what the bundle's own inference command computes
        cli = bundle_cli_mask(app / "model" / "vlmfilm_on", ref, work / "bundle_cli_out")
        same_as_cli = cli.shape == masks["vlmfilm_on"].shape and bool(((cli > 0) == (masks["vlmfilm_on"] > 0)).all())
        summary["infer_equals_bundle_cli"] = same_as_cli
        if not same_as_cli:
            raise E2EError("/infer/vlmfilm_on differs from `python -m monai.bundle run` on the same image")
        log("/infer/vlmfilm_on equals `python -m monai.bundle run` of the same bundle, pixel for pixel")
        # a handful of hostile uploads (the whole set, under load too: benchmarks/reliability_monailabel.py)
        rows = hostile_uploads(
            base,
            "vlmfilm_on",
            {"device": "cpu"},
            ref,
            image_id,
            masks["vlmfilm_on"],
            ("zero_bytes", "truncated_png", "text_named_png", "nan_nifti", "huge_8000x8000", "png_16bit", "png_rgb"),
        )
        summary["hostile"] = {r["input"]: {k: r.get(k) for k in ("status", "answer", "pass")} for r in rows}
        failed = [r for r in rows if not r["pass"]]
        if failed:
            raise E2EError(f"hostile uploads not answered as expected: {failed}")
        for m, on in models.items():
            res = probe_profile(app / "model" / m, ref, on)
            summary.setdefault("profile_probe", {})[m] = res
            log(f"profile reaching the network in MONAI Label's BundleInferTask ({m}): {res}")
        if args.train_model:
            params = {
                "max_epochs": args.max_epochs,
                "val_split": 0.2,
                "multi_gpu": False,
                "device": "cpu",
                "pretrained": True,
                "tracking": "None",
            }
            ckpt_dir = app / "model" / args.train_model / "models"
            res = train(base, args.train_model, params, ckpt_dir, args.train_timeout, logfile)
            summary["train"] = {"model": args.train_model, **res}
            log(f"/train/{args.train_model}: {res}")
            # the server reloads models/model.pt when its mtime changes: infer again with the new weights
            data, dt = infer(base, args.train_model, image_id, args.infer_timeout)
            res, _ = check_mask(data, ref, f"/infer/{args.train_model} after training", truth)
            res["latency_s"] = round(dt, 2)
            summary["infer"][args.train_model + "_after_train"] = res
            log(f"/infer/{args.train_model} after training: {res}")
        ok = True
    finally:
        stop_server(proc)
        left = group_members(pgid, str(app))
        summary["processes_left"] = left
        if left:
            log(f"processes left in group {pgid}: {left}")
            ok = False
        else:
            log(f"server stopped (process group {pgid}); no process left")
        summary["wall_s"] = round(time.time() - t_start, 1)
        log("summary " + json.dumps(summary))
        if not ok:
            log(f"server log: {logfile}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except E2EError as e:
        print(f"[e2e] FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
