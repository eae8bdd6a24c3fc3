"""Token text and activation highlighting shared by the terminal and the HTML report.

- :func:`tokenizer_for` loads the tokenizer of a dictionary's language model (once per process,
  through the auto-interp helper, only when a report needs text).
- :class:`TokenDecoder` turns token ids into display strings, one token at a time (so byte-level
  BPE markers such as ``Ġ`` and ``Ċ`` become a space and a newline), memoised per id.
- :func:`visible` makes whitespace and control characters visible on one line.
- :func:`context_window`, :func:`activation_level` and :func:`format_activation` decide what part
  of a context is shown and how strongly each token is highlighted.
- :class:`FeatureView` and :func:`load_feature_view` gather what both reports show about one
  feature, raising :class:`lmsae.errors.StoreError` (with the closest name) for missing records.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import types
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from lmsae._text import did_you_mean
from lmsae.errors import LmsaeError, StoreError
from lmsae.stores.base import (
    DictionaryRecord,
    FeatureAnalysis,
    Interpretation,
    LogitAttribution,
    Sample,
    Sampling,
    Store,
    TokenLogit,
    dictionary_or_error,
)

log = logging.getLogger(__name__)

#: the sampling of a feature's strongest contexts (written by the analysis task)
TOP_SAMPLING = "top_activations"

# --- tokenizers ------------------------------------------------------------------------------


class IdTokenizer:
    """The fallback when a model's tokenizer is unavailable: shows token ids as ``⟨123⟩``."""

    name_or_path = "lmsae/token-ids"

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return "".join(f"⟨{int(i)}⟩" for i in ids)


_TOKENIZERS: dict[str, Any] = {}


def _model_reference(model_name: str | None, model_config: dict[str, Any] | None) -> tuple[str | None, Any]:
    """The model string a backend config names (``model = "smollm2-135m"``), and its cache dir."""
    config = model_config or {}
    model = config.get("model") if isinstance(config.get("model"), str) else None
    return model or model_name, config.get("cache_dir")


def tokenizer_for(model_name: str | None, model_config: dict[str, Any] | None = None) -> Any:
    """The tokenizer of a language model, from its name and (optionally) its stored backend config.

    ``model_config`` is the config a store records for the model (``{"model": "smollm2-135m",
    "cache_dir": ...}``); its ``model`` wins over ``model_name``. Loading is the auto-interp
    helper's (:func:`lmsae.autointerp.prompts.load_tokenizer`): ``"tiny-random"`` -> byte
    tokenizer, ``"smollm2-135m"`` -> the converted SmolLM2 directory (or the GGUF file's tokenizer
    before the first conversion), else a local Hugging Face directory or a name in the local cache. Tokenizers are loaded once per process.

    Raises :class:`LmsaeError` when the tokenizer cannot be loaded.
    """
    model, cache_dir = _model_reference(model_name, model_config)
    if not model:
        raise LmsaeError("the dictionary records no language model, so its tokens cannot be turned into text")
    key = f"{model}\0{cache_dir}"
    if key not in _TOKENIZERS:
        from lmsae.autointerp.prompts import load_tokenizer

        try:
            # load_tokenizer reads only ``model`` and ``cache_dir`` of a backend config.
            _TOKENIZERS[key] = load_tokenizer(types.SimpleNamespace(model=model, cache_dir=cache_dir))
        except ImportError as exc:
            raise LmsaeError(f"the tokenizer of {model!r} needs {exc.name or 'transformers'}: "
                             "pip install 'lmsae-core[lm]'") from None
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise LmsaeError(f"cannot load the tokenizer of {model!r} ({type(exc).__name__}: {first})") from None
    return _TOKENIZERS[key]


def tokenizer_for_dictionary(store: Store, record: DictionaryRecord) -> Any:
    """The tokenizer of ``record``'s language model, or :class:`IdTokenizer` with a warning when it
    cannot be loaded (a report of token ids beats no report)."""
    try:
        lm = store.get_language_model(record.model_name) if record.model_name else None
        return tokenizer_for(record.model_name, lm.config if lm is not None else None)
    except LmsaeError as exc:
        log.warning("showing token ids instead of text: %s", exc)
        return IdTokenizer()


# --- token text ------------------------------------------------------------------------------

_VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}
_BYTE_TOKEN = re.compile(r"(<0x[0-9A-Fa-f]{2}>)+")


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def bytes_text(data: bytes) -> str:
    """``data`` as UTF-8 text, each byte that is not part of a whole character written ``<0xNN>``."""
    out = []
    while data:
        try:
            out.append(data.decode("utf-8"))
            break
        except UnicodeDecodeError as exc:
            out.append(data[:exc.start].decode("utf-8"))
            out.extend(f"<0x{b:02X}>" for b in data[exc.start:exc.end])
            data = data[exc.end:]
    return "".join(out)


def visible(text: str) -> str:
    """``text`` on one line: newline ``↵``, tab ``⇥``, CR ``␍``, other control characters ``\\xNN``
    (so a token can never move the cursor or start an escape sequence in a terminal)."""
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ord(ch) < 32 or 127 <= ord(ch) < 160:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def clean_token_string(token: str) -> str:
    """A raw vocabulary string as text, for records that carry no tokenizer: byte-level BPE
    (``ĠThe`` -> `` The``, ``Ċ`` -> newline) and SentencePiece (``▁The`` -> `` The``)."""
    table = _byte_level_table()
    if all(ch in table for ch in token):
        return bytes_text(bytes(table[ch] for ch in token))
    return token.replace("▁", " ")


class TokenDecoder:
    """Display strings of token ids, decoded one token at a time and memoised per id."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.is_fallback = isinstance(tokenizer, IdTokenizer)
        self._cache: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        """The text of one token (raw, not yet made :func:`visible`)."""
        token_id = int(token_id)
        text = self._cache.get(token_id)
        if text is None:
            text = self._decode(token_id)
            self._cache[token_id] = text
        return text

    def _decode(self, token_id: int) -> str:
        try:
            text = self.tokenizer.decode([token_id])
        except (IndexError, KeyError, ValueError, TypeError, OverflowError):
            # ids outside the vocabulary (a model's embedding matrix can be larger than it)
            return f"⟨{token_id}⟩"
        if "\ufffd" in text:
            # Part of a multi-byte character: its bytes (<0xE2>) say more than "�".
            raw = self._raw(token_id)
            if raw is not None:
                return raw
        return text

    def _raw(self, token_id: int) -> str | None:
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        if convert is None:
            return None
        try:
            raw = convert(token_id)
        except (IndexError, KeyError, ValueError, TypeError, OverflowError):
            return None
        if not isinstance(raw, str) or not raw:
            return None
        if _BYTE_TOKEN.fullmatch(raw):  # byte-fallback vocabularies already spell bytes <0xNN>
            return raw
        table = _byte_level_table()
        if all(ch in table for ch in raw):  # GPT-2 style byte-level BPE ("Ġ" is the space byte)
            return bytes_text(bytes(table[ch] for ch in raw))
        return None

    def tokens(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        return [self.token(int(i)) for i in np.asarray(ids).reshape(-1)]

    def logit_token(self, logit: TokenLogit) -> str:
        """The text of a logit-attribution token (the stored string when no tokenizer is loaded)."""
        if self.is_fallback:
            return clean_token_string(logit.token)
        return self.token(logit.token_id)


# --- highlighting ----------------------------------------------------------------------------


def format_activation(value: float) -> str:
    """An activation as shown next to a token: two decimals, scientific when tiny."""
    if value == 0:
        return "0"
    if abs(value) < 0.01:
        return f"{value:.1e}"
    return f"{value:.2f}"


def format_number(value: float) -> str:
    """A statistic for tables: integers plainly, small fractions with three significant digits."""
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value:.2e}"
    if abs(value) < 1:
        return f"{value:.3g}"
    return f"{value:,.3f}".rstrip("0").rstrip(".")


def format_density(density: float) -> str:
    """A density as a percentage (``0.123%``)."""
    if density == 0:
        return "0%"
    percent = density * 100
    return f"{percent:.2e}%" if percent < 1e-3 else f"{percent:.3g}%"


def activation_level(value: float, scale: float) -> float:
    """Highlight strength in [0, 1]: ``value / scale`` clipped (``scale``: the feature's maximum, so
    strengths compare across contexts)."""
    if not scale > 0 or not value > 0:
        return 0.0
    return min(1.0, float(value) / float(scale))


@attrs.frozen
class Context:
    """The shown part of one sample: token strings (raw), activations, where the peak is."""

    tokens: tuple[str, ...]
    activations: tuple[float, ...]
    #: position of the peak within ``tokens``
    peak: int
    #: the window starts after / ends before the sample's own start / end
    cut_left: bool
    cut_right: bool
    meta: dict[str, Any] = attrs.field(factory=dict)

    @property
    def peak_value(self) -> float:
        return self.activations[self.peak] if self.activations else 0.0


def window_bounds(length: int, peak: int, window: int | None) -> tuple[int, int]:
    """``[start, end)`` of at most ``window`` tokens around ``peak``: two thirds of the window
    before it (what led to the activation matters most in a causal model), the rest after; a window
    that hits an end of the sample is shifted to keep its size."""
    if window is None or window >= length:
        return 0, length
    window = max(1, window)
    before = (window - 1) - (window - 1) // 3
    start = max(0, peak - before)
    end = min(length, start + window)
    start = max(0, end - window)
    return start, end


def context_window(sample: Sample, decoder: TokenDecoder, window: int | None) -> Context:
    """The window of ``sample`` around its peak activation (``window=None``: all of it)."""
    acts = np.asarray(sample.activations, dtype=np.float64).reshape(-1)
    ids = np.asarray(sample.tokens).reshape(-1)
    n = min(len(acts), len(ids))
    acts, ids = acts[:n], ids[:n]
    peak = int(np.argmax(acts)) if n else 0
    start, end = window_bounds(n, peak, window)
    return Context(tokens=tuple(decoder.tokens(ids[start:end])),
                   activations=tuple(float(a) for a in acts[start:end]),
                   peak=peak - start, cut_left=start > 0, cut_right=end < n, meta=dict(sample.meta))


def sparse_extras(sample: Sample, decoder: TokenDecoder, limit: int = 5) -> list[tuple[str, list[tuple[str, int, float]]]]:
    """Per-sample sparse extras as ``[(name, [(token text, position, value), ...])]``.

    A pair of extras ``<name>_positions`` (int, -1 padded) and ``<name>_values`` (e.g. Lorsa's
    ``z_pattern``: which source tokens the feature read at its peak) is shown as the tokens at
    those positions with their values, at most ``limit`` per pair, in stored order.
    """
    out = []
    ids = np.asarray(sample.tokens).reshape(-1)
    for key in sorted(sample.extras):
        if not key.endswith("_positions"):
            continue
        name = key[: -len("_positions")]
        values = sample.extras.get(f"{name}_values")
        if values is None:
            continue
        pos = np.asarray(sample.extras[key]).reshape(-1)
        val = np.asarray(values, dtype=np.float64).reshape(-1)
        entries = [(visible(decoder.token(int(ids[p]))), int(p), float(v))
                   for p, v in zip(pos, val) if 0 <= p < len(ids)][:limit]
        if entries:
            out.append((name, entries))
    return out


def describe_meta(meta: dict[str, Any]) -> str:
    """Where a context came from, on one line (``dataset=wiki document_index=3``)."""
    return " ".join(f"{k}={visible(str(v))}" for k, v in meta.items())


# --- what the reports show about a feature ----------------------------------------------------


def n_features_of(record: DictionaryRecord, registry: Any = None) -> int | None:
    """Number of features of a dictionary, from its stored architecture config (None if unknown)."""
    config = record.config or {}
    if registry is not None:
        try:
            from lmsae.config.base import DictionaryConfig

            return int(registry.structure(dict(config), DictionaryConfig).n_features)
        except (LmsaeError, NotImplementedError, TypeError, ValueError) as exc:
            # e.g. an architecture whose plugin is not installed: fall back to well-known keys
            log.debug("cannot read the config of %r with the registry: %s", record.name, exc)
    for key in ("n_features", "d_sae"):
        if isinstance(config.get(key), int):
            return int(config[key])
    d_model, factor = config.get("d_model"), config.get("expansion_factor")
    if isinstance(d_model, int) and isinstance(factor, (int, float)):
        return int(d_model * factor)
    return None


def analysis_or_error(store: Store, name: str, series: str, analysis: str) -> None:
    """Nothing if ``analysis`` exists for the dictionary; :class:`StoreError` naming the known ones."""
    analyses = store.list_analyses(name, series)
    if analysis in analyses:
        return
    if not analyses:
        raise StoreError(f"dictionary {name!r} (series {series!r}) has no feature analyses yet; run the analysis "
                         "task first")
    raise StoreError(f"dictionary {name!r} has no analysis {analysis!r}; analyses: {', '.join(analyses)}"
                     f"{did_you_mean(analysis, analyses)}")


def check_feature_index(record: DictionaryRecord, index: int, registry: Any = None) -> None:
    """:class:`StoreError` when ``index`` is not a feature of the dictionary."""
    n = n_features_of(record, registry)
    if index < 0 or (n is not None and index >= n):
        span = f"0..{n - 1}" if n else "none"
        raise StoreError(f"feature index {index} is out of range: dictionary {record.name!r} has "
                         f"{n if n is not None else 'an unknown number of'} features ({span})")


def closest_index(index: int, indices: Sequence[int] | np.ndarray) -> int | None:
    """The element of ``indices`` nearest to ``index`` (None when empty)."""
    arr = np.asarray(indices, dtype=np.int64)
    if arr.size == 0:
        return None
    return int(arr[np.argmin(np.abs(arr - index))])


@attrs.frozen
class FeatureView:
    """Everything the reports show about one feature of one dictionary."""

    dictionary: DictionaryRecord
    analysis_name: str
    analysis: FeatureAnalysis
    logits: LogitAttribution | None = None
    interpretation: Interpretation | None = None

    @property
    def index(self) -> int:
        return self.analysis.index

    @property
    def architecture(self) -> str:
        return str((self.dictionary.config or {}).get("architecture", "?"))

    def samplings(self) -> list[Sampling]:
        """The samplings, the top activations first."""
        return sorted(self.analysis.samplings, key=lambda s: s.name != TOP_SAMPLING)

    def top_sampling(self) -> Sampling | None:
        """The sampling of the strongest contexts (``top_activations``, else the first one)."""
        samplings = self.samplings()
        return samplings[0] if samplings else None


def load_feature_view(store: Store, name: str, index: int, *, series: str = "default",
                      analysis: str = "default", registry: Any = None,
                      record: DictionaryRecord | None = None) -> FeatureView:
    """Gather the records of feature ``index`` of dictionary ``name``.

    Raises :class:`StoreError` for an unknown dictionary or analysis (with the closest name), an
    index out of range, or a feature that the analysis did not record (with the nearest analysed
    index).
    """
    record = record if record is not None else dictionary_or_error(store, name, series)
    check_feature_index(record, index, registry)
    analysis_or_error(store, name, series, analysis)
    found = store.get_feature_analysis(name, series, index, analysis)
    if found is None:
        nearest = closest_index(index, store.feature_statistics(name, series, analysis)["index"])
        hint = f"; the nearest analysed feature is {nearest}" if nearest is not None else ""
        raise StoreError(f"feature {index} of {name!r} has no {analysis!r} analysis{hint}")
    return FeatureView(dictionary=record, analysis_name=analysis, analysis=found,
                       logits=store.get_logit_attribution(name, series, index),
                       interpretation=store.get_interpretation(name, series, index))


__all__ = [
    "TOP_SAMPLING", "Context", "FeatureView", "IdTokenizer", "TokenDecoder", "activation_level",
    "analysis_or_error", "bytes_text", "check_feature_index", "clean_token_string", "closest_index", "context_window",
    "describe_meta", "format_activation", "format_density", "format_number", "load_feature_view",
    "n_features_of", "sparse_extras", "tokenizer_for", "tokenizer_for_dictionary", "visible", "window_bounds",
]
