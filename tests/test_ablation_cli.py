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
            "--variant", "cal+nogate:calibration=train;network_def#use_difficulty_gate=False",
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

    # plain modes: no normalisation, said outright since the bundle's default normalises by the training split; the
    # base store; the variant's bundle override only on its own jobs
    assert arg("on_seed0", "profile_norm") == "none" and arg("on_seed0", "network_def#use_difficulty_gate") is None
    assert arg("on.cal+nogate_seed0", "network_def#use_difficulty_gate") == "False"
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


def test_override_and_variant_keys_must_exist_in_the_bundle(tmp_path, capsys):
    """A key the bundle does not define would be added unused (MONAI's ConfigParser accepts any id): the jobs would
    run unchanged and the "variant" would report noise as a finding. Such keys are refused before anything is written,
    naming the key and the config id it probably meant; a new argument of a component is allowed."""
    from monai_vlmfilm.ablation.cli import main

    datalist = generate_dataset(tmp_path / "data", n_train=3, n_val=1, n_test=1, size=32, seed=3)
    out = tmp_path / "abl"
    base = ["--datalist", str(datalist), "--out", str(out), "--modes", "off,on", "--seeds", "0", "--gpus", "cpu"]
    assert main([*base, "--variant", "nogate:use_difficulty_gate=False"]) == 2
    err = capsys.readouterr().err
    assert "--variant nogate" in err and "'use_difficulty_gate'" in err and "'network_def#use_difficulty_gate'" in err
    assert main([*base, "--override", "learning_rat=0.01"]) == 2
    assert "--override" in capsys.readouterr().err
    assert main([*base, "--override", "train#no_such_section=1"]) == 2  # "train" is a plain section: never read
    assert not out.exists()
    # existing keys, and a new constructor argument of a component (film_stages of FiLMFlowUNet), are accepted
    from monai_vlmfilm.ablation.cli import Ablation, parse_args

    argv = [
        *base,
        "--override",
        "network_def#use_difficulty_gate=False",
        "--variant",
        "coarse:network_def#film_stages=[0]",
    ]
    Ablation(parse_args(argv), argv)


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
                  ["--modes", "off,on", "--variant", "a@oracle:b=1"],
                  ["--modes", "off,on", "--compare", "on.x:on"], ["--modes", "off,on", "--compare", "on"],
                  ["--modes", "off,on", "--compare", "on:on"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args(base + extra)
    ok = parse_args(base + ["--modes", "off,on", "--variant", "x@on:b=1", "--compare", "on.x:on"])
    assert ok.compare_pairs == [["on.x", "on"]]


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


# ------------------------------------------------------------------------------------------------ several sites


@pytest.fixture()
def two_sites(tmp_path):
    """Two tiny synthetic "sites" (different seeds: no shared image), each in a folder named after it."""
    a = generate_dataset(tmp_path / "siteA", n_train=5, n_val=2, n_test=2, size=32, seed=20)
    b = generate_dataset(tmp_path / "siteB", n_train=3, n_val=1, n_test=2, size=32, seed=21)
    return a, b


def _ablation(tmp_path, *argv: str):
    from monai_vlmfilm.ablation.cli import Ablation, parse_args

    args = ["--out", str(tmp_path / "abl"), "--seeds", "0", *argv]
    return Ablation(parse_args(args), args)


def _images(items) -> list[str]:
    return sorted(it["image"] for it in items)


def test_mixed_sites_with_folds_stratify_by_site_and_tag_every_item(tmp_path, two_sites):
    from monai_vlmfilm.ablation import data as D

    a, b = two_sites
    ab = _ablation(tmp_path, "--datalist", str(a), "--datalist", str(b), "--folds", "3", "--modes", "off,on,shuffle")
    assert ab.setting == "mixed-site" and [s.name for s in ab.sites] == ["siteA", "siteB"]
    pools = {s.name: D.training_pool(s.datalist) for s in ab.sites}
    splits = ab.splits()
    assert [f for f, _, _ in splits] == [0, 1, 2]
    # every training+validation item of both sites is evaluated exactly once, with its site
    held = [it for _, _, ev in splits for it in ev]
    assert _images(held) == _images(pools["siteA"] + pools["siteB"])
    assert all(it["site"] == ("siteA" if it["image"].startswith(str(a.parent)) else "siteB") for it in held)
    # each fold holds out each site's share (7 -> 3/2/2, 4 -> 2/1/1) and trains on the rest of both sites
    assert [[sum(it["site"] == s for it in ev) for s in ("siteA", "siteB")] for _, _, ev in splits] == [
        [3, 2],
        [2, 1],
        [2, 1],
    ]
    for _, path, ev in splits:
        doc = json.loads(path.read_text())
        assert _images(doc["training"]) == sorted(set(_images(held)) - set(_images(ev)))
        assert doc["test"] == doc["validation"] == json.loads(json.dumps(ev))
        assert {it["site"] for it in doc["training"]} == {"siteA", "siteB"}
    assert [_images(ev) for _, _, ev in ab.splits()] == [_images(ev) for _, _, ev in splits]  # deterministic
    # the profile stores cover both sites; shuffle permutes within each site by default, in its own store
    assert _images(json.loads((tmp_path / "abl" / "datalists" / "sites.json").read_text())["training"]) == _images(
        ab.datalist["training"]
    )
    ab.prepare_profiles()
    assert ab.shuffle_within_site and ab.sources.of("shuffle").dir.name == "shuffle-in-site"
    cmd = next(j for j in ab.make_jobs(splits) if j.name == "shuffle_seed0_fold1").steps[0].cmd
    assert cmd[cmd.index("--profile_cache_dir") + 1].endswith("profiles/shuffle-in-site")
    store, shuffled = ab.sources.of("on"), ab.sources.of("shuffle")
    for site in ("siteA", "siteB"):  # the donors: any image of the same site (its test split included)
        items = [it for it in D.unique_images(ab.datalist) if it["site"] == site]
        true = {tuple(v) for v in D.profile_vectors(store.dir, items, store.profiler).round(6)}
        assert {tuple(v) for v in D.profile_vectors(shuffled.dir, items, store.profiler).round(6)} == true
    across = _ablation(tmp_path, "--datalist", str(a), "--datalist", str(b), "--folds", "3", "--modes", "off,shuffle",
                       "--no-shuffle-within-site")  # fmt: skip
    across.prepare_profiles()
    assert not across.shuffle_within_site and across.sources.of("shuffle").dir.name == "shuffle"


def test_mixed_sites_without_folds_pool_the_sites_splits(tmp_path, two_sites):
    a, b = two_sites
    ab = _ablation(tmp_path, "--datalist", f"A={a}", "--datalist", f"B={b}", "--modes", "off,on")
    ((fold, path, ev),) = ab.splits()
    doc = json.loads(path.read_text())
    dla, dlb = (ab.site_datalists[n] for n in ("A", "B"))
    assert fold is None and ab.eval_split == "test" and ab.eval_splits == {"A": "test", "B": "test"}
    assert _images(ev) == _images(dla["test"] + dlb["test"]) and [it["site"] for it in ev] == ["A"] * 2 + ["B"] * 2
    assert _images(doc["training"]) == _images(dla["training"] + dlb["training"])
    ab = _ablation(tmp_path, "--datalist", f"A={a}", "--datalist", f"B={b}", "--eval-split", "validation")
    assert _images(ab.splits()[0][2]) == _images(
        ab.site_datalists["A"]["validation"] + ab.site_datalists["B"]["validation"]
    )


def test_cross_site_trains_on_every_item_of_one_site_and_tests_on_every_item_of_the_other(tmp_path, two_sites):
    from monai_vlmfilm.ablation import data as D

    a, b = two_sites
    ab = _ablation(tmp_path, "--datalist", str(a), "--test-datalist", str(b), "--modes", "off,on,shuffle")
    assert ab.setting == "cross-site" and ab.test_site.name == "siteB"
    ((fold, path, ev),) = ab.splits()
    doc = json.loads(path.read_text())
    site_a, site_b = D.load_datalist(a), D.load_datalist(b)
    assert fold is None and path.name == "cross_site.json"
    assert _images(doc["training"]) == _images(site_a["training"] + site_a["validation"])  # not its test split
    assert _images(ev) == _images(D.unique_images(site_b)) and len(ev) == 3 + 1 + 2
    assert {it["site"] for it in doc["training"]} == {"siteA"} and {it["site"] for it in ev} == {"siteB"}
    assert "siteB" in ab.eval_split and ab.shuffle_within_site
    ab.prepare_profiles()  # the stores hold the test images too
    D.profile_vectors(ab.sources.of("shuffle").dir, ev, ab.sources.of("on").profiler)


def _write_results(ab, jobs, gain: dict[str, float]) -> list:
    """Each job's result.json as the collect step writes it (training skipped): Dice 0.6 off / shuffle, 0.6 + the
    site's gain on; then the outcomes of a rerun that found every job done."""
    from monai_vlmfilm.ablation.jobs import JobOutcome

    outcomes = []
    for j in jobs:
        mode = j.info["mode"]
        recs = []
        for i, it in enumerate(j.info["eval_items"]):
            dice = 0.6 + 0.001 * i + (gain.get(it.get("site"), 0.0) if mode == "on" else 0.0)
            recs.append({"mode": mode, "seed": j.info["seed"], "fold": j.info["fold"], "image": it["image"],
                         "difficulty": ab.difficulty[it["image"]], "dice": dice, "betti1_error": 1.0})  # fmt: skip
        doc = {"mode": mode, "seed": j.info["seed"], "fold": j.info["fold"], "records": recs, "film": None}
        (j.workdir / "result.json").write_text(json.dumps(doc))
        outcomes.append(JobOutcome(j, "skipped", 0.0))
    return outcomes


def test_mixed_site_report_gives_results_per_site(tmp_path, two_sites):
    from monai_vlmfilm.ablation.report import write_report

    a, b = two_sites
    ab = _ablation(tmp_path, "--datalist", str(a), "--datalist", str(b), "--folds", "2", "--modes", "off,on,shuffle")
    ab.split_list = ab.splits()
    ab.prepare_profiles()
    ab.prepare_difficulty()
    outcomes = _write_results(ab, ab.make_jobs(ab.split_list), {"siteA": 0.05, "siteB": 0.0})
    res = ab.results(outcomes, 1.0, "CPU")
    assert res["setting"] == "mixed-site" and res["sites"] == {"siteA": str(a.resolve()), "siteB": str(b.resolve())}
    assert res["shuffle_within_site"] is True and "test_site" not in res
    assert {r["site"] for r in res["records"] if r["image"].startswith(str(a.parent))} == {"siteA"}
    report = write_report(res, tmp_path / "abl", n_boot=200).read_text()
    saved = json.loads((tmp_path / "abl" / "results.json").read_text())
    by_site = saved["analysis"]["sites"]
    assert set(by_site) == {"siteA", "siteB"}
    # each site's own images: 7 and 4, with its own gain (the pooled one is their weighted mean)
    on_a, on_b = (by_site[s]["paired"]["on"]["overall"]["dice"] for s in ("siteA", "siteB"))
    assert (on_a["n"], on_b["n"]) == (7, 4)
    assert on_a["mean"] == pytest.approx(0.05) and on_b["mean"] == pytest.approx(0.0, abs=1e-12)
    assert saved["analysis"]["paired"]["on"]["overall"]["dice"]["mean"] == pytest.approx(0.05 * 7 / 11)
    assert by_site["siteA"]["paired"]["on-vs-shuffle"]["overall"]["dice"]["mean"] == pytest.approx(0.05)
    assert by_site["siteB"]["summary"]["off"]["dice"]["n_images"] == 4
    assert "# FiLM conditioning ablation — mixed-site, siteA + siteB" in report
    assert "setting: **mixed-site** training on 2 sites (siteA, siteB); folds stratified by site" in report
    assert "permutes profiles within each site" in report
    assert "## Per site" in report and "### Site `siteA`" in report and "### Site `siteB`" in report
    site_a = report[report.index("### Site `siteA`") : report.index("### Site `siteB`")]
    assert "| on − off | 7 | +5.00 pt" in site_a and "| on − shuffle | 7 | +5.00 pt" in site_a
    assert "| off | " in site_a


def test_cross_site_report_names_the_setting_and_its_sites(tmp_path, two_sites):
    from monai_vlmfilm.ablation.report import write_report

    a, b = two_sites
    ab = _ablation(tmp_path, "--datalist", str(a), "--test-datalist", f"far={b}", "--modes", "off,on")
    ab.split_list = ab.splits()
    ab.prepare_profiles()
    ab.prepare_difficulty()
    res = ab.results(_write_results(ab, ab.make_jobs(ab.split_list), {"far": 0.02}), 1.0, "CPU")
    assert res["setting"] == "cross-site" and res["test_site"] == {"far": str(b.resolve())}
    assert {r["site"] for r in res["records"]} == {"far"} and len(res["records"]) == 2 * 6
    report = write_report(res, tmp_path / "abl", n_boot=200).read_text()
    assert "# FiLM conditioning ablation — cross-site, siteA → far" in report
    assert "setting: **cross-site** — trained on siteA (every training+validation item), evaluated on far" in report
    assert "## Per site" not in report  # one evaluated site: the pooled tables are its tables
    assert "permutes profiles" not in report  # no shuffle mode ran


def test_one_datalist_runs_as_before(tmp_path, two_sites):
    """A single --datalist: no site tags in the written datalists or records, no site keys in results.json, the
    across-image shuffle store; the same folds as before sites existed."""
    from monai_vlmfilm.ablation import data as D

    a, _ = two_sites
    ab = _ablation(tmp_path, "--datalist", str(a), "--folds", "2", "--modes", "off,on,shuffle")
    ab.split_list = ab.splits()
    assert ab.setting == "single" and not ab.site_of and not (tmp_path / "abl" / "datalists" / "sites.json").exists()
    pool = D.training_pool(D.load_datalist(a))
    assert [ev for _, _, ev in ab.split_list] == D.make_folds(pool, 2, 0)
    assert all("site" not in it for it in json.loads(ab.split_list[0][1].read_text())["training"])
    ab.prepare_profiles()
    ab.prepare_difficulty()
    assert ab.sources.of("shuffle").dir.name == "shuffle"
    res = ab.results(_write_results(ab, ab.make_jobs(ab.split_list), {}), 1.0, "CPU")
    assert not {"setting", "sites", "test_site", "shuffle_within_site"} & set(res)
    assert all("site" not in r for r in res["records"]) and res["datalist"] == str(a.resolve())


def test_site_settings_report_bad_input_clearly(tmp_path, two_sites, capsys):
    from monai_vlmfilm.ablation.cli import main

    a, b = two_sites
    out = ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main(["--datalist", str(a), "--test-datalist", str(b), "--folds", "2", *out])
    assert e.value.code == 2 and "--test-datalist" in (err := capsys.readouterr().err) and "--folds" in err
    with pytest.raises(SystemExit):
        main(["--datalist", str(a), "--test-datalist", str(b), "--eval-split", "test", *out])
    assert "--eval-split" in capsys.readouterr().err
    # the test datalist holds a training image; two datalists under one site name; a site too small for the folds
    assert main(["--datalist", str(a), "--test-datalist", f"again={a}", *out]) == 2
    err = capsys.readouterr().err
    assert "is in two datalists" in err and str(a.resolve()) in err
    assert main(["--datalist", str(a), "--datalist", f"siteA={b}", *out]) == 2
    assert "site name 'siteA' is given twice" in capsys.readouterr().err
    assert main(["--datalist", str(a), "--datalist", str(b), "--folds", "5", *out]) == 2
    assert "site 'siteB': cannot make 5 folds of 4 items" in capsys.readouterr().err
    # a mode the sites cannot run names the datalists, before anything is written
    from monai_vlmfilm.ablation import data as D

    real = tmp_path / "real" / "datalist.json"
    real.parent.mkdir()
    items = [{k: v for k, v in it.items() if k != "factors"} for it in D.load_datalist(b)["training"]]
    real.write_text(json.dumps({"training": items}))  # absolute paths to site B's images, without factors
    fresh = ["--out", str(tmp_path / "fresh")]
    assert main(["--datalist", str(a), "--test-datalist", str(real), "--modes", "off,oracle", *fresh]) == 2
    err = capsys.readouterr().err
    assert "oracle" in err and "real/datalist.json" in err and "siteA" not in err
    assert not (tmp_path / "fresh").exists()
