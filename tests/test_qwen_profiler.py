"""QwenVLProfiler on a tiny random Qwen2.5-VL built offline and loaded with ``from_pretrained``."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from monai_vlmfilm.profiles.qwen import SCHEMA_TEXT, QwenVLProfiler, load_prompt_template, to_uint8
from monai_vlmfilm.profiles.schema import FOCUS_KEYS, VLMProfile


def _images(n: int, seed: int = 0, shape=(64, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        img = 40 + 150 * rng.random(shape) * (i % 3 == 0) + 60 * np.sin(xx / (3 + i)) * np.cos(yy / (5 + 2 * i))
        out.append(np.clip(img, 0, 255).astype(np.float32))
    return out


def _param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def _in_range(p: VLMProfile) -> bool:
    vals = [p.confidence, *(p.focus[k] for k in FOCUS_KEYS)]
    return 1.0 <= p.difficulty <= 5.0 and all(0.0 <= v <= 1.0 for v in vals) and set(p.focus) == set(FOCUS_KEYS)


@pytest.fixture(scope="module")
def scored(tiny_qwen_dir):
    return QwenVLProfiler(tiny_qwen_dir, mode="scored", batch_size=4).load()


@pytest.fixture(scope="module")
def generate(tiny_qwen_dir):
    return QwenVLProfiler(tiny_qwen_dir, mode="generate", batch_size=8, max_new_tokens=24).load()


def test_lazy_load_and_frozen_model(tiny_qwen_dir):
    p = QwenVLProfiler(tiny_qwen_dir, mode="scored", batch_size=2)
    assert not p.is_loaded and p.model is None and p.heavy
    _ = p.fingerprint  # the fingerprint never loads the model
    assert not p.is_loaded
    p.load()
    before = _param_digest(p.model)
    assert all(not q.requires_grad for q in p.model.parameters())
    assert not p.model.training
    out = p.profile(_images(3))
    assert len(out) == 3 and all(_in_range(o) for o in out)
    assert all(q.grad is None for q in p.model.parameters())
    assert _param_digest(p.model) == before
    # the model class is transformers' own, loaded without remote code
    assert p.load_kwargs["trust_remote_code"] is False
    assert type(p.model).__module__.startswith("transformers.models.qwen2_5_vl.")
    assert p.dtype == torch.float32 and p.model.dtype == torch.float32  # CPU default


def test_device_map_auto_through_accelerate(scored, tiny_qwen_dir):
    p = QwenVLProfiler(tiny_qwen_dir, mode="scored", device_map="auto").load()
    assert p.load_kwargs["device_map"] == "auto"
    imgs = _images(2, seed=4)
    a = np.stack([o.to_vector() for o in p.profile(imgs)])
    np.testing.assert_allclose(a, np.stack([o.to_vector() for o in scored.profile(imgs)]), atol=1e-6)


def test_pickled_copy_is_unloaded_and_equivalent(scored):
    import pickle

    copy = pickle.loads(pickle.dumps(scored))
    assert scored.is_loaded and not copy.is_loaded
    assert copy.fingerprint == scored.fingerprint


def test_remote_code_is_never_executed(tiny_qwen_dir, tmp_path):
    """A checkpoint that asks for remote code (auto_map + a module) gets no code run."""
    folder = tmp_path / "evil"
    shutil.copytree(tiny_qwen_dir, folder)
    sentinel = tmp_path / "executed"
    (folder / "evil_code.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\nclass Evil: pass\n")
    for name, key in (("tokenizer_config.json", "AutoTokenizer"), ("preprocessor_config.json", "AutoImageProcessor")):
        cfg = json.loads((folder / name).read_text())
        cfg["auto_map"] = {key: ["evil_code.Evil", "evil_code.Evil"] if key == "AutoTokenizer" else "evil_code.Evil"}
        (folder / name).write_text(json.dumps(cfg))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "evil_code.Evil", "AutoConfig": "evil_code.Evil"}
    (folder / "config.json").write_text(json.dumps(cfg))
    p = QwenVLProfiler(folder, mode="scored")
    try:
        p.load()
    except (ValueError, OSError):
        pass  # refusing to load is fine too; running the code is not
    assert not sentinel.exists()
    assert "evil_code" not in sys.modules


def test_scored_values_in_range_and_image_dependent(scored):
    imgs = _images(6)
    out = scored.profile(imgs)
    assert len(out) == 6 and all(_in_range(o) and o.source == "qwen2_5_vl" and not o.is_fallback for o in out)
    vecs = np.stack([o.to_vector() for o in out])
    # different images give different profiles (the reference implementation's failure was near-constant ones)
    assert np.ptp(vecs[:, :6], axis=0).max() > 1e-3
    assert len({tuple(np.round(v, 6)) for v in vecs}) == 6
    # deterministic
    again = scored.profile(imgs)
    np.testing.assert_allclose(vecs, np.stack([o.to_vector() for o in again]), atol=1e-6)
    assert 0.0 < scored.stats["allowed_mass_sum"]


def test_scored_batch_equals_one_by_one_with_padding(scored):
    # mixed sizes -> different numbers of image tokens -> left padding inside the batch
    imgs = _images(3) + _images(2, seed=1, shape=(80, 120)) + [np.full((70, 50), 0.5, np.float32)]
    batch = np.stack([o.to_vector() for o in scored.profile(imgs)])
    single = np.stack([scored.profile([im])[0].to_vector() for im in imgs])
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_scored_readout_matches_a_direct_forward(scored):
    """Recompute difficulty and confidence from one plain forward over the chat text + skeleton string."""
    from PIL import Image

    p = scored
    img = _images(1, seed=3)[0]
    prof = p.profile([img])[0]
    u8 = to_uint8(img)
    vis = p.image_processor(images=[Image.fromarray(u8).convert("RGB")], return_tensors="pt")
    n_img = int(vis["image_grid_thw"].prod()) // p.image_processor.merge_size**2
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.prompt}]}]
    chat = p.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = chat.replace("<|image_pad|>", "<|image_pad|>" * n_img)
    tok = p.tokenizer
    for text, field in (('{"difficulty": ', "difficulty"), ('{"difficulty": 3, "confidence": ', "confidence")):
        ids = tok(chat + text, return_tensors="pt", add_special_tokens=False)
        mm = (ids["input_ids"] == p.model.config.image_token_id).int()
        with torch.inference_mode():
            logits = p.model(**ids, mm_token_type_ids=mm, **vis).logits[0, -1].float()
        probs = torch.softmax(logits, -1)
        if field == "difficulty":
            digits = [tok.convert_tokens_to_ids(str(d)) for d in range(1, 6)]
            q = probs[digits] / probs[digits].sum()
            expected = float((q * torch.arange(1, 6)).sum())
            assert prof.difficulty == pytest.approx(expected, abs=1e-4)
        else:
            zero_one = probs[[tok.convert_tokens_to_ids("0"), tok.convert_tokens_to_ids("1")]]
            p1 = float(zero_one[1] / zero_one.sum())
            ids2 = tok(chat + text + "0.", return_tensors="pt", add_special_tokens=False)
            mm2 = (ids2["input_ids"] == p.model.config.image_token_id).int()
            with torch.inference_mode():
                probs2 = torch.softmax(p.model(**ids2, mm_token_type_ids=mm2, **vis).logits[0, -1].float(), -1)
            tenths = probs2[[tok.convert_tokens_to_ids(str(d)) for d in range(10)]]
            e_tenths = float((tenths / tenths.sum() * torch.arange(10)).sum()) / 10
            assert prof.confidence == pytest.approx(p1 + (1 - p1) * e_tenths, abs=1e-4)


def test_fast_pixels_match_the_image_processor(scored):
    rng = np.random.default_rng(5)
    assert scored._fast_pixels
    for shape in [(64, 64), (61, 93), (300, 200), (512, 512), (20, 30)]:
        u8 = rng.integers(0, 256, size=shape, dtype=np.uint8)
        ref = scored._pixels_processor([u8])
        fast = scored._pixels_fast([scored._resize(u8)], torch.device("cpu"), torch.float32)
        assert torch.equal(ref["image_grid_thw"], fast["image_grid_thw"]), shape
        torch.testing.assert_close(fast["pixel_values"], ref["pixel_values"].float(), atol=1e-5, rtol=0)


def test_packed_vision_attention_matches_stock(scored):
    visual = scored.model.model.visual
    assert scored.vision_attention.startswith("vlmfilm_packed")
    # 3 images, windows of several sizes (grids not multiples of the window)
    grid = torch.tensor([[1, 20, 28], [1, 8, 12], [1, 4, 4]])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=gen)
    cfg = visual.config
    with torch.inference_mode():
        packed = visual(x, grid_thw=grid).pooler_output
        cfg._attn_implementation = "sdpa"
        try:
            stock = visual(x, grid_thw=grid).pooler_output
        finally:
            cfg._attn_implementation = scored.vision_attention
    torch.testing.assert_close(packed, stock, atol=1e-5, rtol=1e-5)


def test_generate_mode_fallback_and_batch_equals_one_by_one(generate):
    imgs = _images(4) + _images(1, seed=2, shape=(90, 60))
    out = generate.profile(imgs)
    texts = list(generate.last_texts)
    assert len(out) == 5 and all(_in_range(o) for o in out)
    single_texts = []
    for im, o in zip(imgs, out):
        s = generate.profile([im])[0]
        single_texts += generate.last_texts
        np.testing.assert_array_equal(s.to_vector(), o.to_vector())
    assert single_texts == texts  # greedy float32 on CPU: identical text, batched or not
    # random weights write no valid profile: every image takes the parser's fallback path, and it is counted
    rate = generate.fallback_rate
    print(f"generate-mode fallback rate on the tiny random model: {rate:.2f}; sample output: {texts[0]!r}")
    assert all(o.is_fallback and o.reason for o in out)
    assert rate == 1.0 and generate.stats["images"] == 10


def test_fingerprint_changes_with_prompt_mode_model(tiny_qwen_dir, tmp_path):
    base = QwenVLProfiler(tiny_qwen_dir, mode="scored")
    fp = base.fingerprint
    assert json.loads(fp)["revision"].startswith("local-sha256:")
    assert QwenVLProfiler(tiny_qwen_dir, mode="scored").fingerprint == fp
    assert QwenVLProfiler(tiny_qwen_dir, mode="generate").fingerprint != fp
    assert QwenVLProfiler(tiny_qwen_dir, prompt_template="Rate this angiogram. {schema}").fingerprint != fp
    assert QwenVLProfiler(tiny_qwen_dir, max_pixels=224 * 224).fingerprint != fp
    assert QwenVLProfiler(tiny_qwen_dir, dtype="bfloat16").fingerprint != fp
    # same config, different weights (one byte of the weight file changed): another model
    other = tmp_path / "other"
    shutil.copytree(tiny_qwen_dir, other)
    w = other / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    assert QwenVLProfiler(other, mode="scored").fingerprint != fp
    # hub ids pinned to a commit: no network needed, id and revision are both in the key
    a = QwenVLProfiler("org/model-a", revision="a" * 40).fingerprint
    assert a != QwenVLProfiler("org/model-b", revision="a" * 40).fingerprint
    assert a != QwenVLProfiler("org/model-a", revision="b" * 40).fingerprint


def test_prompt_template_is_only_text(tmp_path):
    default = load_prompt_template(None)
    assert SCHEMA_TEXT in default and "{schema}" not in default
    hostile = "Describe {__import__('os').system('echo hi')} {0} {schema} {{x}}"
    assert load_prompt_template(hostile) == hostile.replace("{schema}", SCHEMA_TEXT)
    f = tmp_path / "prompt.txt"
    f.write_text("From a file: {schema}\n")
    assert load_prompt_template(str(f)) == "From a file: " + SCHEMA_TEXT
    assert load_prompt_template(f) == "From a file: " + SCHEMA_TEXT
    with pytest.raises(ValueError, match="empty"):
        load_prompt_template("   ")


def test_intensity_mapping():
    ramp = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    np.testing.assert_array_equal(to_uint8(ramp), np.round(ramp * 255).astype(np.uint8))  # [0, 1] -> x255
    eight_bit = (ramp * 200 + 10).astype(np.float32)
    np.testing.assert_array_equal(to_uint8(eight_bit), np.round(eight_bit).astype(np.uint8))  # 8-bit kept
    wide = ramp * 4000 - 1000  # e.g. 12-bit or signed: stretched
    u = to_uint8(wide)
    assert u.min() == 0 and u.max() == 255
    assert to_uint8(eight_bit, "minmax").max() == 255
    assert not to_uint8(np.full((4, 4), 7.0, np.float32), "minmax").any()
    with pytest.raises(ValueError):
        QwenVLProfiler("x", mode="sample")
