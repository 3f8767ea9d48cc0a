"""The tiny profile's model: a random Llama from a config and a BPE tokenizer trained on the run's data."""

from __future__ import annotations

from typing import Iterable, Optional

from ftl.config.schema import TinyModelConfig
from ftl.data.chat_templates import CHAT_TEMPLATES, ChatTemplate

CHATML_TEMPLATE = CHAT_TEMPLATES["chatml"].text
PAD_TOKEN = "<|endoftext|>"


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int, template: Optional[ChatTemplate] = None):
    """Byte-level BPE trained in ~10 ms, with the chat template (default ChatML): its markers are special
    tokens and its end of turn is EOS, so the model learns to stop where a turn ends; pad=<|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template = template or CHAT_TEMPLATES["chatml"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, *template.markers],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=template.end_of_turn or PAD_TOKEN,
                                        pad_token=PAD_TOKEN, bos_token=None)
    tokenizer.chat_template = template.text
    return tokenizer


def build_tiny_model(cfg: TinyModelConfig, tokenizer, seed: int, attn_implementation: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, vocab_size=len(tokenizer),
        max_position_embeddings=cfg.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)  # same seed → same initial weights on every rank and every run
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
