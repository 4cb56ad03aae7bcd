"""Crash-safe checkpoints: atomic writes under SIGKILL and a file size limit, damaged files, resuming from a folder."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_vlmfilm.atomic import DiskWriteError, atomic_write, remove_stale_temp_files
from monai_vlmfilm.handlers import AtomicDiskSaver, ResumeCheckpointLoader, TrainingRandomState
from monai_vlmfilm.networks import CheckpointError, find_resume_checkpoint, load_network_weights, read_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _child(code: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, start_new_session=True, **kwargs)


def _training_ckpt(iteration: int, value: float = 0.0) -> dict:
    return {
        "model": {"w": torch.full((4, 4), value)},
        "trainer": {"epoch_length": 2, "iteration": iteration, "max_epochs": 10},
    }


def test_killed_writer_leaves_the_old_or_the_new_complete_file(tmp_path):
    """SIGKILL a process that rewrites one checkpoint in a loop: the file always loads, as one whole version."""
    ready = tmp_path / "ready"
    # AtomicDiskSaver's write path without importing MONAI / ignite (a quick child start)
    proc_code = f"""
        import itertools, torch
        from monai_vlmfilm.atomic import atomic_write
        for i in itertools.count():
            # 8 MB per version: the write (serialise, write, fsync) is most of each loop
            with atomic_write({str(tmp_path / "checkpoint_final.pt")!r}) as tmp:
                torch.save({{"model": {{"w": torch.full((2_000_000,), float(i))}}, "version": i}}, tmp)
            if i == 0:
                open({str(ready)!r}, "w").close()
    """
    rng = random.Random(0)
    leftovers = 0
    # at least 3 kills, and more until one lands inside a write: about a quarter of kills land between two writes
    # (measured: 5 of 20), so a fixed 3 kills missed every write in a few % of runs; 12 miss with p < 1e-7
    for kill in range(12):
        if kill >= 3 and leftovers:
            break
        ready.unlink(missing_ok=True)
        proc = _child(proc_code)
        t0 = time.time()
        while not ready.exists() and time.time() - t0 < 60:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.6))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = read_checkpoint(tmp_path / "checkpoint_final.pt")  # never partial
        w = ckpt["model"]["w"]
        assert w.shape == (2_000_000,) and bool((w == float(ckpt["version"])).all())
        leftovers += len(remove_stale_temp_files(tmp_path))
    assert leftovers >= 1, "no kill landed inside a write: the test did not exercise the atomic path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_final.pt", "ready"]


def test_truncated_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    net = torch.nn.Linear(3, 2)
    good = tmp_path / "model.pt"
    torch.save(net.state_dict(), good)
    data = good.read_bytes()
    for n in (0, 10, len(data) // 2, len(data) - 5):
        bad = tmp_path / f"cut_{n}.pt"
        bad.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=rf"cut_{n}\.pt.*damaged"):
            read_checkpoint(bad)
        with pytest.raises(CheckpointError, match=rf"cut_{n}\.pt"):
            load_network_weights(net, bad)
        with pytest.raises(CheckpointError, match=rf"cut_{n}\.pt"):  # resume from a named file: no silent fallback
            ResumeCheckpointLoader(str(bad), {"model": net})


def test_resume_from_a_folder_skips_a_damaged_newest_file(tmp_path, caplog):
    torch.save(_training_ckpt(4, 1.0), tmp_path / "checkpoint_epoch=2.pt")
    torch.save(_training_ckpt(6, 2.0), tmp_path / "checkpoint_epoch=3.pt")
    newest = tmp_path / "checkpoint_final.pt"  # the newest by progress and time, cut short
    torch.save(_training_ckpt(8, 3.0), newest)
    newest.write_bytes(newest.read_bytes()[:200])
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")  # weights only: never a resume candidate
    with caplog.at_level(logging.WARNING):
        path, keys = find_resume_checkpoint(tmp_path, ("model", "trainer"))
    assert path.name == "checkpoint_epoch=3.pt" and "trainer" in keys
    assert "skipped" in caplog.text and "checkpoint_final.pt" in caplog.text and "damaged" in caplog.text
    # the loader restores that file into real objects
    from ignite.engine import Engine

    w = torch.nn.Module()
    w.register_buffer("w", torch.zeros(4, 4))
    engine = Engine(lambda e, b: None)
    loader = ResumeCheckpointLoader(str(tmp_path), {"model": w, "trainer": engine, "rng": TrainingRandomState()},
                                    optional_keys=["rng"])  # fmt: skip
    assert loader.load_path == str(tmp_path / "checkpoint_epoch=3.pt") and "rng" not in loader.load_dict
    loader(engine)
    assert engine.state.iteration == 6 and bool((w.w == 2.0).all())
    # a checkpoint lacking a required entry is not a training checkpoint
    with pytest.raises(CheckpointError, match="lacks"):
        find_resume_checkpoint(tmp_path / "checkpoint_epoch=3.pt", ("model", "trainer", "optimizer"))
    # nothing intact: an error listing every file and its reason
    for p in tmp_path.glob("checkpoint*.pt"):
        p.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*checkpoint_epoch=2\.pt.*checkpoint_final\.pt"):
        find_resume_checkpoint(tmp_path)


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one(tmp_path):
    """RLIMIT_FSIZE in a child (SIGXFSZ ignored, so the write fails with EFBIG): a real ignite run with n_saved=1."""
    code = f"""
        import resource, signal, sys, torch
        from ignite.engine import Engine, Events
        from monai_vlmfilm.atomic import DiskWriteError
        from monai_vlmfilm.handlers import AtomicCheckpointSaver
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # default action kills; ignored, write() fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        net = torch.nn.Module()
        net.register_buffer("w", torch.zeros(10_000))  # 40 kB checkpoints for epoch 1
        def step(engine, batch):
            if engine.state.epoch == 2:
                net.w = torch.zeros(1_000_000)  # 4 MB: over the limit at the epoch-2 save
        engine = Engine(step)
        AtomicCheckpointSaver({str(tmp_path)!r}, {{"model": net, "trainer": engine}}, file_prefix="checkpoint",
                              save_interval=1, n_saved=1).attach(engine)
        try:
            engine.run([0], max_epochs=3)
        except DiskWriteError as e:
            print("ERROR", e)
            sys.exit(3)
    """
    proc = _child(code, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    msg = out.split("ERROR", 1)[1]
    assert "checkpoint_checkpoint_epoch=2.pt" in msg and "file size limit" in msg and "no space" in msg
    # the epoch-1 checkpoint (n_saved=1) is still there and whole; no partial file, no temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_checkpoint_epoch=1.pt"]
    ckpt = read_checkpoint(tmp_path / "checkpoint_checkpoint_epoch=1.pt")
    assert ckpt["trainer"]["iteration"] == 1 and ckpt["model"]["w"].shape == (10_000,)


def test_atomic_write_error_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(DiskWriteError, match="out.bin.*no space left"):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_training_random_state_round_trip(tmp_path):
    from monai.transforms import Compose, RandFlipd, RandGaussianNoised

    xf = Compose([RandFlipd("x", prob=0.5), RandGaussianNoised("x", prob=1.0)])
    xf.set_random_state(7)
    state = TrainingRandomState(xf)

    def draw():
        return (torch.rand(3), np.random.rand(3), random.random(), xf({"x": torch.ones(1, 4, 4)})["x"])

    torch.save({"rng": state.state_dict()}, tmp_path / "c.pt")
    first = draw()
    state.load_state_dict(read_checkpoint(tmp_path / "c.pt")["rng"])  # weights_only-readable
    second = draw()
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second))


def test_atomic_disk_saver_removes_old_files_only_after_the_new_one_is_written(tmp_path):
    saver = AtomicDiskSaver(tmp_path)
    saver({"a": torch.zeros(1)}, "checkpoint_epoch=1.pt")
    saver.remove("checkpoint_epoch=1.pt")  # what ignite's Checkpoint calls before writing epoch 2
    assert (tmp_path / "checkpoint_epoch=1.pt").exists()
    saver({"a": torch.ones(1)}, "checkpoint_epoch=2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]


def test_inference_output_is_atomic_and_a_full_disk_names_the_file(tmp_path):
    """AtomicSaveImaged (inference.yaml's mask writer) under RLIMIT_FSIZE: DiskWriteError naming the file, no partial
    file; without the limit the same transform writes a complete NIfTI mask and PNG overlay."""
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(tmp_path / "case.png")
    code = f"""
        import resource, signal, sys
        from monai.transforms import LoadImaged
        from monai_vlmfilm.atomic import DiskWriteError
        from monai_vlmfilm.transforms import AtomicSaveImaged, SaveVesselOverlayd
        d = LoadImaged(["image"], ensure_channel_first=True)({{"image": {str(tmp_path / "case.png")!r}}})
        d["pred"] = (d["image"] > 127).float()
        kw = dict(output_dir={str(tmp_path / "out")!r}, separate_folder=False)
        save = AtomicSaveImaged("pred", output_postfix="seg", output_ext=".nii.gz", resample=False, **kw)
        overlay = SaveVesselOverlayd("pred", **kw)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # a soft limit only, so that the same process can lift it again ("space returns")
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, resource.RLIM_INFINITY))
        for t in (save, overlay):
            try:
                t(d)
            except DiskWriteError as e:
                print("ERROR", e)
        print("LEFT", sorted(os.listdir(kw["output_dir"])), flush=True)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        save(d)
        overlay(d)
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", "import os\n" + textwrap.dedent(code)], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    errors = [ln for ln in out.stdout.splitlines() if ln.startswith("ERROR")]
    assert len(errors) == 2, out.stdout + out.stderr
    assert "case_seg.nii.gz" in errors[0] and "case_overlay.png" in errors[1]
    assert all("no space left" in e and "file size limit" in e for e in errors)
    assert "LEFT []" in out.stdout  # neither a partial file nor a temp file
    import nibabel as nib

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_overlay.png", "case_seg.nii.gz"]
    assert nib.load(str(tmp_path / "out" / "case_seg.nii.gz")).shape[:2] == (64, 64)


def test_ema_warmup_position_survives_a_resume(tmp_path):
    """ignite's EMA warm-up counts its own events from 0 per process: EMAMomentumState carries the count over."""
    from ignite.engine import Engine
    from ignite.handlers import EMAHandler

    from monai_vlmfilm.handlers import EMAMomentumState

    def run(iters: int, state: dict | None = None) -> tuple[float, dict]:
        engine = Engine(lambda e, b: None)
        ema = EMAHandler(torch.nn.Linear(2, 2), momentum=0.001, momentum_warmup=0.1, warmup_iters=100)
        ema.attach(engine)
        keep = EMAMomentumState(ema)
        if state is not None:
            torch.save({"ema_state": state}, tmp_path / "c.pt")
            keep.load_state_dict(read_checkpoint(tmp_path / "c.pt")["ema_state"])  # weights_only-readable
        engine.run([0] * iters, max_epochs=1)
        return engine.state.ema_momentum, keep.state_dict()

    straight, _ = run(30)
    _, state = run(10)
    resumed, _ = run(20, state)
    assert state == {"event_index": 10} and resumed == pytest.approx(straight)
    fresh, _ = run(20)
    assert fresh != pytest.approx(straight)  # without the entry the warm-up restarts


def test_a_resumed_run_keeps_n_saved_epoch_checkpoints(tmp_path, caplog):
    """ignite's n_saved counts only this process's files: a resumed run adopts the earlier lives' epoch files."""
    from ignite.engine import Engine

    from monai_vlmfilm.handlers import AtomicCheckpointSaver

    def trainer_and_saver():
        engine, net = Engine(lambda e, b: None), torch.nn.Linear(2, 2)
        saver = AtomicCheckpointSaver(str(tmp_path), {"model": net, "trainer": engine}, file_prefix="checkpoint",
                                      save_interval=1, n_saved=1)  # fmt: skip
        saver.attach(engine)
        return engine

    trainer_and_saver().run([0, 0], max_epochs=2)
    names = ["checkpoint_checkpoint_epoch=2.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    # an earlier killed life left its last checkpoint (and a file of another saver that must stay)
    (tmp_path / "checkpoint_checkpoint_epoch=1.pt").write_bytes((tmp_path / names[0]).read_bytes())
    (tmp_path / "model.pt").write_bytes(b"weights")
    engine = trainer_and_saver()
    ResumeCheckpointLoader(str(tmp_path), {"trainer": engine}).attach(engine)
    with caplog.at_level(logging.INFO):
        engine.run([0, 0], max_epochs=4)
    assert engine.state.epoch == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_checkpoint_epoch=4.pt", "model.pt"]
    assert "removed checkpoint_checkpoint_epoch=1.pt" in caplog.text
