"""FLUX.2's text encoders at full size, cut to the layers FLUX.2 reads, with weights from anywhere.

FLUX.2 stacks three hidden states of a decoder LM into the prompt embedding: (10, 20, 30) of Mistral
Small 3.1 for [dev], (9, 18, 27) of Qwen3 for [klein]. Everything after the last of them (10 more
Mistral layers, the final norm, ``lm_head``) and the whole Pixtral vision tower never influence the
embedding, so the encoder this module builds is the decoder's base model (``MistralModel`` /
``Qwen3Model``) with only ``max(layers)`` layers and **no final norm**: transformers overwrites the
last entry of ``hidden_states`` with the normed ``last_hidden_state``, so a plain cut would return
``norm(layer 30)`` where the whole model returns layer 30 itself. With the norm an identity the cut
encoder's ``hidden_states[k]`` are the whole encoder's, bit for bit, and the diffusers helpers
(``Flux2Pipeline._get_mistral_3_small_prompt_embeds`` / ``Flux2KleinPipeline._get_qwen3_prompt_embeds``)
run on it unchanged.

Shapes (full size), and where they come from:

* [dev] text encoder, Mistral Small 3.1 24B (``Mistral3ForConditionalGeneration``): the
  ``config.json`` of mistralai/Mistral-Small-3.1-24B-Instruct-2503 as embedded in kohya-ss/musubi-tuner
  ``src/musubi_tuner/flux_2/flux2_utils.py`` (``M3_CONFIG_JSON``, FLUX.2's text encoder, transformers
  4.57.1), identical to vLLM's test config and to docs/facts.md / issue 11: text hidden 5120, 40 layers,
  32 heads / 8 KV heads, head 128, MLP 32768, vocab 131072, RoPE theta 1e9; Pixtral vision tower
  hidden 1024, 24 layers, 16 heads, head 64, MLP 4096, patch 14, image 1540; projector spatial merge 2.
* [klein] 4B: Qwen3-4B, [klein] 9B: Qwen3-8B (musubi-tuner ``load_text_embedder``: ``qwen_variant``
  "4B" / "8B"; its ``zimage/zimage_utils.py`` holds both ``config.json``\\ s): Qwen3-4B hidden 2560,
  36 layers, 32 / 8 heads, head 128, MLP 9728, vocab 151936, tied embeddings; Qwen3-8B hidden 4096,
  36 layers, 32 / 8 heads, head 128, MLP 12288, vocab 151936, untied. 3 x 2560 = 7680 and
  3 x 4096 = 12288 are the [klein] transformers' ``joint_attention_dim``.
"""


from .build import (
    EncoderSpec,
    build_prompt_encoder,
    build_tokenizer,
    check_text_encoder_options,
    encoder_spec,
    family_of,
    flux2_encode_fn,
    quantize_encoder_,
    spec_for_preset,
)
from .cut import build_shell, build_whole_shell, decoder_of, param_count, truncate_text_encoder
from .shapes import _TEXT_SEED, FULL_TEXT_ENCODERS, MISTRAL_SMALL_31, QWEN3_4B, QWEN3_8B, TextShape
from .weights import ModuleWeights, RandomWeights, SafetensorsWeights, WeightSource, materialize_

__all__ = ["FULL_TEXT_ENCODERS", "MISTRAL_SMALL_31", "QWEN3_4B", "QWEN3_8B", "_TEXT_SEED", "EncoderSpec",
           "ModuleWeights", "RandomWeights", "SafetensorsWeights", "TextShape", "WeightSource", "build_prompt_encoder",
           "build_shell", "build_tokenizer", "build_whole_shell", "check_text_encoder_options", "decoder_of",
           "encoder_spec", "family_of", "flux2_encode_fn", "materialize_", "param_count", "quantize_encoder_",
           "spec_for_preset", "truncate_text_encoder"]
