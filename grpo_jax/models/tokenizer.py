"""A character-level tokenizer for the synthetic tasks, so the default run needs no download.

It follows the small part of the transformers tokenizer interface the trainer uses: `encode`,
`decode`, `eos_token_id`, `pad_token_id`, `vocab_size`.
"""

from __future__ import annotations

import string
from typing import Sequence

_CHARS = string.digits + string.ascii_letters + " +-*/=?.,:;!()[]{}<>#$%&'\"\\_^|~@\n"


class CharTokenizer:
    """Token 0 pads, 1 begins, 2 ends a text; then one token per character of `_CHARS`."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    unk_token_id = 3

    def __init__(self, chars: str = _CHARS):
        self.chars = chars
        self._ids = {c: i + 4 for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + 4

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._ids.get(c, self.unk_token_id) for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id and skip_special_tokens:
                break
            if 4 <= i < 4 + len(self.chars):
                out.append(self.chars[i - 4])
            elif i < 4 and not skip_special_tokens:  # ids past the characters (a padded vocabulary): no text
                out.append(["<pad>", "<s>", "</s>", "<unk>"][i])
        return "".join(out)

    def to_hf(self):
        """The same tokenizer as a transformers `PreTrainedTokenizerFast` (one token per character,
        BOS prepended, pieces fused on decode), so an exported policy loads in transformers/vLLM."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **self._ids}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 1)])
        tok.decoder = decoders.Fuse()
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>")
