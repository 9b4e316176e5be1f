import csv
import io
import json
import tarfile

import pytest
from PIL import Image

from adapters.errors import ConfigError
from datamodules import shards
from datamodules.shards import from_coop_split, from_csv, from_folder, index_shards, iter_tar_samples, write_shards
from tests.conftest import shared


def _samples(directory, split):
    manifest = json.loads((directory / "dataset.json").read_text())
    for entry in manifest["splits"][split]["shards"]:
        yield from iter_tar_samples(directory / entry["name"])


def test_cifar_folder_round_trip_is_byte_identical(tmp_path):
    src = shared("cifar10-test-jpg")
    records, names = from_folder(src)
    manifest = write_shards(records, names, tmp_path / "out", max_count=300, progress=False)
    assert manifest["splits"]["train"]["count"] == 2000 == len(records)
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [300] * 6 + [200]
    assert manifest["splits"]["train"]["class_counts"] == [200] * 10
    seen = 0
    for sample in _samples(tmp_path / "out", "train"):
        meta = json.loads(sample["json"])
        source = src / meta["class_name"] / meta["source"].rsplit("/", 1)[-1]
        assert sample["jpg"] == source.read_bytes()
        assert int(sample["cls"]) == names.index(meta["class_name"])
        assert meta["split"] == "train"
        seen += 1
    assert seen == 2000
    index = (tmp_path / "out" / "train-index.tsv").read_text().splitlines()
    assert len(index) == 2000 and index[0].split("\t")[2] == "train-000000.tar"


def test_writing_twice_gives_identical_shards(tmp_path):
    records, names = from_folder(shared("cifar10-test-jpg"))
    records = records[:120]
    write_shards(records, names, tmp_path / "a", max_count=50, progress=False, dataset="cifar")
    write_shards(records, names, tmp_path / "b", max_count=50, progress=False, dataset="cifar")
    for name in ("train-000000.tar", "train-000002.tar", "dataset.json", "train-index.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # into a directory that already holds shards: refused, nothing touched
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with pytest.raises(ConfigError, match="already holds shards"):
        write_shards(records[:10], names, tmp_path / "a", max_count=5, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


def test_shard_size_limit_by_bytes(tmp_path):
    records, names = from_folder(shared("cifar10-test-jpg"))
    manifest = write_shards(records[:100], names, tmp_path, max_count=1000, max_size=20_000, progress=False)
    assert len(manifest["splits"]["train"]["shards"]) > 3
    # tar ends with two 512-byte blocks and pads to a 10 KiB record: the only allowed overshoot
    assert all(s["bytes"] <= 20_000 + 1024 + 10_240 for s in manifest["splits"]["train"]["shards"])


def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_csv_with_class_names_and_split_column_and_reencode(tmp_path):
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png", (60 * i, 0, 0))
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows([["img/0.png", "cat", "train"], ["img/1.png", "dog", "train"], ["img/2.png", "cat", "test"],
                     ["img/3.png", "dog", "test"]])
    records, names = from_csv(tmp_path / "list.csv")
    assert names == ["cat", "dog"] and {r.split for r in records} == {"train", "test"}
    write_shards(records, names, tmp_path / "raw", progress=False)
    assert "png" in next(_samples(tmp_path / "raw", "test"))  # original bytes under their own extension
    write_shards(records, names, tmp_path / "jpg", progress=False, reencode=True)
    sample = next(_samples(tmp_path / "jpg", "test"))
    assert "jpg" in sample and Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"


def test_coop_split_file(tmp_path):
    for i in range(3):
        _png(tmp_path / "root" / f"c{i}.png", (0, 80 * i, 0))
    split = {"train": [["c0.png", 0, "apple"], ["c1.png", 1, "pear"]], "val": [], "test": [["c2.png", 1, "pear"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    records, names = from_coop_split(tmp_path / "split.json", tmp_path / "root")
    assert names == ["apple", "pear"] and [r.split for r in records] == ["train", "train", "test"]


def test_index_of_img2dataset_style_shards(tmp_path):
    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, name in enumerate(["cat", "dog", "cat"]):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, format="JPEG")
            for ext, data in [("jpg", buf.getvalue()), ("txt", name.encode()), ("json", json.dumps({"key": i}).encode())]:
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = index_shards([tar_path], tmp_path / "idx", label="txt", class_names=["cat", "dog"])
    assert manifest["splits"]["train"]["class_counts"] == [2, 1]
    assert (tmp_path / "idx" / "train-index.tsv").read_text().splitlines()[1].split("\t")[:2] == ["000000001", "1"]


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert shards.main(["folder", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "bad.csv").write_text("file,class\na.jpg,1\n")
    assert shards.main(["csv", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "image folder not found" in err[0] and "'path,label'" in err[1]
