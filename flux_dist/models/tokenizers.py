"""Tiny offline tokenizers for the tiny presets.

The real FLUX.2 tokenizers (Mistral Small's Tekken, Qwen3's BPE) cannot be downloaded here, so the
tiny presets train a small byte-level BPE on a fixed corpus. Byte-level means any prompt encodes
(no unknown tokens), and training on a fixed corpus with ``tokenizers`` is deterministic, so every
rank and every process builds the same vocabulary without any file being shipped.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

if TYPE_CHECKING:  # transformers takes seconds to import; train_bpe alone does not need it
    from transformers import PixtralProcessor, Qwen2TokenizerFast

# Target vocabulary size (bytes + specials + merges); the text encoders' vocab_size is the
# tokenizer's actual length, so this only needs to stay small.
VOCAB_SIZE = 384
# Longest tokenized prompt the tiny encoders accept (the pipelines pad to 512 by default).
MODEL_MAX_LENGTH = 1024

# Fixed training text: image prompts in the style the pipelines receive. Changing it changes every
# tiny preset's token ids (and thus its images), so treat it as frozen.
CORPUS: tuple[str, ...] = (
    "a red fox sitting in the snow at dawn",
    "a photo of a cat holding a sign that says hello world",
    "a small cactus with a happy face in the sahara desert",
    "an astronaut riding a horse on the moon, detailed, cinematic lighting",
    "a bowl of ramen on a wooden table, steam rising, soft focus",
    "a lighthouse on a rocky coast under a stormy sky",
    "portrait of an old fisherman with a grey beard, studio light",
    "a watercolor painting of a mountain lake surrounded by pine trees",
    "a futuristic city at night with neon signs and flying cars",
    "a dog is dancing in the rain wearing a yellow raincoat",
    "close-up of a blue butterfly resting on a purple flower",
    "a vintage red bicycle leaning against a brick wall",
    "an oil painting of a sunflower field in the style of the old masters",
    "a cozy reading room with a fireplace, bookshelves and a sleeping cat",
    "a green frog wearing a tiny crown, sitting on a lily pad",
    "aerial view of a winding river through an autumn forest",
    "a robot making coffee in a small kitchen, morning light",
    "a glass of orange juice on a white table next to a croissant",
    "the northern lights over a frozen lake with a wooden cabin",
    "a sailing ship on a calm sea at sunset, 35mm photograph",
    "a child flying a kite on a windy beach",
    "a still life of apples, pears and grapes in a ceramic bowl",
    "a hand-drawn map of a fantasy island with castles and dragons",
    "a macro photo of dew drops on a spider web at sunrise",
    "You are an AI that reasons about image descriptions. You give structured responses.",
    "Describe the image in one sentence. Keep the colors, the lighting and the composition.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1024 2048 3.14 50% #ff0000 (x, y) [a] {b} <c> 'quote' \"double\"",
)

# Qwen2's pre-tokenizer split (from transformers' Qwen2Tokenizer) so the merges we train are the
# ones Qwen2TokenizerFast applies at encode time.
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

QWEN_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
MISTRAL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)

# Qwen3-style template: the [klein] pipeline renders it with add_generation_prompt=True and
# enable_thinking=False, then tokenizes the text itself with padding="max_length".
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Mistral-style template for the [dev] PixtralProcessor: content is a list of typed parts (the
# pipeline's format_input), images become one [IMG] each that the processor expands.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- set ns = namespace(body='') %}"
    "{%- for part in parts %}"
    "{%- if part['type'] == 'text' %}{%- set ns.body = ns.body + part['text'] %}"
    "{%- elif part['type'] == 'image' %}{%- set ns.body = ns.body + '[IMG]' %}{%- endif %}"
    "{%- endfor %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + ns.body + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + ns.body + '[/INST]' }}"
    "{%- else %}{{- ns.body + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def _byte_level_pipeline_(tok: Tokenizer) -> None:
    """Qwen2's normalizer / pre-tokenizer / decoder, shared by training and encoding."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()


@lru_cache(maxsize=4)
def _trained_bpe(
    special_tokens: tuple[str, ...], vocab_size: int
) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Train the byte-level BPE once per special-token set; returns (vocab, merges)."""
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    _byte_level_pipeline_(tok)
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS), trainer=trainer)
    spec = json.loads(tok.to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"])
    return dict(spec["vocab"]), merges


def train_bpe(
    special_tokens: tuple[str, ...], vocab_size: int = VOCAB_SIZE
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of the fixed-corpus byte-level BPE (special tokens get the first ids)."""
    vocab, merges = _trained_bpe(tuple(special_tokens), vocab_size)
    return dict(vocab), list(merges)


def _padded(vocab: dict[str, int], pad_vocab_to: int | None) -> dict[str, int]:
    """The trained vocab plus never-produced entries up to ``pad_vocab_to`` ids (no merge builds them), so
    a tokenizer of a full-size encoder has the encoder's vocabulary size; encoding is unchanged."""
    if pad_vocab_to is None or pad_vocab_to <= len(vocab):
        return vocab
    out = dict(vocab)
    base = max(vocab.values()) + 1
    for i in range(pad_vocab_to - base):
        out[f"<|unused_{i}|>"] = base + i
    return out


def _byte_level_tokenizer(special_tokens: tuple[str, ...], pad_vocab_to: int | None = None) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` over the trained vocab with the specials matched whole."""
    vocab, merges = train_bpe(special_tokens)
    vocab = _padded(vocab, pad_vocab_to)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    _byte_level_pipeline_(tok)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def build_qwen_tokenizer(pad_vocab_to: int | None = None) -> Qwen2TokenizerFast:
    """Tokenizer for the tiny [klein] preset, the class ``Flux2KleinPipeline`` declares (``pad_vocab_to``:
    the vocabulary size of a full-size encoder, see ``_padded``)."""
    from transformers import Qwen2TokenizerFast

    vocab, merges = train_bpe(QWEN_SPECIAL_TOKENS)
    vocab = _padded(vocab, pad_vocab_to)
    tok = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )
    # Chat markers must be matched whole, before the byte-level split sees them.
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build_mistral_processor(*, patch_size: int, image_size: int, spatial_merge_size: int,
                            pad_vocab_to: int | None = None) -> PixtralProcessor:
    """Processor for the tiny [dev] preset: a fast BPE tokenizer plus a Pixtral image processor.

    ``patch_size`` / ``image_size`` / ``spatial_merge_size`` must match the tiny vision tower so that
    image prompts (not used for text-to-image, but part of the processor contract) stay consistent.
    """
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(MISTRAL_SPECIAL_TOKENS, pad_vocab_to),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )
    image_processor = PixtralImageProcessor(
        size={"longest_edge": image_size}, patch_size={"height": patch_size, "width": patch_size}
    )
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        spatial_merge_size=spatial_merge_size,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
