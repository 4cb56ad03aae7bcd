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


def test_variants_calibration_and_profile_norm(tmp_path):
    """Variants run as extra modes with their own settings; calibration=train gets its own store and spec;
    profile_norm=train points each job at the statistics of its own store over its split's training images."""
    import numpy as np

    from monai_vlmfilm.ablation import data as D
    from monai_vlmfilm.ablation.cli import Ablation, parse_args
    from monai_vlmfilm.profiles.normalization import load_profile_norm

    datalist = generate_dataset(tmp_path / "data", n_train=6, n_val=2, n_test=3, size=32, seed=4)
    argv = ["--datalist", str(datalist), "--out", str(tmp_path / "abl"), "--modes", "off,on,shuffle,oracle",
            "--seeds", "0", "--variant", "norm:profile_norm=train",
            "--variant", "cal+nogate:calibration=train;use_difficulty_gate=False",
            "--variant", "lr@oracle:learning_rate=0.01", "--variant-modes", "on,shuffle"]  # fmt: skip
    ab = Ablation(parse_args(argv), argv)
    splits = ab.splits()
    ab.prepare_profiles()
    jobs = {j.name: j for j in ab.make_jobs(splits)}
    assert set(jobs) == {f"{m}_seed0" for m in
                         ("off", "on", "shuffle", "oracle", "on.norm", "shuffle.norm", "on.cal+nogate", "shuffle.cal+nogate",
                          "oracle.lr")}  # fmt: skip

    def arg(name, key):
        cmd = jobs[name].steps[0].cmd
        return cmd[cmd.index(f"--{key}") + 1] if f"--{key}" in cmd else None

    # plain modes: no normalisation, the base store; the variant's bundle override only on its own jobs
    assert arg("on_seed0", "profile_norm") is None and arg("on_seed0", "use_difficulty_gate") is None
    assert arg("on.cal+nogate_seed0", "use_difficulty_gate") == "False"
    assert arg("oracle.lr_seed0", "learning_rate") == "0.01" and arg("oracle.lr_seed0", "profiler") == "oracle"
    assert arg("on.norm_seed0", "profile_cache_dir") == arg("on_seed0", "profile_cache_dir")
    # calibration=train: its own store (and shuffled store) and a profiler spec naming the calibration file
    assert arg("on.cal+nogate_seed0", "profile_cache_dir").endswith("profiles/heuristic-cal-train")
    assert arg("shuffle.cal+nogate_seed0", "profile_cache_dir").endswith("profiles/shuffle-cal-train")
    spec = arg("on.cal+nogate_seed0", "profiler")
    assert "HeuristicProfiler" in spec and "heuristic_calibration_train.json" in spec
    on_store, cal_store = ab.sources.of("on"), ab.sources.of("on.cal+nogate")
    train = json.loads(splits[0][1].read_text())["training"]
    v_on = D.profile_vectors(on_store.dir, train, on_store.profiler)
    v_cal = D.profile_vectors(cal_store.dir, train, cal_store.profiler)
    assert not np.allclose(v_on, v_cal)  # another calibration gives other profiles
    # profile_norm=train: the statistics of the job's own store over the training images
    mean, std = load_profile_norm(arg("on.norm_seed0", "profile_norm"))
    np.testing.assert_allclose(mean[:6], v_on.mean(0)[:6], atol=1e-5)
    np.testing.assert_allclose(std[:6], np.maximum(v_on.std(0), 0.02)[:6], atol=1e-5)
    assert (mean[6], std[6]) == (0.0, 1.0)  # the fallback flag is left as it is
    assert arg("shuffle.norm_seed0", "profile_norm") != arg("on.norm_seed0", "profile_norm")


def test_variant_specs_are_checked():
    from monai_vlmfilm.ablation.cli import parse_args, parse_variant

    assert parse_variant("coarse:network_def#film_stages=[0, 1]") == ("coarse", {"network_def#film_stages": "[0, 1]"})
    assert parse_variant("a@on+oracle:b=1") == ("a@on+oracle", {"b": "1"})
    for bad in (
        "nocolon",
        ":a=1",
        "x y:a=1",
        "v:",
        "v:novalue",
        "v:calibration=dca1",
        "v:profile_norm=zscore",
        "@on:a=1",
    ):
        with pytest.raises(ValueError):
            parse_variant(bad)
    base = ["--datalist", "d.json", "--out", "o"]
    for extra in (["--variant", "a:b=1", "--variant", "a:c=2"], ["--variant", "a:b=1", "--variant-modes", "sideways"],
                  ["--modes", "off", "--variant", "a:b=1"], ["--variant", "a@sideways:b=1"],
                  ["--modes", "off,on", "--variant", "a@oracle:b=1"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args(base + extra)


def test_bundle_root_from_the_option_or_the_working_directory(tmp_path, monkeypatch):
    """Installed from a wheel the package holds no bundle: --bundle-root names it, else ./bundle, else a clear error."""
    from pathlib import Path

    from monai_vlmfilm.ablation.cli import bundle_root_of

    repo_bundle = Path(__file__).resolve().parents[1] / "bundle"
    assert bundle_root_of(str(repo_bundle)) == repo_bundle
    monkeypatch.chdir(repo_bundle.parent)
    assert bundle_root_of(None) == repo_bundle
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no ./bundle here.*--bundle-root"):
        bundle_root_of(None)
    with pytest.raises(ValueError, match="not a MONAI bundle folder"):
        bundle_root_of(str(tmp_path))
