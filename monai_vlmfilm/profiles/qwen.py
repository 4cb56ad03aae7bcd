"""Qwen2.5-VL profiler: a frozen vision-language model writes each image's :class:`VLMProfile`.

Two modes:

``generate``
    Free text: chat template with the image and the prompt, greedy decoding of free text, then
    :func:`parse_profile` (which never raises; unusable output becomes a counted fallback).

``scored`` (default)
    The JSON answer is a fixed skeleton the model is teacher-forced on; every value is read from the
    model's next-token distribution restricted to the tokens allowed in that slot, so it never fails to
    parse and costs ONE forward pass over prompt + image + skeleton (no generation):

    - ``difficulty``: digits ``1``-``5`` -> expectation in [1, 5];
    - ``confidence`` and each ``focus`` value, written ``0.d`` / ``1.0``: P(integer digit ``1``) at the slot's
      first token plus P(``0``) x E[d]/10 over the tenths digit ``0``-``9`` read after ``0.`` -> [0, 1]
      (the expectation of the one-decimal number the model would write).

    All slots are read from one forward over the skeleton completed with fixed placeholder values (the
    neutral profile: ``3`` and ``0.5``). So each field is the model's answer given the image, the prompt
    and a *neutral* answer for the fields before it, not its own earlier answers. We accept this: the
    conditioning is identical for every image, so differences between images come from the image only;
    there is no error propagation between fields; and it costs one forward instead of a prefill plus six
    cached decoding steps. A model that copies earlier values would pull every field toward the neutral
    placeholder equally for all images (a shrinkage, not a reordering of images).

Images: canonical 2D float32 arrays (raw intensities) are mapped to 8 bit (``intensity="auto"``: values in
[0, 1] are scaled by 255, values in [0, 255] are used as they are, anything else is min-max stretched;
``"minmax"``: always stretched), resized as the Qwen2-VL image processor does (``smart_resize`` to a multiple
of 28 between ``min_pixels`` and ``max_pixels``, PIL bicubic) and shown to the model as grey RGB.

Speed: pixels are normalised and patchified on the model's device from uint8 (checked at load time against
the model's own image processor, which is used instead if they ever disagree); the chat prompt is tokenised
once; batches are left-padded; the next batch is prepared on a CPU thread while the model runs; and the
vision tower's windowed attention runs as one batched SDPA call per window size instead of one call per
window (``packed_vision_attention``; also checked against the stock path at load time).

Scored mode's own forward (``fast_forward``, on by default): instead of ``model(**inputs)`` the profiler calls the
vision tower and the language model itself, which gives the same numbers with less work:

- the vision tower's index tables (window order, rotary positions, segment lengths) are built once per set of image
  grids and reused, instead of per image per batch in Python;
- the 3D rotary (mrope) positions are computed on the host from the known row layout (chat prefix, image grid,
  chat suffix + skeleton) instead of by ``get_rope_index``'s per-row loop with device syncs;
- the language-model head runs only on the hidden states of the read positions (rows are right-padded, so each row
  has its own read positions);
- ``prefix_cache`` (off by default: on one H200 it gained nothing, 70.7 against 71.7 images/s without it, because the
  shared text before the image is only 15 of 467 tokens): the chat text every image shares before its image tokens (system prompt, the
  user turn's opening and, with ``prompt_position="before"``, the prompt) is run through the language model once; its
  keys and values are reused for every batch, so each image's prefill starts at its image tokens.

Both are checked against the stock ``model(**inputs)`` read-out at load time on two images of different sizes
(``self.fast_path_check``) and switched off with a warning if they ever disagree. ``compile`` (off by default)
applies ``torch.compile`` to the language model's decoder layers and / or the vision tower's blocks (regional
compilation: one compiled block reused by every layer); it fuses the element-wise work (RMSNorm, rotary, SiLU) and
changes results only by rounding. ``prompt_position="before"`` (not the default) shows the prompt before the image;
that changes what the model sees, so it is part of the fingerprint.

The processor's parts are loaded with ``AutoTokenizer`` and ``AutoImageProcessor`` (PIL backend, so every
machine computes the same pixels): in transformers 5 ``AutoProcessor`` of Qwen2.5-VL also builds a video
processor that needs torchvision, which this package does not require.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import Profiler, canonical_image
from .parsing import parse_profile
from .schema import FOCUS_KEYS, VLMProfile

__all__ = ["QwenVLProfiler", "DEFAULT_PROMPT_FILE", "SCHEMA_TEXT", "SKELETON_VERSION", "load_prompt_template"]

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_FILE = "prompts/profile_prompt.txt"
#: What ``{schema}`` in a prompt template is replaced with (plain ``str.replace``, never ``format``).
SCHEMA_TEXT = (
    '{"difficulty": <1-5>, "confidence": <0-1>, "focus": {"boundary": <0-1>, "thin_structure": <0-1>, '
    '"small_objects": <0-1>, "clutter": <0-1>}}'
)
#: Bumped whenever the scored skeleton, its placeholders or the value read-out change (part of the fingerprint).
SKELETON_VERSION = "scored-v1"
_CODE_VERSION = "qwen-profiler-v1"
_SOURCE = "qwen2_5_vl"
_PACKED_ATTN = "vlmfilm_packed_sdpa_flash_varlen"  # "flash" in the name makes the vision tower pass cu_seqlens

# Skeleton: (text before the value, field, kind). Placeholders are the neutral profile (3, 0.5).
_SLOTS: tuple[tuple[str, str, str], ...] = (
    ('{"difficulty": ', "difficulty", "int1to5"),
    (', "confidence": ', "confidence", "unit"),
    (', "focus": {"boundary": ', "boundary", "unit"),
    (', "thin_structure": ', "thin_structure", "unit"),
    (', "small_objects": ', "small_objects", "unit"),
    (', "clutter": ', "clutter", "unit"),
)
_DIFFICULTY_DIGITS = ("1", "2", "3", "4", "5")
_TENTHS = tuple(str(d) for d in range(10))


def load_prompt_template(prompt_template: str | os.PathLike | None = None) -> str:
    """The prompt text with ``{schema}`` replaced by :data:`SCHEMA_TEXT`.

    Args:
        prompt_template: None for the packaged default; a path to an existing text file; or the prompt text
            itself. The text is only ever text: ``{schema}`` is substituted with ``str.replace``, nothing is
            formatted or evaluated.
    """
    if prompt_template is None:
        text = resources.files("monai_vlmfilm").joinpath(DEFAULT_PROMPT_FILE).read_text(encoding="utf-8")
    elif isinstance(prompt_template, os.PathLike) or (
        isinstance(prompt_template, str) and "\n" not in prompt_template and os.path.isfile(prompt_template)
    ):
        path = os.fspath(prompt_template)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompt template file {path!r}: {e}") from e
    elif isinstance(prompt_template, str):
        text = prompt_template
    else:
        raise TypeError(f"prompt_template must be None, a path or a string, got {type(prompt_template).__name__}")
    text = text.strip()
    if not text:
        raise ValueError("prompt template is empty")
    return text.replace("{schema}", SCHEMA_TEXT)


def to_uint8(image: np.ndarray, intensity: str = "auto") -> np.ndarray:
    """Map a canonical 2D float image to uint8 (see the module docstring for the ``intensity`` rules)."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    if intensity == "auto" and lo >= 0.0 and hi <= 1.0:
        scaled = img * np.float32(255.0)
    elif intensity == "auto" and lo >= 0.0 and hi <= 255.0:
        scaled = img
    elif intensity in ("auto", "minmax"):
        scaled = (img - lo) * np.float32(255.0 / (hi - lo)) if hi > lo else np.zeros_like(img)
    else:
        raise ValueError(f"intensity must be 'auto' or 'minmax', got {intensity!r}")
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _model_digest(folder: Path) -> str:
    """Content digest of a local checkpoint folder: small files in full, weight files sampled.

    Weights are hashed by name, size and three 1 MiB samples (start, middle, end): this tells a re-trained or
    fine-tuned checkpoint from another without reading gigabytes (not a bit-exact integrity check).
    """
    h = hashlib.sha256(b"vlmfilm-model-folder/v1")
    sample = 1 << 20
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        size = p.stat().st_size
        h.update(f"|{p.name}|{size}|".encode())
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf") or size > 64 * sample:
            with p.open("rb") as f:
                for off in sorted({0, max(0, size // 2 - sample // 2), max(0, size - sample)}):
                    f.seek(off)
                    h.update(f.read(sample))
        else:
            h.update(p.read_bytes())
    return h.hexdigest()[:32]


def _resolve_revision(model: str, revision: str | None) -> str:
    """A revision that pins the weights: local folder digest, or the hub commit hash (local cache, then hub)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return "local-sha256:" + _model_digest(folder)
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        path = try_to_load_from_cache(model, "config.json", revision=revision)
        if not isinstance(path, str):
            path = hf_hub_download(model, "config.json", revision=revision)
        commit = Path(path).parent.name
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            return commit
    except Exception as e:  # offline / unknown repo: say so, keep a usable (less precise) fingerprint
        logger.warning("cannot resolve the commit of %r (revision %r): %s", model, revision, e)
    return f"unresolved:{revision or 'main'}"


def _packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Block-diagonal (per image / per window) attention as one SDPA call per distinct segment length.

    Same maths as the vision tower's stock SDPA path (one call per window): ``query``/``key``/``value`` are
    ``(1, heads, tokens, dim)`` packed segments delimited by ``cu_seq_lens_q``; returns ``(1, tokens, heads, dim)``.
    """
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise RuntimeError("packed vision attention needs packed inputs with cu_seq_lens (transformers changed?)")
    _, heads, n, dim = query.shape
    starts = cu_seq_lens_q[:-1].tolist()
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    out = torch.empty_like(q)
    by_length: dict[int, list[int]] = {}
    for s, length in zip(starts, lengths):
        if length > 0:
            by_length.setdefault(length, []).append(s)
    for length, seg_starts in by_length.items():
        if len(by_length) == 1 and len(seg_starts) * length == n:
            idx = None  # the common case (equal windows / same-size images): pure views, no gather
            qs, ks, vs = (t.view(len(seg_starts), length, heads, dim) for t in (q, k, v))
        else:
            idx = (torch.tensor(seg_starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).reshape(
                -1
            )
            qs, ks, vs = (t.index_select(0, idx).view(len(seg_starts), length, heads, dim) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(
            qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), dropout_p=dropout, scale=scaling
        ).transpose(1, 2)  # (segments, length, heads, dim)
        if idx is None:
            out = o.reshape(n, heads, dim)
        else:
            out.index_copy_(0, idx, o.reshape(-1, heads, dim))
    return out.unsqueeze(0), None


class QwenVLProfiler(Profiler):
    """Profiles images with a frozen Qwen2.5-VL (``transformers`` ``Qwen2_5_VLForConditionalGeneration``).

    Args:
        model: hub id or local checkpoint folder.
        mode: ``"scored"`` (one forward, read-out of the next-token distributions; never fails to parse) or
            ``"generate"`` (free text + :func:`parse_profile`).
        prompt_template: None (packaged ``prompts/profile_prompt.txt``), a text file path or the prompt text;
            ``{schema}`` is replaced by the JSON schema line.
        batch_size: images per forward pass.
        dtype: torch dtype or its name; None: bfloat16 on GPU, float32 on CPU.
        device: device for the model; None: ``cuda`` when available, else ``cpu``. Ignored with ``device_map``.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``: accelerate spreads the model over GPUs).
        max_new_tokens: generation budget in ``generate`` mode.
        revision: hub revision (branch, tag or commit).
        min_pixels: the image processor's minimum pixel count after resizing.
        max_pixels: the image processor's maximum pixel count after resizing (448*448: a 512x512 angiogram is
            shown as 448x448, 256 visual tokens).
        intensity: ``"auto"`` or ``"minmax"``, how raw intensities become 8-bit pixels (module docstring).
        attn_implementation: the language model's attention backend (``from_pretrained``'s argument; None:
            transformers' default, SDPA). ``"flash_attention_2"`` also switches the vision tower to it.
        packed_vision_attention: run the vision tower's per-window attention batched (see module docstring);
            ignored when the vision tower already uses a flash-attention backend.
        fast_forward: scored mode runs the vision tower and the language model itself (cached vision index tables,
            host-side mrope positions, the head only at the read positions); same profiles, checked at load time.
        prefix_cache: with ``fast_forward``, the shared chat text before the image tokens is prefilled once and its
            keys / values reused for every batch; same profiles, checked at load time. Off by default: it pays only
            with ``prompt_position="before"``, where the prompt joins the prefix.
        compile: ``torch.compile`` the language model's decoder layers (``"text"``), the vision tower's blocks
            (``"vision"``) or both (``"all"`` or True); False / None: off. Same maths, rounding differs; costs
            compile time on the first batches of each new shape.
        prompt_position: ``"after"`` (the image, then the prompt: the chat template's usual order) or ``"before"``
            (the prompt, then the image: the prompt joins the shared prefix that ``prefix_cache`` computes once).
            Changes what the model sees, so ``"before"`` is part of the fingerprint.
        verbose: log the raw generated text of every image in ``generate`` mode.

    ``stats`` counts images, fallbacks (``generate``) and, in ``scored`` mode, the mean probability mass the
    model put on the allowed tokens (how well it follows the skeleton).
    """

    name = _SOURCE
    heavy = True

    def __init__(
        self,
        model: str | os.PathLike = "Qwen/Qwen2.5-VL-3B-Instruct",
        mode: str = "scored",
        prompt_template: str | os.PathLike | None = None,
        batch_size: int = 8,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        max_new_tokens: int = 96,
        revision: str | None = None,
        min_pixels: int = 56 * 56,
        max_pixels: int = 448 * 448,
        intensity: str = "auto",
        attn_implementation: str | None = None,
        packed_vision_attention: bool = True,
        fast_forward: bool = True,
        prefix_cache: bool = False,
        compile: bool | str | None = False,
        prompt_position: str = "after",
        verbose: bool = False,
    ) -> None:
        if mode not in ("scored", "generate"):
            raise ValueError(f"mode must be 'scored' or 'generate', got {mode!r}")
        if intensity not in ("auto", "minmax"):
            raise ValueError(f"intensity must be 'auto' or 'minmax', got {intensity!r}")
        if int(batch_size) < 1 or int(max_new_tokens) < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if prompt_position not in ("after", "before"):
            raise ValueError(f"prompt_position must be 'after' or 'before', got {prompt_position!r}")
        compile = "all" if compile is True else (compile or None)
        if compile not in (None, "all", "text", "vision"):
            raise ValueError(f"compile must be False, True, 'all', 'text' or 'vision', got {compile!r}")
        if not 0 < int(min_pixels) <= int(max_pixels):
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        self.model_name = os.fspath(model)
        self.mode = mode
        self.prompt = load_prompt_template(prompt_template)
        self.batch_size = int(batch_size)
        self.device_map = device_map
        self.max_new_tokens = int(max_new_tokens)
        self.revision = revision
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.intensity = intensity
        self.attn_implementation = attn_implementation
        self.packed_vision_attention = bool(packed_vision_attention)
        self.fast_forward = bool(fast_forward)
        self.prefix_cache = bool(prefix_cache)
        self.compile = compile
        self.prompt_position = prompt_position
        self.verbose = bool(verbose)
        cuda = torch.cuda.is_available()
        self.device = torch.device(device) if device is not None else torch.device("cuda" if cuda else "cpu")
        on_gpu = self.device.type == "cuda" or (device_map is not None and cuda)
        if dtype is None:
            self.dtype = torch.bfloat16 if on_gpu else torch.float32
        else:
            self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            if not isinstance(self.dtype, torch.dtype):
                raise ValueError(f"unknown dtype {dtype!r}")
        self.stats: dict[str, float] = {"images": 0, "fallbacks": 0, "allowed_mass_sum": 0.0}
        self._prep_threads = min(8, os.cpu_count() or 1)
        self._prep_pool: ThreadPoolExecutor | None = None
        self.last_texts: list[str] = []  # raw generated text of the last batch (``generate`` mode)
        self.load_kwargs: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._fingerprint_revision: str | None = None
        self.model: Any = None  # loaded on first use
        self.tokenizer: Any = None
        self.image_processor: Any = None
        self.fast_path_check: dict[str, Any] = {}
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._vision_aux_cache: dict[tuple, dict[str, Any]] = {}

    # ------------------------------------------------------------------ identity
    def fingerprint_fields(self) -> dict[str, Any]:
        if self._fingerprint_revision is None:
            self._fingerprint_revision = _resolve_revision(self.model_name, self.revision)
        folder = Path(self.model_name).expanduser()
        fields = super().fingerprint_fields()
        fields.update(
            model=folder.name if folder.is_dir() else self.model_name,
            revision=self._fingerprint_revision,
            mode=self.mode,
            prompt_sha256=hashlib.sha256(self.prompt.encode("utf-8")).hexdigest(),
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            intensity=self.intensity,
            dtype=str(self.dtype).replace("torch.", ""),
            code=_CODE_VERSION,
        )
        if self.prompt_position != "after":  # only when set: caches written before this option stay valid
            fields["prompt_position"] = self.prompt_position
        if self.mode == "scored":
            fields["skeleton"] = SKELETON_VERSION
        else:
            fields["max_new_tokens"] = self.max_new_tokens
        return fields

    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    @property
    def fallback_rate(self) -> float:
        return self.stats["fallbacks"] / self.stats["images"] if self.stats["images"] else 0.0

    # ------------------------------------------------------------------ loading
    def load(self) -> QwenVLProfiler:
        """Load model, tokenizer and image processor now (otherwise done on the first ``profile`` call)."""
        with self._lock:
            if self.model is None:
                self._load()
        return self

    def _load(self) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        common = {"revision": self.revision, "trust_remote_code": False}
        self.load_kwargs = dict(common, dtype=self.dtype)
        if self.attn_implementation is not None:
            self.load_kwargs["attn_implementation"] = self.attn_implementation
        if self.device_map is not None:
            self.load_kwargs["device_map"] = self.device_map
        if self.device_map is None and self.device.type == "cuda":
            # straight into GPU memory (no full copy in host memory first): part of the start-up of every process
            try:
                model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    self.model_name, **self.load_kwargs, device_map={"": str(self.device)}
                )
            except Exception as e:  # e.g. a transformers without device maps: the old way below
                logger.info("loading onto %s directly failed (%s): loading, then moving", self.device, e)
                model = None
        else:
            model = None
        if model is None:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.model_name, **self.load_kwargs)
        if self.device_map is None:
            model = model.to(self.device)
        model.eval()
        model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name, **common)
        self.tokenizer.padding_side = "left"
        self.image_processor = AutoImageProcessor.from_pretrained(
            self.model_name, backend="pil", min_pixels=self.min_pixels, max_pixels=self.max_pixels, **common
        )
        self.model = model
        self._input_device = model.get_input_embeddings().weight.device
        self._pixel_device = model.model.visual.patch_embed.proj.weight.device
        self._setup_text()
        self._lm_takes_cache = "cache" in inspect.signature(model.model.language_model.forward).parameters
        self._fast_pixels = self._check_fast_pixels()
        self.vision_attention = model.config.vision_config._attn_implementation
        if self.packed_vision_attention and "flash" not in str(self.vision_attention):
            self._enable_packed_vision_attention()
        self._prefix_kv, self._vision_aux_cache = None, {}
        if self.mode == "scored" and self.fast_forward:
            self._check_fast_path()
        if self.compile is not None:
            self._apply_compile()

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _setup_text(self) -> None:
        tok, cfg = self.tokenizer, self.model.config
        if getattr(tok, "chat_template", None) is None:
            raise ValueError(f"{self.model_name}: the tokenizer has no chat template (chat_template.jinja missing?)")
        content = [{"type": "image"}, {"type": "text", "text": self.prompt}]
        if self.prompt_position == "before":
            content.reverse()
        messages = [{"role": "user", "content": content}]
        chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self._encode(chat)
        self.image_token_id = int(cfg.image_token_id)
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(where) != 1:
            raise ValueError(f"{self.model_name}: chat template gave {len(where)} image tokens, expected 1")
        self._prefix_ids, self._suffix_ids = ids[: where[0]], ids[where[0] + 1 :]
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.model.generation_config.pad_token_id
        if pad is None:
            raise ValueError(f"{self.model_name}: neither the tokenizer nor the generation config has a pad token")
        self.pad_token_id = int(pad)
        if self.mode == "scored":
            self._setup_skeleton()

    def _single(self, text: str) -> int:
        ids = self._encode(text)
        if len(ids) != 1:
            raise ValueError(
                f"{self.model_name}: the tokenizer encodes {text!r} as {len(ids)} tokens; scored mode needs it to be one"
            )
        return ids[0]

    def _setup_skeleton(self) -> None:
        """Token ids of the teacher-forced skeleton and, per read-out, its position and allowed token ids.

        Each piece is tokenised on its own and the ids concatenated, so every value sits in exactly one known
        token. Where the tokenizer glues a space to the following digit (``" 3"``), the space moves into the
        value tokens.
        """
        skel: list[int] = []
        reads: list[tuple[str, str, int, list[int]]] = []  # (field, part, position in skel, allowed ids)
        for text, field, kind in _SLOTS:
            first = _DIFFICULTY_DIGITS if kind == "int1to5" else ("0", "1")
            lead = ""
            seg = self._encode(text)
            whole = self._encode(text + first[0])
            if whole[: len(seg)] != seg or len(whole) != len(seg) + 1:
                lead = " " if text.endswith(" ") else ""
                seg = self._encode(text[: len(text) - len(lead)])
            skel += seg
            allowed = [self._single(lead + d) for d in first]
            reads.append((field, "first", len(skel), allowed))
            if kind == "int1to5":
                skel.append(allowed[first.index("3")])
            else:
                skel.append(allowed[0])  # "0"
                skel.append(self._single("."))
                tenths = [self._single(d) for d in _TENTHS]
                reads.append((field, "tenths", len(skel), tenths))
                skel.append(tenths[5])
        full = "".join(t + ("3" if k == "int1to5" else "0.5") for t, _, k in _SLOTS)
        if self._encode(full) != skel:
            logger.debug("scored skeleton uses a non-canonical tokenisation for %s", self.model_name)
        self._skeleton_ids = skel
        self._reads = reads
        # logits at position p predict token p+1: read the position before each value token
        self._read_offsets = torch.tensor([pos - 1 - len(skel) for _, _, pos, _ in reads])  # from the end (<0)
        self._allowed = [torch.tensor(ids) for _, _, _, ids in reads]

    def _check_fast_pixels(self) -> bool:
        """True when the on-device patchify reproduces the image processor (checked on a random image)."""
        ip = self.image_processor
        needed = ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "rescale_factor")
        if not all(hasattr(ip, a) for a in needed) or not (ip.do_resize and ip.do_rescale and ip.do_normalize):
            logger.info("image processor %s: using it as it is (no fast path)", type(ip).__name__)
            return False
        rng = np.random.default_rng(0)
        img = rng.integers(0, 256, size=(61, 93), dtype=np.uint8)
        ref = self._pixels_processor([img])
        fast = self._pixels_fast([self._resize(img)], torch.device("cpu"), torch.float32)
        ok = bool(
            torch.equal(ref["image_grid_thw"].cpu(), fast["image_grid_thw"].cpu())
            and torch.allclose(ref["pixel_values"].float().cpu(), fast["pixel_values"].cpu(), atol=1e-4)
        )
        if not ok:
            logger.warning("fast pixel path disagrees with %s: using the image processor", type(ip).__name__)
        return ok

    def _enable_packed_vision_attention(self) -> None:
        """Switch the vision tower to :func:`_packed_sdpa_attention` if it reproduces the stock output."""
        from transformers import AttentionInterface

        AttentionInterface.register(_PACKED_ATTN, _packed_sdpa_attention)
        visual = self.model.model.visual
        cfg = visual.config
        # two images of different sizes: several windows of unequal size, so every code path is compared
        grid = torch.tensor([[1, 12, 20], [1, 8, 8]], device=self._pixel_device)
        dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(int(grid.prod(-1).sum()), dim, generator=gen).to(self._pixel_device, visual.dtype)
        stock = cfg._attn_implementation
        with torch.inference_mode():
            ref = visual(x, grid_thw=grid).pooler_output
            cfg._attn_implementation = _PACKED_ATTN
            try:
                new = visual(x, grid_thw=grid).pooler_output
            except Exception as e:
                new = None
                logger.warning("packed vision attention failed (%s): keeping %s", e, stock)
        # relative error of the whole output: same maths, only the summation order differs
        tol = 1e-5 if visual.dtype == torch.float32 else 2e-2
        rel = float((new.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)) if new is not None else 1
        if new is None or not rel <= tol:
            cfg._attn_implementation = stock
            if new is not None:
                logger.warning("packed vision attention disagrees with %s: keeping %s", stock, stock)
        self.vision_attention = cfg._attn_implementation

    # ------------------------------------------------------------------ inputs
    def _resize(self, img_u8: np.ndarray) -> np.ndarray:
        from PIL import Image
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.image_processor
        h, w = img_u8.shape
        rh, rw = smart_resize(
            h, w, factor=ip.patch_size * ip.merge_size, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        if (rh, rw) == (h, w):
            return img_u8
        return np.asarray(Image.fromarray(img_u8, mode="L").resize((rw, rh), resample=int(ip.resample)))

    def _pixels_fast(self, resized: list[np.ndarray], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Rescale, normalise and patchify uint8 grey images on ``device`` exactly as the image processor does."""
        ip = self.image_processor
        p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(ip.image_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        chunks, grids = [], []
        i = 0
        while i < len(resized):  # runs of equal-size images are processed together
            j = i + 1
            while j < len(resized) and resized[j].shape == resized[i].shape:
                j += 1
            x = torch.from_numpy(np.stack(resized[i:j])).to(device, non_blocking=True)
            x = (x.float() * ip.rescale_factor).unsqueeze(1).expand(-1, mean.shape[1], -1, -1)
            x = (x - mean) / std  # (b, c, h, w)
            b, c, h, w = x.shape
            gh, gw = h // p, w // p
            x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
            x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
            chunks.append(x.reshape(b * gh * gw, c * t * p * p).to(dtype))
            grids += [[1, gh, gw]] * b
            i = j
        return {"pixel_values": torch.cat(chunks), "image_grid_thw": torch.tensor(grids, device=device), "grids": grids}

    def _pixels_processor(self, images_u8: list[np.ndarray]) -> dict[str, Any]:
        from PIL import Image

        out = self.image_processor(images=[Image.fromarray(u, mode="L").convert("RGB") for u in images_u8])
        return {k: torch.as_tensor(np.asarray(out[k])) for k in ("pixel_values", "image_grid_thw")}

    def _prepare_one(self, x: Any) -> np.ndarray:
        arr = x if isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype == np.float32 else canonical_image(x)
        u8 = to_uint8(arr, self.intensity)
        return self._resize(u8) if self._fast_pixels else u8

    def _prepare_cpu(self, images: Sequence[Any]) -> list[np.ndarray]:
        """CPU part of the input pipeline: canonical -> uint8 -> resized, images in parallel threads.

        numpy and PIL release the GIL here, so a few threads keep up with a GPU at large batches.
        """
        if len(images) < 4 or self._prep_threads < 2:
            return [self._prepare_one(x) for x in images]
        if self._prep_pool is None:
            self._prep_pool = ThreadPoolExecutor(max_workers=self._prep_threads, thread_name_prefix="qwen-img")
        return list(self._prep_pool.map(self._prepare_one, images))

    def _vision_inputs(self, prepared: list[np.ndarray]) -> dict[str, Any]:
        """``pixel_values`` and ``image_grid_thw`` on the vision tower's device, ``grids`` the same grid on the host."""
        if self._fast_pixels:
            return self._pixels_fast(prepared, self._pixel_device, self.dtype)
        vis = self._pixels_processor(prepared)
        grids = vis["image_grid_thw"].tolist()
        vis = {k: v.to(self._pixel_device) for k, v in vis.items()}
        vis["pixel_values"] = vis["pixel_values"].to(self.dtype)
        vis["grids"] = grids
        return vis

    def _build_inputs(self, prepared: list[np.ndarray]) -> dict[str, torch.Tensor]:
        vis = self._vision_inputs(prepared)
        merge = self.image_processor.merge_size**2
        n_img = [t * h * w // merge for t, h, w in vis["grids"]]
        tail = self._skeleton_ids if self.mode == "scored" else []
        rows = [self._prefix_ids + [self.image_token_id] * n + self._suffix_ids + tail for n in n_img]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every sequence ends at the same position
            ids[i, length - len(r) :] = torch.tensor(r)
            mask[i, length - len(r) :] = 1
        mm = (ids == self.image_token_id).to(torch.int32)
        dev = self._input_device
        return {
            "input_ids": ids.to(dev),
            "attention_mask": mask.to(dev),
            "mm_token_type_ids": mm.to(dev),
            "pixel_values": vis["pixel_values"],
            "image_grid_thw": vis["image_grid_thw"],
        }

    # ------------------------------------------------------------------ profiling
    def profile(self, images: Sequence[Any]) -> list[VLMProfile]:
        """Profiles of canonical 2D float32 images (anything :func:`canonical_image` accepts also works)."""
        images = list(images)
        if not images:
            return []
        self.load()
        batches = [images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size)]
        results: list[VLMProfile] = []
        if len(batches) == 1:
            return self._run_batch(self._prepare_cpu(batches[0]))
        # prepare the next batch on a CPU thread while the model runs on the current one
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-prep") as pool:
            pending = pool.submit(self._prepare_cpu, batches[0])
            for i in range(len(batches)):
                prepared = pending.result()
                if i + 1 < len(batches):
                    pending = pool.submit(self._prepare_cpu, batches[i + 1])
                results += self._run_batch(prepared)
        return results

    def _run_batch(self, prepared: list[np.ndarray]) -> list[VLMProfile]:
        with torch.inference_mode():
            if self.mode == "scored" and self.fast_forward:
                out = self._readout(self._scored_logits_fast(prepared))
            elif self.mode == "scored":
                out = self._readout(self._scored_logits(self._build_inputs(prepared)))
            else:
                out = self._generate(self._build_inputs(prepared))
        self.stats["images"] += len(out)
        self.stats["fallbacks"] += sum(p.is_fallback for p in out)
        return out

    def _scored_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stock path: ``model(**inputs)`` on left-padded rows, logits kept at the read positions only."""
        length = inputs["input_ids"].shape[1]
        keep = (self._read_offsets + length).to(self._input_device)
        inputs = {k: v for k, v in inputs.items() if k != "grids"}
        return self.model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (B, reads, vocab)

    # ------------------------------------------------------------------ scored mode, own forward
    def _row_positions(self, n_prefix: int, grid: Sequence[int], n_after: int) -> np.ndarray:
        """mrope positions ``(3, n)`` of one row: ``n_prefix`` text tokens, one image, ``n_after`` text tokens.

        The layout ``get_rope_index`` gives a still image: text tokens count up on all three axes; the image's
        tokens sit at (start, start + row, start + column) of its merged grid; text resumes at start + max(rows,
        columns).
        """
        m = self.image_processor.merge_size
        t, gh, gw = (int(v) for v in grid)
        lh, lw = gh // m, gw // m
        pre = np.arange(n_prefix)
        start = n_prefix
        img_t = np.full(t * lh * lw, start)
        img_h = np.tile(np.repeat(np.arange(lh), lw), t) + start
        img_w = np.tile(np.arange(lw), t * lh) + start
        post = start + max(lh, lw) + np.arange(n_after)
        return np.stack([np.concatenate([pre, a, post]) for a in (img_t, img_h, img_w)])

    def _vision_aux(self, grids: list[list[int]]) -> dict[str, Any]:
        """The vision tower's index tables for these image grids, built once per distinct list of grids.

        ``transformers.vision_utils`` lets a caller pass them precomputed; without it (older transformers) nothing is
        passed and the tower builds them itself.
        """
        key = tuple(tuple(int(v) for v in g) for g in grids)
        aux = self._vision_aux_cache.get(key)
        if aux is not None:
            return aux
        try:
            from transformers import vision_utils as vu
        except ImportError:
            return {}
        visual = self.model.model.visual
        cfg = visual.config
        grid = torch.tensor(key, dtype=torch.long)
        cu = vu.get_vision_cu_seqlens(grid)
        pos = vu.get_vision_position_ids(grid, visual.spatial_merge_size)
        win, cu_win = vu.get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        impl = str(cfg._attn_implementation)
        # flash-attention kernels read the segment boundaries on the device; SDPA and the packed path read them as
        # Python lists, so keeping them on the host saves one device sync per layer
        seg_dev = self._pixel_device if ("flash" in impl and impl != _PACKED_ATTN) else torch.device("cpu")
        aux = {
            "position_ids": pos.to(self._pixel_device),
            "window_index": win.to(self._pixel_device),
            "cu_seqlens": cu.to(seg_dev),
            "cu_window_seqlens": cu_win.to(seg_dev),
            "max_seqlen": int((cu[1:] - cu[:-1]).max()),
            "max_window_seqlen": int((cu_win[1:] - cu_win[:-1]).max()),
        }
        if len(self._vision_aux_cache) >= 16:
            self._vision_aux_cache.pop(next(iter(self._vision_aux_cache)))
        self._vision_aux_cache[key] = aux
        return aux

    def _lm_call(self, **kwargs: Any) -> Any:
        """The language model's forward; ``cache`` is renamed where transformers still calls it ``past_key_values``."""
        lm = self.model.model.language_model
        if "cache" in kwargs and not self._lm_takes_cache:
            kwargs["past_key_values"] = kwargs.pop("cache")
        return lm(**kwargs)

    def _new_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=layers, config=self.model.config.text_config)

    @staticmethod
    def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if hasattr(cache, "layers"):
            return [(layer.keys, layer.values) for layer in cache.layers]
        return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56

    def _shared_prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of the chat text before the image tokens (batch 1), computed once."""
        if self._prefix_kv is None:
            ids = torch.tensor([self._prefix_ids], device=self._input_device)
            n = ids.shape[1]
            pos = torch.arange(n, device=self._input_device).view(1, 1, n).expand(3, 1, n)
            out = self._lm_call(
                inputs_embeds=self.model.get_input_embeddings()(ids),
                attention_mask=torch.ones_like(ids),
                position_ids=pos,
                cache=self._new_cache(),
                use_cache=True,
            )
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            self._prefix_kv = self._cache_layers(cache)
        return self._prefix_kv

    def _scored_logits_fast(self, prepared: list[np.ndarray], prefix_cache: bool | None = None) -> torch.Tensor:
        """Logits ``(B, reads, vocab)`` at the read positions, from the profiler's own forward (module docstring)."""
        prefix_cache = self.prefix_cache if prefix_cache is None else prefix_cache
        vis = self._vision_inputs(prepared)
        grids = vis["grids"]
        merge = self.image_processor.merge_size**2
        n_img = [t * h * w // merge for t, h, w in grids]
        after = self._suffix_ids + self._skeleton_ids
        n_pre = len(self._prefix_ids)
        head = [] if prefix_cache else self._prefix_ids
        rows = [head + [self.image_token_id] * n + after for n in n_img]
        lengths = [len(r) for r in rows]
        length = max(lengths)
        ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), n_pre * prefix_cache + length), dtype=np.int64)
        pos = np.zeros((3, len(rows), length), dtype=np.int64)
        for i, (r, g) in enumerate(zip(rows, grids)):  # right padding: each row starts right after the prefix
            ids[i, : len(r)] = r
            mask[i, : n_pre * prefix_cache + len(r)] = 1
            p = self._row_positions(n_pre, g, len(after))
            pos[:, i, : len(r)] = p[:, n_pre:] if prefix_cache else p
        dev = self._input_device
        ids_t = torch.from_numpy(ids).to(dev, non_blocking=True)
        visual = self.model.model.visual
        feats = visual(
            vis["pixel_values"].type(visual.dtype), grid_thw=vis["image_grid_thw"], **self._vision_aux(grids)
        )
        embeds = self.model.get_input_embeddings()(ids_t)
        image_mask = (ids_t == self.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, feats.pooler_output.to(embeds.device, embeds.dtype))
        cache = None
        if prefix_cache:
            b = len(rows)
            cache = self._new_cache(
                [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in self._shared_prefix_kv()]
            )
        hidden = self._lm_call(
            inputs_embeds=embeds,
            attention_mask=torch.from_numpy(mask).to(dev, non_blocking=True),
            position_ids=torch.from_numpy(pos).to(dev, non_blocking=True),
            cache=cache,
            use_cache=prefix_cache,
        ).last_hidden_state
        # logits at position p predict token p + 1: each row's read positions, counted back from its own end
        read = torch.tensor(lengths).unsqueeze(1) + self._read_offsets.unsqueeze(0)  # (B, reads)
        rows_idx = torch.arange(len(rows)).unsqueeze(1)
        picked = hidden[rows_idx.to(hidden.device), read.to(hidden.device)]  # (B, reads, hidden)
        return self.model.lm_head(picked)

    def _check_fast_path(self) -> None:
        """Compare the own forward (with and without the prefix cache) against ``model(**inputs)`` on two images.

        Two images of different sizes, so padding, several image grids and the read positions of rows of unequal
        length are all exercised; a disagreement beyond rounding switches the fast path (or the prefix cache) off.
        """
        rng = np.random.default_rng(0)
        imgs = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in ((61, 93), (84, 56))]
        prepared = [self._resize(u) if self._fast_pixels else u for u in imgs]
        tol = 1e-3 if self.dtype == torch.float32 else 0.1
        with torch.inference_mode():
            ref = self._readout(self._scored_logits(self._build_inputs(prepared)), count=False)
            ref_v = np.array([p.to_vector()[:6] for p in ref])
            result: dict[str, Any] = {"tolerance": tol}
            for name, use_prefix in (("fast_forward", False), ("prefix_cache", True)):
                try:
                    got = self._readout(self._scored_logits_fast(prepared, prefix_cache=use_prefix), count=False)
                    diff = float(np.abs(np.array([p.to_vector()[:6] for p in got]) - ref_v).max())
                except Exception as e:  # transformers changed under us: keep the stock path, say why
                    logger.warning("scored %s path failed (%s: %s): not used", name, type(e).__name__, e)
                    diff = float("inf")
                result[f"{name}_max_abs_diff"] = diff
        self.fast_path_check = result
        if not result["fast_forward_max_abs_diff"] <= tol:
            logger.warning("scored fast path disagrees with the stock forward (%s): using the stock forward", result)
            self.fast_forward = False
        elif self.prefix_cache and not result["prefix_cache_max_abs_diff"] <= tol:
            logger.warning("prefix KV cache disagrees with the stock forward (%s): not used", result)
            self.prefix_cache = False

    def _apply_compile(self) -> None:
        """Regional ``torch.compile``: each decoder layer / vision block compiled in place (one graph, reused)."""
        inner = self.model.model
        blocks: list[torch.nn.Module] = []
        if self.compile in ("all", "text"):
            blocks += list(inner.language_model.layers)
        if self.compile in ("all", "vision"):
            blocks += list(inner.visual.blocks)
        import torch._dynamo

        # the decoder layers differ only by their layer index: do not recompile once per layer
        torch._dynamo.config.allow_unspec_int_on_nn_module = True
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for blk in blocks:
            blk.compile()

    def _readout(self, logits: torch.Tensor, count: bool = True) -> list[VLMProfile]:
        """Profiles from the logits ``(B, reads, vocab)`` at the read positions."""
        lse = torch.logsumexp(logits.float(), dim=-1)  # (B, reads): normaliser of the full distribution
        probs, mass = [], torch.zeros(logits.shape[0], device=logits.device)
        for r, allowed in enumerate(self._allowed):
            lp = logits[:, r, allowed.to(logits.device)].float() - lse[:, r : r + 1]  # log p over allowed tokens
            mass += lp.exp().sum(-1)
            probs.append(torch.softmax(lp, dim=-1))  # distribution restricted to the allowed tokens
        digits = torch.arange(10, dtype=torch.float32, device=logits.device)
        columns, r = [], 0
        for _, _, kind in _SLOTS:
            first = probs[r]
            if kind == "int1to5":  # E[difficulty]
                columns.append((first * (digits[:5] + 1)).sum(-1))
                r += 1
            else:  # P("1.0") + P("0.") * E[tenths] / 10
                columns.append(first[:, 1] + first[:, 0] * (probs[r + 1] * digits).sum(-1) / 10.0)
                r += 2
        values = torch.stack(columns, dim=1).cpu().tolist()  # one device sync per batch
        if count:
            self.stats["allowed_mass_sum"] += float(mass.sum()) / len(self._reads)
        fields = [f for _, f, _ in _SLOTS]
        out = []
        for row in values:
            v = dict(zip(fields, row))
            out.append(VLMProfile(v["difficulty"], v["confidence"], {k: v[k] for k in FOCUS_KEYS}, source=_SOURCE))
        return out

    def _generate(self, inputs: dict[str, torch.Tensor]) -> list[VLMProfile]:
        import copy

        gen_cfg = copy.deepcopy(self.model.generation_config)
        gen_cfg.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1)
        gen_cfg.max_new_tokens = self.max_new_tokens
        gen_cfg.pad_token_id = self.pad_token_id
        out = self.model.generate(**inputs, generation_config=gen_cfg)
        texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        self.last_texts = list(texts)
        profiles = []
        for text in texts:
            prof = parse_profile(text, source=_SOURCE)
            if self.verbose:
                logger.info("qwen raw output: %s -> %s", json.dumps(text), prof.reason or "ok")
            profiles.append(prof)
        return profiles

    def __getstate__(self) -> dict[str, Any]:
        """Pickled / copied without the model, threads or lock: a copy (e.g. in a DataLoader worker) is unloaded."""
        state = self.__dict__.copy()
        state.update(model=None, tokenizer=None, image_processor=None, _lock=None, _prep_pool=None)
        state.update(_prefix_kv=None, _vision_aux_cache={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"QwenVLProfiler(model={self.model_name!r}, mode={self.mode!r}, batch_size={self.batch_size}, "
            f"dtype={str(self.dtype).replace('torch.', '')}, loaded={self.is_loaded})"
        )
