"""The ablation CLI without training: stable job commands (resume), per-mode stores, clear errors on bad input."""

from __future__ import annotations

import json

import pytest

from monai_vlmfilm.data.synthetic import generate_dataset


def test_rerun_resumes_with_identical_jobs_and_reruns_changed_ones(tmp_path):
    """Job commands are stable across invocations (so a rerun skips finished jobs); changed settings rerun."""
    from monai_vlmfilm.ablation.cli import Ablation, parse_args

    datalist = generate_dataset(tmp_path / "data", n_train=4, n_val=2, n_test=2, size=32, seed=3)

    def jobs(*extra: str):
        argv = ["--datalist", str(datalist), "--out", str(tmp_path / "abl"), "--modes", "off,on,shuffle,oracle",
                "--seeds", "0,1", "--folds", "2", *extra]  # fmt: skip
        ab = Ablation(parse_args(argv), argv)
        splits = ab.splits()
        ab.prepare_profiles()
        return ab.make_jobs(splits)

    first = jobs()
    assert len(first) == 4 * 2 * 2 and first[0].name == "off_seed0_fold0" and first[4].name == "off_seed0_fold1"
    for j in first:  # pretend every job finished
        j.done_file.write_text("{}")
        (j.workdir / "train.done").write_text("1.0")
    again = jobs()
    assert [j.steps[0].cmd for j in again] == [j.steps[0].cmd for j in first]
    assert all(j.done_file.exists() for j in again)
    # the shuffle and oracle jobs read their own stores, with misses forbidden
    shuffle_cmd = next(j for j in first if j.name.startswith("shuffle")).steps[0].cmd
    assert shuffle_cmd[shuffle_cmd.index("--profile_cache_dir") + 1].endswith("profiles/shuffle")
    assert shuffle_cmd[shuffle_cmd.index("--profile_on_missing") + 1] == "error"
    oracle_cmd = next(j for j in first if j.name.startswith("oracle")).steps[0].cmd
    assert oracle_cmd[oracle_cmd.index("--profiler") + 1] == "oracle"
    assert first[0].steps[0].cmd[first[0].steps[0].cmd.index("--use_vlm_film") + 1] == "False"
    changed = jobs("--override", "learning_rate=0.001")
    assert not any(j.done_file.exists() or (j.workdir / "train.done").exists() for j in changed)


def test_bad_input_is_reported_clearly(tmp_path, capsys):
    from monai_vlmfilm.ablation.cli import main

    datalist = generate_dataset(tmp_path / "data", n_train=3, n_val=1, n_test=0, size=32, seed=2)
    dl = json.loads(datalist.read_text())
    for it in dl["training"]:
        it.pop("factors")
    real = tmp_path / "data" / "real.json"
    real.write_text(json.dumps(dl))
    assert main(["--datalist", str(real), "--out", str(tmp_path / "o"), "--modes", "off,oracle"]) == 2
    err = capsys.readouterr().err
    assert "oracle" in err and "factors" in err and "real.json" in err
    assert main(["--datalist", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--datalist", str(real), "--out", str(tmp_path / "o"), "--modes", "off,sideways"])
    assert e.value.code == 2 and "sideways" in capsys.readouterr().err
