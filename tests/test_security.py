"""Security checks: nothing in the cache path is unpickled, every ``torch.load`` is ``weights_only``,
``trust_remote_code`` stays off, cache keys cannot leave the cache directory, a prompt template is only text.

Static checks read the source with ``ast`` (so a new call site is checked the day it is written); runtime
checks feed real malicious pickles to the real loaders and watch for their side effect.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from monai_vlmfilm.profiles import HeuristicProfiler, ProfileStore, VLMProfile

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "monai_vlmfilm"
CONFIG_FILES = sorted(
    [*(REPO / "bundle" / "configs").glob("*.yaml"), *(REPO / "bundle" / "configs").glob("*.json")]
    + [*(REPO / "configs").rglob("*.yaml"), *(REPO / "configs").rglob("*.json")]
)
PY_FILES = sorted([*PACKAGE.rglob("*.py"), *(REPO / "scripts").glob("*.py")])
FP = "security-test/v1"

# modules that turn bytes into arbitrary objects (code execution on load)
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
UNSAFE_ATTRS = {"read_pickle", "load_pickle", "loads_pickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _scan(path: Path, root: Path = REPO) -> tuple[list[str], int]:
    """Problems in one Python file, and the number of ``torch.load`` calls seen (all must be weights_only)."""
    tree = ast.parse(path.read_text(), str(path))
    rel, problems, loads = path.relative_to(root), [], 0
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            problems += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            problems.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            problems.append(f"{where}: from torch import load (call torch.load(..., weights_only=True))")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{where}: calls {name}()")
            elif name.endswith(("torch.load", "torch.serialization.load")):
                loads += 1
                if not _is_const(_kw(node, "weights_only"), True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and not _is_const(_kw(node, "allow_pickle"), False):
                if _kw(node, "allow_pickle") is not None:
                    problems.append(f"{where}: np.load with allow_pickle")
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                problems.append(f"{where}: {name} (use yaml.safe_load)")
            elif name.split(".")[-1] in UNSAFE_ATTRS:
                problems.append(f"{where}: calls {name}")
            trc = _kw(node, "trust_remote_code")
            if trc is not None and not _is_const(trc, False):
                problems.append(f"{where}: trust_remote_code is not the constant False")
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and not _is_const(v, False):
                    problems.append(f"{where}: trust_remote_code is not the constant False")
    return problems, loads


def test_package_never_unpickles_and_loads_weights_only():
    problems, loads = [], 0
    for f in PY_FILES:
        p, n = _scan(f)
        problems += p
        loads += n
    assert not problems, "\n".join(problems)
    assert loads >= 1  # the scanner does see the package's torch.load call (networks.checkpoint.read_checkpoint)


def test_scanner_catches_what_it_must(tmp_path):
    """The AST scan is not vacuous: each unsafe pattern in a snippet is reported (snippets live in tmp_path)."""
    snippets = {
        "import pickle": "imports pickle",
        "from joblib import load": "imports from joblib",
        "import torch\ntorch.load('x')": "without weights_only",
        "import torch\ntorch.load('x', weights_only=False)": "without weights_only",
        "import numpy as np\nnp.load('x', allow_pickle=True)": "allow_pickle",
        "import yaml\nyaml.load(s)": "safe_load",
        "eval('1')": "calls eval",
        "f(m, trust_remote_code=True)": "trust_remote_code",
        "kw = {'trust_remote_code': flag}": "trust_remote_code",
        "import pandas as pd\npd.read_pickle('x')": "read_pickle",
    }
    tmp = tmp_path / "probe.py"
    for code, expected in snippets.items():
        tmp.write_text(code + "\n")
        problems, _ = _scan(tmp, tmp_path)
        assert any(expected in p for p in problems), (code, problems)
    tmp.write_text("import torch\ntorch.load('x', weights_only=True)\nf(trust_remote_code=False)\n")
    assert _scan(tmp, tmp_path) == ([], 1)


def _config_targets(obj) -> list[str]:
    out = []
    if isinstance(obj, dict):
        t = obj.get("_target_")
        if isinstance(t, str):
            out.append(t)
        for v in obj.values():
            out += _config_targets(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _config_targets(v)
    return out


def test_bundle_configs_load_checkpoints_weights_only():
    assert CONFIG_FILES, "no bundle configs found"
    loaders = set()
    for f in CONFIG_FILES:
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{f}: {m.group(0)}"
        assert not re.search(r"trust_remote_code\W+(true|True|1)", text), f
        assert "pickle" not in text.lower(), f
        doc = yaml.safe_load(text) if f.suffix == ".yaml" else json.loads(text)
        loaders |= {t for t in _config_targets(doc) if "checkpoint" in t.lower() or t.lower().endswith(".load")}
    # every checkpoint loader a config names is one whose torch.load is weights_only (checked below)
    allowed = {"CheckpointLoader", "monai.handlers.CheckpointLoader", "CheckpointSaver",
               "monai_vlmfilm.handlers.NetworkCheckpointLoader", "monai_vlmfilm.handlers.AtomicCheckpointSaver",
               "monai_vlmfilm.handlers.ResumeCheckpointLoader"}  # fmt: skip
    assert loaders <= allowed, loaders - allowed
    # ResumeCheckpointLoader (train.yaml's resume) chooses the file with read_checkpoint (weights_only, AST scan above)
    # and loads it with MONAI's CheckpointLoader.__call__, which calls torch.load(..., weights_only=True) in this MONAI
    from monai.handlers import CheckpointLoader

    from monai_vlmfilm.handlers import ResumeCheckpointLoader

    assert ResumeCheckpointLoader.__call__ is CheckpointLoader.__call__

    calls = [
        n
        for n in ast.walk(ast.parse(inspect.getsource(CheckpointLoader)))
        if isinstance(n, ast.Call) and _dotted(n.func).endswith("torch.load")
    ]
    assert calls and all(_is_const(_kw(c, "weights_only"), True) for c in calls)


class _Payload:
    """Unpickling this runs os.mkdir(sentinel): the side effect shows that a loader executed pickled code."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.mkdir, (self.sentinel,))


def test_malicious_checkpoint_is_never_executed(tmp_path):
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    from monai_vlmfilm.networks import load_network_weights

    net = torch.nn.Linear(2, 2)
    sentinel = tmp_path / "pwned"
    ckpt = tmp_path / "model.pt"
    torch.save({"model": {"weight": _Payload(sentinel)}}, ckpt)
    with pytest.raises(pickle.UnpicklingError):
        load_network_weights(net, ckpt)
    with pytest.raises(pickle.UnpicklingError):
        CheckpointLoader(str(ckpt), {"model": net})(Engine(lambda e, b: None))
    assert not sentinel.exists()
    # and the payload is real: an unsafe load does run it
    torch.load(ckpt, weights_only=False)
    assert sentinel.exists()


def test_pickles_in_the_cache_are_never_loaded(tmp_path, caplog):
    store = ProfileStore(tmp_path / "cache")
    img = np.random.default_rng(0).integers(0, 256, (32, 32)).astype(np.float32)
    key = store.put(img, VLMProfile(), FP)
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(sentinel))
    store.entry_path(key).write_bytes(payload)  # an entry replaced by a pickle
    torch.save(_Payload(sentinel), store.root / "path_memo.json")  # and the path memo by a torch pickle
    fresh = ProfileStore(tmp_path / "cache")
    assert fresh.get(img, FP) is None and fresh.stats.corrupt == 1
    png = tmp_path / "img.png"
    Image.fromarray(img.astype(np.uint8)).save(png)
    assert fresh.path_digest(png)[0] == fresh.digest(img)  # the pickled memo is ignored, the file hashed
    assert fresh.verify()["corrupt"] == [str(store.entry_path(key))]
    assert not sentinel.exists()
    assert store.get_or_compute([img], HeuristicProfiler())[0].source == "heuristic"  # recomputed


# ------------------------------------------------------------------------------------------------ keys
@pytest.mark.parametrize(
    "bad",
    ["\0" * 64, "a" * 63 + "\0", "a" * 64 + "\n", "a" * 64 + "/", "/" + "a" * 63, "..%2f" + "a" * 59, "ａ" * 64,
     "٠" * 64, b"a" * 64, Path("a" * 64), "A" * 64, None, ["a" * 64]],
    ids=lambda b: repr(b)[:24],
)  # fmt: skip
def test_no_key_can_name_a_path_outside_the_cache(tmp_path, bad):
    store = ProfileStore(tmp_path / "cache")
    for call in (store.entry_path, store.get_by_key, lambda k: store.put_by_key(k, VLMProfile(), FP)):
        with pytest.raises(ValueError, match="invalid profile cache key"):
            call(bad)
    assert (bad in store) is False
    assert store.entry_fingerprint("a" * 64) is None
    assert not (tmp_path / "cache").exists()


def test_hostile_fingerprints_and_planted_links_stay_inside(tmp_path):
    store = ProfileStore(tmp_path / "cache")
    img = np.arange(64, dtype=np.float32).reshape(8, 8)
    for fp in ("../../../../etc/passwd", "/abs/path", "a\0b", "x" * 10_000, "{0.__class__}", "$eval"):
        key = store.put(img, VLMProfile(), fp)
        assert ProfileStore.is_key(key)
        assert store.entry_path(key).resolve().is_relative_to((tmp_path / "cache").resolve())
        assert ProfileStore(tmp_path / "cache").get(img, fp) == VLMProfile()
    # a symlink planted where an entry goes is read as a corrupt entry and replaced, never written through
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    key = store.make_key(store.digest(img + 1), FP)
    link = store.entry_path(key)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    fresh = ProfileStore(tmp_path / "cache")
    assert fresh.get_by_key(key, FP) is None and fresh.stats.corrupt == 1
    fresh.put_by_key(key, VLMProfile(difficulty=2.0), FP)
    assert outside.read_text() == "precious" and not link.is_symlink()
    assert ProfileStore(tmp_path / "cache").get_by_key(key, FP).difficulty == 2.0
    v = fresh.verify()
    assert v["corrupt"] == [] and v["tmp"] == []
    assert all(p.resolve().is_relative_to((tmp_path / "cache").resolve()) for p in (tmp_path / "cache").rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "outside.txt"]


# ------------------------------------------------------------------------------------------------ prompts
HOSTILE_PROMPT = (
    "Rate {__import__('os').getcwd()} {0.__class__.__mro__} %(x)s ${HOME} "
    "{{ 7 * 7 }} {% for i in range(3) %}{{ i }}{% endfor %} "
    "{{ ''.__class__.__mro__[1].__subclasses__() }} @profiler %macro\n{schema}"
)
# what MONAI's config syntax would act on at the start of a value, and "#" (MONAI rewrites it to "::")
FILE_PROMPT = "$__import__('os').getcwd() # Task\n@profiler %macro {0} {{ 7 * 7 }}\n{schema}\n"


def test_prompt_template_from_a_config_is_only_text(tmp_path, tiny_qwen_dir, monkeypatch):
    """A template with Python format / Jinja / MONAI-config syntax reaches the model verbatim, through a bundle
    config and through the chat template; every from_pretrained call has trust_remote_code=False."""
    import transformers
    from monai.bundle import ConfigParser

    from monai_vlmfilm.profiles.qwen import SCHEMA_TEXT, QwenVLProfiler

    cfg = tmp_path / "profiler.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "profiler": {
                    "_target_": "monai_vlmfilm.profiles.QwenVLProfiler",
                    "model": str(tiny_qwen_dir),
                    "mode": "generate",
                    "prompt_template": HOSTILE_PROMPT,
                }
            }
        )
    )
    parser = ConfigParser()
    parser.read_config(str(cfg))
    prof = parser.get_parsed_content("profiler")
    assert isinstance(prof, QwenVLProfiler)
    expected = HOSTILE_PROMPT.replace("{schema}", SCHEMA_TEXT)  # the one documented substitution
    assert prof.prompt == expected
    calls = []
    for cls in (transformers.AutoTokenizer, transformers.AutoImageProcessor,
                transformers.Qwen2_5_VLForConditionalGeneration, transformers.AutoProcessor):  # fmt: skip
        orig = cls.from_pretrained

        def spy(*a, _orig=orig, _name=cls.__name__, **k):
            calls.append((_name, k))
            return _orig(*a, **k)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    prof.load()
    assert {n for n, _ in calls} >= {"AutoTokenizer", "AutoImageProcessor", "Qwen2_5_VLForConditionalGeneration"}
    assert all(k.get("trust_remote_code") is False for _, k in calls), calls
    # the chat template (Jinja) received the prompt as data: nothing in it was rendered or evaluated
    assert expected in prof.tokenizer.decode(prof._suffix_ids)


def test_prompt_template_file_named_in_a_config_is_read_verbatim(tmp_path):
    """Give templates as files: MONAI's parser evaluates values starting with "$", resolves "@" / "%", and
    rewrites "#" to "::" inside config strings; a file's text never goes through that parser."""
    from monai.bundle import ConfigParser

    from monai_vlmfilm.profiles.qwen import SCHEMA_TEXT, QwenVLProfiler

    prompt = tmp_path / "prompt.txt"
    prompt.write_text(FILE_PROMPT)
    parser = ConfigParser(
        {
            "profiler": {"_target_": "monai_vlmfilm.profiles.QwenVLProfiler", "model": "unused/never-loaded",
                         "prompt_template": str(prompt)},
            "inline": "rate # this",
        }
    )  # fmt: skip
    prof = parser.get_parsed_content("profiler")
    assert isinstance(prof, QwenVLProfiler) and not prof.is_loaded
    assert prof.prompt == FILE_PROMPT.strip().replace("{schema}", SCHEMA_TEXT)
    assert parser.get_parsed_content("inline") == "rate :: this"  # MONAI's rewrite, the reason for files
