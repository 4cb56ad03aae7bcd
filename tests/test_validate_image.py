"""``ValidateImaged``: what a server (MONAI Label) does with an upload that is not a usable angiogram.

Each hostile input of issue 18 (truncated PNG, zero bytes, text named ``.png``, a huge image, NaN NIfTI, a missing
file) must give an ``ImageReadError`` whose message names the problem and whose ``status_code`` is a 4xx; valid
images (16-bit, RGB) pass. Where starlette is loaded (MONAI Label's FastAPI) the error is also a starlette
``HTTPException``, which FastAPI answers with that status and the message. The real server is exercised by
``benchmarks/reliability_monailabel.py``; these tests stay in-process and fast.
"""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from monai_vlmfilm.profiles import ImageReadError, as_http_error
from monai_vlmfilm.transforms import ValidateImaged

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture()
def gray(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    return _png(tmp_path / "ok.png", rng.integers(0, 255, (48, 40), dtype=np.uint8))


def _error(img, max_pixels: int | None = 4096) -> ImageReadError:
    with pytest.raises(ImageReadError) as e:
        ValidateImaged("image", max_pixels=max_pixels)({"image": img})
    return e.value


def test_hostile_files_are_named_with_a_4xx_status(tmp_path, gray):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(gray.read_bytes()[: gray.stat().st_size // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n" * 20)
    nan = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    nan[3, 4] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    volume = np.zeros((16, 16, 5), np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "volume.nii.gz"))
    cases = {
        "truncated.png": (422, "truncated"),
        "empty.png": (422, r"is empty \(0 bytes\)"),
        "notes.png": (422, "cannot identify image file"),
        "nan.nii.gz": (422, "NaN or Inf pixels"),
        "volume.nii.gz": (422, "expected a 2D image"),
        "missing.png": (404, "does not exist"),
    }
    for name, (status, pattern) in cases.items():
        err = _error(str(tmp_path / name))
        assert err.status_code == status, (name, err)
        assert name in str(err), err  # the file is named
        assert pytest.importorskip("re").search(pattern, str(err)), (name, str(err))
    err = _error("")  # MONAI Label resolves an image id it does not know to ""
    assert err.status_code == 404 and "unknown image id" in str(err)


def test_huge_image_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    big = _png(tmp_path / "big.png", np.zeros((300, 200), np.uint8))
    import monai_vlmfilm.transforms as transforms

    def no_decode(*_a, **_k):
        raise AssertionError("the huge image was decoded")

    monkeypatch.setattr(transforms, "canonical_image", no_decode)
    err = _error(str(big), max_pixels=200 * 299)
    assert err.status_code == 413
    assert "big.png" in str(err) and "300 x 200 = 0.1 Mpx" in str(err) and "max_pixels 59800" in str(err)
    # arrays (MONAI Label may pass one) are checked after the canonical read
    monkeypatch.undo()
    err = _error(np.zeros((100, 100), np.float32), max_pixels=9999)
    assert err.status_code == 413 and "image array is too large" in str(err)


def test_valid_images_pass_unchanged(tmp_path, gray):
    """16-bit, RGB, arrays and tensors pass; so does a folder (a DICOM series is left to LoadImaged's readers)."""
    arr = np.asarray(Image.open(gray))
    sixteen = _png(tmp_path / "sixteen.png", arr.astype(np.uint16) * 257)
    assert Image.open(sixteen).mode.startswith("I")
    rgb = _png(tmp_path / "rgb.png", np.stack([arr, arr // 2, 255 - arr], -1))
    t = ValidateImaged("image", max_pixels=48 * 40)
    for item in (str(gray), sixteen, str(rgb), torch.rand(1, 48, 40), np.ones((48, 40, 3), np.uint8), str(tmp_path)):
        d = {"image": item, "other": 1}
        assert t(d) == d
    assert ValidateImaged("image", max_pixels=0).max_pixels is None  # 0 / None: no size limit
    with pytest.raises(ValueError, match="max_pixels"):
        ValidateImaged("image", max_pixels=-1)


def test_error_becomes_an_http_exception_only_where_starlette_is_loaded(monkeypatch, tmp_path):
    """FastAPI answers any starlette ``HTTPException`` subclass with its ``status_code`` and ``{"detail": ...}``."""
    err = ImageReadError("image file 'x.png' is empty (0 bytes)")
    if "starlette.exceptions" not in sys.modules:
        assert as_http_error(err) is err  # nothing imported, nothing changed

    class FakeHTTPException(Exception):  # the shape of starlette.exceptions.HTTPException
        def __init__(self, status_code: int, detail=None, headers=None) -> None:
            self.status_code, self.detail, self.headers = status_code, detail, headers

    fake = types.ModuleType("starlette.exceptions")
    fake.HTTPException = FakeHTTPException
    monkeypatch.setitem(sys.modules, "starlette.exceptions", fake)
    with pytest.raises(FakeHTTPException) as e:
        ValidateImaged("image")({"image": str(tmp_path / "gone.png")})
    http = e.value
    assert isinstance(http, ImageReadError) and isinstance(http, ValueError)
    assert http.status_code == 404 and http.detail == str(http) and "gone.png' does not exist" in str(http)
    assert http.headers is None
    again = pickle.loads(pickle.dumps(http))  # DataLoader workers send errors back pickled
    assert type(again) is type(http) and again.status_code == 404 and str(again) == str(http)


def test_inference_config_validates_first():
    """The bundle's inference pipeline starts with the check, with the configured size limit."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(REPO / "bundle")
    first = parser.get_parsed_content("preprocessing").transforms[0]
    assert isinstance(first, ValidateImaged)
    assert first.max_pixels == parser["max_image_pixels"] == 1024 * 1024
