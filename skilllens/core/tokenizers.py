"""A byte-level tokenizer built offline, for tiny random-initialised test models."""
from __future__ import annotations

from pathlib import Path

from skilllens.core.cache import cache_dir
from skilllens.io import atomic_dir

BYTE_VOCAB_SIZE = 259  # 256 bytes + <pad>, <s>, </s>


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` over raw bytes (vocab 259), saved in the cache once."""
    from transformers import PreTrainedTokenizerFast

    target = cache_dir() / "byte-tokenizer-v1"
    if not (target / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {c: i for i, c in enumerate(alphabet)}
        for special in ("<pad>", "<s>", "</s>"):
            vocab[special] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                       bos_token="<s>", eos_token="</s>")
        with atomic_dir(target) as tmp:
            fast.save_pretrained(tmp)
    # loading from a path gives the tokenizer a name_or_path (TransformerLens needs one)
    return PreTrainedTokenizerFast.from_pretrained(str(Path(target)))


def pad_id(tokenizer) -> int:
    """The id skilllens pads its own batches with, read from ``tokenizer`` without changing it:
    the pad token, else the (first) EOS token, else 0. Padded positions are always masked out
    (``attention_mask`` 0, never counted or scored), so any valid id does; the caller's
    ``pad_token`` and ``padding_side`` are neither needed nor set."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0
