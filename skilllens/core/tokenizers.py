"""A byte-level tokenizer built offline, for tiny random-initialised test models."""
from __future__ import annotations

from pathlib import Path

from skilllens.core.cache import cache_dir
from skilllens.core.batching import pad_id  # noqa: F401  (the one padding rule lives there)
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
