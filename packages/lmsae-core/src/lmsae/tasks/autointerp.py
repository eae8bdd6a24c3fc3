"""``task = "autointerp"``: explain the features of an analysed dictionary with a chat model and
score the explanations (detection, fuzzing).

Reads the feature analyses an ``analyze`` run put in the store; for every alive feature it asks
an OpenAI-compatible endpoint for an explanation of the top examples, then scores it on held-out
examples, and writes an :class:`~lmsae.stores.base.Interpretation` (text, scores, answers and
per-example results) as soon as the feature is done, so an interrupted run loses at most the
features in flight. Rerunning skips features already interpreted unless ``overwrite`` is set.

Non-activating examples for detection are other features' top contexts, chosen with a seed; the
store does not hold this feature's activations there, so it is presumed silent (a context that
is also one of this feature's own samples is never used). A sampling named ``non_activating*``
in the feature's analysis is preferred when present.

All store access happens on the calling thread; only the chat requests run in the worker pool
(``max_workers`` features at a time, one request in flight per feature).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, ClassVar, Literal

import attrs
import numpy as np
from tqdm.auto import tqdm

from lmsae.autointerp.client import ChatClient, public_url
from lmsae.autointerp.prompts import (
    Excerpt,
    explanation_messages,
    load_tokenizer,
    parse_explanation,
    render_sample,
)
from lmsae.autointerp.scoring import run_detection, run_fuzzing
from lmsae.config import Config, LanguageModelConfig, RunConfig, StoreConfig, config_class, option
from lmsae.config.fields import each, in_range, non_empty, non_negative, one_of, positive
from lmsae.errors import LmsaeError, StoreError
from lmsae.records import TaskSpec
from lmsae.runtime import RunContext
from lmsae.stores.base import FeatureAnalysis, Interpretation, Sample, Store, dictionary_or_error

log = logging.getLogger(__name__)

Scorer = Literal["detection", "fuzzing"]
TOP_SAMPLING = "top_activations"
NON_ACTIVATING_PREFIX = "non_activating"


@config_class
class ExplainerConfig(Config):
    """The chat model that writes and scores explanations: any OpenAI-compatible endpoint."""

    base_url: str = option("http://127.0.0.1:8000/v1",
                           doc="Base URL of the endpoint; requests go to {base_url}/chat/completions "
                               "(e.g. https://api.openai.com/v1, or a local vLLM/llama.cpp server).")
    model: str = option("gpt-4o-mini", doc="Model name sent with every request (recorded with each interpretation).")
    api_key_env: str = option("OPENAI_API_KEY", doc="Environment variable holding the API key (sent as a Bearer "
                                                    "token; unset: no Authorization header, for local servers).")
    timeout_s: float = option(60.0, doc="Seconds to wait for one request before retrying.", validator=positive())
    max_retries: int = option(4, doc="Retries after a failed request (HTTP 429/5xx, connection errors, timeouts), "
                                     "with exponential backoff and jitter; Retry-After is honoured.",
                              validator=non_negative())
    backoff_s: float = option(1.0, doc="First backoff in seconds (doubled at each retry).", validator=non_negative())
    temperature: float = option(0.0, doc="Sampling temperature (0: as deterministic as the server allows).",
                                validator=non_negative())
    max_tokens: int = option(512, doc="Longest reply, in tokens.", validator=positive())

    def client(self) -> ChatClient:
        """A :class:`ChatClient` with these settings."""
        return ChatClient(self.base_url, self.model, api_key_env=self.api_key_env, timeout_s=self.timeout_s,
                          max_retries=self.max_retries, backoff_s=self.backoff_s, temperature=self.temperature,
                          max_tokens=self.max_tokens)


def _default_scorers() -> list[str]:
    return ["detection", "fuzzing"]


@config_class
class AutoInterpRunConfig(RunConfig):
    """Explain a dictionary's features with a chat model and score the explanations."""

    name: ClassVar[str] = "autointerp"

    dictionary_name: str = option(doc="Name of the dictionary in the store (as recorded by the analyze task).",
                                  validator=non_empty())
    series: str = option("default", doc="Series of the dictionary in the store.")
    analysis_name: str = option("default", doc="Which analysis of the dictionary to read examples from.")
    model: LanguageModelConfig | None = option(
        None, doc="The language model whose tokenizer turns stored tokens back into text ([model] table; only "
                  "the tokenizer is loaded). None: the model recorded with the dictionary in the store.")
    explainer: ExplainerConfig = option(factory=ExplainerConfig, doc="The chat model ([explainer] table).")
    features: list[int] | None = option(None, doc="Feature indices to interpret (None: every alive feature).",
                                        validator=each(non_negative()))
    max_features: int | None = option(None, doc="Interpret at most this many features in this run (after skipping "
                                                "dead and already interpreted ones; None: no limit).",
                                      validator=positive())
    n_examples: int = option(8, doc="Top-activating excerpts shown to the explainer.", validator=positive())
    detection_examples: int = option(5, doc="Detection: activating excerpts, and as many non-activating ones.",
                                     validator=positive())
    fuzzing_examples: int = option(5, doc="Fuzzing: correctly marked excerpts, and as many marked at random tokens.",
                                   validator=positive())
    window: int = option(24, doc="Tokens shown on each side of an excerpt's strongest token.", validator=positive())
    highlight_threshold: float = option(
        0.7, doc="Mark tokens whose activation is at least this fraction of the excerpt's maximum.",
        validator=in_range(0.0, 1.0, low_open=True))
    scorers: list[Scorer] = option(factory=_default_scorers, doc="Scores to compute: 'detection', 'fuzzing' "
                                                                 "(empty: explanations only).",
                                   validator=each(one_of("detection", "fuzzing")))
    max_workers: int = option(4, doc="Features processed at the same time (one chat request in flight each).",
                              validator=positive())
    overwrite: bool = option(False, doc="Redo features that already have an interpretation (default: skip them, "
                                        "so a rerun resumes).")
    save_prompts: bool = option(False, doc="Also keep the full prompts in each interpretation's details "
                                           "(answers and per-excerpt results are always kept).")
    store: StoreConfig | None = option(None, doc="Where the analyses are and interpretations go ([store] table; "
                                                 "default: the local store).")
    seed: int = option(0, doc="Seed of the example choice and shuffling (per feature, independent of order).")


# --- preparing a feature (calling thread: store and tokenizer) ----------------------------------


@attrs.frozen
class _Job:
    """Everything the worker needs for one feature: rendered excerpts, no store access."""

    index: int
    explain: tuple[Excerpt, ...]
    detect_positive: tuple[Excerpt, ...]
    detect_negative: tuple[Excerpt, ...]
    fuzz_correct: tuple[Excerpt, ...]
    fuzz_wrong: tuple[Excerpt, ...]
    notes: dict[str, Any]


def _fingerprint(sample: Sample) -> bytes:
    return np.asarray(sample.tokens, dtype=np.int64).tobytes()


def _activating(samples: Sequence[Sample]) -> list[Sample]:
    return [s for s in samples if s.peak > 0]


def _is_non_activating(name: str) -> bool:
    return name.startswith(NON_ACTIVATING_PREFIX)


class _Preparer:
    """Builds :class:`_Job` s from the store (on the calling thread)."""

    def __init__(self, cfg: AutoInterpRunConfig, store: Store, tokenizer: Any, alive: Sequence[int]):
        self.cfg = cfg
        self.store = store
        self.tokenizer = tokenizer
        self.alive = list(alive)
        # other features' analyses are read for negatives; keep recent ones (features share them)
        self._cache: OrderedDict[int, FeatureAnalysis | None] = OrderedDict()

    def _analysis(self, index: int) -> FeatureAnalysis | None:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        fa = self.store.get_feature_analysis(self.cfg.dictionary_name, self.cfg.series, index, self.cfg.analysis_name)
        self._cache[index] = fa
        if len(self._cache) > 256:
            self._cache.popitem(last=False)
        return fa

    def _render(self, sample: Sample, source: str, *, zero: bool = False) -> Excerpt:
        return render_sample(self.tokenizer, sample, self.cfg.window, source=source, zero_activations=zero)

    def prepare(self, index: int) -> _Job | str:
        """The job for feature ``index``, or a reason to skip it."""
        cfg = self.cfg
        rng = random.Random(f"autointerp:{cfg.seed}:{index}:examples")
        fa = self.store.get_feature_analysis(cfg.dictionary_name, cfg.series, index, cfg.analysis_name)
        if fa is None:
            return "no analysis"
        samplings = [s for s in fa.samplings if not _is_non_activating(s.name)]
        top = next((s for s in samplings if s.name == TOP_SAMPLING), samplings[0] if samplings else None)
        if top is None or not _activating(top.samples):
            return "no activating samples"
        ranked = sorted(_activating(top.samples), key=lambda s: -s.peak)
        explain = ranked[: cfg.n_examples]
        seen = {_fingerprint(s) for s in explain}
        # held-out pool for scoring: the rest of the top sampling and every other (quantile)
        # sampling, taken round-robin so that each activation range is represented
        groups = [list(ranked[cfg.n_examples:])]
        groups += [_activating(s.samples) for s in samplings if s is not top]
        for g in groups:
            rng.shuffle(g)
        pool: list[tuple[Sample, str]] = []
        names = [top.name] + [s.name for s in samplings if s is not top]
        for round_ in range(max((len(g) for g in groups), default=0)):
            for g, name in zip(groups, names):
                if round_ < len(g) and _fingerprint(g[round_]) not in seen:
                    seen.add(_fingerprint(g[round_]))
                    pool.append((g[round_], name))
        own = {_fingerprint(s) for sampling in fa.samplings for s in sampling.samples}
        # render only what the scorers can use (the round-robin order is already random)
        need = (cfg.detection_examples if "detection" in cfg.scorers else 0) + (
            2 * cfg.fuzzing_examples if "fuzzing" in cfg.scorers else 0)
        notes: dict[str, Any] = {"held_out": len(pool)}
        explain_x = tuple(self._render(s, top.name) for s in explain)
        pool_x = [self._render(s, name) for s, name in pool[:need]]

        def take(n: int) -> tuple[Excerpt, ...]:
            # held-out excerpts first; reuse the explainer's own only when too few are left
            chosen = pool_x[:n]
            if len(chosen) < n:
                extra = list(explain_x[: n - len(chosen)])
                notes["reused_explainer_examples"] = max(notes.get("reused_explainer_examples", 0), len(extra))
                chosen = chosen + extra
            return tuple(chosen)

        detect_pos = detect_neg = fuzz_correct = fuzz_wrong = ()
        if "detection" in cfg.scorers:
            detect_pos = take(cfg.detection_examples)
            detect_neg = tuple(self._negatives(fa, own, cfg.detection_examples, rng))
            notes["non_activating"] = len(detect_neg)
        if "fuzzing" in cfg.scorers:
            shuffled = list(pool_x)
            rng.shuffle(shuffled)
            both = shuffled[: 2 * cfg.fuzzing_examples]
            if len(both) < 2:
                both = list(take(2))
            half = (len(both) + 1) // 2
            fuzz_correct, fuzz_wrong = tuple(both[:half]), tuple(both[half:])
        return _Job(index, explain_x, detect_pos, detect_neg, fuzz_correct, fuzz_wrong, notes)

    def _negatives(self, fa: FeatureAnalysis, own: set[bytes], n: int, rng: random.Random) -> list[Excerpt]:
        for sampling in fa.samplings:
            if _is_non_activating(sampling.name) and sampling.samples:
                chosen = list(sampling.samples)
                rng.shuffle(chosen)
                return [self._render(s, sampling.name) for s in chosen[:n]]
        others = [i for i in self.alive if i != fa.index]
        rng.shuffle(others)
        out: list[Excerpt] = []
        used: set[bytes] = set()
        for other in others[: 4 * n]:  # bounded: a store of near-duplicates must not loop for long
            if len(out) >= n:
                break
            ofa = self._analysis(other)
            if ofa is None:
                continue
            candidates = [s for sampling in ofa.samplings if not _is_non_activating(sampling.name)
                          for s in sampling.samples if _fingerprint(s) not in own and _fingerprint(s) not in used]
            if not candidates:
                continue
            sample = candidates[rng.randrange(len(candidates))]
            used.add(_fingerprint(sample))
            out.append(self._render(sample, f"feature {other}", zero=True))
        return out


# --- working on a feature (worker threads: chat requests only) -----------------------------------


def _interpret(job: _Job, client: ChatClient, cfg: AutoInterpRunConfig) -> Interpretation:
    rng = random.Random(f"autointerp:{cfg.seed}:{job.index}:scoring")
    messages = explanation_messages(job.explain, cfg.highlight_threshold)
    answer = client.complete(messages)
    explanation = parse_explanation(answer)
    details: dict[str, Any] = {
        "analysis": cfg.analysis_name, "seed": cfg.seed, "base_url": public_url(client.base_url),
        "temperature": client.temperature, **job.notes,
        "explanation": {"answer": answer,
                        "examples": [{"text": e.highlighted(cfg.highlight_threshold), "source": e.source,
                                      "max_activation": e.max_activation} for e in job.explain]}}
    prompts: dict[str, Any] = {"explanation": messages}
    scores: dict[str, float] = {}

    def complete(which: str):
        def call(msgs: list[dict[str, str]]) -> str:
            prompts[which] = msgs
            return client.complete(msgs)
        return call

    if "detection" in cfg.scorers:
        result = run_detection(complete("detection"), explanation, job.detect_positive, job.detect_negative, rng)
        details["detection"] = result.details()
        if not math.isnan(result.score):
            scores["detection"] = float(result.score)
    if "fuzzing" in cfg.scorers:
        result = run_fuzzing(complete("fuzzing"), explanation, job.fuzz_correct, job.fuzz_wrong,
                             cfg.highlight_threshold, rng)
        details["fuzzing"] = result.details()
        if not math.isnan(result.score):
            scores["fuzzing"] = float(result.score)
    if cfg.save_prompts:
        details["prompts"] = prompts
    return Interpretation(index=job.index, text=explanation, explainer_model=client.model, scores=scores,
                          details=details, created_at=time.time())


# --- the task --------------------------------------------------------------------------------


def _model_config(cfg: AutoInterpRunConfig, store: Store, context: RunContext, model_name: str | None) -> Any:
    if cfg.model is not None:
        return cfg.model
    record = store.get_language_model(model_name) if model_name else None
    if record is None:
        raise LmsaeError(f"the store records no language model for dictionary {cfg.dictionary_name!r}; set the "
                         f"[model] table (only its tokenizer is used)")
    return context.registry.structure(record.config, LanguageModelConfig, source=f"store model {model_name!r}")


def _select(cfg: AutoInterpRunConfig, store: Store) -> tuple[list[int], list[int], dict[str, int]]:
    """(features to do, alive features, counts of the skipped ones)."""
    stats = store.feature_statistics(cfg.dictionary_name, cfg.series, cfg.analysis_name)
    indices = np.asarray(stats.get("index", []), dtype=np.int64)
    if indices.size == 0:
        known = store.list_analyses(cfg.dictionary_name, cfg.series)
        raise StoreError(f"dictionary {cfg.dictionary_name!r} (series {cfg.series!r}) has no analysis "
                         f"{cfg.analysis_name!r}; known analyses: {', '.join(known) or '(none: run the analyze task)'}")
    counts = dict(zip(indices.tolist(), np.asarray(stats["act_count"]).tolist()))
    alive = [i for i in indices.tolist() if counts[i] > 0]
    wanted = list(dict.fromkeys(cfg.features)) if cfg.features is not None else indices.tolist()
    missing = [i for i in wanted if i not in counts]
    dead = [i for i in wanted if i in counts and counts[i] <= 0]
    existing = set() if cfg.overwrite else store.interpreted_features(cfg.dictionary_name, cfg.series)
    todo = [i for i in wanted if counts.get(i, 0) > 0]
    done_before = [i for i in todo if i in existing]
    todo = [i for i in todo if i not in existing]
    if missing:
        log.warning("%d requested feature(s) have no analysis %r: %s", len(missing), cfg.analysis_name,
                    ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else ""))
    if cfg.max_features is not None:
        todo = todo[: cfg.max_features]
    return todo, alive, {"dead": len(dead), "existing": len(done_before), "missing": len(missing)}


def run(cfg: AutoInterpRunConfig, context: RunContext, *, store: Store | None = None,
        client: ChatClient | None = None) -> dict[str, Any]:
    """Interpret the selected features; returns the summary (counts, mean scores, failures).

    ``store`` and ``client`` replace the ones the config describes (tests, notebooks)."""
    own_store = store is None
    if store is None:
        from lmsae.stores.configs import open_store

        store = open_store(context.registry, cfg.store)
    try:
        record = dictionary_or_error(store, cfg.dictionary_name, cfg.series)
        todo, alive, skipped = _select(cfg, store)
        client = client or cfg.explainer.client()
        start = time.monotonic()
        summary: dict[str, Any] = {"dictionary": cfg.dictionary_name, "series": cfg.series, "done": 0,
                                   "skipped_existing": skipped["existing"], "skipped_dead": skipped["dead"],
                                   "missing": skipped["missing"], "skipped_no_examples": 0, "failed": 0,
                                   "failures": {}, "mean_scores": {}}
        if todo:
            tokenizer = load_tokenizer(_model_config(cfg, store, context, record.model_name), context.registry)
            preparer = _Preparer(cfg, store, tokenizer, alive)
            _work(cfg, context, store, client, preparer, todo, summary)
        stats = client.stats()
        summary.update(requests=stats["requests"], retries=stats["retries"],
                       seconds=round(time.monotonic() - start, 2))
        _print_summary(context, summary)
        return summary
    finally:
        if own_store:
            store.close()


def _work(cfg: AutoInterpRunConfig, context: RunContext, store: Store, client: ChatClient, preparer: _Preparer,
          todo: list[int], summary: dict[str, Any]) -> None:
    score_sums: dict[str, list[float]] = {}
    failures: dict[int, str] = summary["failures"]
    # a run whose first features all fail (wrong URL, bad key, unknown model) stops early rather
    # than retrying every feature of a large dictionary
    abort_after = max(3, cfg.max_workers)
    bar = tqdm(total=len(todo), desc="auto-interp", unit="feature", disable=not context.progress)
    pending: dict[Future, int] = {}
    jobs: Iterator[int] = iter(todo)
    stop = False
    try:
        with ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="autointerp") as pool:
            while True:
                while not stop and len(pending) < cfg.max_workers:
                    index = next(jobs, None)
                    if index is None:
                        break
                    job = preparer.prepare(index)
                    if isinstance(job, str):
                        log.warning("feature %d skipped: %s", index, job)
                        summary["skipped_no_examples"] += 1
                        bar.update()
                        continue
                    pending[pool.submit(_interpret, job, client, cfg)] = index
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = pending.pop(future)
                    try:
                        interpretation = future.result()
                    except Exception as e:  # one feature's failure must not stop the others
                        failures[index] = f"{type(e).__name__}: {e}"
                        summary["failed"] += 1
                        log.warning("feature %d failed: %s", index, failures[index])
                        log.debug("feature %d failed", index, exc_info=True)
                    else:
                        # written at once: a crash loses only the features still in flight
                        store.put_interpretation(cfg.dictionary_name, cfg.series, interpretation)
                        summary["done"] += 1
                        for key, value in interpretation.scores.items():
                            score_sums.setdefault(key, []).append(value)
                    bar.update()
                    bar.set_postfix(done=summary["done"], failed=summary["failed"], refresh=False)
                if summary["done"] == 0 and summary["failed"] >= abort_after:
                    stop = True
                    for future in list(pending):
                        if future.cancel():
                            pending.pop(future)
    finally:
        bar.close()
    summary["mean_scores"] = {k: sum(v) / len(v) for k, v in score_sums.items() if v}
    if summary["done"] == 0 and summary["failed"]:
        first = next(iter(failures.values()))
        raise LmsaeError(f"auto-interp failed for every feature tried ({summary['failed']}); first error: {first}")


def _print_summary(context: RunContext, s: dict[str, Any]) -> None:
    parts = [f"{s['done']} interpreted"]
    if s["skipped_existing"]:
        parts.append(f"{s['skipped_existing']} already interpreted (skipped; overwrite = true redoes them)")
    if s["skipped_dead"]:
        parts.append(f"{s['skipped_dead']} dead (skipped)")
    if s["skipped_no_examples"]:
        parts.append(f"{s['skipped_no_examples']} without examples (skipped)")
    if s["missing"]:
        parts.append(f"{s['missing']} not in the analysis")
    if s["failed"]:
        parts.append(f"{s['failed']} failed (rerun to retry them)")
    context.echo(f"auto-interp of {s['dictionary']!r} ({s['series']}): " + ", ".join(parts))
    if s["mean_scores"]:
        context.echo("mean scores (balanced accuracy): " + ", ".join(f"{k} {v:.3f}"
                                                                       for k, v in sorted(s["mean_scores"].items())))
    if s.get("requests"):
        context.echo(f"{s['requests']} requests ({s['retries']} retries) in {s['seconds']:.1f}s")
    for index, message in list(s["failures"].items())[:5]:
        context.echo(f"  feature {index}: {message}")


def example(registry: Any, architecture: str | None = None) -> AutoInterpRunConfig:
    """Interpret an analysed SmolLM2 dictionary with a local OpenAI-compatible server."""
    from lmsae.models.transformer_lens import TransformerLensConfig

    if architecture is not None:
        raise LmsaeError("the autointerp task does not depend on an architecture")
    return AutoInterpRunConfig(dictionary_name="smollm2-l3-sae", model=TransformerLensConfig(model="smollm2-135m"),
                               explainer=ExplainerConfig(base_url="http://127.0.0.1:8000/v1", model="gpt-4o-mini"),
                               max_features=100)


SPEC = TaskSpec(config_class=AutoInterpRunConfig, factory=run, example=example,
                summary="explain features with a chat model and score the explanations (detection, fuzzing)")
