"""Ablation data helpers: derangement, shuffled profile cache (keys as the transform looks them up), folds, CSVs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from monai_vlmfilm.ablation import data as D
from monai_vlmfilm.ablation.cli import metric_name, parse_metric_csvs
from monai_vlmfilm.data.synthetic import generate_dataset
from monai_vlmfilm.profiles.heuristic import HeuristicProfiler
from monai_vlmfilm.profiles.oracle import OracleProfiler
from monai_vlmfilm.profiles.store import ProfileStore


@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_derangement_has_no_fixed_point_and_is_seeded(n):
    for seed in range(20):
        p = D.seeded_derangement(n, seed)
        assert sorted(p.tolist()) == list(range(n))
        assert not np.any(p == np.arange(n))
    assert np.array_equal(D.seeded_derangement(n, 5), D.seeded_derangement(n, 5))
    if n > 3:
        assert any(not np.array_equal(D.seeded_derangement(n, 0), D.seeded_derangement(n, s)) for s in range(1, 5))
    with pytest.raises(ValueError):
        D.seeded_derangement(1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth"), n_train=6, n_val=2, n_test=3, size=32, seed=0)


def test_datalist_loading_and_errors(synth, tmp_path):
    dl = D.load_datalist(synth)
    assert Path(dl["training"][0]["image"]).is_absolute() and Path(dl["training"][0]["image"]).is_file()
    assert D.has_factors(D.unique_images(dl))
    assert D.eval_split_of(dl) == "test"
    assert D.eval_split_of(dl, "validation") == "validation"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": [{"image": "nope.png", "label": "nope.png"}]}))
    with pytest.raises(ValueError, match="nope.png"):
        D.load_datalist(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        D.load_datalist(bad)


def test_folds_partition_the_pool():
    items = [{"image": f"i{i}"} for i in range(23)]
    folds = D.make_folds(items, 5, seed=0)
    assert [len(f) for f in folds] == [5, 5, 5, 4, 4]
    assert sorted(it["image"] for f in folds for it in f) == sorted(it["image"] for it in items)
    assert [it["image"] for it in D.make_folds(items, 5, seed=0)[2]] == [it["image"] for it in folds[2]]
    with pytest.raises(ValueError):
        D.make_folds(items[:3], 5)


def test_shuffled_cache_is_a_derangement_seen_through_the_transform(synth, tmp_path):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from monai_vlmfilm.transforms import AttachVLMProfiled

    dl = D.load_datalist(synth)
    items = D.unique_images(dl)
    prof = HeuristicProfiler()
    src, dst = tmp_path / "heuristic", tmp_path / "shuffle"
    true = D.prepare_profile_cache(src, items, prof)
    mapping = D.build_shuffled_cache(src, dst, items, prof, seed=3)
    assert set(mapping) == {it["image"] for it in items}
    assert all(mapping[k] != k for k in mapping)

    # what training sees: LoadImaged (PIL reader transposes) then the transform reading the shuffle store, which
    # must never compute (on_missing="error"): every key the transform builds must be in the shuffled store
    tf = Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            AttachVLMProfiled(keys="image", store=str(dst), profiler="heuristic", on_missing="error"),
        ]
    )
    seen = [np.asarray(tf({"image": it["image"]})["vlm_profile"], dtype=np.float32) for it in items]
    true_vecs = [p.to_vector() for p in true]
    # same multiset of profile vectors
    assert Counter(tuple(np.round(v, 6)) for v in seen) == Counter(tuple(np.round(v, 6)) for v in true_vecs)
    # each image now holds exactly its donor's profile, and (images being distinct) not its own
    index = {it["image"]: i for i, it in enumerate(items)}
    for it, v in zip(items, seen):
        np.testing.assert_allclose(v, true_vecs[index[mapping[it["image"]]]], rtol=0, atol=1e-7)
    n_own = sum(np.allclose(v, t) for v, t in zip(seen, true_vecs))
    assert n_own <= 1  # an own-profile match can only come from two images with equal profiles
    # the store is a plain ProfileStore under the heuristic fingerprint: readable by the profile_vectors helper
    np.testing.assert_allclose(D.profile_vectors(dst, items, prof), np.stack(seen), atol=1e-7)
    assert len(ProfileStore(dst)) == len(items)


def test_oracle_cache_and_missing_profiles(synth, tmp_path):
    dl = D.load_datalist(synth)
    items = D.unique_images(dl)
    oracle = OracleProfiler(datalist=str(synth))
    profs = D.prepare_profile_cache(tmp_path / "oracle", items, oracle)
    assert [p.difficulty for p in profs] == pytest.approx([it["factors"]["difficulty"] for it in items])
    with pytest.raises(ValueError, match="no heuristic profile"):
        D.profile_vectors(tmp_path / "empty", items, HeuristicProfiler())


def test_metric_csv_parsing(tmp_path):
    assert metric_name("test_mean_dice") == "dice"
    assert metric_name("val_cldice") == "cldice"
    assert metric_name("betti0_error") == "betti0_error"
    assert metric_name("Betti_1_err") == "betti1_error"
    assert metric_name("hd95") == "hd95" and metric_name("hausdorff_distance") == "hd95"
    assert metric_name("loss") is None
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mean_dice_raw.csv").write_text("filename,class0,mean\n/a/x.png,0.5,0.5\n/a/y.png,0.7,0.7\n")
    (tmp_path / "sub" / "hd95_raw.csv").write_text("filename,class0,mean\n/a/x.png,inf,inf\n/a/y.png,3.0,3.0\n")
    out = parse_metric_csvs(tmp_path)
    assert out["/a/x.png"]["dice"] == 0.5 and out["/a/y.png"]["hd95"] == 3.0
    assert np.isinf(out["/a/x.png"]["hd95"])
    with pytest.raises(ValueError, match="no per-image metric CSV"):
        parse_metric_csvs(tmp_path / "sub" / "none")


# ------------------------------------------------------------------------------------------------ several sites


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny synthetic "sites" (different seeds, so no image is shared), each in a folder named after it."""
    root = tmp_path_factory.mktemp("sites")
    a = generate_dataset(root / "siteA", n_train=5, n_val=2, n_test=2, size=32, seed=10)
    b = generate_dataset(root / "siteB", n_train=3, n_val=1, n_test=2, size=32, seed=11)
    return a, b


def test_site_specs_name_the_site(tmp_path):
    name, path = D.parse_site_spec(str(tmp_path / "xcad" / "datalist.json"))
    assert (name, path) == ("xcad", (tmp_path / "xcad" / "datalist.json").resolve())
    assert D.parse_site_spec(f"dca1={tmp_path / 'x' / 'd.json'}")[0] == "dca1"
    # a '=' inside the path is not a name separator; a folder name that is no site name asks for NAME=PATH
    odd = tmp_path / "a=b" / "d.json"
    with pytest.raises(ValueError, match="NAME=PATH"):
        D.parse_site_spec(str(odd))
    assert D.parse_site_spec(f"s1={odd}") == ("s1", odd.resolve())
    with pytest.raises(ValueError, match="names no file"):
        D.parse_site_spec("s1=")


def test_sites_load_tag_and_refuse_duplicates(two_sites, tmp_path):
    a, b = two_sites
    sites = D.load_sites([str(a), f"other={b}"])
    assert [s.name for s in sites] == ["siteA", "other"] and sites[0].path == a.resolve()
    assert "site" not in sites[0].datalist["training"][0]  # the loaded datalist is left as it is
    tagged = D.tag_site(sites[0].datalist, "siteA")
    assert {it["site"] for it in D.unique_images(tagged)} == {"siteA"}
    assert tagged["description"] == sites[0].datalist["description"]
    merged = D.merge_datalists([tagged, D.tag_site(sites[1].datalist, "other")])
    assert len(merged["training"]) == 5 + 3 and len(merged["test"]) == 2 + 2
    assert len(D.training_pool(tagged)) == 5 + 2

    # the same file twice, two sites with one name, one image in two datalists: each names both files
    with pytest.raises(ValueError, match="same datalist is given twice"):
        D.load_sites([str(a), str(a)])
    twin = tmp_path / "x" / "siteA" / "datalist.json"
    twin.parent.mkdir(parents=True)
    twin.write_text(json.dumps(D.load_datalist(b)))
    with pytest.raises(ValueError, match=r"site name 'siteA' is given twice.*x/siteA/datalist.json"):
        D.load_sites([str(a), str(twin)])
    copy = tmp_path / "copy" / "datalist.json"
    copy.parent.mkdir()
    copy.write_text(json.dumps(D.load_datalist(a)))  # absolute paths: the same images as site A
    with pytest.raises(ValueError, match=r"is in two datalists: .*siteA/datalist.json.*copy/datalist.json"):
        D.load_sites([str(a), str(copy)])
    # also against sites read before (a cross-site test datalist may not hold training images)
    with pytest.raises(ValueError, match="is in two datalists"):
        D.load_sites([str(copy)], taken=D.load_sites([str(a)]))


def test_site_folds_are_stratified_and_deterministic():
    pools = {"a": [{"image": f"a{i}", "site": "a"} for i in range(13)], "b": [{"image": f"b{i}"} for i in range(7)]}
    folds = D.make_site_folds(pools, 3, seed=4)
    # every item held out exactly once
    held = [it["image"] for f in folds for it in f]
    assert sorted(held) == sorted(it["image"] for p in pools.values() for it in p)
    # each fold holds each site's share: the site's own folds, sizes within one
    for site, items in pools.items():
        own = D.make_folds(items, 3, seed=4)
        for f, part in zip(folds, own):
            assert [it["image"] for it in f if it["image"][0] == site] == [it["image"] for it in part]
    assert [sum(it["image"][0] == "a" for it in f) for f in folds] == [5, 4, 4]
    assert [sum(it["image"][0] == "b" for it in f) for f in folds] == [3, 2, 2]
    assert D.make_site_folds(pools, 3, seed=4) == folds
    assert D.make_site_folds(pools, 3, seed=5) != folds
    with pytest.raises(ValueError, match="site 'b': cannot make 8 folds of 7 items"):
        D.make_site_folds(pools, 8)


def test_within_site_shuffle_keeps_each_donor_in_its_site(two_sites, tmp_path):
    a, b = two_sites
    items = [it for s in D.load_sites([str(a), str(b)]) for it in D.unique_images(D.tag_site(s.datalist, s.name))]
    groups = {it["image"]: it["site"] for it in items}
    prof = HeuristicProfiler()
    true = np.stack([p.to_vector() for p in D.prepare_profile_cache(tmp_path / "heuristic", items, prof)])
    mapping = D.build_shuffled_cache(tmp_path / "heuristic", tmp_path / "in", items, prof, seed=1, groups=groups)
    assert all(groups[donor] == groups[img] and donor != img for img, donor in mapping.items())
    # each site keeps its own multiset of profiles
    shuffled = D.profile_vectors(tmp_path / "in", items, prof)
    for site in ("siteA", "siteB"):
        sel = [i for i, it in enumerate(items) if it["site"] == site]
        assert sorted(map(tuple, np.round(shuffled[sel], 6))) == sorted(map(tuple, np.round(true[sel], 6)))
    again = D.build_shuffled_cache(tmp_path / "heuristic", tmp_path / "in2", items, prof, seed=1, groups=groups)
    assert again == mapping
    # without groups donors cross sites; a site of one image cannot be shuffled within itself
    across = D.build_shuffled_cache(tmp_path / "heuristic", tmp_path / "across", items, prof, seed=1)
    assert any(groups[d] != groups[i] for i, d in across.items())
    lone = {**groups, items[-1]["image"]: "alone"}
    with pytest.raises(ValueError, match="group 'alone'.*at least 2"):
        D.build_shuffled_cache(tmp_path / "heuristic", tmp_path / "x", items, prof, seed=1, groups=lone)
