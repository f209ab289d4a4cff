"""Tiny random models for tests: a BERT-style sentence-transformer and a Llama causal LM.

Both are built from a fixed seed with a byte-level BPE tokenizer trained on a built-in text, so a
build is identical every time and on every machine, and needs no model hub.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from sentence_transformers import SentenceTransformer
from transformers import PreTrainedTokenizerBase

__all__ = ["build_tiny_embedder", "build_tiny_generator", "seeded"]

_TINY_SEED = 0
_TINY_MAX_LENGTH = 256
_M = TypeVar("_M", bound=torch.nn.Module)

# The tiny tokenizers learn their merges from this text. Byte-level BPE can still encode any
# string (every byte is in the base alphabet); the text only decides which merges exist.
_TOKENIZER_TEXT = """\
The river town of Aldermere sits where two valleys meet. Its first bridge was built in 1204 from
oak and stone, and the second, longer one in 1879, when the railway reached the town. Farmers
bring wheat, apples, honey and wool to the market square every Saturday morning, and the old
clock above the town hall has struck the hours for more than 300 years. Children learn to count
from 0 to 9 on its face before they can read, and visitors ask who painted the numbers gold.

A question is answered best by a short passage that contains the answer. Who founded the
library? When was the museum opened? Which city is the capital of the northern province, and how
many people lived there in 1950? The answer to each question is a name, a place, a date or a
number such as 42, 365, 2024 or 3.14, and a good answer gives only what was asked for.
"""


def build_tiny_embedder(folder: Path) -> None:
    """A 2-layer BERT with mean pooling and Normalize, like MiniLM but with random weights."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    tokenizer = _train_tiny_tokenizer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], bert_style=True
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=_TINY_MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
    )
    # The pooler is kept (unused by mean pooling) so loading the folder initialises nothing at
    # random: a missing weight would be drawn from the caller's RNG on every load.
    bert = seeded(lambda: BertModel(config))
    hf_folder = folder / "_hf"
    bert.save_pretrained(hf_folder)
    tokenizer.save_pretrained(hf_folder)
    transformer = Transformer(str(hf_folder), max_seq_length=_TINY_MAX_LENGTH)
    embedder = SentenceTransformer(
        modules=[transformer, Pooling(config.hidden_size, "mean"), Normalize()], device="cpu"
    )
    embedder.save(str(folder), safe_serialization=True, create_model_card=False)
    shutil.rmtree(hf_folder)


def build_tiny_generator(folder: Path) -> None:
    """A 2-layer Llama with tied embeddings (like SmolLM2) and a locally trained tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tiny_tokenizer(special_tokens=["<|endoftext|>"], bert_style=False)
    eos_id = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,  # room for k=5 passages of 96 tokens and a question
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    model = seeded(lambda: LlamaForCausalLM(config))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _train_tiny_tokenizer(
    *, special_tokens: list[str], bert_style: bool
) -> PreTrainedTokenizerBase:
    """Byte-level BPE trained on ``_TOKENIZER_TEXT``: deterministic, and encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TOKENIZER_TEXT.splitlines(), trainer=trainer)
    if bert_style:
        cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            model_max_length=_TINY_MAX_LENGTH,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    # No pad token on purpose: the loader's eos fallback is what real generators rely on too.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=1024,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
    )


def seeded(build: Callable[[], _M]) -> _M:
    """Run ``build`` with a fixed seed, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        return build()
