"""Auto-interpretation: the chat client against a local scripted server, prompt rendering and
parsing, the scoring maths, and the ``autointerp`` task end to end on a store of synthetic
feature analyses (byte-level tokenizer, features that fire on one word each)."""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import logging
import pathlib
import random
import re
import socket
import sys
import time
from collections.abc import Iterator

import attrs
import numpy as np
import pytest
from lmsae.autointerp import (
    AnswerFormatError,
    ChatClient,
    ChatError,
    Excerpt,
    Trial,
    balanced_accuracy,
    binary_metrics,
    detection_score,
    detection_trial,
    explanation_messages,
    fuzzing_score,
    fuzzing_trial,
    load_tokenizer,
    parse_explanation,
    parse_judgements,
    parse_selection,
    render_sample,
    token_pieces,
)
from lmsae.autointerp.prompts import DETECT_SYSTEM, EXPLAIN_SYSTEM, FUZZ_SYSTEM
from lmsae.errors import LmsaeError
from lmsae.models.transformer_lens import ByteTokenizer, TransformerLensConfig
from lmsae.registry import load_registry
from lmsae.runtime import RunContext
from lmsae.stores.configs import LocalStoreConfig
from lmsae.stores.local import LocalStore
from lmsae.stores.base import (
    DictionaryRecord,
    FeatureAnalysis,
    Interpretation,
    NamedConfigRecord,
    Sample,
    Sampling,
    Store,
)
from lmsae.tasks import autointerp as task
from lmsae.testing.plugins import fake_entry_points


def _load_helper(name: str):
    # tests are imported in importlib mode (not on sys.path): load the helper module by path
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"lmsae_tests_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ChatServer = _load_helper("chat_server").ChatServer

WORDS = {0: "cat", 1: "dog", 2: "fish", 3: "bird", 5: "moon", 6: "lamp"}
DEAD = 4
FILLER = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "hill", "near", "the", "river", "while", "snow", "falls", "softly"]
DICT = "toy-sae"


# --- an in-memory store (the contract's subset the task uses, plus the rest trivially) ------------


class MemoryStore(Store):
    """Dicts behind the :class:`Store` ABC; enough for the task (the real backends have their own tests)."""

    def __init__(self):
        self.models, self.datasets, self.dicts = {}, {}, {}
        self.analyses, self.logits, self.interps, self.evals = {}, {}, {}, {}
        self.closed = False

    def _table(self, table): return self.models if table == "language_models" else self.datasets
    def _put_named(self, table, record): self._table(table)[record.name] = record
    def _get_named(self, table, name): return self._table(table).get(name)
    def put_dictionary(self, record): self.dicts[(record.name, record.series)] = record
    def get_dictionary(self, name, series="default"): return self.dicts.get((name, series))

    def list_dictionaries(self, series=None):
        return [d for d in self.dicts.values() if series is None or d.series == series]

    def remove_dictionary(self, name, series="default"):
        return self.dicts.pop((name, series), None) is not None

    def put_feature_analyses(self, name, series, analysis, features):
        for fa in features:
            self.analyses[(name, series, analysis, fa.index)] = fa

    def get_feature_analysis(self, name, series, index, analysis="default"):
        return self.analyses.get((name, series, analysis, index))

    def list_analyses(self, name, series="default"):
        return sorted({k[2] for k in self.analyses if k[:2] == (name, series)})

    def feature_statistics(self, name, series, analysis="default"):
        fas = sorted((fa for k, fa in self.analyses.items() if k[:3] == (name, series, analysis)),
                     key=lambda fa: fa.index)
        return {"index": np.array([f.index for f in fas], dtype=np.int64),
                "act_count": np.array([f.act_count for f in fas], dtype=np.int64),
                "n_tokens": np.array([f.n_tokens for f in fas], dtype=np.int64),
                "max_activation": np.array([f.max_activation for f in fas], dtype=np.float32)}

    def put_logit_attributions(self, name, series, attributions):
        for a in attributions:
            self.logits[(name, series, a.index)] = a

    def get_logit_attribution(self, name, series, index): return self.logits.get((name, series, index))

    def put_interpretation(self, name, series, interpretation):
        json.dumps(interpretation.details)  # real backends store details as JSON: it must serialise
        self.interps[(name, series, interpretation.index)] = interpretation

    def get_interpretation(self, name, series, index): return self.interps.get((name, series, index))

    def interpreted_features(self, name, series):
        return {k[2] for k in self.interps if k[:2] == (name, series)}

    def put_evaluation(self, name, series, record): self.evals.setdefault((name, series), []).append(record)
    def list_evaluations(self, name, series="default"): return list(self.evals.get((name, series), []))
    def close(self): self.closed = True


def _sample(word: str, level: float, rng: random.Random) -> Sample:
    words = [rng.choice(FILLER) for _ in range(9)]
    at = rng.randrange(1, len(words))
    left = " ".join(words[:at]) + " "
    text = left + word + " " + " ".join(words[at:])
    tokens = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    acts = np.zeros(tokens.size, dtype=np.float32)
    acts[len(left): len(left) + len(word)] = level
    return Sample(tokens=tokens, activations=acts, meta={"text": text})


def _analysis(index: int) -> FeatureAnalysis:
    if index == DEAD:
        return FeatureAnalysis(index=index, act_count=0, n_tokens=10_000, max_activation=0.0,
                               histogram_counts=np.zeros(4), histogram_edges=np.linspace(0, 1, 5))
    rng = random.Random(index)
    word = WORDS[index]
    top = [_sample(word, 5.0 - 0.1 * j, rng) for j in range(12)]
    quantile = [_sample(word, 1.0 + 0.1 * j, rng) for j in range(6)]
    return FeatureAnalysis(index=index, act_count=300, n_tokens=10_000, max_activation=5.0,
                           histogram_counts=np.ones(4), histogram_edges=np.linspace(0, 5, 5),
                           samplings=[Sampling("top_activations", top), Sampling("quantile_0.00-0.50", quantile)])


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> Iterator[Store]:
    s = LocalStore(LocalStoreConfig(directory=tmp_path / "store")) if request.param == "local" else MemoryStore()
    s.put_language_model(NamedConfigRecord("tiny", {"backend": "transformer_lens", "model": "tiny-random"}))
    s.put_dictionary(DictionaryRecord(name=DICT, series="default", path="/nowhere", config={}, model_name="tiny"))
    s.put_feature_analyses(DICT, "default", "default", [_analysis(i) for i in sorted([*WORDS, DEAD])])
    yield s
    s.close()


@pytest.fixture
def registry(monkeypatch):
    fake_entry_points(monkeypatch, [])
    return load_registry()


# --- the scripted explainer: answers as a perfect interpreter of the synthetic features -------------


def _user(request) -> str:
    return request["messages"][-1]["content"]


def _excerpts(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^Excerpt (\d+): (.*)$", text, re.MULTILINE)}


def oracle(request) -> str:
    system, user = request["messages"][0]["content"], _user(request)
    if system == EXPLAIN_SYSTEM:
        spans = collections.Counter(s for line in _excerpts(user).values() for s in re.findall(r"<<(.*?)>>", line))
        return f'Explanation: the word "{spans.most_common(1)[0][0]}".'
    word = re.search(r'^Explanation: .*?"(.+?)"', user, re.MULTILINE).group(1)
    excerpts = _excerpts(user)
    if system == DETECT_SYSTEM:
        return json.dumps([n for n, text in sorted(excerpts.items()) if word in text])
    if system == FUZZ_SYSTEM:
        verdicts = []
        for _, text in sorted(excerpts.items()):
            spans = re.findall(r"<<(.*?)>>", text)
            verdicts.append(int(bool(spans) and all(s == word for s in spans)))
        return json.dumps(verdicts)
    raise AssertionError(f"unexpected prompt: {system[:60]}")


def config(server: ChatServer, **kw) -> task.AutoInterpRunConfig:
    explainer = task.ExplainerConfig(base_url=server.url, model="scripted-model", max_retries=0, backoff_s=0.0,
                                     timeout_s=10.0)
    fields = {"dictionary_name": DICT, "explainer": explainer, "n_examples": 4, "max_workers": 2, **kw}
    return task.AutoInterpRunConfig(**fields)


def run_task(cfg, store, registry) -> tuple[dict, str]:
    out = io.StringIO()
    context = RunContext(registry=registry, out=out, progress=False)
    summary = task.run(cfg, context, store=store)
    return summary, out.getvalue()


# --- client ---------------------------------------------------------------------------------------


def client_for(server: ChatServer, **kw) -> ChatClient:
    kw = {"api_key": None, "max_retries": 3, "backoff_s": 0.0, "timeout_s": 5.0, **kw}
    return ChatClient(server.url, "scripted-model", **kw)


def test_client_retries_server_errors_then_succeeds():
    with ChatServer(lambda r: "hello", fail_first=2, fail_status=500) as server:
        client = client_for(server)
        assert client.complete([{"role": "user", "content": "hi"}]) == "hello"
    assert len(server.requests) == 3
    assert client.stats() == {"requests": 3, "retries": 2, "failures": 0}


def test_client_honours_retry_after():
    with ChatServer(lambda r: "ok", fail_first=1, fail_status=429, retry_after="0.4") as server:
        start = time.monotonic()
        assert client_for(server).complete([{"role": "user", "content": "x"}]) == "ok"
        assert time.monotonic() - start >= 0.35  # backoff_s is 0: only Retry-After can make it wait
    assert len(server.requests) == 2


def test_client_gives_up_after_the_last_retry():
    with (ChatServer(fail_always=True, fail_status=503) as server,
          pytest.raises(ChatError, match=r"after 3 attempts: HTTP 503: scripted failure") as info):
        client_for(server, max_retries=2).complete([{"role": "user", "content": "x"}])
    assert len(server.requests) == 3 and info.value.status == 503 and info.value.retryable


def test_client_sends_model_settings_and_the_key_as_bearer_but_never_shows_it(monkeypatch, caplog, capsys):
    secret = "sk-test-Very-Secret-123"
    monkeypatch.setenv("LMSAE_TEST_CHAT_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with ChatServer(lambda r: "fine", fail_first=1, fail_status=429) as server:
        client = ChatClient(server.url, "my-model", api_key_env="LMSAE_TEST_CHAT_KEY", temperature=0.25,
                            max_tokens=77, backoff_s=0.0)
        assert client.complete([{"role": "user", "content": "hi"}]) == "fine"
    request = server.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {secret}"
    assert request["body"] == {"model": "my-model", "messages": [{"role": "user", "content": "hi"}],
                               "temperature": 0.25, "max_tokens": 77}
    with ChatServer(lambda r: (401, {"error": {"message": "bad key"}}, {})) as server:
        bad = ChatClient(server.url, "m", api_key_env="LMSAE_TEST_CHAT_KEY")
        with pytest.raises(ChatError) as info:
            bad.complete([{"role": "user", "content": "hi"}])
    shown = repr(client) + str(info.value) + caplog.text + "".join(capsys.readouterr())
    assert secret not in shown and "bad key" in str(info.value)


def test_client_without_key_sends_no_authorization(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ChatServer(lambda r: "x") as server:
        client_for(server).complete([{"role": "user", "content": "hi"}])
    assert "Authorization" not in server.requests[0]["headers"]


def test_client_4xx_error_names_status_and_server_message_without_retrying():
    reply = lambda r: (400, {"error": {"message": "model 'nope' does not exist", "type": "invalid_request"}}, {})
    with ChatServer(reply) as server, pytest.raises(LmsaeError) as info:
        client_for(server).complete([{"role": "user", "content": "x"}])
    message = str(info.value)
    assert "HTTP 400" in message and "model 'nope' does not exist" in message and "\n" not in message
    assert len(server.requests) == 1


def test_client_unreachable_server_fails_fast():
    with socket.socket() as s:  # a port that was just free: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff_s=0.01, timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(ChatError, match=r"after 2 attempts: could not connect"):
        client.complete([{"role": "user", "content": "x"}])
    assert time.monotonic() - start < 3


def test_client_timeout_is_reported():
    with ChatServer(lambda r: "late", delay_s=1.0) as server, pytest.raises(ChatError, match="timed out"):
        client_for(server, max_retries=0, timeout_s=0.2).complete([{"role": "user", "content": "x"}])


def test_client_rejects_invalid_json_and_missing_content():
    with (ChatServer(lambda r: (200, "<html>proxy error</html>", {})) as server,
          pytest.raises(ChatError, match="not valid JSON")):
        client_for(server).complete([{"role": "user", "content": "x"}])
    with ChatServer(lambda r: (200, {"choices": []}, {})) as server, pytest.raises(ChatError, match="no choices"):
        client_for(server).complete([{"role": "user", "content": "x"}])


def test_client_rejects_a_url_without_scheme():
    with pytest.raises(LmsaeError, match="http"):
        ChatClient("localhost:8000/v1", "m")


# --- rendering and prompts ------------------------------------------------------------------------


def _text_sample(text: str, hot: str, level: float = 2.0) -> Sample:
    tokens = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    acts = np.zeros(tokens.size, dtype=np.float32)
    start = len(text[: text.index(hot)].encode("utf-8"))
    acts[start: start + len(hot.encode("utf-8"))] = level
    return Sample(tokens=tokens, activations=acts)


def test_render_sample_windows_around_the_peak_and_marks_strong_tokens():
    tok = ByteTokenizer()
    sample = _text_sample("a long prefix that is cut, then the cat sat down on the mat", "cat")
    excerpt = render_sample(tok, sample, window=10)
    assert excerpt.text == "then the cat sat dow"
    assert excerpt.highlighted(0.7) == "then the <<cat>> sat dow"
    assert excerpt.max_activation == pytest.approx(2.0)


def test_render_sample_merges_multibyte_characters_and_drops_special_tokens():
    tok = ByteTokenizer()
    text = "un café noir"
    sample = _text_sample(text, "é")
    sample = Sample(tokens=np.concatenate([[256], sample.tokens]), activations=np.concatenate([[0.0],
                                                                                               sample.activations]))
    excerpt = render_sample(tok, sample, window=50)
    assert "".join(excerpt.pieces) == text  # BOS (256) dropped
    assert excerpt.highlighted(0.5) == "un caf<<é>> noir"
    multiline = render_sample(tok, _text_sample("first line\nsecond cat", "cat"), window=50)
    assert multiline.text == "first line↵second cat"


def test_highlight_threshold_is_relative_to_the_excerpt_peak():
    e = Excerpt(["a", " b", " c", " d"], [4.0, 3.0, 1.0, 0.0])
    assert e.highlighted(0.7) == "<<a b>> c d"
    assert e.highlighted(0.2) == "<<a b c>> d"
    assert Excerpt(["x"], [0.0]).highlighted(0.5) == "x"


def test_load_tokenizer_for_tiny_random_is_the_byte_tokenizer():
    assert isinstance(load_tokenizer(TransformerLensConfig(model="tiny-random")), ByteTokenizer)


@pytest.mark.lm
@pytest.mark.slow
def test_token_pieces_of_a_byte_level_bpe_tokenizer_rebuild_the_text():
    from lmsae.models import smollm2

    smollm2.ensure_converted(progress=False)  # once per machine (cached); no-op afterwards
    tok = load_tokenizer(TransformerLensConfig(model="smollm2-135m"))
    text = "Hello world, naïve café 😀 def foo():\n    return 1"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = token_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids) and " world" in pieces
    # the emoji spans two tokens: the first adds nothing, the second the whole character
    i = pieces.index(" 😀")
    assert pieces[i - 1] == ""
    acts = np.zeros(len(ids), dtype=np.float32)
    acts[i - 1] = 3.0  # active on the first half of the emoji only
    excerpt = render_sample(tok, Sample(tokens=np.array(ids), activations=acts), window=40)
    assert "<< 😀>>" in excerpt.highlighted(0.5)


def test_explanation_prompt_lists_marked_examples():
    messages = explanation_messages([Excerpt(["the", " cat"], [0, 1]), Excerpt(["a", " cat"], [0, 2])], 0.7)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "Excerpt 1: the<< cat>>" in messages[1]["content"]
    assert "Excerpt 2: a<< cat>>" in messages[1]["content"]


@pytest.mark.parametrize("answer, expected", [
    ("the word cat", "the word cat"),
    ('Explanation: "the word cat".', "the word cat"),
    ("**Explanation:** mentions of cats\nBecause every example...", "mentions of cats"),
    ("Explanation:\n  'animal names'", "animal names"),
    ('"cat" and "dog" tokens', '"cat" and "dog" tokens'),
    ('{"final_explanation": "plural nouns", "steps": []}', "plural nouns"),
    ("```\nclosing brackets\n```", "closing brackets"),
])
def test_parse_explanation(answer, expected):
    assert parse_explanation(answer) == expected


def test_parse_explanation_rejects_empty_answers():
    with pytest.raises(AnswerFormatError):
        parse_explanation("  \n Explanation:  ")


@pytest.mark.parametrize("answer, expected", [
    ("[1, 3]", [True, False, True, False]),
    ("Active in 1, 3 and 4.", [True, False, True, True]),
    ("I think... [2]", [False, True, False, False]),
    ("[]", [False] * 4),
    ("None of them.", [False] * 4),
    ("[0, 2, 9]", [False, True, False, False]),  # out of range numbers are ignored
])
def test_parse_selection(answer, expected):
    assert parse_selection(answer, 4) == expected


def test_parse_selection_rejects_unreadable_answers():
    with pytest.raises(AnswerFormatError):
        parse_selection("I cannot tell.", 4)


@pytest.mark.parametrize("answer, expected", [
    ("[1, 0, 1]", [True, False, True]),
    ("[true, false, false]", [True, False, False]),
    ('["yes", "no", "yes"]', [True, False, True]),
    ("1, 1, 0", [True, True, False]),
])
def test_parse_judgements(answer, expected):
    assert parse_judgements(answer, 3) == expected


def test_parse_judgements_needs_one_per_excerpt():
    with pytest.raises(AnswerFormatError, match="expected 3"):
        parse_judgements("[1, 0]", 3)


def test_detection_trial_shuffles_unmarked_excerpts_with_their_truth():
    pos = [Excerpt([f"cat {i}"], [1.0], "top") for i in range(3)]
    neg = [Excerpt([f"dog {i}"], [0.0], "feature 9") for i in range(3)]
    trial = detection_trial("cats", pos, neg, random.Random(0))
    excerpts = _excerpts(trial.messages[1]["content"])
    assert len(excerpts) == 6 and "<<" not in trial.messages[1]["content"]
    assert [excerpts[i + 1].startswith("cat") for i in range(6)] == list(trial.truth)
    assert detection_trial("cats", pos, neg, random.Random(0)) == trial  # deterministic


def test_fuzzing_trial_marks_wrong_excerpts_away_from_the_active_tokens():
    tok = ByteTokenizer()
    rng = random.Random(1)
    correct = [render_sample(tok, _text_sample(f"the cat number {i} sat", "cat"), 40) for i in range(3)]
    wrong = [render_sample(tok, _text_sample(f"a cat number {i} ran", "cat"), 40) for i in range(3)]
    trial = fuzzing_trial("cats", correct, wrong, 0.7, rng)
    excerpts = _excerpts(trial.messages[1]["content"])
    for i, truth in enumerate(trial.truth):
        spans = re.findall(r"<<(.*?)>>", excerpts[i + 1])
        assert spans and (spans == ["cat"]) == truth
        if not truth:  # as many marked tokens as the real ones, never on them
            assert sum(len(s) for s in spans) == 3 and "cat" not in spans


# --- scoring maths --------------------------------------------------------------------------------


def naive_balanced_accuracy(truth, predicted):
    pos = [p for t, p in zip(truth, predicted) if t]
    neg = [not p for t, p in zip(truth, predicted) if not t]
    return (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2


def test_balanced_accuracy_matches_hand_computed_values():
    truth = [True, True, True, False]
    assert balanced_accuracy(truth, [True, False, True, True]) == pytest.approx((2 / 3 + 0) / 2)
    assert balanced_accuracy(truth, truth) == 1.0
    assert balanced_accuracy(truth, [not t for t in truth]) == 0.0
    assert balanced_accuracy(truth, [True] * 4) == 0.5  # "everything matches" earns chance
    m = binary_metrics(truth, [True, False, True, True])
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (2, 1, 0, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    rng = random.Random(3)
    for _ in range(50):
        t = [rng.random() < 0.5 for _ in range(10)]
        t[0], t[1] = True, False
        p = [rng.random() < 0.5 for _ in range(10)]
        assert balanced_accuracy(t, p) == pytest.approx(naive_balanced_accuracy(t, p))


def test_balanced_accuracy_with_one_class_uses_that_class_rate():
    assert balanced_accuracy([True, True], [True, False]) == 0.5
    assert np.isnan(balanced_accuracy([], []))


def test_detection_and_fuzzing_scores_from_answers():
    trial = Trial(messages=[], truth=[True, False, True, False],
                  items=[{"text": f"e{i}", "source": "s"} for i in range(4)])
    assert detection_score(trial, "[1, 3]").score == 1.0
    assert detection_score(trial, "[2, 4]").score == 0.0
    assert detection_score(trial, "1, 2").score == 0.5
    assert detection_score(trial, [1, 3, 4]).score == pytest.approx(0.75)
    result = fuzzing_score(trial, "[1, 0, 1, 0]")
    assert result.score == 1.0 and fuzzing_score(trial, "[0, 1, 0, 1]").score == 0.0
    assert result.examples[1] == {"number": 2, "text": "e1", "source": "s", "truth": False, "predicted": False}
    assert fuzzing_score(trial, [1, 1, 1, 0]).score == pytest.approx(0.75)
    json.dumps(detection_score(Trial([], [True]), "[1]").details())  # NaN metrics become null


# --- the task -------------------------------------------------------------------------------------


def test_task_interprets_alive_features_and_stores_scores(store, registry):
    with ChatServer(oracle) as server:
        summary, out = run_task(config(server), store, registry)
    assert summary["done"] == len(WORDS) and summary["skipped_dead"] == 1 and summary["failed"] == 0
    assert store.interpreted_features(DICT, "default") == set(WORDS)
    for index, word in WORDS.items():
        interp = store.get_interpretation(DICT, "default", index)
        assert interp.text == f'the word "{word}"' and interp.explainer_model == "scripted-model"
        assert interp.scores == {"detection": 1.0, "fuzzing": 1.0}
        assert interp.created_at > 0
        detection = interp.details["detection"]
        assert len(detection["examples"]) == 10 and sum(e["truth"] for e in detection["examples"]) == 5
        negatives = [e["source"] for e in detection["examples"] if not e["truth"]]
        assert all(s.startswith("feature ") and s != f"feature {index}" and s != f"feature {DEAD}" for s in negatives)
        assert word not in " ".join(e["text"] for e in detection["examples"] if not e["truth"])
        fuzz = interp.details["fuzzing"]["examples"]
        assert len(fuzz) == 10 and sum(e["truth"] for e in fuzz) == 5
        assert interp.details["explanation"]["answer"].startswith("Explanation:")
        assert "prompts" not in interp.details
    assert all(r["body"]["model"] == "scripted-model" and r["body"]["temperature"] == 0.0 for r in server.requests)
    assert len(server.requests) == 3 * len(WORDS)
    assert server.max_in_flight <= 2
    assert "6 interpreted" in out and "1 dead" in out and "detection 1.000" in out
    assert summary["mean_scores"] == {"detection": 1.0, "fuzzing": 1.0}


def test_task_is_deterministic_for_a_seed(store, registry):
    with ChatServer(oracle) as server:
        run_task(config(server, features=[1], save_prompts=True), store, registry)
    first = store.get_interpretation(DICT, "default", 1).details["prompts"]
    with ChatServer(oracle) as server:
        run_task(config(server, features=[1], save_prompts=True, overwrite=True), store, registry)
    assert store.get_interpretation(DICT, "default", 1).details["prompts"] == first
    assert set(first) == {"explanation", "detection", "fuzzing"}


def test_task_resumes_without_requests_for_done_features(store, registry):
    with ChatServer(oracle) as server:
        run_task(config(server), store, registry)
    before = {i: store.get_interpretation(DICT, "default", i) for i in WORDS}
    with ChatServer(fail_always=True, fail_status=500) as broken:
        summary, out = run_task(config(broken), store, registry)
    assert broken.requests == []
    assert summary["done"] == 0 and summary["skipped_existing"] == len(WORDS)
    assert {i: store.get_interpretation(DICT, "default", i) for i in WORDS} == before
    assert "already interpreted" in out


def test_task_overwrite_redoes_interpretations(store, registry):
    store.put_interpretation(DICT, "default", Interpretation(index=0, text="old", explainer_model="x"))
    with ChatServer(oracle) as server:
        summary, _ = run_task(config(server, features=[0, 1]), store, registry)
    assert summary["done"] == 1 and summary["skipped_existing"] == 1
    assert store.get_interpretation(DICT, "default", 0).text == "old"
    with ChatServer(oracle) as server:
        summary, _ = run_task(config(server, features=[0, 1], overwrite=True), store, registry)
    assert summary["done"] == 2 and len(server.requests) == 6
    assert store.get_interpretation(DICT, "default", 0).text == 'the word "cat"'


def test_task_skips_dead_and_limits_the_number_of_features(store, registry):
    with ChatServer(oracle) as server:
        summary, _ = run_task(config(server, features=[DEAD, 3, 5, 6], max_features=2), store, registry)
    assert summary["skipped_dead"] == 1 and summary["done"] == 2
    assert store.interpreted_features(DICT, "default") == {3, 5}


def test_task_bounds_concurrent_requests(store, registry):
    with ChatServer(oracle, delay_s=0.05) as server:
        run_task(config(server, max_workers=2), store, registry)
    assert server.max_in_flight == 2  # concurrent, and never more than max_workers
    with ChatServer(oracle, delay_s=0.02) as server:
        run_task(config(server, max_workers=1, overwrite=True), store, registry)
    assert server.max_in_flight == 1


def test_a_failing_feature_does_not_stop_the_others(store, registry):
    def flaky(request):
        if '"fish"' in _user(request) or "<<fish>>" in _user(request):
            return 500, {"error": {"message": "fish overload"}}, {}
        return oracle(request)

    with ChatServer(flaky) as server:
        summary, out = run_task(config(server), store, registry)
    assert summary["failed"] == 1 and summary["done"] == len(WORDS) - 1
    assert "fish overload" in summary["failures"][2] and "feature 2" in out
    assert 2 not in store.interpreted_features(DICT, "default")
    with ChatServer(oracle) as server:  # a rerun only does what is missing
        summary, _ = run_task(config(server), store, registry)
    assert summary["done"] == 1 and len(server.requests) == 3
    assert store.get_interpretation(DICT, "default", 2).scores == {"detection": 1.0, "fuzzing": 1.0}


def test_task_raises_when_every_request_fails(store, registry):
    with (ChatServer(fail_always=True, fail_status=503) as server,
          pytest.raises(LmsaeError, match="failed for every feature.*HTTP 503")):
        run_task(config(server, max_workers=1), store, registry)
    # it stopped early instead of trying all six features
    assert len(server.requests) == 3
    assert store.interpreted_features(DICT, "default") == set()


def test_task_scores_chance_for_an_uninformative_explainer(store, registry):
    def lazy(request):
        system = request["messages"][0]["content"]
        n = len(_excerpts(_user(request)))
        if system == EXPLAIN_SYSTEM:
            return "stuff"
        return json.dumps(list(range(1, n + 1)) if system == DETECT_SYSTEM else [1] * n)

    with ChatServer(lazy) as server:
        run_task(config(server, features=[0], scorers=["detection"]), store, registry)
    interp = store.get_interpretation(DICT, "default", 0)
    assert interp.text == "stuff" and interp.scores == {"detection": 0.5}
    assert len(server.requests) == 2


def test_task_errors_name_the_missing_dictionary_and_analysis(store, registry):
    with ChatServer(oracle) as server:
        with pytest.raises(LmsaeError, match="no dictionary 'toy-sea'.*did you mean 'toy-sae'"):
            run_task(config(server, dictionary_name="toy-sea"), store, registry)
        with pytest.raises(LmsaeError, match="no analysis 'other'; known analyses: default"):
            run_task(config(server, analysis_name="other"), store, registry)
    assert server.requests == []


def test_config_from_plain_data_and_the_example(registry):
    # the task is not registered yet (the CLI wiring comes later): structure the class directly
    cfg = registry.structure({"dictionary_name": "d", "model": {"backend": "transformer_lens", "model": "tiny-random"},
                              "explainer": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "temperature": 0.5},
                              "scorers": ["detection"], "features": [1, 2]}, task.AutoInterpRunConfig)
    assert cfg.explainer.temperature == 0.5 and cfg.scorers == ["detection"] and cfg.features == [1, 2]
    with pytest.raises(LmsaeError, match="scorers"):
        registry.structure({"dictionary_name": "d", "scorers": ["simulation"]}, task.AutoInterpRunConfig)
    with pytest.raises(LmsaeError, match="max_workers"):
        registry.structure({"dictionary_name": "d", "max_workers": 0}, task.AutoInterpRunConfig)
    example = task.example(registry)
    plain = registry.unstructure(example)
    assert plain.pop("task") == "autointerp"  # the tag picks the class once the task is registered
    assert registry.structure(plain, task.AutoInterpRunConfig) == example
    assert task.SPEC.name == "autointerp" and task.SPEC.factory is task.run


def test_task_prefers_a_non_activating_sampling_and_skips_features_without_samples(store, registry):
    rng = random.Random(7)
    quiet = [_sample("pond", 0.0, rng) for _ in range(6)]
    fa = _analysis(0)
    store.put_feature_analyses(DICT, "default", "default", [
        attrs.evolve(fa, samplings=[*fa.samplings, Sampling("non_activating", quiet)]),
        FeatureAnalysis(index=9, act_count=5, n_tokens=100, max_activation=1.0, histogram_counts=np.ones(1),
                        histogram_edges=np.array([0.0, 1.0]))])
    with ChatServer(oracle) as server:
        summary, out = run_task(config(server, features=[0, 9]), store, registry)
    assert summary["done"] == 1 and summary["skipped_no_examples"] == 1 and "1 without examples" in out
    negatives = [e for e in store.get_interpretation(DICT, "default", 0).details["detection"]["examples"]
                 if not e["truth"]]
    assert len(negatives) == 5 and all(e["source"] == "non_activating" for e in negatives)
    assert len(server.requests) == 3


def test_client_error_messages_hide_credentials_in_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(f"http://user:hunter2@127.0.0.1:{port}/v1?key=abc", "m", max_retries=0, timeout_s=0.5)
    with pytest.raises(ChatError) as info:
        client.complete([{"role": "user", "content": "x"}])
    assert "hunter2" not in str(info.value) + repr(client) and "abc" not in str(info.value)
