"""Text tokenization with the package's own ``tokenizer.json`` (HuggingFace ``tokenizers``).

Two ways to encode a batch of texts:

* :meth:`TextEncoder.encode`: one feed dict, truncated at ``max_length`` and padded to the
  longest text (calibration and golden vectors use it).
* :meth:`TextEncoder.encode_windows`: a :class:`TextBatch`. A text longer than ``max_length``
  becomes overlapping windows (the tokenizers library's own overflow, so every window carries
  the special tokens such as [CLS] and [SEP]); each window is padded to the smallest length
  bucket that holds it, and windows of one bucket share one feed dict.
  :func:`aggregate_windows` turns per-window probabilities back into per-text ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

from edge_sdk.errors import PackageError, PipelineError
from runtime.manifest import AGGREGATES, TensorSpec, TextPreprocess

log = logging.getLogger(__name__)

PAD_CANDIDATES = ("[PAD]", "<pad>", "<PAD>")


@dataclass(frozen=True, eq=False)
class TextGroup:
    """Windows padded to one bucket ``length``: their feeds, and their indices among the batch's windows."""

    length: int
    feeds: Mapping[str, np.ndarray]
    rows: np.ndarray


@dataclass(frozen=True, eq=False)
class TextBatch:
    """A batch of texts as windows grouped by bucket.

    ``owner[w]`` is the text of window ``w``; ``windows_per_text`` counts the windows kept per
    text and ``total_windows`` the windows before the ``max_windows`` cap.
    """

    groups: tuple[TextGroup, ...]
    owner: np.ndarray
    windows_per_text: tuple[int, ...]
    total_windows: tuple[int, ...]

    @property
    def n_texts(self) -> int:
        return len(self.windows_per_text)

    @property
    def n_windows(self) -> int:
        return len(self.owner)

    def place(self, per_group: Sequence[np.ndarray]) -> np.ndarray:
        """Per-group results (rows in each group's order) -> one array in window order."""
        if len(per_group) != len(self.groups) or not per_group:
            raise PipelineError(f"{len(per_group)} group results for {len(self.groups)} window groups; expected one each")
        out = np.empty((self.n_windows, *per_group[0].shape[1:]), dtype=np.float64)
        for group, values in zip(self.groups, per_group):
            out[group.rows] = values
        return out


def _load(tokenizer_json: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(tokenizer_json)
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise PackageError(f"the package's tokenizer cannot be loaded: {exc}") from None


def _check_texts(texts: Sequence[str]) -> None:
    if len(texts) == 0:
        raise PipelineError("no texts given; expected at least one")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise PipelineError(f"text #{i} is a {type(text).__name__}; expected str")


def spread(n: int, keep: int) -> np.ndarray:
    """``min(n, keep)`` distinct indices in ``range(n)``, evenly spread, first and last included."""
    if n <= keep:
        return np.arange(n)
    return np.linspace(0, n - 1, keep).round().astype(np.int64)


def bucket_lengths(spec: TextPreprocess, sequence_length: int | None = None) -> tuple[int, ...]:
    """The lengths windows are padded to: the manifest's buckets, or the graph's fixed sequence length."""
    if sequence_length is None:
        return spec.bucket_lengths
    if sequence_length < spec.max_length:
        raise PackageError(f"the graph's sequence axis is fixed at {sequence_length} but text max_length is "
                           f"{spec.max_length}; expected max_length <= {sequence_length}",
                           hint=f"convert with max_length={sequence_length}")
    return (sequence_length,)


class TextEncoder:
    """Turns texts into the model's token tensors: truncation or windows, padding, attention mask, token types.

    ``sequence_length`` is the graph's fixed sequence axis, if it has one: every window is then
    padded to it.
    """

    def __init__(self, tokenizer_json: str, spec: TextPreprocess, sequence_length: int | None = None) -> None:
        tokenizer = _load(tokenizer_json)
        pads = [(t, i) for t in PAD_CANDIDATES if (i := tokenizer.token_to_id(t)) is not None]
        if not pads:
            raise PackageError(f"the tokenizer has no padding token; expected one of {list(PAD_CANDIDATES)}")
        pad_token, self._pad_id = pads[0]
        tokenizer.enable_truncation(max_length=spec.max_length)
        fixed = spec.max_length if spec.padding == "max_length" else None
        tokenizer.enable_padding(pad_id=self._pad_id, pad_token=pad_token, length=fixed)
        self.tokenizer = tokenizer
        self.spec = spec
        self.buckets = bucket_lengths(spec, sequence_length)
        self._windowing, self._overflow = _windowing_tokenizer(tokenizer_json, spec)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Encode a batch of texts into ``{input name: int64 [batch, sequence]}`` (truncated, padded to the longest)."""
        _check_texts(texts)
        encodings = self.tokenizer.encode_batch(list(texts))
        feeds = {self.spec.input_ids: np.array([e.ids for e in encodings], dtype=np.int64)}
        if self.spec.attention_mask:
            feeds[self.spec.attention_mask] = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        if self.spec.token_type_ids:
            feeds[self.spec.token_type_ids] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        return feeds

    def encode_windows(self, texts: Sequence[str]) -> TextBatch:
        """Encode a batch of texts as windows (one tokenizer call), grouped by length bucket."""
        _check_texts(texts)
        windows: list[Encoding] = []
        owner: list[int] = []
        kept: list[int] = []
        total: list[int] = []
        for index, encoding in enumerate(self._windowing.encode_batch(list(texts))):
            pieces = [encoding, *encoding.overflowing] if self._overflow else [encoding]
            chosen = [pieces[k] for k in spread(len(pieces), self.spec.max_windows)]
            if len(chosen) < len(pieces):
                log.debug("text #%d has %d windows; keeping %d evenly spread (max_windows)",
                          index, len(pieces), len(chosen))
            windows += chosen
            owner += [index] * len(chosen)
            kept.append(len(chosen))
            total.append(len(pieces))
        lengths = np.array([len(w.ids) for w in windows], dtype=np.int64)
        slots = np.searchsorted(np.array(self.buckets), lengths, side="left")  # first bucket >= length
        groups = tuple(self._group(windows, np.flatnonzero(slots == slot), self.buckets[slot])
                       for slot in np.unique(slots))
        return TextBatch(groups, np.array(owner, dtype=np.int64), tuple(kept), tuple(total))

    def _group(self, windows: Sequence[Encoding], rows: np.ndarray, length: int) -> TextGroup:
        ids = np.full((len(rows), length), self._pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for r, row in enumerate(rows):
            window = windows[row]
            n = len(window.ids)
            ids[r, :n], mask[r, :n], types[r, :n] = window.ids, window.attention_mask, window.type_ids
        feeds = {self.spec.input_ids: ids}
        if self.spec.attention_mask:
            feeds[self.spec.attention_mask] = mask
        if self.spec.token_type_ids:
            feeds[self.spec.token_type_ids] = types
        return TextGroup(length, feeds, rows)


def fixed_sequence_length(inputs: Sequence[TensorSpec], spec: TextPreprocess) -> int | None:
    """The graph's sequence length when its ``input_ids`` declare a fixed one ([batch, int]), else None."""
    ids = next((t for t in inputs if t.name == spec.input_ids), None)
    if ids is None or len(ids.shape) != 2 or not isinstance(ids.shape[1], int):
        return None
    return ids.shape[1]


class TextFeeds:
    """The text preprocessing as a pipeline runs it, with feeds cast to the graph's declared dtypes.

    Called with texts it gives one feed dict (calibration, golden vectors); :meth:`windows`
    gives the windowed, bucketed :class:`TextBatch` that text classification runs on.
    """

    def __init__(self, encoder: TextEncoder, dtypes: Mapping[str, np.dtype]) -> None:
        self.encoder = encoder
        self._dtypes = dict(dtypes)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return self._cast(self.encoder.encode(texts))

    def windows(self, texts: Sequence[str]) -> TextBatch:
        batch = self.encoder.encode_windows(texts)
        return replace(batch, groups=tuple(replace(g, feeds=self._cast(g.feeds)) for g in batch.groups))

    def _cast(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.astype(self._dtypes[k], copy=False) for k, v in feeds.items() if k in self._dtypes}


def _windowing_tokenizer(tokenizer_json: str, spec: TextPreprocess) -> tuple[Tokenizer, bool]:
    """A tokenizer that truncates at ``max_length`` keeping the overflow in windows, and does not pad.

    Returns it and whether windows are possible (a window must hold at least one text token).
    With ``enable_truncation(max_length, stride=s)`` the tokenizers library puts the first
    ``max_length - specials`` text tokens in the encoding and the rest in ``Encoding.overflowing``,
    each window sharing its first ``s`` text tokens with the previous one and carrying the
    special tokens again; it panics when ``s`` is not below ``max_length - specials``.
    """
    tokenizer = _load(tokenizer_json)
    tokenizer.no_padding()
    specials = tokenizer.num_special_tokens_to_add(False)
    room = spec.max_length - specials
    stride = spec.window_stride
    if room < 1:
        tokenizer.enable_truncation(max_length=spec.max_length)
        return tokenizer, False
    if stride >= room:
        raise PackageError(f"text stride {stride} is not below the {room} text tokens a window holds "
                           f"(max_length {spec.max_length} minus {specials} special tokens)",
                           hint=f"set stride to at most {room - 1} in the package's preprocess")
    tokenizer.enable_truncation(max_length=spec.max_length, stride=stride)
    return tokenizer, True


def aggregate_windows(window_probs: np.ndarray, owner: np.ndarray, n_texts: int, how: str = "mean") -> np.ndarray:
    """Per-window class probabilities ``[n_windows, C]`` -> per-text ``[n_texts, C]``.

    ``mean`` averages a text's windows; ``max`` takes each class's highest window probability,
    then renormalises the row to sum 1.
    """
    if how not in AGGREGATES:
        raise PipelineError(f"window aggregate is {how!r}; expected one of {', '.join(AGGREGATES)}")
    if window_probs.ndim != 2 or len(window_probs) != len(owner):
        raise PipelineError(f"window scores have shape {list(window_probs.shape)}; "
                            f"expected [{len(owner)} windows, classes]")
    counts = np.bincount(owner, minlength=n_texts)
    if len(counts) != n_texts or not counts.all():
        raise PipelineError(f"window owners {owner.tolist()} do not cover texts 0..{n_texts - 1} exactly")
    probs = window_probs.astype(np.float64, copy=False)
    if how == "mean":
        out = np.zeros((n_texts, probs.shape[1]), dtype=np.float64)
        np.add.at(out, owner, probs)
        return out / counts[:, None]
    peak = np.full((n_texts, probs.shape[1]), -np.inf, dtype=np.float64)
    np.maximum.at(peak, owner, probs)
    return peak / peak.sum(axis=1, keepdims=True)
