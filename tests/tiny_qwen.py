"""Build a tiny (or full-size, random) Qwen2.5-VL checkpoint offline, loadable with ``from_pretrained``.

Everything a user's real checkpoint folder holds is written: ``config.json`` + safetensors weights (random,
seeded), ``tokenizer.json`` (a byte-level BPE built with the ``tokenizers`` library, Qwen2's pre-tokenizer
regex, so digits are single tokens as in the real model, plus ALL of Qwen2.5-VL's special tokens with their
real relative order), ``tokenizer_config.json``, the real Qwen2.5-VL chat template, the Qwen2-VL image
processor config and the processor config. No network access is needed.

``build_tiny_qwen(dir)`` gives a ~0.1M-parameter model for tests; ``build_qwen(dir, QWEN2_5_VL_3B_ARCH)``
gives the exact Qwen2.5-VL-3B-Instruct architecture with random weights (benchmarks: same compute, no
download), its BPE vocabulary padded with unreachable filler tokens so the special tokens take their real ids
(151643...) and the embedding has the real 151936 rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "QWEN2_5_VL_SPECIAL_TOKENS",
    "QWEN2_5_VL_CHAT_TEMPLATE",
    "TINY_ARCH",
    "QWEN2_5_VL_3B_ARCH",
    "build_tokenizer",
    "build_qwen",
    "build_tiny_qwen",
]

# Qwen2.5-VL's added tokens, in id order (real ids 151643..151664).
QWEN2_5_VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# The real tokenizer marks these as non-special (they are ordinary added tokens).
_NON_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"}
_NON_SPECIAL |= {"<|repo_name|>", "<|file_sep|>"}

# Qwen2.5-VL-Instruct's chat template (chat_template.json of the released checkpoints).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split pattern: single digits, words, punctuation runs, whitespace.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Tiny architecture for tests (text hidden 64, 2 layers; vision depth 2, hidden 32).
TINY_ARCH: dict[str, Any] = {
    "text": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        # wider than the real 0.02 so a 2-layer random model gives peaked, image-dependent distributions
        "initializer_range": 0.3,
    },
    "vision": {
        "depth": 2,
        "hidden_size": 32,
        "out_hidden_size": 64,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
        "initializer_range": 0.3,
    },
    "tie_word_embeddings": True,
    "vocab_size": None,  # None: the tokenizer's size rounded up to a multiple of 64 (as the real model pads)
    "bpe_vocab_size": None,  # None: whatever the BPE trainer learns (a few hundred tokens)
}

#: Qwen2.5-VL-3B-Instruct (config.json of the released checkpoint), ~3.75B parameters.
QWEN2_5_VL_3B_ARCH: dict[str, Any] = {
    "text": {
        "hidden_size": 2048,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "intermediate_size": 11008,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "out_hidden_size": 2048,
        "intermediate_size": 3420,
        "num_heads": 16,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
    "tie_word_embeddings": True,
    "vocab_size": 151936,
    "bpe_vocab_size": 151643,  # real: 151643 BPE tokens, then the 22 added tokens from id 151643
}


_FOCUS = ("boundary", "thin_structure", "small_objects", "clutter")


def _corpus() -> list[str]:
    """Text the BPE is trained on: the profile prompt, JSON profiles and the chat template's words."""
    prompt_file = Path(__file__).resolve().parents[1] / "monai_vlmfilm" / "prompts" / "profile_prompt.txt"
    lines = [prompt_file.read_text(encoding="utf-8")] if prompt_file.is_file() else []
    lines += [
        "You are a helpful assistant.",
        "system user assistant",
        "Describe this X-ray coronary angiogram for vessel segmentation. Return only JSON.",
        "difficulty confidence focus boundary thin_structure small_objects clutter",
    ]
    for i in range(60):
        d, c = 1 + i % 5, (i * 7) % 10
        vals = [(c + k) % 10 for k in (1, 3, 5, 7)]
        lines.append(
            json.dumps({"difficulty": d, "confidence": c / 10, "focus": {k: v / 10 for k, v in zip(_FOCUS, vals)}})
        )
    return lines


def build_tokenizer(bpe_vocab_size: int | None = None):
    """A Qwen2-style byte-level BPE ``PreTrainedTokenizerFast`` with Qwen2.5-VL's special tokens and chat template.

    Args:
        bpe_vocab_size: pad the learned BPE vocabulary with unreachable filler tokens to this many entries, so the
            added tokens get the real model's ids (151643 for the 3B model). None: no padding.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=3000, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if bpe_vocab_size is not None:
        # Rebuild the BPE model with filler entries: never produced by any merge, so tokenization is unchanged.
        state = json.loads(tok.to_str())
        vocab: dict[str, int] = state["model"]["vocab"]
        if len(vocab) > bpe_vocab_size:
            raise ValueError(f"bpe_vocab_size={bpe_vocab_size} is smaller than the learned vocabulary ({len(vocab)})")
        for i in range(len(vocab), bpe_vocab_size):
            vocab[f"<|filler_{i}|>"] = i
        tok = Tokenizer.from_str(json.dumps(state))
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=t not in _NON_SPECIAL, normalized=False) for t in QWEN2_5_VL_SPECIAL_TOKENS])
    # Mark the special ones as special for skip_special_tokens decoding.
    tok.add_special_tokens([t for t in QWEN2_5_VL_SPECIAL_TOKENS if t not in _NON_SPECIAL])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    hf_tok.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    return hf_tok


def build_qwen(
    out_dir: str | os.PathLike,
    arch: dict[str, Any] | None = None,
    seed: int = 0,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight Qwen2.5-VL checkpoint folder (model, tokenizer, processor) and return its path.

    Args:
        out_dir: folder to write (created).
        arch: ``TINY_ARCH`` (default) or ``QWEN2_5_VL_3B_ARCH`` or a dict of the same shape.
        seed: torch seed for the random weights.
        min_pixels: the image processor's default minimum pixels.
        max_pixels: the image processor's default maximum pixels.
        dtype: dtype the weights are saved in (``"float32"`` or ``"bfloat16"``).
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    arch = TINY_ARCH if arch is None else arch
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(arch.get("bpe_vocab_size"))
    n_tok = len(tokenizer)
    vocab_size = arch.get("vocab_size") or -(-n_tok // 64) * 64
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({n_tok} tokens)")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_5_VL_SPECIAL_TOKENS}
    text = dict(arch["text"])
    text.update(
        vocab_size=vocab_size,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(arch["vision"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=arch.get("tie_word_embeddings", True),
    )
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    # Build directly in the target dtype (a 3.75B float32 copy would need 15 GB of host memory).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    del model

    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    try:
        processor = Qwen2_5_VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_5_VL_CHAT_TEMPLATE
        )
        processor.save_pretrained(out)
    except (ImportError, AttributeError, ValueError, TypeError):
        # (TypeError: with torchvision present, transformers 5 insists on a video processor)
        # transformers 5 builds Qwen2.5-VL's processor with a video processor that needs torchvision: write
        # the same files the processor would (its parts plus the processor config) without it.
        tokenizer.save_pretrained(out)
        image_processor.save_pretrained(out)
        (out / "chat_template.jinja").write_text(QWEN2_5_VL_CHAT_TEMPLATE, encoding="utf-8")
        (out / "processor_config.json").write_text(
            json.dumps({"processor_class": "Qwen2_5_VLProcessor"}, indent=2), encoding="utf-8"
        )
    return out


def build_tiny_qwen(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """The tiny Qwen2.5-VL of the tests (see ``TINY_ARCH``); returns the checkpoint folder."""
    return build_qwen(out_dir, TINY_ARCH, seed=seed)


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    print(build_tiny_qwen(sys.argv[1] if len(sys.argv) > 1 else "tiny_qwen"))
