"""Shard writer (datamodules/shards.py) and demo data (datamodules/demo.py)."""

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.demo import DemoDataModule, class_names, make_demo_data
from datamodules.shards import main, write_shards

WNIDS = ["n02000002", "n01000001", "n03000003"]  # created out of order: the index must follow sorted wnids


def read_shards(folder: Path) -> dict[str, dict[str, bytes]]:
    """All samples of all shards in `folder`: key -> {field: bytes}."""
    samples = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, field = m.name.split(".", 1)
                samples.setdefault(key, {})[field] = tar.extractfile(m).read()
    return samples


@pytest.fixture
def imagenet_like(tmp_path: Path) -> Path:
    """train/<wnid>/<wnid>_<i>.JPEG (4 per class, odd sizes) plus one truncated JPEG."""
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    for wnid in WNIDS:
        (root / wnid).mkdir(parents=True)
        for i in range(4):
            arr = rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / wnid / f"{wnid}_{i}.JPEG", quality=90)
    good = (root / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").read_bytes()
    (root / WNIDS[0] / f"{WNIDS[0]}_bad.JPEG").write_bytes(good[: len(good) // 3])
    return root


def test_round_trip_passthrough(imagenet_like: Path, tmp_path: Path, caplog):
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING):
        summary = write_shards(imagenet_like, out, maxcount=5, workers=0, progress=False)
    # 12 good images in shards of <= 5; the truncated JPEG is skipped, named in the summary and in a warning
    assert summary.num_samples == 12 and len(summary.shards) == 3 and summary.num_skipped == 1
    assert summary.skipped[0][0].endswith("n02000002_bad.JPEG")
    assert "n02000002_bad.JPEG" in caplog.text
    index = json.loads((out / "class_index.json").read_text())
    assert index == {w: i for i, w in enumerate(sorted(WNIDS))}
    samples = read_shards(out)
    assert len(samples) == 12 and "n02000002_bad" not in samples
    for wnid in WNIDS:
        for i in range(4):
            s = samples[f"{wnid}_{i}"]  # key = file stem: no dots
            assert s["jpg"] == (imagenet_like / wnid / f"{wnid}_{i}.JPEG").read_bytes()
            assert int(s["cls"]) == index[wnid]
            assert json.loads(s["json"])["wnid"] == wnid
    info = json.loads((out / "train-info.json").read_text())
    assert sum(s["nsamples"] for s in info["shards"]) == 12 and len(info["skipped"]) == 1


def test_reencode_and_rerun_skips_finished_shards(imagenet_like: Path, tmp_path: Path):
    out = tmp_path / "shards"
    first = write_shards(imagenet_like, out, maxcount=5, reencode=True, quality=80, workers=2, progress=False)
    assert first.num_written == 3
    src = np.asarray(Image.open(imagenet_like / WNIDS[1] / f"{WNIDS[1]}_2.JPEG"), dtype=np.float32)
    back = np.asarray(Image.open(io.BytesIO(read_shards(out)[f"{WNIDS[1]}_2"]["jpg"])), dtype=np.float32)
    assert back.shape == src.shape and np.abs(back - src).mean() < 40  # re-encoded JPEG of the same picture

    shards = sorted(out.glob("*.tar"))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards}
    shards[1].unlink()
    second = write_shards(imagenet_like, out, maxcount=5, reencode=True, quality=80, workers=0, progress=False)
    assert second.num_written == 1 and second.num_samples == 12 and second.num_skipped == 1
    for p in sorted(out.glob("*.tar")):
        assert p.read_bytes() == before[p.name][0]  # same plan -> byte-identical shard (multi- vs single-process)
        if p != shards[1]:
            assert p.stat().st_mtime_ns == before[p.name][1]  # finished shards were not rewritten
    assert not list(out.glob("*.tmp"))
    with pytest.raises(RuntimeError, match="different shard plan"):
        write_shards(imagenet_like, out, maxcount=4, workers=0, progress=False)


def test_flat_val_folder_with_labels_file(tmp_path: Path):
    val = tmp_path / "val"
    val.mkdir()
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(val / f"ILSVRC2012_val_{i:08d}.JPEG")
        lines.append(f"ILSVRC2012_val_{i:08d}.JPEG {wnid}")
    (tmp_path / "labels.txt").write_text("\n".join(lines))
    (tmp_path / "index.json").write_text(json.dumps({"n01": 0, "n02": 1, "n03": 2}))
    code = main([str(val), str(tmp_path / "out"), "--val-labels", str(tmp_path / "labels.txt"),
                 "--class-index", str(tmp_path / "index.json"), "--workers", "0", "--no-shuffle"])  # fmt: skip
    assert code == 0
    samples = read_shards(tmp_path / "out")
    assert [int(samples[f"ILSVRC2012_val_{i:08d}"]["cls"]) for i in range(4)] == [2, 0, 1, 0]


def test_demo_data_deterministic_with_all_classes(tmp_path: Path):
    kw = dict(num_classes=10, image_size=16, train_per_class=3, val_per_class=2, seed=3, num_train_shards=4,
              num_val_shards=2, progress=False)  # fmt: skip
    a, b = make_demo_data(tmp_path / "a", **kw), make_demo_data(tmp_path / "b", **kw)
    files_a = sorted(p.relative_to(a) for p in (a / "shards").rglob("*.tar"))
    assert len(files_a) == 6
    assert files_a == sorted(p.relative_to(b) for p in (b / "shards").rglob("*.tar"))
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    val = read_shards(a / "shards" / "val")
    assert sorted(int(s["cls"]) for s in val.values()) == sorted(list(range(10)) * 2)
    assert json.loads((a / "shards" / "train" / "class_index.json").read_text()) == {
        n: i for i, n in enumerate(class_names(10))
    }
    c = make_demo_data(tmp_path / "c", **{**kw, "seed": 4})
    assert (c / files_a[0]).read_bytes() != (a / files_a[0]).read_bytes()


def test_demo_datamodule_generates_on_first_use(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = DemoDataModule(image_size=16, train_per_class=4, val_per_class=2, num_train_shards=4, num_val_shards=2,
                        batch_size=8, num_workers=0)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert dm.demo_dir.is_relative_to(Path("data/demo")) and (dm.demo_dir / "DONE").exists()
    batches = list(dm.train_dataloader())
    images = np.concatenate([b["image"].numpy() for b in batches])
    labels = np.concatenate([b["label"].numpy() for b in batches])
    assert images.shape == (40, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert sorted(labels.tolist()) == sorted(list(range(10)) * 4) and dm.num_classes == 10
    stamp = os.path.getmtime(dm.demo_dir / "DONE")
    DemoDataModule(image_size=16, train_per_class=4, val_per_class=2, num_train_shards=4, num_val_shards=2).setup("fit")
    assert os.path.getmtime(dm.demo_dir / "DONE") == stamp  # second use reuses the data


def test_flat_val_folder_with_numeric_labels(tmp_path: Path):
    """Numeric labels (`filename index`) are written as given: the class index, not shifted."""
    val = tmp_path / "val"
    val.mkdir()
    given = [5, 0, 999, 1]
    for i in range(4):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(val / f"ILSVRC2012_val_{i:08d}.JPEG")
    (tmp_path / "labels.txt").write_text("\n".join(f"ILSVRC2012_val_{i:08d} {c}" for i, c in enumerate(given)))
    code = main([str(val), str(tmp_path / "out"), "--val-labels", str(tmp_path / "labels.txt"),
                 "--workers", "0", "--no-shuffle"])  # fmt: skip
    assert code == 0
    samples = read_shards(tmp_path / "out")
    assert [int(samples[f"ILSVRC2012_val_{i:08d}"]["cls"]) for i in range(4)] == given
