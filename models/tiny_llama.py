"""The embedded default model: a ~1 M parameter Llama trained from scratch on the embedded data.

The pipeline must run end to end offline on a laptop, so instead of downloading a
checkpoint it builds one: a byte-level BPE tokenizer fitted on the data's texts and a
randomly initialised ``LlamaForCausalLM``. Both are saved with ``save_pretrained`` so the
rest of the pipeline loads them exactly as it would load a hub model.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK]


def _train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE without a prefix space, so answers keep their leading space on decode."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def _build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    max_position_embeddings: int,
) -> LlamaForCausalLM:
    """A small Llama whose weights depend only on ``seed`` (the global RNG is left untouched)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_llama(
    out_dir: pathlib.Path,
    texts: list[str],
    *,
    seed: int = 0,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    max_position_embeddings: int = 256,
) -> None:
    """Fit a tokenizer on ``texts``, initialise a tiny Llama and save both into ``out_dir``.

    Same inputs give the same tokenizer files and the same weights. The folder is written
    as a temporary sibling and renamed into place, so a crash never leaves a half-saved model;
    an existing ``out_dir`` is replaced.
    """
    if not texts:
        raise ValueError("build_tiny_llama needs at least one text to fit the tokenizer on")
    out_dir = pathlib.Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)

    tokenizer = _train_tokenizer(texts, vocab_size)
    model = _build_model(
        tokenizer,
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
    )
    tokenizer.save_pretrained(tmp_dir)
    model.save_pretrained(tmp_dir)
    _replace_dir(tmp_dir, out_dir)


def _replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Rename ``src`` to ``dst``; an old ``dst`` is moved aside first, then deleted."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
