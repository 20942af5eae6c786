"""`ardiff sample`: interrupted + resumed runs give the same npz as one uninterrupted run; PNG and config paths."""

import numpy as np
import pytest
import yaml
from lightning import Trainer
from PIL import Image

from ardiff import sample
from tests.test_eval_common import FakeGenerator, dummy_loader

MODULE = "tests.test_eval_common.FakeGenerator"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "fake.ckpt"
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(FakeGenerator(num_classes=3), train_dataloaders=dummy_loader())
    trainer.save_checkpoint(path)
    return str(path)


def args(ckpt: str, *extra: str) -> list[str]:
    common = ["--ckpt", ckpt, "--num-samples", "11", "--chunk-size", "3", "--seed", "5", "--set", "temperature=0.7"]
    return [*common, *extra]


def test_resumed_sampling_equals_uninterrupted(tmp_path, ckpt, monkeypatch):
    full = tmp_path / "full.npz"
    assert sample.main(["--module", MODULE, *args(ckpt, "--out", str(full))]) == 0
    assert not (tmp_path / "full.npz.chunks").exists()  # chunks removed after assembly
    with np.load(full) as npz:
        arr_0, labels = npz["arr_0"], npz["labels"]
    assert arr_0.shape == (11, 16, 16, 3) and arr_0.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]  # i * C // N

    calls = []
    original = FakeGenerator.sample_images
    monkeypatch.setattr(
        FakeGenerator, "sample_images", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    part, pngs = tmp_path / "part.npz", tmp_path / "pngs"
    cmd = ["--module", MODULE, *args(ckpt, "--out", str(part), "--png-dir", str(pngs))]
    assert sample.main([*cmd, "--max-chunks", "2"]) == sample.EXIT_INCOMPLETE  # "killed" after 2 of 4 chunks
    assert not part.exists() and len(calls) == 2
    chunk_dir = tmp_path / "part.npz.chunks"
    assert sorted(p.name for p in chunk_dir.glob("chunk_*.npz")) == ["chunk_000000.npz", "chunk_000001.npz"]
    assert sample.main(cmd) == 0
    assert len(calls) == 4  # the restart generated only the 2 missing chunks
    with np.load(part) as npz:
        np.testing.assert_array_equal(npz["arr_0"], arr_0)
        np.testing.assert_array_equal(npz["labels"], labels)
    assert len(list(pngs.glob("*.png"))) == 11
    np.testing.assert_array_equal(np.asarray(Image.open(pngs / "000009.png")), arr_0[9])

    # a chunk dir of another sample set is refused, not mixed in
    assert sample.main([*cmd, "--max-chunks", "1"]) == sample.EXIT_INCOMPLETE
    with pytest.raises(SystemExit, match="another run"):
        sample.main(["--module", MODULE, *args(ckpt, "--out", str(part), "--seed", "6")])


def test_sampling_from_lightningcli_config_and_overrides(tmp_path, ckpt):
    config = tmp_path / "run.yaml"
    model = {"class_path": MODULE, "init_args": {"num_classes": 3}}
    config.write_text(yaml.safe_dump({"model": model, "trainer": {"max_steps": 10}}))
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    assert sample.main(["--config", str(config), *args(ckpt, "--out", str(a))]) == 0
    assert sample.main(["--module", MODULE, *args(ckpt, "--out", str(b))]) == 0
    assert sample.main(["--module", MODULE, *args(ckpt, "--out", str(c), "--set", "temperature=0.1")]) == 0
    with np.load(a) as na, np.load(b) as nb, np.load(c) as nc:
        np.testing.assert_array_equal(na["arr_0"], nb["arr_0"])
        assert not np.array_equal(nb["arr_0"], nc["arr_0"])  # --set reaches sample_images


def test_bad_override_and_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit):
        sample.main(["--module", MODULE, "--ckpt", "x", "--out", "o.npz", "--set", "novalue"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        sample.main(["--module", MODULE, "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o.npz")])
