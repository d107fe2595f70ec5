"""Tiny random models of every supported family, built from configs and saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A compression toolkit reads a model, quantizes its "
    "weights and writes an artifact that other programs load. Numbers like 3.14159 and 2718 appear, "
    "as do lists: apples, pears, plums; and code such as def add(a, b): return a + b. "
) * 40


def make_tokenizer(folder: Path):
    """A small byte-level BPE tokenizer trained on CORPUS, saved into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<pad>", "[MASK]", "[CLS]", "[SEP]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
        mask_token="[MASK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="<|endoftext|>",
    )
    fast.save_pretrained(folder)
    return fast


def tiny_config(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, max_position_embeddings=256)
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        cls = {
            "llama": tf.LlamaConfig,
            "mistral": tf.MistralConfig,
            "qwen2": tf.Qwen2Config,
            "qwen3": tf.Qwen3Config,
        }
        extra = {"head_dim": 24} if family == "qwen3" else {}
        return cls[family](
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=family != "mistral",
            **extra,
            **common,
        )
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            **common,
        )
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=96,
            ffn_dim=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            word_embed_proj_dim=96,
            **common,
        )
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=96, n_layer=3, n_head=4, n_positions=256)
    if family == "bert":
        return tf.BertConfig(
            vocab_size=vocab,
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "opt", "gpt2", "bert"]


def make_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a random tiny model of `family` with its tokenizer into `folder`; returns the folder."""
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    config = tiny_config(family, len(tok))
    torch.manual_seed(seed)
    if family == "bert":
        config.architectures = ["BertForMaskedLM"]
        model = tf.BertForMaskedLM(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder
