import json

import pytest

from kormedgemma.core.io import JsonlError, atomic_dir, read_jsonl, write_jsonl


def test_corrupt_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', encoding="utf-8")
    rows = read_jsonl(path)
    assert next(rows)["text"] == "a"
    assert next(rows)["text"] == "b"
    with pytest.raises(JsonlError, match=r"corpus.jsonl:3: not valid JSON"):
        next(rows)


def test_jsonl_line_that_is_not_an_object_is_rejected(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(JsonlError, match=r"rows.jsonl:3: expected a JSON object, got list"):
        list(read_jsonl(path))


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"text": "old"}])

    def rows():
        yield {"text": "new"}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert [r["text"] for r in read_jsonl(path)] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


def test_failed_artifact_folder_leaves_existing_one_intact(tmp_path):
    final = tmp_path / "artifact"
    with atomic_dir(final) as out:
        (out / "a.json").write_text(json.dumps({"v": 1}))
    with pytest.raises(ValueError):
        with atomic_dir(final) as out:
            (out / "a.json").write_text(json.dumps({"v": 2}))
            raise ValueError("crash mid-write")
    assert json.loads((final / "a.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_successful_artifact_replaces_the_old_one(tmp_path):
    final = tmp_path / "artifact"
    with atomic_dir(final) as out:
        (out / "old.txt").write_text("1")
    with atomic_dir(final) as out:
        (out / "new.txt").write_text("2")
    assert [p.name for p in final.iterdir()] == ["new.txt"]
