"""A small job queue: one subprocess chain per job, K parallel jobs per GPU (or N on CPU), resumable.

Each job runs its steps (commands) one after the other in its own folder, with its own log per step and
``CUDA_VISIBLE_DEVICES`` set to the GPU of the slot it got. A step that fails ends that job only: the queue
goes on with the others, and the job's result names the log to read. A step whose ``done`` marker exists is
skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Step", "Job", "JobOutcome", "Slot", "make_slots", "run_jobs", "tail"]


@dataclass
class Step:
    """One command of a job.

    Args:
        name: short name; the log is ``<job dir>/<name>.log`` and the done marker ``<job dir>/<name>.done``.
        cmd: argv of the command (a Python callable ``fn(job, env) -> None`` instead runs in this process).
        timeout_s: kill the step after this many seconds (None: no limit).
    """

    name: str
    cmd: Sequence[str] | Callable[[Job, Mapping[str, str]], None]
    timeout_s: float | None = None


@dataclass
class Job:
    """A named chain of steps run in ``workdir``."""

    name: str
    workdir: Path
    steps: list[Step]
    info: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def done_file(self) -> Path:
        return self.workdir / "job.done"


@dataclass
class JobOutcome:
    job: Job
    status: str  # "ok" | "skipped" (already done) | "failed" | "not_run" (time budget spent)
    wall_s: float
    log: str = ""
    error: str = ""
    slot: str = ""
    steps: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Slot:
    """Where a job runs: ``gpu`` is a CUDA device index or None for CPU."""

    gpu: int | None
    index: int

    @property
    def label(self) -> str:
        return f"cuda:{self.gpu}#{self.index}" if self.gpu is not None else f"cpu#{self.index}"


def make_slots(gpus: Sequence[int], jobs_per_gpu: int = 1, cpu_jobs: int = 1) -> list[Slot]:
    """``jobs_per_gpu`` slots per GPU, or ``cpu_jobs`` CPU slots when ``gpus`` is empty."""
    if gpus:
        if jobs_per_gpu < 1:
            raise ValueError(f"jobs_per_gpu must be >= 1, got {jobs_per_gpu}")
        # round-robin over GPUs so the first jobs spread over all cards
        return [Slot(g, k) for k in range(jobs_per_gpu) for g in gpus]
    if cpu_jobs < 1:
        raise ValueError(f"cpu_jobs must be >= 1, got {cpu_jobs}")
    return [Slot(None, k) for k in range(cpu_jobs)]


def tail(path: str | os.PathLike, n: int = 12) -> str:
    """The last ``n`` lines of a text file ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _slot_env(base: Mapping[str, str], slot: Slot, threads: int) -> dict[str, str]:
    env = dict(base)
    env["CUDA_VISIBLE_DEVICES"] = "" if slot.gpu is None else str(slot.gpu)
    # parallel jobs on one host: keep each one's CPU thread pools from oversubscribing the cores
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(threads))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _run_job(job: Job, slot: Slot, base_env: Mapping[str, str], threads: int) -> JobOutcome:
    t0 = time.time()
    if job.done_file.exists():
        try:  # keep the step times of the run that did the work
            prev = json.loads(job.done_file.read_text()).get("step_s", {})
        except (OSError, ValueError, AttributeError):
            prev = {}
        return JobOutcome(job, "skipped", float(sum(prev.values())), slot=slot.label, steps=prev)
    job.workdir.mkdir(parents=True, exist_ok=True)
    env = _slot_env({**base_env, **job.env}, slot, threads)
    times: dict[str, float] = {}

    def failed(log: Path, error: str) -> JobOutcome:
        return JobOutcome(job, "failed", time.time() - t0, str(log), error, slot.label, times)

    for step in job.steps:
        done = job.workdir / f"{step.name}.done"
        log = job.workdir / f"{step.name}.log"
        if done.exists():  # finished by an earlier run: keep its time
            try:
                times[step.name] = float(done.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
            continue
        ts = time.time()
        try:
            if callable(step.cmd):
                with open(log, "w") as f:
                    f.write(f"# in-process step {step.name} on {slot.label}\n")
                step.cmd(job, env)
            else:
                with open(log, "w") as f:
                    f.write(f"# {slot.label}: {' '.join(map(str, step.cmd))}\n")
                    f.flush()
                    proc = subprocess.run(
                        list(map(str, step.cmd)),
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=str(job.workdir),
                        timeout=step.timeout_s,
                        check=False,
                    )
                if proc.returncode != 0:
                    # the last non-empty line is usually the exception; the log has the rest
                    last = next((ln.strip() for ln in reversed(tail(log, 40).splitlines()) if ln.strip()), "")
                    return failed(log, f"step {step.name!r} exited with code {proc.returncode}: {last}")
        except subprocess.TimeoutExpired:
            return failed(log, f"step {step.name!r} timed out after {step.timeout_s} s")
        except Exception as e:  # an in-process step: report it against this job, keep the queue going
            with open(log, "a") as f:
                f.write(f"\nERROR: {type(e).__name__}: {e}\n")
            return failed(log, f"step {step.name!r}: {type(e).__name__}: {e}")
        times[step.name] = round(time.time() - ts, 2)
        done.write_text(f"{times[step.name]}\n")
    job.done_file.write_text(json.dumps({"finished": time.time(), "step_s": times}) + "\n")
    return JobOutcome(job, "ok", time.time() - t0, slot=slot.label, steps=times)


def run_jobs(
    jobs: Sequence[Job],
    slots: Sequence[Slot],
    env: Mapping[str, str] | None = None,
    progress: bool = True,
    on_done: Callable[[JobOutcome], None] | None = None,
    deadline: float | None = None,
) -> list[JobOutcome]:
    """Run ``jobs`` over ``slots`` (one job per slot at a time), in the order given.

    Args:
        jobs: the jobs; a job whose ``job.done`` exists is reported as "skipped".
        slots: from :func:`make_slots`.
        env: base environment of every command (default: this process's).
        progress: show a tqdm bar over jobs (to stderr).
        on_done: called (in the caller's thread) with each outcome as it arrives.
        deadline: a ``time.time()`` after which no job starts (reported as "not_run"); running jobs finish.

    Returns:
        the outcomes in the order of ``jobs``.
    """
    if not slots:
        raise ValueError("no slots to run jobs on")
    base_env = dict(os.environ if env is None else env)
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    free: queue.Queue[Slot] = queue.Queue()
    for s in slots:
        free.put(s)
    lock = threading.Lock()

    def work(job: Job) -> JobOutcome:
        slot = free.get()
        try:
            if deadline is not None and time.time() > deadline and not job.done_file.exists():
                return JobOutcome(job, "not_run", 0.0, error="not started: the time budget was spent", slot=slot.label)
            return _run_job(job, slot, base_env, threads)
        finally:
            free.put(slot)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="ablation jobs", unit="job", dynamic_ncols=True)
    outcomes: dict[int, JobOutcome] = {}
    failed = 0
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        futures = {pool.submit(work, j): i for i, j in enumerate(jobs)}
        for fut in as_completed(futures):
            i = futures[fut]
            out = fut.result()
            outcomes[i] = out
            with lock:
                if out.status == "failed":
                    failed += 1
                if bar is not None:
                    bar.set_postfix_str(f"last={out.job.name} {out.status} {out.wall_s:.0f}s failed={failed}")
                    bar.update(1)
                if on_done is not None:
                    on_done(out)
    if bar is not None:
        bar.close()
    return [outcomes[i] for i in range(len(jobs))]
