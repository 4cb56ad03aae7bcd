"""Disk full during profile precompute, a checkpoint save and inference output: a clear error, nothing damaged, a rerun.

    python benchmarks/reliability_disk_full.py [--out benchmarks/results/reliability_disk_full]

The "full disk" is ``RLIMIT_FSIZE`` (``resource.setrlimit`` in the child before it starts, the shell's ``ulimit -f``):
any write past the limit fails. A size-limited file system (tmpfs / loop mount) needs root and a mount, which a user's
machine or CI rarely allows; the file size limit needs neither and fails the same ``write`` calls. The default action
of the SIGXFSZ signal that comes with it is to kill the process, so the child ignores it (``SIG_IGN``, inherited
across ``exec``) and the write fails with ``OSError(EFBIG, "File too large")`` instead, as ``ENOSPC`` would on a full
disk. The children are the real CLIs (``python -m monai_vlmfilm.profiles precompute``, ``python -m monai.bundle run``
with ``train.yaml`` / ``inference.yaml``); their output goes to pipes (the limit applies to every file they write).

For each of the three:

1. a run under the limit must fail with a short error that names the file or folder and says "no space" / "file size
   limit" (no traceback of the library's internals as the last word);
2. nothing damaged is left behind: every profile cache entry parses, every checkpoint loads and the newest intact one
   is what a resume chooses, no temporary file remains after the next start;
3. the same command without the limit completes.

Results: ``<out>.json`` and ``<out>.md``; printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reliability_training import TINY_NET  # the benchmarks' one tiny network (run as a script from benchmarks/)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN = ["--batch_size", "2", "--cache_rate", "0", "--val_interval", "1", "--log_iter_interval", "100"]


def limited(max_bytes: int | None):
    """``preexec_fn`` for the child: a file size limit, and SIGXFSZ ignored so that writes fail with EFBIG."""

    def setup() -> None:
        if max_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return setup


def run(cmd: list[str], max_bytes: int | None, timeout: float = 1200, log: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limited(max_bytes))  # fmt: skip
    out = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(out)
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "last_line": lines[-1] if lines else "", "output": out}  # fmt: skip


def error_line(res: dict, *names: str) -> str:
    """The line of the output that reports the disk-full error clearly: names the file / folder and the cause."""
    for ln in res["output"].splitlines():
        low = ln.lower()
        if any(n.lower() in low for n in names) and ("no space" in low or "file size limit" in low):
            return ln.strip()
    return ""


def clear(res: dict, *names: str) -> bool:
    """A clear disk-full error: non-zero exit and a line that names the file / folder and the cause."""
    return res["returncode"] != 0 and bool(error_line(res, *names))


def cache_state(cache: Path) -> dict:
    from monai_vlmfilm.profiles import ProfileStore

    store = ProfileStore(cache, read_only=True)
    entries = sorted(cache.rglob("*.json")) if cache.exists() else []
    entries = [p for p in entries if len(p.stem) == 64]
    bad = 0
    for p in entries:
        if store.get_by_key(p.stem) is None:
            bad += 1
    temps = [p.name for p in cache.rglob(".tmp-*")] if cache.exists() else []
    return {"entries": len(entries), "corrupt": bad, "temp_files": temps}


def ckpt_state(models: Path) -> dict:
    from monai_vlmfilm.networks.checkpoint import CheckpointError, find_resume_checkpoint, read_checkpoint

    files = sorted(p.name for p in models.glob("*.pt"))
    bad = []
    for name in files:
        try:
            read_checkpoint(models / name)
        except CheckpointError as e:
            bad.append(f"{name}: {e}")
    chosen = None
    if list(models.glob("checkpoint*.pt")):
        path, _ = find_resume_checkpoint(models, ("model", "trainer"))
        import torch

        t = torch.load(path, weights_only=True)["trainer"]
        chosen = f"{path.name} (iteration {t['iteration']})"
    temps = sorted(p.name for p in models.glob(".*.tmp*"))
    return {"files": files, "corrupt": bad, "resume_chooses": chosen, "temp_files": temps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="", help="working folder (default: a temporary one)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/reliability_disk_full"))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    work = Path(args.work or tempfile.mkdtemp(prefix="reliability_disk_full_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = work / "data"
    subprocess.run([PY, "-m", "monai_vlmfilm.data.synthetic", "--out", str(data), "--n-train", "8", "--n-val", "2",
                    "--n-test", "4", "--size", "64", "--seed", "3"], check=True, capture_output=True, cwd=REPO)  # fmt: skip
    datalist = data / "datalist.json"
    results: dict[str, dict] = {}

    # (a) precompute: a profile entry is ~0.5 kB, so a 200-byte limit fails the first write
    print("(a) profile precompute under a 200-byte file size limit ...", flush=True)
    cache = work / "profiles"
    pre = [PY, "-m", "monai_vlmfilm.profiles", "precompute", "--datalist", str(datalist), "--cache-dir", str(cache),
           "--profiler", "heuristic", "--no-progress"]  # fmt: skip
    full = run(pre, 200, log=work / "precompute_limited.log")
    after_full = cache_state(cache)
    rerun = run(pre, None)
    results["precompute"] = {
        "limit_bytes": 200,
        "limited": {k: full[k] for k in ("returncode", "seconds", "last_line")},
        "clear_error": clear(full, str(cache)),
        "error_line": error_line(full, str(cache)),
        "cache_after_failure": after_full,
        "rerun": {k: rerun[k] for k in ("returncode", "seconds", "last_line")},
        "cache_after_rerun": cache_state(cache),
    }
    print(json.dumps(results["precompute"], indent=1), flush=True)

    # (b) checkpoint save: 1 epoch without a limit (checkpoints ~1.5 MB, model.pt ~0.35 MB), then a resume to 3
    # epochs under a 1 MB limit: model.pt still fits, the epoch-2 training checkpoint does not
    print("(b) checkpoint save under a 1 MB file size limit ...", flush=True)
    root = work / "train"
    models = root / "models"
    base = [PY, "-m", "monai.bundle", "run", "--config_file", str(REPO / "bundle/configs/train.yaml"),
            "--bundle_root", str(root), "--datalist", str(datalist), "--profile_cache_dir", str(cache),
            *TINY_NET, *TRAIN]  # fmt: skip
    first = run([*base, "--epochs", "1"], None)
    before = ckpt_state(models)
    full = run([*base, "--epochs", "3", "--resume_from", str(models)], 1_000_000, log=work / "train_limited.log")
    after_full = ckpt_state(models)
    rerun = run([*base, "--epochs", "3", "--resume_from", str(models)], None)
    results["checkpoint"] = {
        "limit_bytes": 1_000_000,
        "first_epoch": {k: first[k] for k in ("returncode", "seconds")},
        "before": before,
        "limited": {k: full[k] for k in ("returncode", "seconds", "last_line")},
        "clear_error": clear(full, str(models)),
        "error_line": error_line(full, str(models)),
        "after_failure": after_full,
        "rerun": {k: rerun[k] for k in ("returncode", "seconds", "last_line")},
        "rerun_restored": next((ln for ln in rerun["output"].splitlines() if "Restored all variables" in ln), ""),
        "after_rerun": ckpt_state(models),
    }
    print(json.dumps(results["checkpoint"], indent=1), flush=True)

    # (c) inference output: a 64 x 64 mask as .nii.gz is ~0.4 kB with its 352-byte header; 300 bytes fails it
    print("(c) inference output under a 300-byte file size limit ...", flush=True)
    out_dir = work / "inference"
    inf = [PY, "-m", "monai.bundle", "run", "--config_file", str(REPO / "bundle/configs/inference.yaml"),
           "--bundle_root", str(root), "--datalist", str(datalist), "--profile_cache_dir", str(cache),
           "--output_dir", str(out_dir), "--num_samples", "1", *TINY_NET]  # fmt: skip
    full = run(inf, 300, log=work / "inference_limited.log")
    left = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    damaged = [n for n in left if not _readable(out_dir / n)]
    rerun = run(inf, None)
    outs = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    results["inference"] = {
        "limit_bytes": 300,
        "limited": {k: full[k] for k in ("returncode", "seconds", "last_line")},
        "clear_error": clear(full, str(out_dir)),
        "error_line": error_line(full, str(out_dir)),
        "files_after_failure": left,
        "damaged_files_after_failure": damaged,
        "rerun": {k: rerun[k] for k in ("returncode", "seconds", "last_line")},
        "files_after_rerun": outs,
        "damaged_files_after_rerun": [n for n in outs if not _readable(out_dir / n)],
    }
    print(json.dumps(results["inference"], indent=1), flush=True)

    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": "2-core CPU, shared with other jobs",
        "command": "python benchmarks/reliability_disk_full.py " + " ".join(sys.argv[1:]),
        "mechanism": "RLIMIT_FSIZE in the child (preexec_fn), SIGXFSZ ignored so writes fail with EFBIG",
        "total_seconds": round(time.perf_counter() - t_start, 1),
        **results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary), flush=True)


def _readable(path: Path) -> bool:
    try:
        if path.name.endswith(".nii.gz"):
            import nibabel as nib

            nib.load(str(path)).get_fdata()
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
        return True
    except Exception:
        return False


def markdown(s: dict) -> str:
    p, c, i = s["precompute"], s["checkpoint"], s["inference"]
    rows = [
        ("profile precompute", p["limit_bytes"], p["limited"]["returncode"], p["clear_error"], p["error_line"],
         f"{p['cache_after_failure']['entries']} entries, {p['cache_after_failure']['corrupt']} corrupt, "
         f"{len(p['cache_after_failure']['temp_files'])} temp files",
         f"exit {p['rerun']['returncode']}: {p['cache_after_rerun']['entries']} entries, "
         f"{p['cache_after_rerun']['corrupt']} corrupt"),
        ("checkpoint save (training resumed to epoch 3)", c["limit_bytes"], c["limited"]["returncode"],
         c["clear_error"], c["error_line"],
         f"{len(c['after_failure']['corrupt'])} damaged of {c['after_failure']['files']}; resume chooses "
         f"{c['after_failure']['resume_chooses']}; {len(c['after_failure']['temp_files'])} temp files",
         f"exit {c['rerun']['returncode']}: resume chose {c['after_rerun']['resume_chooses']}, "
         f"{len(c['after_rerun']['corrupt'])} damaged"),
        ("inference output (SaveImaged)", i["limit_bytes"], i["limited"]["returncode"], i["clear_error"],
         i["error_line"],
         f"{len(i['files_after_failure'])} files, {len(i['damaged_files_after_failure'])} damaged",
         f"exit {i['rerun']['returncode']}: {len(i['files_after_rerun'])} files, "
         f"{len(i['damaged_files_after_rerun'])} damaged"),
    ]  # fmt: skip
    lines = [f"# Disk full ({s['date']})", "", f"Machine: {s['machine']}. Command: `{s['command']}` "
             f"({s['total_seconds']:.0f} s). Mechanism: {s['mechanism']}.", "",
             "| stage | limit (bytes) | exit | clear error | the error line | left behind | rerun without the limit |",
             "|---|---:|---:|---|---|---|---|"]  # fmt: skip
    lines += ["| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
