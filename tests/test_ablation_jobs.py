"""The ablation's job queue with real subprocesses: failures stay local, resume skips finished work, deadlines."""

from __future__ import annotations

import sys
import time

from monai_vlmfilm.ablation.jobs import Job, Step, make_slots, run_jobs

PY = sys.executable


def _job(tmp_path, name: str, code: str, *more: Step) -> Job:
    return Job(name, tmp_path / name, [Step("work", [PY, "-c", code]), *more], info={"name": name})


def test_failure_is_reported_and_others_finish(tmp_path):
    counter = tmp_path / "calls.txt"

    def in_process(job, env):
        with open(counter, "a") as f:
            f.write(f"{job.name} {env['CUDA_VISIBLE_DEVICES']!r}\n")

    jobs = [
        _job(tmp_path, "good", "import os; open('out.txt','w').write(os.environ['CUDA_VISIBLE_DEVICES'])",
             Step("collect", in_process)),
        _job(tmp_path, "bad", "import sys; print('some output'); raise SystemExit('boom: bad input file x.png')"),
        _job(tmp_path, "slow", "import time; time.sleep(5)"),
    ]  # fmt: skip
    jobs[2].steps[0].timeout_s = 0.5
    out = run_jobs(jobs, make_slots([], cpu_jobs=2), progress=False)
    assert [o.status for o in out] == ["ok", "failed", "failed"]
    assert (tmp_path / "good" / "out.txt").read_text() == ""  # CPU slot: no GPU visible
    assert out[1].log.endswith("bad/work.log") and "boom: bad input file x.png" in out[1].error
    assert "exited with code 1" in out[1].error
    assert "timed out" in out[2].error
    assert set(out[0].steps) == {"work", "collect"}
    assert counter.read_text().splitlines() == ["good ''"]

    # rerun: the finished job is skipped (its collect step does not run again), failed ones run again
    out2 = run_jobs(jobs, make_slots([], cpu_jobs=1), progress=False)
    assert [o.status for o in out2] == ["skipped", "failed", "failed"]
    assert counter.read_text().splitlines() == ["good ''"]
    assert out2[0].steps.keys() == out[0].steps.keys()


def test_gpu_slots_and_deadline(tmp_path):
    slots = make_slots([0, 1], jobs_per_gpu=2)
    assert [s.label for s in slots] == ["cuda:0#0", "cuda:1#0", "cuda:0#1", "cuda:1#1"]
    jobs = [_job(tmp_path, f"j{i}", "import os; open('gpu.txt','w').write(os.environ['CUDA_VISIBLE_DEVICES'])")
            for i in range(3)]  # fmt: skip
    out = run_jobs(jobs, make_slots([3], jobs_per_gpu=1), progress=False)
    assert all(o.status == "ok" for o in out)
    assert {(tmp_path / f"j{i}" / "gpu.txt").read_text() for i in range(3)} == {"3"}
    late = [_job(tmp_path, "late", "pass")]
    assert run_jobs(late, slots, progress=False, deadline=time.time() - 1)[0].status == "not_run"
    assert not (tmp_path / "late").exists()


def test_changed_settings_move_earlier_outputs_aside_and_keep_them(tmp_path, capsys):
    """A job folder whose command changed runs again, but what it had computed is kept under superseded/<n>/."""
    from monai_vlmfilm.ablation.cli import _invalidate_if_changed

    wd = tmp_path / "on_seed0"
    _invalidate_if_changed(wd, {"train": ["a"]})
    (wd / "result.json").write_text('{"dice": 0.8}')
    (wd / "train.done").write_text("ok")
    (wd / "train").mkdir()
    (wd / "train" / "model.pt").write_bytes(b"weights")
    _invalidate_if_changed(wd, {"train": ["a"]})  # the same command: resumed as it is
    assert (wd / "result.json").is_file() and not (wd / "superseded").exists()
    _invalidate_if_changed(wd, {"train": ["b"]})
    old = wd / "superseded" / "1"
    assert (old / "result.json").read_text() == '{"dice": 0.8}' and (old / "train" / "model.pt").is_file()
    assert '"a"' in (old / "spec.json").read_text() and '"b"' in (wd / "spec.json").read_text()
    assert sorted(p.name for p in wd.iterdir()) == ["spec.json", "superseded"]  # nothing done: it runs again
    assert "moved to" in capsys.readouterr().err
    (wd / "result.json").write_text("{}")
    _invalidate_if_changed(wd, {"train": ["c"]})
    assert (wd / "superseded" / "2" / "result.json").read_text() == "{}" and (old / "result.json").is_file()
