"""Dataset loading: local JSONL (plain or gzipped), Hugging Face names, clear errors."""

from __future__ import annotations

import gzip
import json
import sys

import pytest

from rapid_async.tasks.base import Problem
from rapid_async.tasks.datasets import DatasetTask, load_records, read_hf, read_jsonl


def test_jsonl_and_gzip(tmp_path):
    rows = [{"a": 1}, {"a": 2}]
    plain = tmp_path / "x.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    packed = tmp_path / "x.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    assert read_jsonl(plain) == rows == read_jsonl(packed)
    assert load_records(None, plain) == rows


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*RAPID_DATA"):
        read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        read_jsonl(bad)
    bad.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a JSON object"):
        read_jsonl(bad)


def test_hugging_face_names_need_datasets_and_a_network(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ValueError, match="needs the optional package `datasets`"):
        read_hf("openai/gsm8k", "train", "main")


def test_hugging_face_loader_is_called_with_name_config_and_split(monkeypatch):
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config, split):
            calls.append((name, config, split))
            if name == "offline/none":
                raise ConnectionError("no network")
            return [{"question": "q", "answer": "#### 1"}]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    assert load_records(None, "unused", "openai/gsm8k", "test", "main") == \
        [{"question": "q", "answer": "#### 1"}]
    assert calls == [("openai/gsm8k", "main", "test")]
    with pytest.raises(ValueError, match="could not load Hugging Face dataset 'offline/none'.*no network"):
        read_hf("offline/none", "train")


def test_dataset_task_epochs_and_disjoint_heldout():
    task = DatasetTask(seed=3)
    train = [Problem(str(i), f"q{i}", str(i)) for i in range(10)]
    task._set_problems(train + [Problem("dup", "q0", "0")], [Problem("h", "q0", "0")])
    assert task.train_size == 9  # the held-out prompt left training
    epoch0 = [task.train_problem(i).prompt for i in range(9)]
    epoch1 = [task.train_problem(i).prompt for i in range(9, 18)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1 and "q0" not in epoch0
    with pytest.raises(ValueError, match="index"):
        task.train_problem(-1)
    with pytest.raises(ValueError, match="n must be in 0..1"):
        task.heldout(2)
