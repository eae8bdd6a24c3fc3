"""Loading text datasets: local files, directories, saved datasets, errors, sharding."""

from __future__ import annotations

import json
import time

import pytest

from lmsae.config.fields import FieldValueError
from lmsae.data.datasets import DatasetConfig, iter_texts, load_documents, shard_bounds
from lmsae.errors import DataError, LmsaeError

datasets = pytest.importorskip("datasets")


@pytest.fixture
def hf_cache(tmp_path):
    return str(tmp_path / "hf-cache")


def _texts(ds) -> list[str]:
    return [t for _, t in iter_texts(ds, "text")]


def _config(path, hf_cache, **kw) -> DatasetConfig:
    return DatasetConfig(path=str(path), cache_dir=hf_cache, **kw)


@pytest.fixture
def text_files(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    (d / "a.txt").write_text("first line\nsecond line\n\nthird paragraph\n")
    (d / "b.txt").write_text("another document\n")
    return d


def test_txt_one_document_per_file(text_files, hf_cache):
    ds = load_documents(_config(text_files / "*.txt", hf_cache))
    assert _texts(ds) == ["first line\nsecond line\n\nthird paragraph\n", "another document\n"]


def test_txt_by_line_and_paragraph(text_files, hf_cache):
    lines = load_documents(_config(text_files / "a.txt", hf_cache, sample_by="line"))
    assert _texts(lines) == ["first line", "second line", "", "third paragraph"]
    paragraphs = load_documents(_config(text_files / "a.txt", hf_cache, sample_by="paragraph"))
    assert [t.strip() for t in _texts(paragraphs)] == ["first line\nsecond line", "third paragraph"]


def test_jsonl_and_text_column(tmp_path, hf_cache):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"body": f"doc {i}", "n": i}) for i in range(5)) + "\n")
    ds = load_documents(_config(f, hf_cache, text_column="body"))
    assert [t for _, t in iter_texts(ds, "body")] == [f"doc {i}" for i in range(5)]
    with pytest.raises(DataError) as err:
        load_documents(_config(f, hf_cache, text_column="bdy"))
    message = str(err.value)
    assert "'bdy'" in message and "'body', 'n'" in message and "did you mean 'body'" in message
    with pytest.raises(DataError, match="not text"):
        load_documents(_config(f, hf_cache, text_column="n"))


def test_directory_of_text_files(tmp_path, hf_cache):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "z.txt").write_text("zed")
    (d / "sub" / "a.md").write_text("markdown")
    (d / ".hidden.txt").write_text("never read")
    (d / "notes").write_text("no suffix: ignored")
    ds = load_documents(_config(d, hf_cache))
    assert sorted(_texts(ds)) == ["markdown", "zed"]


def test_directory_mixing_formats_is_an_error(tmp_path, hf_cache):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(DataError, match="mixes file formats"):
        load_documents(_config(tmp_path, hf_cache))


def test_saved_dataset_and_dataset_dict(tmp_path, hf_cache):
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "id": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert _texts(load_documents(_config(tmp_path / "saved", hf_cache))) == ["a", "b", "c"]
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([2])})
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    assert _texts(load_documents(_config(tmp_path / "saved_dict", hf_cache, split="validation"))) == ["c"]
    with pytest.raises(DataError, match="'validation'"):
        load_documents(_config(tmp_path / "saved_dict", hf_cache, split="valid"))


@pytest.fixture
def numbered(tmp_path):
    f = tmp_path / "n.jsonl"
    f.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(11)))
    return f


def test_sharding_is_contiguous_disjoint_and_covering(numbered, hf_cache):
    everything = _texts(load_documents(_config(numbered, hf_cache)))
    for world in (1, 2, 3, 4, 11, 13):
        parts = [_texts(load_documents(_config(numbered, hf_cache), shard=(r, world))) for r in range(world)]
        assert [t for p in parts for t in p] == everything  # in order: contiguous, disjoint, covering
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        for r in range(world):
            lo, hi = shard_bounds(len(everything), (r, world))
            assert parts[r] == everything[lo:hi]
    with pytest.raises(ValueError):
        shard_bounds(10, (2, 2))


def test_max_documents_and_shuffle(numbered, hf_cache):
    first = _texts(load_documents(_config(numbered, hf_cache, max_documents=4)))
    assert first == [f"doc {i}" for i in range(4)]
    # max_documents bounds all ranks together
    halves = [_texts(load_documents(_config(numbered, hf_cache, max_documents=4), shard=(r, 2))) for r in range(2)]
    assert halves == [first[:2], first[2:]]
    shuffled = _texts(load_documents(_config(numbered, hf_cache, shuffle_documents=True, seed=3)))
    again = _texts(load_documents(_config(numbered, hf_cache, shuffle_documents=True, seed=3)))
    assert shuffled == again and sorted(shuffled) == sorted(_texts(load_documents(_config(numbered, hf_cache))))
    assert shuffled != [f"doc {i}" for i in range(11)]


def test_split_slices_and_unknown_split(numbered, hf_cache):
    assert _texts(load_documents(_config(numbered, hf_cache, split="train[2:4]"))) == ["doc 2", "doc 3"]
    with pytest.raises(DataError, match="split 'test'"):
        load_documents(_config(numbered, hf_cache, split="test"))


def test_iter_texts_from_a_position(numbered, hf_cache):
    ds = load_documents(_config(numbered, hf_cache))
    assert list(iter_texts(ds, "text", start=9, batch_size=2)) == [(9, "doc 9"), (10, "doc 10")]
    assert list(iter_texts(["a", None, "c"], start=1)) == [(1, ""), (2, "c")]
    with pytest.raises(DataError, match="not text"):
        list(iter_texts(["a", 3]))


def test_missing_local_paths(tmp_path, hf_cache):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(_config(tmp_path / "nope.jsonl", hf_cache))
    with pytest.raises(DataError, match="no files match"):
        load_documents(_config(tmp_path / "*.parquet", hf_cache))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_documents(_config(tmp_path / "empty", hf_cache))


def test_offline_hub_name_fails_fast_with_a_clear_message(monkeypatch, hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(LmsaeError) as err:
        load_documents(DatasetConfig(path="lmsae-test/no-such-dataset", cache_dir=hf_cache))
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert isinstance(err.value, DataError)
    assert "not in the Hugging Face cache" in message and "builtin:python-docs" in message


def test_config_validation():
    with pytest.raises(FieldValueError, match="builtin:python-docs"):
        DatasetConfig(path="builtin:python-doc")
    with pytest.raises(FieldValueError):
        DatasetConfig(path="x.txt", sample_by="sentence")
    with pytest.raises(FieldValueError):
        DatasetConfig(path="")
    with pytest.raises(FieldValueError):
        DatasetConfig(path="x.txt", max_documents=0)
