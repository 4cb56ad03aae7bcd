"""Crash campaign for bundle training: SIGKILLs at random moments (some inside checkpoint writes), each followed by a resume.

    python benchmarks/reliability_training.py [--kills 24] [--epochs 48] [--seed 0] \
        [--out benchmarks/results/reliability_training]

CPU only, tiny network (channels 8/16/16) on 10 synthetic 64 x 64 angiograms (8 train / 2 validation), so one
process lives for seconds. Every process is the real ``python -m monai.bundle run --config_file
bundle/configs/train.yaml`` with command-line overrides, started in its own process group and killed with SIGKILL:

1. a reference run trains ``--epochs`` epochs without interruption;
2. the campaign run trains the same schedule in a chain of processes: each is killed at a random moment (half of the
   kills at a random time: in start-up, or within the 1st-3rd epoch of that process; half a random delay into the
   1st-4th checkpoint write it announces) and the next one resumes with ``--resume_from <ckpt_dir>`` (the newest intact
   checkpoint in the folder); when ``--kills`` kills are done, the last process runs to the end;
3. after every kill every ``checkpoint*.pt`` on disk is read (a damaged file would count as corrupt) and the
   checkpoint that a resume will choose is recorded (the bundle's own ``find_resume_checkpoint``); every resumed
   process must log that it restored it;
4. the final weights (model, EMA), optimizer state, ``model.pt`` and best validation Dice of the campaign run are
   compared with the reference run's.

Checkpoint writes are slowed only in the processes of this benchmark: the child runs through this script
(``--child``), which wraps ``torch.save`` to write its bytes in 32 KiB pieces with a pause between them and to print
``CKPT-WRITE-BEGIN`` / ``CKPT-WRITE-END`` markers, so a kill can be aimed at an open write. Whether a kill landed
inside a write is judged from the disk: the write's temporary file (``.<name>.<pid>.tmp``) is still there.

Results: ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# a tiny network (3 levels: the attention flags follow the channel count) for every bundle command of the
# reliability benchmarks (reliability_disk_full.py imports it)
TINY_NET = [
    "--network_def#channels", "[8,16,16]",
    "--network_def#attention_levels", "[False,False,False]",
    "--network_def#norm_num_groups", "8",
    "--network_def#cond_dim", "16",
    "--network_def#film_hidden_dim", "16",
    "--patch_size", "[64,64]",
    "--num_inference_steps", "1",
]  # fmt: skip
TINY = [
    *TINY_NET,
    "--batch_size", "2",
    "--cache_rate", "0",
    "--val_interval", "1",
    "--ckpt_interval", "1",
    "--log_iter_interval", "100",
]  # fmt: skip
SLOW_ENV = "VLMFILM_BENCH_SLOW_SAVE_S"  # seconds one checkpoint write takes in a child of this benchmark


def child_main(argv: list[str]) -> None:
    """Run ``monai.bundle`` with ``torch.save`` slowed and announced (the benchmark's hook; never used otherwise)."""
    import io
    import runpy

    import torch

    pause = float(os.environ.get(SLOW_ENV, "0"))
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data, piece = buf.getvalue(), 32 << 10
        n = max(1, -(-len(data) // piece))
        name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "?")
        print(f"CKPT-WRITE-BEGIN {name}", file=sys.stderr, flush=True)
        out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        for i in range(n):
            out.write(data[i * piece : (i + 1) * piece])
            out.flush()
            time.sleep(pause / n)
        if out is not f:
            out.close()
        print(f"CKPT-WRITE-END {name}", file=sys.stderr, flush=True)

    torch.save = slow_save
    sys.argv = ["monai.bundle", *argv]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)


def make_data(work: Path) -> tuple[Path, Path]:
    data = work / "data"
    subprocess.run([PY, "-m", "monai_vlmfilm.data.synthetic", "--out", str(data), "--n-train", "8", "--n-val", "2",
                    "--n-test", "0", "--size", "64", "--seed", "3"], check=True, capture_output=True, cwd=REPO)  # fmt: skip
    cache = work / "profiles"
    subprocess.run([PY, "-m", "monai_vlmfilm.profiles", "precompute", "--datalist", str(data / "datalist.json"),
                    "--cache-dir", str(cache), "--profiler", "heuristic", "--no-progress"],
                   check=True, capture_output=True, cwd=REPO)  # fmt: skip
    return data / "datalist.json", cache


def bundle_cmd(root: Path, datalist: Path, cache: Path, epochs: int, resume: Path | None) -> list[str]:
    cmd = [PY, str(Path(__file__).resolve()), "--child", "run", "--config_file", str(REPO / "bundle/configs/train.yaml"),
           "--bundle_root", str(root), "--datalist", str(datalist), "--profile_cache_dir", str(cache),
           "--epochs", str(epochs), *TINY]  # fmt: skip
    return cmd + (["--resume_from", str(resume)] if resume else [])


def child_env(slow_s: float) -> dict:
    # one thread: bit-identical CPU kernels in every process, and fair to the other jobs on a 2-core machine
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        SLOW_ENV: str(slow_s),
    }


def checkpoints(models: Path) -> list[Path]:
    return sorted(models.glob("checkpoint*.pt"))


def temp_files(models: Path) -> list[Path]:
    return sorted(p for p in models.glob(".*.tmp*")) if models.is_dir() else []


def scan(models: Path) -> dict:
    """Read every checkpoint on disk; which one a resume chooses."""
    from monai_vlmfilm.networks.checkpoint import CheckpointError, find_resume_checkpoint, read_checkpoint

    corrupt = []
    for p in checkpoints(models) + ([models / "model.pt"] if (models / "model.pt").exists() else []):
        try:
            read_checkpoint(p)
        except CheckpointError as e:
            corrupt.append(f"{p.name}: {e}")
    chosen, progress = None, None
    if checkpoints(models):
        path, _ = find_resume_checkpoint(models, ("model", "trainer"))
        import torch

        t = torch.load(path, weights_only=True)["trainer"]
        chosen, progress = path.name, (int(t["iteration"]) // int(t["epoch_length"]), int(t["iteration"]))
    return {"corrupt": corrupt, "chosen": chosen, "progress": progress, "temps": [p.name for p in temp_files(models)]}


def run_to_end(cmd: list[str], env: dict, log: Path, timeout: float = 1800) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}), see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def one_life(
    cmd: list[str], env: dict, log: Path, mode: str, rng: random.Random, startup_s: float, epoch_s: float, slow_s: float
) -> dict:
    """Start ``cmd`` and SIGKILL its process group at a random moment.

    "time": after 0-2 finished epochs of this process (chosen at random), a uniform delay within the next epoch (with
    0 epochs: a random time within start-up + one epoch, at the latest when the first epoch ends); "write": a random
    delay into the k-th (1-4) checkpoint write.
    Waiting for progress instead of a fixed clock keeps every life short on a machine whose load changes.
    """
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(marker: str, count: int, limit_s: float) -> None:
        while proc.poll() is None and time.perf_counter() - t0 < limit_s:
            if log.read_text(errors="replace").count(marker) >= count:
                return
            time.sleep(0.01)

    limit = 10 * (startup_s + 4 * epoch_s)
    if mode == "time":
        n = rng.randint(0, 2)
        if n == 0:  # a random time in start-up + one epoch, cut short at the end of this process's first epoch
            wait_for("progress: finished epoch", 1, rng.uniform(0.5, startup_s + epoch_s))
        else:
            wait_for("progress: finished epoch", n, limit)
            time.sleep(rng.uniform(0.0, epoch_s))
    else:
        wait_for("CKPT-WRITE-BEGIN", rng.randint(1, 4), limit)
        time.sleep(rng.uniform(0.0, slow_s))
    finished = proc.poll() is not None
    if not finished:
        kill_group(proc)
    text = log.read_text(errors="replace")
    return {
        "mode": mode,
        "seconds": round(time.perf_counter() - t0, 2),
        "finished": finished,
        "returncode": proc.returncode,
        "open_write": text.count("CKPT-WRITE-BEGIN") > text.count("CKPT-WRITE-END"),
        "restored": re.findall(r"Restored all variables from (\S+)", text),
        "resume_log": re.findall(r"resume: (.*)", text),
        "error": next((ln for ln in text.splitlines()[::-1] if re.match(r"^\w*(Error|Exception)\b", ln)), ""),
    }


def final_state(models: Path) -> dict:
    import torch

    ck = torch.load(models / "checkpoint_final.pt", weights_only=True)
    best = torch.load(models / "model.pt", weights_only=True)
    saved = ck.get("val_checkpointer", {}).get("_saved", [])
    return {"ckpt": ck, "model_pt": best, "best_dice": max((float(s[0]) for s in saved), default=float("nan"))}


def compare(a: dict, b: dict) -> dict:
    import torch

    def max_diff(x: dict, y: dict) -> float:
        keys = set(x) | set(y)
        if set(x) != set(y):
            return float("inf")
        return max((float((x[k].float() - y[k].float()).abs().max()) if x[k].numel() else 0.0) for k in keys)

    opt = [
        float((s1 - s2).abs().max())
        for p1, p2 in zip(a["ckpt"]["optimizer"]["state"].values(), b["ckpt"]["optimizer"]["state"].values())
        for s1, s2 in zip(p1.values(), p2.values())
        if isinstance(s1, torch.Tensor)
    ]
    return {
        "model_max_abs_diff": max_diff(a["ckpt"]["model"], b["ckpt"]["model"]),
        "ema_model_max_abs_diff": max_diff(a["ckpt"]["ema_model"], b["ckpt"]["ema_model"]),
        "optimizer_max_abs_diff": max(opt) if opt else 0.0,
        "model_pt_max_abs_diff": max_diff(a["model_pt"], b["model_pt"]),
        "iteration": [a["ckpt"]["trainer"]["iteration"], b["ckpt"]["trainer"]["iteration"]],
        "best_val_dice": [a["best_dice"], b["best_dice"]],
        "lr_scheduler_equal": a["ckpt"]["lr_scheduler"] == b["ckpt"]["lr_scheduler"],
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=48)
    ap.add_argument("--slow-save-s", type=float, default=0.6, help="duration of one slowed checkpoint write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="", help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/reliability_training"))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="reliability_training_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    datalist, cache = make_data(work)
    env = child_env(args.slow_save_s)

    print(f"reference: {args.epochs} epochs uninterrupted ...", flush=True)
    ref_root = work / "reference"
    ref_s = run_to_end(bundle_cmd(ref_root, datalist, cache, args.epochs, None), env, work / "reference.log")
    m = re.findall(
        r"SupervisedTrainer - INFO - Engine run finished. Time taken: (\d+):(\d+):([\d.]+)",
        (work / "reference.log").read_text(),
    )
    train_s = int(m[-1][0]) * 3600 + int(m[-1][1]) * 60 + float(m[-1][2])
    startup_s, epoch_s = ref_s - train_s, train_s / args.epochs
    print(f"reference: done in {ref_s:.1f} s (start-up {startup_s:.1f} s, {epoch_s:.1f} s per epoch)", flush=True)

    root = work / "campaign"
    models = root / "models"
    lives: list[dict] = []
    modes = ["time", "write"] * (args.kills // 2) + ["time"] * (args.kills % 2)
    rng.shuffle(modes)
    for i, mode in enumerate(modes):
        resume = models if checkpoints(models) else None
        before = scan(models) if resume else None
        temps_before = {p.name for p in temp_files(models)}
        life = one_life(bundle_cmd(root, datalist, cache, args.epochs, resume), env, work / f"life{i:02d}.log", mode,
                        rng, startup_s, epoch_s, args.slow_save_s)  # fmt: skip
        after = scan(models)
        life.update(
            index=i,
            resumed_from=before["chosen"] if before else None,
            progress_before=before["progress"] if before else None,
            progress_after=after["progress"],
            chosen_after=after["chosen"],
            corrupt_after=after["corrupt"],
            temp_files_after=[t for t in after["temps"] if t not in temps_before],
            landed_in_write=any(t not in temps_before for t in after["temps"]),
        )
        if life["finished"]:
            print(f"  life {i}: finished before its kill (rc {life['returncode']})", flush=True)
        lives.append(life)
        print(
            f"kill {i + 1}/{len(modes)} [{mode}] after {life['seconds']:.1f} s: "
            f"{'inside a write' if life['landed_in_write'] else 'outside writes'}; resumed from {life['resumed_from']} "
            f"{life['progress_before']} -> newest intact {life['chosen_after']} {life['progress_after']}; "
            f"corrupt {len(life['corrupt_after'])}; temp files on disk {len(after['temps'])}",
            flush=True,
        )
        if life["error"]:
            print(f"    error: {life['error']}", flush=True)
    print("final: resume and run to the end ...", flush=True)
    last_resume = models if checkpoints(models) else None
    before = scan(models)
    final_s = run_to_end(bundle_cmd(root, datalist, cache, args.epochs, last_resume), env, work / "final.log")
    final_log = (work / "final.log").read_text(errors="replace")
    cmp = compare(final_state(ref_root / "models"), final_state(models))

    resumed = [x for x in lives if x["resumed_from"]]
    restored_ok = [x for x in resumed if x["restored"] and Path(x["restored"][0]).name == x["resumed_from"]]
    killed_before_restore = [x for x in resumed if not x["restored"] and not x["error"]]
    failed = [x for x in lives if x["error"]] + (
        [] if "Restored all variables" in final_log or not last_resume else [{}]
    )
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"2-core CPU ({platform.processor() or platform.machine()}), shared with other jobs",
        "command": "python benchmarks/reliability_training.py " + " ".join(sys.argv[1:]),
        "epochs": args.epochs,
        "kills": len(lives),
        "kills_aimed_at_writes": sum(x["mode"] == "write" for x in lives),
        "kills_inside_a_write": sum(x["landed_in_write"] for x in lives),
        "kills_with_open_write_marker": sum(x["open_write"] for x in lives),
        "lives_that_finished_before_the_kill": sum(x["finished"] for x in lives),
        "resumes": len(resumed) + (1 if last_resume else 0),
        "resumes_restored_the_chosen_checkpoint": len(restored_ok) + (1 if "Restored all variables" in final_log else 0),
        "resumes_killed_before_restoring": len(killed_before_restore),
        "failed_processes": len(failed),
        "corrupt_checkpoints_on_disk_after_kills": sum(len(x["corrupt_after"]) for x in lives),
        "corrupt_checkpoints_chosen": 0 if all(not x["corrupt_after"] or x["chosen_after"] for x in lives) else -1,
        "temp_files_left_by_kills": sum(len(x["temp_files_after"]) for x in lives),
        "temp_files_removed_by_next_start": len(re.findall(r"partial write of", "".join(
            (work / f"life{i:02d}.log").read_text(errors="replace") for i in range(len(lives))) + final_log)),
        "final_vs_reference": cmp,
        "files_at_end": sorted(p.name for p in models.iterdir()),
        "reference_seconds": round(ref_s, 1),
        "final_seconds": round(final_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "lives": lives,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary), flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def markdown(s: dict) -> str:
    c = s["final_vs_reference"]
    rows = [
        ("SIGKILLs (aimed at a checkpoint write / at a random time)",
         f"{s['kills']} ({s['kills_aimed_at_writes']} / {s['kills'] - s['kills_aimed_at_writes']})"),
        ("kills that landed inside a checkpoint write (temp file on disk)", s["kills_inside_a_write"]),
        ("processes that finished before their kill", s["lives_that_finished_before_the_kill"]),
        ("resumes started / restored the chosen checkpoint / killed before restoring",
         f"{s['resumes']} / {s['resumes_restored_the_chosen_checkpoint']} / {s['resumes_killed_before_restoring']}"),
        ("processes that ended with an error", s["failed_processes"]),
        ("damaged checkpoint files on disk after a kill", s["corrupt_checkpoints_on_disk_after_kills"]),
        ("temp files left by kills / removed by the next start",
         f"{s['temp_files_left_by_kills']} / {s['temp_files_removed_by_next_start']}"),
        ("final model weights vs uninterrupted run (max abs diff)", c["model_max_abs_diff"]),
        ("final EMA weights vs uninterrupted run", c["ema_model_max_abs_diff"]),
        ("final optimizer state vs uninterrupted run", c["optimizer_max_abs_diff"]),
        ("model.pt (best validation EMA) vs uninterrupted run", c["model_pt_max_abs_diff"]),
        ("best validation Dice (reference / killed-and-resumed)", c["best_val_dice"]),
        ("iterations (reference / killed-and-resumed)", c["iteration"]),
        ("files in the checkpoint folder at the end", ", ".join(s["files_at_end"])),
    ]  # fmt: skip
    lines = [f"# Training crash campaign ({s['date']})", "", f"Machine: {s['machine']}. Command: `{s['command']}`",
             f"({s['total_seconds']:.0f} s in all; reference run {s['reference_seconds']} s).", "",
             "| measure | value |", "|---|---:|"]  # fmt: skip
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
