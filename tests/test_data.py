import json

import pytest

from fedcola import data


def test_named_datasets_sizes_and_columns():
    rt = data.load_splits("rotten_tomatoes")
    assert sum(len(s) for s in rt.values()) == 12_808
    assert rt["train"].features["label"].names == ["rotten", "fresh"]
    bbc = data.load_splits("bbc_news")
    assert sum(len(s) for s in bbc.values()) == 2_225 and bbc["train"].features["label"].num_classes == 5
    ham = data.load_splits("hamlet", block_chars=128)
    assert "text" in ham["train"].column_names and len(ham["train"][0]["text"]) == 128


def test_splits_depend_only_on_seed():
    s1 = data.load_splits("bbc_news", seed=3)
    data.load_splits.cache_clear()
    s2 = data.load_splits("bbc_news", seed=3)
    s3 = data.load_splits("bbc_news", seed=4)
    assert s1["test"]["text"] == s2["test"]["text"] != s3["test"]["text"]
    assert len(s1["train"]) + len(s1["validation"]) + len(s1["test"]) == 2_225


def test_local_files(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("review,stars\n" + "good,1\nbad,0\n" * 20)
    ds = data.load_splits(str(csv), text_column="review", label_column="stars")
    assert set(ds["train"].column_names) == {"text", "label"} and sum(len(s) for s in ds.values()) == 40
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 3}) for i in range(30)))
    assert sum(len(s) for s in data.load_splits(str(jsonl)).values()) == 30
    txt = tmp_path / "corpus.txt"
    txt.write_text("x" * 1000)
    assert len(data.load_raw(str(txt), block_chars=100)) == 10
    for c in ("pos", "neg"):
        (tmp_path / "folder" / c).mkdir(parents=True)
        for i in range(5):
            (tmp_path / "folder" / c / f"{i}.txt").write_text(f"{c} {i}")
    folder = data.load_raw(str(tmp_path / "folder"))
    assert folder.features["label"].names == ["neg", "pos"] and len(folder) == 10


def test_missing_text_column_is_clear(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n1,2\n" * 10)
    with pytest.raises(data.UnknownDatasetError, match="no column 'text'"):
        data.load_splits(str(csv))


@pytest.mark.parametrize("name", ["imagenet", "nothing.xyz"])
def test_unknown_dataset_is_one_line(name):
    with pytest.raises(data.UnknownDatasetError) as err:
        data.load_raw(name)
    assert "\n" not in str(err.value) and "rotten_tomatoes" in str(err.value)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "natural:movie"])
def test_partitions_deterministic_disjoint_and_complete(spec):
    train = data.load_splits("rotten_tomatoes")["train"].add_column("row", list(range(10_246)))
    parts = [data.load_partition(train, spec, pid, 4, seed=0) for pid in range(4)]
    again = [data.load_partition(train, spec, pid, 4, seed=0) for pid in range(4)]
    rows = [set(p["row"]) for p in parts]
    assert [p["row"] for p in parts] == [p["row"] for p in again]
    assert all(not rows[i] & rows[j] for i in range(4) for j in range(i + 1, 4))
    assert set().union(*rows) == set(range(10_246))
    assert all(len(r) > 0 for r in rows)


def test_dirichlet_is_label_skewed_and_seeded():
    train = data.load_splits("rotten_tomatoes")["train"]
    fresh = [sum(data.load_partition(train, "dirichlet:0.3", pid, 4, seed=1)["label"]) / len(data.load_partition(train, "dirichlet:0.3", pid, 4, seed=1)) for pid in range(4)]
    assert max(fresh) - min(fresh) > 0.2
    other = data.load_partition(train, "dirichlet:0.3", 0, 4, seed=2)["text"]
    assert other != data.load_partition(train, "dirichlet:0.3", 0, 4, seed=1)["text"]


@pytest.mark.parametrize("spec,msg", [("zipf", "unknown partitioning"), ("dirichlet:x", "alpha must be a number"), ("natural:nope", "no column 'nope'")])
def test_bad_partitioning(spec, msg):
    train = data.load_splits("rotten_tomatoes")["train"]
    with pytest.raises(ValueError, match=msg):
        data.load_partition(train, spec, 0, 4)


def test_partition_id_out_of_range():
    with pytest.raises(ValueError, match="outside 0..3"):
        data.load_partition(data.load_splits("rotten_tomatoes")["train"], "iid", 4, 4)
