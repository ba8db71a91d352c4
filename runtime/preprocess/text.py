"""Text tokenization with the package's own ``tokenizer.json`` (HuggingFace ``tokenizers``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from edge_sdk.errors import PackageError, PipelineError
from runtime.manifest import TextPreprocess

PAD_CANDIDATES = ("[PAD]", "<pad>", "<PAD>")


class TextEncoder:
    """Turns texts into the model's token tensors: truncation, padding, attention mask, token types."""

    def __init__(self, tokenizer_json: str, spec: TextPreprocess) -> None:
        try:
            tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise PackageError(f"the package's tokenizer cannot be loaded: {exc}") from None
        pad_token = next((t for t in PAD_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        if pad_token is None:
            raise PackageError(f"the tokenizer has no padding token; expected one of {list(PAD_CANDIDATES)}")
        tokenizer.enable_truncation(max_length=spec.max_length)
        fixed = spec.max_length if spec.padding == "max_length" else None
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token, length=fixed)
        self.tokenizer = tokenizer
        self.spec = spec

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Encode a batch of texts into ``{input name: int64 [batch, sequence]}``."""
        if len(texts) == 0:
            raise PipelineError("no texts given; expected at least one")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise PipelineError(f"text #{i} is a {type(text).__name__}; expected str")
        encodings = self.tokenizer.encode_batch(list(texts))
        feeds = {self.spec.input_ids: np.array([e.ids for e in encodings], dtype=np.int64)}
        if self.spec.attention_mask:
            feeds[self.spec.attention_mask] = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        if self.spec.token_type_ids:
            feeds[self.spec.token_type_ids] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        return feeds
