"""Tiny random models for fast tests: a Llama-shaped model built from a config and a small
byte-level tokenizer with a ChatML template, made in memory in well under a second.

Used by the test-suite and handy for trying the API without the default model.
"""

from __future__ import annotations

from typing import Any

import torch

from steerkit.models import LoadedModel, wrap_model

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TRAIN_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "I feel bored, what should I do today?",
    "You are a helpful assistant. Answer the question briefly.",
    "If you were ruler of the world, what would you do?",
    "money investment risk stocks savings advice",
    "hello world how are you doing",
]

_TOKENIZER: Any = None


def tiny_tokenizer() -> Any:
    """A ~300-token byte-level BPE tokenizer with ChatML specials (cached per process)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(_TRAIN_TEXT, trainer=trainer)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tk,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
        tok.chat_template = CHATML
        _TOKENIZER = tok
    return _TOKENIZER


def tiny_hf_model(seed: int = 0, n_layers: int = 4, d_model: int = 64, vocab_size: int | None = None, **overrides: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=d_model,
        intermediate_size=d_model * 2,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attn_implementation="eager",
        **overrides,
    )
    model = LlamaForCausalLM(cfg)
    # larger logits than the default init, so sampling is not uniform noise
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)
    model.eval()
    return model


def tiny_model(seed: int = 0, n_layers: int = 4, d_model: int = 64, name: str = "tiny-llama") -> LoadedModel:
    """A LoadedModel around a random tiny Llama: same code paths as the default model."""
    return wrap_model(tiny_hf_model(seed, n_layers, d_model), tiny_tokenizer(), name=name, source=name)
