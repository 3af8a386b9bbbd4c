"""A byte-level BPE tokenizer trained in the test itself (no download), for tests of text streaming and decoding."""

from __future__ import annotations


def byte_level_bpe(texts: list[str], vocab_size: int):
    """A `tokenizers.Tokenizer`: byte-level BPE trained on `texts`, `<eos>` its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator(texts, trainer)
    return tok
