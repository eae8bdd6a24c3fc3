"""Feature reports: ``lmsae show feature`` (terminal) and ``lmsae report`` (static HTML).

Runs against :class:`FakeStore`, an in-memory implementation of the store contract (the browser
test loads this file for it).
"""

from __future__ import annotations

import html.parser
import json
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest

from lmsae import cli as cli_module
from lmsae.errors import LmsaeError, StoreError
from lmsae.report import commands as report_commands
from lmsae.report.html import MARKER, write_report
from lmsae.report.terminal import render_feature, sparkline
from lmsae.report.text import (
    IdTokenizer,
    TokenDecoder,
    bytes_text,
    clean_token_string,
    context_window,
    load_feature_view,
    tokenizer_for,
    tokenizer_for_dictionary,
    visible,
    window_bounds,
)
from lmsae.stores.base import (
    DictionaryRecord,
    EvaluationRecord,
    FeatureAnalysis,
    Interpretation,
    LogitAttribution,
    NamedConfigRecord,
    Sample,
    Sampling,
    Store,
    TokenLogit,
)

# --- an in-memory store ----------------------------------------------------------------------


class FakeStore(Store):
    """Every record in dictionaries (just enough of the contract for the reports)."""

    def __init__(self) -> None:
        self.models: dict[str, NamedConfigRecord] = {}
        self.datasets: dict[str, NamedConfigRecord] = {}
        self.dictionaries: dict[tuple[str, str], DictionaryRecord] = {}
        self.analyses: dict[tuple[str, str, str], dict[int, FeatureAnalysis]] = {}
        self.logits: dict[tuple[str, str], dict[int, LogitAttribution]] = {}
        self.interpretations: dict[tuple[str, str], dict[int, Interpretation]] = {}
        self.evaluations: dict[tuple[str, str], list[EvaluationRecord]] = {}
        self.closed = False

    def _table(self, table: str) -> dict[str, NamedConfigRecord]:
        return self.models if table == "language_models" else self.datasets

    def _put_named(self, table: str, record: NamedConfigRecord) -> None:
        self._table(table)[record.name] = record

    def _get_named(self, table: str, name: str) -> NamedConfigRecord | None:
        return self._table(table).get(name)

    def put_dictionary(self, record: DictionaryRecord) -> None:
        self.dictionaries[(record.name, record.series)] = record

    def get_dictionary(self, name: str, series: str = "default") -> DictionaryRecord | None:
        return self.dictionaries.get((name, series))

    def list_dictionaries(self, series: str | None = None) -> list[DictionaryRecord]:
        return [d for d in self.dictionaries.values() if series is None or d.series == series]

    def remove_dictionary(self, name: str, series: str = "default") -> bool:
        return self.dictionaries.pop((name, series), None) is not None

    def put_feature_analyses(self, name: str, series: str, analysis: str,
                             features: Iterable[FeatureAnalysis]) -> None:
        if (name, series) not in self.dictionaries:
            raise StoreError(f"unknown dictionary {name!r}")
        self.analyses.setdefault((name, series, analysis), {}).update({f.index: f for f in features})

    def get_feature_analysis(self, name: str, series: str, index: int,
                             analysis: str = "default") -> FeatureAnalysis | None:
        return self.analyses.get((name, series, analysis), {}).get(index)

    def list_analyses(self, name: str, series: str = "default") -> list[str]:
        return sorted(a for (n, s, a) in self.analyses if (n, s) == (name, series))

    def feature_statistics(self, name: str, series: str, analysis: str = "default") -> dict[str, np.ndarray]:
        features = sorted(self.analyses.get((name, series, analysis), {}).values(), key=lambda f: f.index)
        return {"index": np.array([f.index for f in features], dtype=np.int64),
                "act_count": np.array([f.act_count for f in features], dtype=np.int64),
                "n_tokens": np.array([f.n_tokens for f in features], dtype=np.int64),
                "max_activation": np.array([f.max_activation for f in features], dtype=np.float32)}

    def put_logit_attributions(self, name: str, series: str, attributions: Iterable[LogitAttribution]) -> None:
        self.logits.setdefault((name, series), {}).update({a.index: a for a in attributions})

    def get_logit_attribution(self, name: str, series: str, index: int) -> LogitAttribution | None:
        return self.logits.get((name, series), {}).get(index)

    def put_interpretation(self, name: str, series: str, interpretation: Interpretation) -> None:
        self.interpretations.setdefault((name, series), {})[interpretation.index] = interpretation

    def get_interpretation(self, name: str, series: str, index: int) -> Interpretation | None:
        return self.interpretations.get((name, series), {}).get(index)

    def interpreted_features(self, name: str, series: str) -> set[int]:
        return set(self.interpretations.get((name, series), {}))

    def put_evaluation(self, name: str, series: str, record: EvaluationRecord) -> None:
        self.evaluations.setdefault((name, series), []).append(record)

    def list_evaluations(self, name: str, series: str = "default") -> list[EvaluationRecord]:
        return list(self.evaluations.get((name, series), []))

    def close(self) -> None:
        self.closed = True


# --- test data -------------------------------------------------------------------------------

#: a tokenizer whose tokens are whole strings, some of them hostile to HTML and terminals
VOCAB = ["The", " cat", " sat", " on", " the", " mat", ".", "\n", " <script>", "alert(1)", "</script>", " &",
         ' "quoted"', " dog", "\x1b[31m", " ran"]


class VocabTokenizer:
    def decode(self, ids: Iterable[int], **_: Any) -> str:
        return "".join(VOCAB[int(i)] for i in ids)


def tok(*words: str) -> list[int]:
    return [VOCAB.index(w) for w in words]


def sample(words: Iterable[str], acts: Iterable[float], **meta: Any) -> Sample:
    return Sample(tokens=np.array(tok(*words), dtype=np.int64), activations=np.array(list(acts), dtype=np.float32),
                  meta=meta)


N_FEATURES = 8
ANALYSED = [0, 1, 2, 3, 4, 5]
NAME = "demo"


def analysis_of(index: int) -> FeatureAnalysis:
    if index == 3:  # a dead feature: no samples at all
        return FeatureAnalysis(index=3, act_count=0, n_tokens=1000, max_activation=0.0,
                               histogram_counts=np.zeros(4), histogram_edges=np.linspace(0, 1, 5))
    peak = 1.0 + index
    top = Sampling("top_activations", [
        sample(["The", " cat", " sat", " on", " the", " mat", "."], [0, peak, 0.25 * peak, 0, 0, 0, 0],
               dataset="toy", document_index=7),
        sample(["The", " dog", " ran", " <script>", "alert(1)", "</script>", " &", ' "quoted"', "\n", "\x1b[31m"],
               [0, 0.5 * peak, 0, 0.83 * peak, 0, 0, 0, 0, 0, 0], dataset="toy", document_index=9),
    ])
    quantile = Sampling("quantile_0.25-0.50", [sample([" the", " mat", "."], [0, 0.3 * peak, 0])])
    return FeatureAnalysis(index=index, act_count=10 * (index + 1), n_tokens=1000, max_activation=peak,
                           histogram_counts=np.array([5, 3, 0, 2]), histogram_edges=np.linspace(0, peak, 5),
                           samplings=[quantile, top], extras={"decoder_norm": 1.5})


def populate(store: Store, *, model_name: str = "tiny-random") -> Store:
    store.put_language_model(NamedConfigRecord("tiny-random", {"backend": "transformer_lens", "model": "tiny-random"}))
    store.put_dictionary(DictionaryRecord(
        name=NAME, series="default", path="/runs/demo", model_name=model_name, created_at=1.7e9,
        config={"architecture": "sae", "d_model": 4, "d_sae": N_FEATURES, "hook_point_in": "blocks.0.hook_resid_pre"}))
    store.put_feature_analyses(NAME, "default", "default", [analysis_of(i) for i in ANALYSED])
    store.put_logit_attributions(NAME, "default", [LogitAttribution(
        index=1, top_positive=[TokenLogit(13, "Ġdog", 2.5), TokenLogit(1, "Ġcat", 1.25)],
        top_negative=[TokenLogit(5, "Ġmat", -1.75)])])
    store.put_interpretation(NAME, "default", Interpretation(
        index=1, text='animals & <pets> "named"', explainer_model="gpt-test",
        scores={"detection": 0.83, "fuzzing": 0.71}, created_at=1.7e9))
    store.put_interpretation(NAME, "default", Interpretation(index=2, text="sitting", explainer_model="gpt-test",
                                                             scores={"detection": 0.4}))
    return store


@pytest.fixture
def store() -> FakeStore:
    return populate(FakeStore())


@pytest.fixture
def decoder() -> TokenDecoder:
    return TokenDecoder(VocabTokenizer())


def make_report(store: Store, out: pathlib.Path, **kwargs: Any) -> Any:
    return write_report(store, NAME, out, decoder=TokenDecoder(VocabTokenizer()), **kwargs)


# --- HTML parsing helpers --------------------------------------------------------------------


class _Collector(html.parser.HTMLParser):
    """Rows of the features table (their attributes) and the text of every context."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[dict[str, str]] = []
        self.contexts: list[str] = []
        self._ctx_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and "data-index" in a:
            self.rows.append(a)
        if tag == "span":
            if self._ctx_depth:
                self._ctx_depth += 1
            elif a.get("class") == "ctx":
                self._ctx_depth = 1
                self.contexts.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._ctx_depth:
            self._ctx_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._ctx_depth:
            self.contexts[-1] += data


def parse(path: pathlib.Path) -> _Collector:
    collector = _Collector()
    collector.feed(path.read_text(encoding="utf-8"))
    return collector


# --- token text ------------------------------------------------------------------------------


def test_visible_keeps_one_line_and_no_control_characters():
    assert visible("a\nb\tc\rd") == "a↵b⇥c␍d"
    assert visible("\x1b[31m") == "\\x1b[31m"
    assert visible("\x7f\x85") == "\\x7f\\x85"
    assert clean_token_string("ĠThe") == " The" and clean_token_string("Ċ") == "\n"
    assert clean_token_string("日本") == "日本"  # not byte-level: left alone
    assert clean_token_string("ĠâĢĶ") == " —" and clean_token_string("▁The") == " The"
    assert bytes_text(b"a\xe2\x80") == "a<0xE2><0x80>" and bytes_text("é".encode()) == "é"


def test_window_bounds_keep_size_and_centre_on_the_peak():
    assert window_bounds(100, 80, 10) == (74, 84)  # two thirds before the peak
    assert window_bounds(100, 2, 10) == (0, 10)  # shifted at the start
    assert window_bounds(100, 99, 10) == (90, 100)  # and at the end
    assert window_bounds(5, 2, 10) == (0, 5)
    assert window_bounds(5, 2, None) == (0, 5)


def test_context_window_marks_cuts(decoder):
    words = [" cat"] * 40
    acts = [0.0] * 40
    acts[30] = 2.0
    ctx = context_window(sample(words, acts), decoder, 6)
    assert len(ctx.tokens) == 6 and ctx.cut_left and ctx.cut_right
    assert ctx.activations[ctx.peak] == 2.0 and ctx.peak_value == 2.0


def test_tiny_random_tokenizer_and_model_config_override():
    tokenizer = tokenizer_for("tiny-random")
    assert TokenDecoder(tokenizer).tokens(list(b"hi\n")) == ["h", "i", "\n"]
    # the stored backend config names the model; the record's name is only a label
    assert tokenizer_for("my-label", {"backend": "transformer_lens", "model": "tiny-random"}) is tokenizer
    # one byte of a multi-byte character shows as its raw byte, not as U+FFFD
    assert TokenDecoder(tokenizer).tokens(list("é".encode())) == ["<0xC3>", "<0xA9>"]


@pytest.mark.lm
def test_smollm2_tokens_decode_byte_level_markers():
    tokenizer = tokenizer_for("smollm2-135m")
    ids = tokenizer.encode(" hello world\nnext", add_special_tokens=False)
    pieces = TokenDecoder(tokenizer).tokens(ids)
    assert "".join(pieces) == " hello world\nnext"
    assert " hello" in pieces and "\n" in pieces  # not 'Ġhello' / 'Ċ'
    assert not any("Ġ" in p or "Ċ" in p for p in pieces)
    # a character split over tokens shows its bytes, not U+FFFD
    pieces = TokenDecoder(tokenizer).tokens(tokenizer.encode(" 🎉", add_special_tokens=False))
    assert "\ufffd" not in "".join(pieces) and "<0x9F>" in "".join(pieces)


def test_unknown_model_falls_back_to_token_ids(store, caplog):
    record = store.get_dictionary(NAME)
    unknown = DictionaryRecord(name="x", series="default", path="", config={}, model_name="/no/such/model/dir")
    assert isinstance(tokenizer_for_dictionary(store, unknown), IdTokenizer)
    assert "showing token ids" in caplog.text
    assert TokenDecoder(IdTokenizer()).tokens([5, 7]) == ["⟨5⟩", "⟨7⟩"]
    # the fake records the tiny model under the dictionary's model name
    assert not isinstance(tokenizer_for_dictionary(store, record), IdTokenizer)


# --- terminal --------------------------------------------------------------------------------


def test_terminal_without_colour_uses_markers(store, decoder):
    view = load_feature_view(store, NAME, 1)
    out = render_feature(view, decoder, color=False)
    assert "\x1b" not in out  # neither our codes nor the token's own escape sequence
    lines = out.splitlines()
    assert lines[0] == "demo · feature 1"
    assert "architecture sae" in lines[1] and "model tiny-random" in lines[1]
    assert "activations  20 of 1,000 tokens (density 2%)" in out
    assert "max          2.00" in out
    assert "histogram    0 " in out and "█" in out
    assert "promotes     ' dog' +2.50  ' cat' +1.25" in out
    assert "suppresses   ' mat' -1.75" in out
    assert 'explanation  animals & <pets> "named"' in out
    assert "scores       detection 0.83  fuzzing 0.71" in out
    assert "top_activations (2 of 2)" in out
    assert "The« cat:2.00»« sat:0.50» on the mat." in out
    assert "« dog:1.00» ran« <script>:1.66»alert(1)</script> & \"quoted\"↵\\x1b[31m" in out
    quantile = next(line for line in lines if line.startswith("quantile_0.25-0.50"))
    assert "« mat:0.60»" in quantile
    # the top sampling comes first even though the analysis lists it second
    assert out.index("top_activations") < out.index("quantile_0.25-0.50")


def test_terminal_with_colour_uses_ansi_backgrounds(store, decoder):
    out = render_feature(load_feature_view(store, NAME, 1), decoder, color=True)
    assert "\x1b[48;5;196m" in out  # the peak gets the strongest colour of the ramp
    assert "\x1b[48;5;" in out and "«" not in out
    assert "\x1b[31m" not in out  # a token's own escape sequence is still neutralised


def test_terminal_window_and_sample_count(store, decoder):
    view = load_feature_view(store, NAME, 1)
    out = render_feature(view, decoder, color=False, samples=1, window=3)
    assert "top_activations (1 of 2)" in out
    assert "The« cat:2.00»« sat:0.50»…" in out  # 3 tokens around the peak, cut on the right
    assert " dog" not in out.split("top_activations")[1].split("quantile")[0]


def test_dead_feature_renders(store, decoder):
    out = render_feature(load_feature_view(store, NAME, 3), decoder, color=False)
    assert "activations  0 of 1,000 tokens (density 0%)" in out and "no contexts recorded" in out
    assert "histogram" not in out


def test_sparkline_rebins_and_never_hides_a_bin():
    assert sparkline([1, 0, 100]) == "▁ █"
    assert len(sparkline(np.ones(500), width=40)) == 40


@pytest.mark.parametrize("call, message", [
    (lambda s: load_feature_view(s, "dmeo", 1),
     "no dictionary 'dmeo' in series 'default'; known: demo; did you mean 'demo'?"),
    (lambda s: load_feature_view(s, NAME, 1, analysis="defualt"), "did you mean 'default'?"),
    (lambda s: load_feature_view(s, NAME, 99),
     "feature index 99 is out of range: dictionary 'demo' has 8 features (0..7)"),
    (lambda s: load_feature_view(s, NAME, -1), "out of range"),
    (lambda s: load_feature_view(s, NAME, 7),
     "feature 7 of 'demo' has no 'default' analysis; the nearest analysed feature is 5"),
])
def test_missing_records_raise_store_errors(store, call, message):
    with pytest.raises(StoreError) as info:
        call(store)
    assert message in str(info.value)


def test_dictionary_without_analyses(store):
    store.put_dictionary(DictionaryRecord(name="bare", series="default", path="", config={"d_sae": 4}))
    with pytest.raises(StoreError, match="has no feature analyses yet"):
        load_feature_view(store, "bare", 0)


# --- the commands ----------------------------------------------------------------------------


@pytest.fixture
def lmsae(monkeypatch, capsys):
    """Run ``lmsae ARGS`` (with the report commands); returns (exit code, stdout, stderr)."""
    from lmsae.registry import load_registry
    from lmsae.testing.plugins import fake_entry_points

    fake_entry_points(monkeypatch, [])
    registry = load_registry(plugins=["lmsae.testing.toy"])
    add_plugin_commands = cli_module._add_plugin_commands

    def with_report_commands(cli, reg):
        added = add_plugin_commands(cli, reg)
        if "report" not in cli.commands:  # until the core plugin registers them
            report_commands.register(cli)
        return added

    monkeypatch.setattr(cli_module, "_add_plugin_commands", with_report_commands)

    def run(*argv: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as info:
            cli_module.main(list(argv), registry=registry)
            raise SystemExit(0)
        out = capsys.readouterr()
        return info.value.code or 0, out.out, out.err

    return run


@pytest.fixture
def cli_run(lmsae, monkeypatch, store):
    """``lmsae`` reading the fake store, whose token ids are VOCAB's."""
    opened: list[tuple[Any, ...]] = []

    def fake_open(*options: Any) -> Store:
        opened.append(options)
        return store

    monkeypatch.setattr(report_commands, "open_store", fake_open)
    from lmsae.report import html as report_html
    from lmsae.report import text as report_text

    for module in (report_text, report_html):
        monkeypatch.setattr(module, "tokenizer_for_dictionary", lambda _store, _record: VocabTokenizer())
    lmsae.opened = opened  # type: ignore[attr-defined]
    return lmsae


def test_show_feature_command_plain_when_not_a_terminal(cli_run):
    code, out, err = cli_run("show", "feature", NAME, "1", "--store-dir", "/somewhere", "-n", "1")
    assert code == 0, err
    assert "\x1b" not in out and "«" in out
    assert "top_activations (1 of 2)" in out
    assert "The« cat:2.00»« sat:0.50» on the mat." in out
    assert cli_run.opened == [(pathlib.Path("/somewhere"), None, None)]


def test_show_feature_command_forced_colour(cli_run):
    code, out, _ = cli_run("show", "feature", NAME, "1", "--color", "--window", "4")
    assert code == 0 and "\x1b[48;5;" in out


@pytest.mark.parametrize("argv, message", [
    (["show", "feature", "dmeo", "1"], "did you mean 'demo'?"),
    (["show", "feature", NAME, "1", "--analysis", "defualt"], "did you mean 'default'?"),
    (["show", "feature", NAME, "42"], "feature index 42 is out of range"),
    (["report", "dmeo", "--out", "unused"], "did you mean 'demo'?"),
])
def test_command_errors_exit_2_on_one_line(cli_run, argv, message):
    code, _, err = cli_run(*argv)
    assert code == 2
    assert message in err and err.startswith("lmsae: error: ") and "Traceback" not in err


def test_report_command(cli_run, tmp_path):
    out = tmp_path / "site"
    code, stdout, err = cli_run("report", NAME, "--out", str(out), "--features", "0-1,4", "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in (out / "features").iterdir()) == ["0.html", "1.html", "4.html"]
    assert "wrote 3 feature pages" in stdout and (out / "index.html").as_uri() in stdout
    code, _, err = cli_run("report", NAME, "--out", str(out), "--max-features", "2", "--no-progress")
    assert code == 2 and "pass --overwrite" in err
    code, _, err = cli_run("report", NAME, "--out", str(out), "--max-features", "2", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in (out / "features").iterdir()) == ["0.html", "1.html"]
    assert "writing pages" in err  # the progress bar
    code, _, err = cli_run("report", NAME, "--out", str(out), "--features", "1,x")
    assert code == 2 and "'x' is not a feature index" in err


def put_byte_feature(store: Store, name: str, text: str, peak_at: int) -> None:
    """A dictionary of tiny-random (byte tokens) with one feature peaking on ``text[peak_at]``."""
    store.put_language_model(NamedConfigRecord("tiny-random", {"backend": "transformer_lens", "model": "tiny-random"}))
    store.put_dictionary(DictionaryRecord(name=name, series="default", path="", model_name="tiny-random",
                                          config={"architecture": "sae", "d_sae": 2}))
    acts = np.zeros(len(text), dtype=np.float32)
    acts[peak_at] = 1.0
    store.put_feature_analyses(name, "default", "default", [FeatureAnalysis(
        index=0, act_count=1, n_tokens=len(text), max_activation=1.0, histogram_counts=[1], histogram_edges=[0, 1],
        samplings=[Sampling("top_activations", [Sample(list(text.encode()), acts, {"document_index": 0})])])])


def test_commands_read_a_local_store(lmsae, tmp_path):
    from lmsae.stores.configs import LocalStoreConfig
    from lmsae.stores.local import LocalStore

    with LocalStore(LocalStoreConfig(directory=tmp_path / "store")) as store:
        put_byte_feature(store, "bytes", "a <b> & c", 2)
    code, out, err = lmsae("show", "feature", "bytes", "0", "--store-dir", str(tmp_path / "store"), "--no-color")
    assert code == 0, err
    assert "a «<:1.00»b> & c" in out
    code, out, err = lmsae("report", "bytes", "--store-dir", str(tmp_path / "store"), "--out", str(tmp_path / "site"))
    assert code == 0, err
    assert parse(tmp_path / "site" / "features" / "0.html").contexts == ["a <b> & c"]
    code, _, err = lmsae("show", "feature", "bytes", "1", "--store-dir", str(tmp_path / "store"))
    assert code == 2 and "feature 1 of 'bytes' has no 'default' analysis; the nearest analysed feature is 0" in err


def test_parse_feature_list():
    parse_list = report_commands.parse_feature_list
    assert parse_list(None, None, "3, 1,1-2 ,") == [1, 2, 3]
    assert parse_list(None, None, None) is None
    import click

    for bad in ("5-1", "-1", "a", ","):
        with pytest.raises(click.BadParameter):
            parse_list(None, None, bad)


# --- the HTML report -------------------------------------------------------------------------


def test_report_layout_and_index(store, tmp_path):
    result = make_report(store, tmp_path / "site")
    out = tmp_path / "site"
    assert result.features == tuple(ANALYSED)
    assert sorted(p.name for p in out.iterdir()) == ["features", "index.html", MARKER]
    assert json.loads((out / MARKER).read_text())["format"] == "lmsae-report"
    rows = parse(out / "index.html").rows
    assert [int(r["data-index"]) for r in rows] == ANALYSED
    for row in rows:  # every sort key is a data attribute
        assert {"data-act_count", "data-density", "data-max_activation", "data-explanation",
                "data-detection"} <= set(row)
    by_index = {int(r["data-index"]): r for r in rows}
    assert by_index[1]["data-act_count"] == "20" and float(by_index[1]["data-density"]) == 0.02
    assert by_index[1]["data-detection"] == "0.83" and by_index[0]["data-detection"] == ""
    assert by_index[1]["data-explanation"] == 'animals & <pets> "named"'  # (unescaped by the parser)
    assert by_index[3].get("class") == "dead"
    page = (out / "index.html").read_text()
    assert 'href="features/1.html"' in page
    assert "animals &amp; &lt;pets&gt; &quot;named&quot;" in page
    for key in ("index", "act_count", "density", "max_activation", "explanation", "detection"):
        assert f'data-key="{key}"' in page
    assert "<script>" in page and "fetch(" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")


def test_feature_page_contexts_histogram_logits_and_escaping(store, tmp_path):
    make_report(store, tmp_path / "site")
    path = tmp_path / "site" / "features" / "1.html"
    page = path.read_text()
    contexts = parse(path).contexts
    assert contexts == [
        "The cat sat on the mat.",
        'The dog ran <script>alert(1)</script> & "quoted"↵\\x1b[31m',
        " the mat.",
    ]
    # the hostile token is escaped; only our own script element is real
    assert 'title="1.66"> &lt;script&gt;</span>alert(1)&lt;/script&gt; &amp; &quot;quoted&quot;↵' in page
    assert page.count("<script>") == 1 and "\x1b" not in page
    # activation highlighting: opacity proportional to activation, value in the title
    assert '<span class="on pk" style="--a:1.000" title="2.00"> cat</span>' in page
    assert '<span class="on" style="--a:0.250" title="0.50"> sat</span>' in page
    # inline SVG histogram with one bar per bin (empty bins included)
    assert page.count('<svg class="hist"') == 1 and page.count('<rect class="bar"') == 4
    assert "<title>0.50 – 1.00: 3</title>" in page
    assert "animals &amp; &lt;pets&gt; &quot;named&quot;" in page and "detection <b>0.83</b>" in page
    assert '<td class="tok"> dog</td><td class="num">+2.500</td>' in page
    assert "quantile_0.25-0.50" in page and "top_activations" in page
    assert 'title="dataset=toy document_index=7"' in page
    assert 'rel="prev" href="0.html"' in page and 'rel="next" href="2.html"' in page
    assert "decoder_norm" in page


def test_report_window_hides_far_tokens_until_asked(store, tmp_path):
    make_report(store, tmp_path / "site", window=2)
    page = (tmp_path / "site" / "features" / "1.html").read_text()
    assert '<span class="far">' in page and '<span class="cut">…</span>' in page
    assert 'id="full"' in page and "#full:checked~.sampling .far{display:inline}" in page


def test_dead_feature_page(store, tmp_path):
    make_report(store, tmp_path / "site", features=[3])
    page = (tmp_path / "site" / "features" / "3.html").read_text()
    assert "no contexts recorded" in page and 'rel="prev"' not in page and 'rel="next"' not in page


def test_features_and_max_features_limit_the_report(store, tmp_path):
    result = make_report(store, tmp_path / "a", features=[4, 1, 4])
    assert result.features == (1, 4)
    assert sorted(p.name for p in (tmp_path / "a" / "features").iterdir()) == ["1.html", "4.html"]
    assert [r["data-index"] for r in parse(tmp_path / "a" / "index.html").rows] == ["1", "4"]
    result = make_report(store, tmp_path / "b", max_features=3)
    assert result.features == (0, 1, 2)
    assert make_report(store, tmp_path / "c", features=[5, 2, 0], max_features=2).features == (0, 2)
    with pytest.raises(StoreError, match="nearest analysed feature is 5"):
        make_report(store, tmp_path / "d", features=[7])
    with pytest.raises(StoreError, match="out of range"):
        make_report(store, tmp_path / "d", features=[8])
    with pytest.raises(LmsaeError, match="at least 1"):
        make_report(store, tmp_path / "d", max_features=0)
    assert not (tmp_path / "d").exists()


def test_missing_dictionary_or_analysis(store, tmp_path):
    with pytest.raises(StoreError, match="did you mean 'demo'"):
        write_report(store, "dem", tmp_path / "x")
    with pytest.raises(StoreError, match="did you mean 'default'"):
        make_report(store, tmp_path / "x", analysis="defaul")


def leftovers(parent: pathlib.Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_overwrite_rules(store, tmp_path):
    out = tmp_path / "site"
    make_report(store, out, max_features=1)
    (out / "stale.txt").write_text("from the previous report")
    with pytest.raises(LmsaeError, match="pass --overwrite"):
        make_report(store, out)
    assert (out / "stale.txt").exists()
    make_report(store, out, overwrite=True)
    assert not (out / "stale.txt").exists() and len(list((out / "features").iterdir())) == len(ANALYSED)

    # a directory that is not a report is never replaced, even with overwrite
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(LmsaeError, match="not an lmsae report"):
            make_report(store, other, overwrite=overwrite)
    assert (other / "thesis.tex").read_text() == "precious" and sorted(os_names(other)) == ["thesis.tex"]

    a_file = tmp_path / "file.html"
    a_file.write_text("x")
    with pytest.raises(LmsaeError, match="not a directory"):
        make_report(store, a_file, overwrite=True)

    empty = tmp_path / "empty"
    empty.mkdir()
    make_report(store, empty)  # an empty directory is fine
    assert (empty / "index.html").is_file()
    assert leftovers(tmp_path) == []


def os_names(path: pathlib.Path) -> list[str]:
    return [p.name for p in path.iterdir()]


def test_failed_write_leaves_previous_report_and_no_temp_dirs(store, tmp_path, monkeypatch):
    out = tmp_path / "site"
    make_report(store, out, max_features=2)
    before = sorted(p.name for p in (out / "features").iterdir())
    from lmsae.report import html as report_html

    real = report_html.feature_page
    calls = []

    def flaky(view, *args, **kwargs):
        calls.append(view.index)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(view, *args, **kwargs)

    monkeypatch.setattr(report_html, "feature_page", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        make_report(store, out, overwrite=True)
    assert sorted(p.name for p in (out / "features").iterdir()) == before
    with pytest.raises(RuntimeError, match="disk full"):
        calls.clear()
        make_report(store, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert leftovers(tmp_path) == []


def test_report_from_the_dictionarys_tokenizer(store, tmp_path):
    # no decoder given: tiny-random's byte tokenizer rebuilds the text (one byte per token)
    put_byte_feature(store, "bytes", "a <b>", 2)
    write_report(store, "bytes", tmp_path / "site")
    path = tmp_path / "site" / "features" / "0.html"
    assert parse(path).contexts == ["a <b>"]
    assert '<span class="on pk" style="--a:1.000" title="1.00">&lt;</span>b&gt;' in path.read_text()


def test_sparse_sample_extras_are_shown_as_the_tokens_they_point_at(tmp_path, decoder):
    """Lorsa-style z-patterns (``<name>_positions`` -1 padded + ``<name>_values``) appear under a
    context in the terminal and in the HTML report, as the tokens at those positions."""
    store = populate(FakeStore())
    base = analysis_of(1)
    z = sample(["The", " cat", " sat", " on", " <script>"], [0, 0, 2.0, 0, 0], dataset="toy")
    z = Sample(tokens=z.tokens, activations=z.activations, meta=z.meta,
               extras={"z_pattern_positions": np.array([1, 2, 4, -1], dtype=np.int32),
                       "z_pattern_values": np.array([1.5, 0.25, -0.125, 0.0], dtype=np.float32)})
    analysis = FeatureAnalysis(index=1, act_count=base.act_count, n_tokens=base.n_tokens, max_activation=2.0,
                               histogram_counts=base.histogram_counts, histogram_edges=base.histogram_edges,
                               samplings=[Sampling("top_activations", [z])])
    store.put_feature_analyses(NAME, "default", "default", [analysis])
    out = render_feature(load_feature_view(store, NAME, 1), decoder, color=False)
    assert "z_pattern: ' cat'@1 1.50, ' sat'@2 0.25, ' <script>'@4 -0.12" in out
    make_report(store, tmp_path / "site")
    page = (tmp_path / "site" / "features" / "1.html").read_text()
    assert ('<div class="reads muted">z_pattern: <code> cat</code>@1 1.50, <code> sat</code>@2 0.25, '
            '<code> &lt;script&gt;</code>@4 -0.12</div>') in page
