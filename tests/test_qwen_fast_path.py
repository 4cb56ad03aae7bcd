"""QwenVLProfiler's scored-mode fast path (own forward, prefix KV cache, compile) equals the stock ``model(**inputs)``.

All on the tiny random Qwen2.5-VL in float32 on the CPU, where the paths agree to ~1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_vlmfilm.profiles.qwen import QwenVLProfiler


def _images() -> list[np.ndarray]:
    """Images of several sizes (different numbers of image tokens, so padding inside a batch) and contents."""
    rng = np.random.default_rng(11)
    out = []
    for shape in [(64, 64), (64, 64), (80, 120), (70, 50), (300, 200), (64, 64), (33, 47), (128, 96)]:
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        img = 30 + 120 * rng.random(shape) + 60 * np.sin(xx / (2 + rng.random() * 6)) * np.cos(yy / 5)
        out.append(np.clip(img, 0, 255).astype(np.float32))
    return out


def _vectors(prof: QwenVLProfiler, images: list[np.ndarray]) -> np.ndarray:
    return np.stack([p.to_vector() for p in prof.profile(images)])


@pytest.fixture(scope="module")
def stock(tiny_qwen_dir):
    return QwenVLProfiler(tiny_qwen_dir, mode="scored", batch_size=8, fast_forward=False).load()


@pytest.fixture(scope="module")
def fast(tiny_qwen_dir):
    return QwenVLProfiler(tiny_qwen_dir, mode="scored", batch_size=8, prefix_cache=True).load()


def test_fast_path_is_the_default_and_passed_its_load_check(fast, tiny_qwen_dir):
    default = QwenVLProfiler(tiny_qwen_dir, mode="scored")
    assert default.fast_forward and not default.prefix_cache  # the cache is opt-in: it did not pay on the GPU
    assert fast.fast_forward and fast.prefix_cache
    chk = fast.fast_path_check
    assert chk["fast_forward_max_abs_diff"] <= 1e-5 and chk["prefix_cache_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_fast_path_and_prefix_cache_equal_the_stock_forward(tiny_qwen_dir, stock, fast, batch_size):
    imgs = _images()
    ref = _vectors(stock, imgs)
    no_prefix = QwenVLProfiler(tiny_qwen_dir, mode="scored", batch_size=batch_size, prefix_cache=False).load()
    assert no_prefix.fast_forward and not no_prefix.prefix_cache
    fast.batch_size = batch_size
    try:
        got = _vectors(fast, imgs)
    finally:
        fast.batch_size = 8
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(_vectors(no_prefix, imgs), ref, atol=1e-5)
    assert np.ptp(ref[:, :6], axis=0).max() > 1e-3  # the images do give different profiles


def test_allowed_mass_statistic_unchanged(tiny_qwen_dir, stock, fast):
    imgs = _images()[:4]
    for p in (stock, fast):
        p.stats["allowed_mass_sum"] = 0.0
        p.profile(imgs)
    assert fast.stats["allowed_mass_sum"] == pytest.approx(stock.stats["allowed_mass_sum"], rel=1e-5)


def test_host_positions_equal_get_rope_index(fast):
    """The mrope layout computed on the host equals transformers' ``get_rope_index`` (also with left padding)."""
    model = fast.model.model
    after = fast._suffix_ids + fast._skeleton_ids
    grids = [[1, 4, 4], [1, 6, 10], [1, 12, 8], [1, 20, 14]]
    rows = [fast._prefix_ids + [fast.image_token_id] * (t * h * w // 4) + after for t, h, w in grids]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), fast.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r)
        mask[i, length - len(r) :] = 1
    ref, _ = model.get_rope_index(
        ids,
        mm_token_type_ids=(ids == fast.image_token_id).int(),
        image_grid_thw=torch.tensor(grids),
        attention_mask=mask,
    )
    for i, (r, g) in enumerate(zip(rows, grids)):
        mine = fast._row_positions(len(fast._prefix_ids), g, len(after))
        np.testing.assert_array_equal(mine, ref[:, i, length - len(r) :].numpy())


def test_prefix_kv_is_computed_once_and_never_modified(fast):
    imgs = _images()[:3]
    fast.profile(imgs)
    kv = fast._prefix_kv
    assert kv is not None and all(k.shape[0] == 1 and k.shape[2] == len(fast._prefix_ids) for k, _ in kv)
    before = [(k.clone(), v.clone()) for k, v in kv]
    fast.profile(imgs)
    assert fast._prefix_kv is kv
    for (k0, v0), (k1, v1) in zip(before, kv):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_a_wrong_fast_path_is_caught_at_load_time(tiny_qwen_dir, monkeypatch):
    """The load-time check compares against the stock forward: wrong positions switch the fast path off.

    (A uniform shift would not do: rotary attention only sees position differences. Swapping the height and width
    axes changes every non-square image.)
    """
    real = QwenVLProfiler._row_positions
    monkeypatch.setattr(QwenVLProfiler, "_row_positions", lambda self, *a: real(self, *a)[[0, 2, 1]])
    p = QwenVLProfiler(tiny_qwen_dir, mode="scored", batch_size=4).load()
    assert not p.fast_forward and p.fast_path_check["fast_forward_max_abs_diff"] > 1e-3
    monkeypatch.undo()
    # and the stock path it fell back to still gives the stock profiles
    stock_vals = _vectors(QwenVLProfiler(tiny_qwen_dir, batch_size=4, fast_forward=False).load(), _images()[:3])
    np.testing.assert_allclose(_vectors(p, _images()[:3]), stock_vals, atol=1e-6)


def test_prompt_before_image(tiny_qwen_dir, fast):
    before = QwenVLProfiler(tiny_qwen_dir, mode="scored", batch_size=8, prompt_position="before").load()
    before_stock = QwenVLProfiler(
        tiny_qwen_dir, mode="scored", batch_size=8, prompt_position="before", fast_forward=False
    ).load()
    # the prompt is in the shared prefix now, the text after the image is only the template's closing tokens
    assert len(before._prefix_ids) > len(fast._prefix_ids) + 50
    assert len(before._suffix_ids) < 10
    imgs = _images()
    ref = _vectors(before_stock, imgs)
    np.testing.assert_allclose(_vectors(before, imgs), ref, atol=1e-5)
    assert np.abs(ref - _vectors(fast, imgs)).max() > 1e-4  # it is another computation ...
    assert before.fingerprint != fast.fingerprint  # ... so another cache key


def test_fingerprint_ignores_the_equal_result_options(tiny_qwen_dir, fast):
    fp = fast.fingerprint
    assert QwenVLProfiler(tiny_qwen_dir, fast_forward=False, prefix_cache=False).fingerprint == fp
    assert QwenVLProfiler(tiny_qwen_dir, compile="text").fingerprint == fp
    assert QwenVLProfiler(tiny_qwen_dir, prompt_position="after").fingerprint == fp
    assert QwenVLProfiler(tiny_qwen_dir, prompt_position="before").fingerprint != fp
    with pytest.raises(ValueError, match="prompt_position"):
        QwenVLProfiler(tiny_qwen_dir, prompt_position="middle")
    with pytest.raises(ValueError, match="compile"):
        QwenVLProfiler(tiny_qwen_dir, compile="everything")


def test_pickled_copy_drops_the_prefix_cache(fast):
    import pickle

    fast.profile(_images()[:1])
    copy = pickle.loads(pickle.dumps(fast))
    assert copy._prefix_kv is None and copy._vision_aux_cache == {} and not copy.is_loaded


@pytest.mark.slow
def test_compiled_blocks_give_the_same_profiles(tiny_qwen_dir, stock):
    """Regional torch.compile (inductor, CPU here) of the decoder layers and vision blocks: same profiles."""
    pytest.importorskip("torch._inductor")
    comp = QwenVLProfiler(tiny_qwen_dir, mode="scored", batch_size=8, compile="all").load()
    imgs = _images()[:5]
    np.testing.assert_allclose(_vectors(comp, imgs), _vectors(stock, imgs), atol=1e-4)
