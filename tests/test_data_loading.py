"""WebDataModule (datamodules/webdataset.py), transforms and the feature-cache engine (datamodules/cache.py)."""

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from datamodules import WebDataModule
from datamodules.cache import run_feature_cache
from datamodules.shards import write_shards
from datamodules.transforms import center_crop_arr

N_IMAGES, PER_SHARD = 48, 6  # 8 shards: divides over 2 ranks x 2 workers


def index_of(image: torch.Tensor) -> int:
    """Images are constant colours (5*i, 255-5*i, 100), so the sample index survives crop, resize and flip."""
    return round(float((image[0, 0, 0] + 1) * 127.5) / 5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wds")
    for i in range(N_IMAGES):
        folder = root / "images" / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i % 3, 36), (5 * i, 255 - 5 * i, 100)).save(folder / f"img{i:03d}.png")
    write_shards(root / "images", root / "shards", prefix="train", maxcount=PER_SHARD, workers=0, progress=False)
    return root / "shards"


def epoch_indices(loader) -> list[int]:
    return [index_of(img) for batch in loader for img in batch["image"]]


def test_center_crop_arr_matches_adm_recipe():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    out = center_crop_arr(img, 32)
    # ADM: BOX-halve 300x200 -> 150x100 -> 75x50 (50 < 64 stops), BICUBIC to 48x32, crop x in [8, 40)
    ref = img.resize((150, 100), Image.BOX).resize((75, 50), Image.BOX).resize((48, 32), Image.BICUBIC)
    assert out.size == (32, 32)
    assert np.array_equal(np.asarray(out), np.asarray(ref)[:, 8:40])


def test_image_batches_match_contract(shards: Path):
    dm = WebDataModule(train_shards=str(shards / "train-{000000..000007}.tar"), val_shards=str(shards), image_size=16,
                       batch_size=5, num_workers=0)  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["image"].abs().max() <= 1.0
    assert batch["label"].tolist() == [index_of(x) % 4 for x in batch["image"]]
    val = [index_of(x) for b in dm.val_dataloader() for x in b["image"]]
    assert val == [index_of(x) for b in dm.val_dataloader() for x in b["image"]]  # fixed order
    assert sorted(val) == list(range(N_IMAGES))


def test_two_ranks_two_workers_read_each_sample_once_per_epoch(shards: Path):
    dm = WebDataModule(train_shards=str(shards), image_size=8, batch_size=4, num_workers=2, shuffle_buffer=8,
                       persistent_workers=True)  # fmt: skip
    dm.setup("fit")
    loaders = [dm.build_train_loader(rank, 2) for rank in range(2)]
    epochs = []
    for _ in range(2):  # epoch counter advances on its own after a full pass
        per_rank = [epoch_indices(loader) for loader in loaders]
        assert len(per_rank[0]) == len(per_rank[1]) == N_IMAGES // 2
        assert sorted(per_rank[0] + per_rank[1]) == list(range(N_IMAGES))
        epochs.append(per_rank[0])
    assert epochs[0] != epochs[1]  # reshuffled per epoch (also through the persistent workers)
    loaders[0].set_epoch(0)
    assert epoch_indices(loaders[0]) == epochs[0]  # deterministic per (seed, epoch, rank)


def test_resampled_epoch_length_is_equal_on_every_rank(shards: Path):
    dm = WebDataModule(train_shards=str(shards), image_size=8, batch_size=3, num_workers=2, resampled=True,
                       epoch_length=7)  # fmt: skip
    dm.setup("fit")
    for rank in range(3):
        loader = dm.build_train_loader(rank, 3)
        assert len(loader) == 7 and len(list(loader)) == 7 and len(list(loader)) == 7
    with pytest.raises(ValueError, match="epoch_length"):
        WebDataModule(train_shards=str(shards), resampled=True)


def test_missing_shards_raise_clear_error(tmp_path: Path):
    pattern = str(tmp_path / "imagenet-train-{000000..000009}.tar")
    with pytest.raises(FileNotFoundError, match=r"imagenet-train-\{000000\.\.000009\}\.tar"):
        WebDataModule(train_shards=pattern).setup("fit")


def test_truncated_shard_and_corrupt_sample_are_skipped(shards: Path, tmp_path: Path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    data = (bad / "train-000003.tar").read_bytes()
    (bad / "train-000003.tar").write_bytes(data[: len(data) // 2])  # truncated mid-archive
    with wds.TarWriter(str(bad / "train-000008.tar")) as sink:  # one good and one undecodable sample
        sink.write({"__key__": "junk", "png": b"not an image", "cls": b"0"})
        sink.write({"__key__": "ok", "png": (shards.parent / "images/c1/img001.png").read_bytes(), "cls": b"1"})
    dm = WebDataModule(train_shards=str(bad), image_size=8, batch_size=4, num_workers=0)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        seen = epoch_indices(dm.train_dataloader())
    assert len(seen) == len(set(seen)) + 1  # + the copy of img001 in the extra shard
    lost = set(range(N_IMAGES)) - set(seen)
    assert 1 <= len(lost) <= PER_SHARD  # only (part of) the truncated shard is missing; the epoch went on
    assert seen.count(1) == 2  # the good sample of the extra shard was read
    assert dm.num_skipped >= 2 and "train-000003.tar is truncated" in caplog.text and "junk" not in str(seen)


def test_loader_state_dict_resumes_mid_epoch(shards: Path):
    def make_loader():
        dm = WebDataModule(train_shards=str(shards), image_size=8, batch_size=4, num_workers=2, shuffle_buffer=10)
        dm.setup("fit")
        return dm.build_train_loader(0, 1)

    full = make_loader()
    full.set_epoch(1)
    reference = epoch_indices(full)

    first = make_loader()
    first.set_epoch(1)
    it = iter(first)
    seen = [index_of(x) for _ in range(4) for x in next(it)["image"]]  # 3 trained + 1 prefetched, like Lightning
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 3
    del it

    resumed = make_loader()
    resumed.load_state_dict(state)
    rest = epoch_indices(resumed)
    assert seen[:12] + rest == reference  # continues exactly after the last trained batch
    assert resumed.epoch == 2 and resumed.batches == 0


def avg_pool_encode(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 4)  # (B, 3, 16, 16) -> (B, 3, 4, 4)


def test_feature_cache_round_trip_and_resume(shards: Path, tmp_path: Path):
    out = tmp_path / "cache"
    n = run_feature_cache(str(shards), str(out), avg_pool_encode, "moments", image_size=16, batch_size=5,
                          info={"encoder": "avgpool"}, progress=False)  # fmt: skip
    assert n == N_IMAGES
    assert json.loads((out / "cache_info.json").read_text())["encoder"] == "avgpool"
    src = Image.open(shards.parent / "images/c3/img007.png")
    x = torch.from_numpy(np.array(center_crop_arr(src, 16))).permute(2, 0, 1).float() / 127.5 - 1
    expected = avg_pool_encode(x[None])[0].numpy()
    cached = {s["__key__"]: s for s in wds.WebDataset(str(out / "train-{000000..000007}.tar"), shardshuffle=False)}
    assert sorted(cached) == [f"img{i:03d}" for i in range(N_IMAGES)]  # same keys as the image shards
    sample = cached["img007"]
    assert int(sample["cls"]) == 3
    assert np.allclose(np.load(io.BytesIO(sample["moments.npy"])), expected, atol=1e-6)

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000002.tar").unlink()
    assert run_feature_cache(str(shards), str(out), avg_pool_encode, "moments", 16, progress=False) == PER_SHARD
    for p in out.glob("*.tar"):
        assert p.name == "train-000002.tar" or p.stat().st_mtime_ns == stamps[p.name]


def test_feature_cache_stores_encoding_of_the_flip(tmp_path: Path):
    folder = tmp_path / "images" / "c0"
    folder.mkdir(parents=True)
    ramp = np.tile(np.linspace(0, 255, 24, dtype=np.uint8)[None, :, None], (20, 1, 3))  # left-right gradient
    Image.fromarray(ramp).save(folder / "ramp.png")
    write_shards(tmp_path / "images", tmp_path / "shards", prefix="s", workers=0, progress=False)
    run_feature_cache(str(tmp_path / "shards"), str(tmp_path / "cache"), avg_pool_encode, "moments", 16,
                      progress=False)  # fmt: skip
    sample = next(iter(wds.WebDataset(str(tmp_path / "cache" / "s-000000.tar"), shardshuffle=False)))
    x = torch.from_numpy(np.array(center_crop_arr(Image.fromarray(ramp), 16))).permute(2, 0, 1).float() / 127.5 - 1
    assert np.allclose(np.load(io.BytesIO(sample["moments.npy"])), avg_pool_encode(x[None])[0].numpy(), atol=1e-6)
    flipped = avg_pool_encode(x.flip(-1)[None])[0].numpy()
    assert np.allclose(np.load(io.BytesIO(sample["moments_flip.npy"])), flipped, atol=1e-6)
    assert not np.allclose(flipped, avg_pool_encode(x[None])[0].numpy())


@pytest.mark.parametrize("kind", ["latent", "tokens"])
def test_cache_kinds_pick_flip_variant_per_sample(tmp_path: Path, kind: str):
    field = {"latent": "moments", "tokens": "tokens"}[kind]
    dtype = np.float32 if kind == "latent" else np.int64
    with wds.TarWriter(str(tmp_path / "c-000000.tar")) as sink:
        for i in range(64):
            sink.write({"__key__": f"s{i:03d}", f"{field}.npy": np.zeros((2, 3), dtype),
                        f"{field}_flip.npy": np.ones((2, 3), dtype), "cls": i % 5})  # fmt: skip
    dm = WebDataModule(train_shards=str(tmp_path), val_shards=str(tmp_path), kind=kind, batch_size=16, num_workers=0)
    dm.setup("fit")
    train = torch.cat([b[field] for b in dm.train_dataloader()])
    assert train.shape == (64, 2, 3) and train.dtype == (torch.float32 if kind == "latent" else torch.int64)
    flipped = train[:, 0, 0].sum().item()
    assert 16 < flipped < 48 and all(len(set(t.flatten().tolist())) == 1 for t in train)  # ~half, per sample
    val = torch.cat([b[field] for b in dm.val_dataloader()])
    assert val.abs().sum() == 0  # validation never flips


def test_feature_cache_splits_shards_over_ranks(shards: Path, tmp_path: Path):
    out = tmp_path / "cache"
    for rank in range(3):
        run_feature_cache(str(shards), str(out), avg_pool_encode, "tokens", 16, rank=rank, world_size=3,
                          progress=False)  # fmt: skip
        if rank == 0:
            assert sorted(p.name for p in out.glob("*.tar")) == [f"train-{i:06d}.tar" for i in (0, 3, 6)]
    assert len(list(out.glob("*.tar"))) == 8


def test_lightning_checkpoint_resumes_data_position(shards: Path, tmp_path: Path):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen += [index_of(x) for x in batch["image"]]
            return self.layer(batch["image"].mean((1, 2, 3))[:, None]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def run(max_steps: int, ckpt: str | None = None) -> list[int]:
        dm = WebDataModule(train_shards=str(shards), image_size=8, batch_size=4, num_workers=2, shuffle_buffer=10)
        model = Recorder()
        every5 = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=5, save_top_k=-1)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, callbacks=[every5],
                            enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(model, dm, ckpt_path=ckpt)
        trainer.save_checkpoint(tmp_path / f"end{max_steps}.ckpt")
        return model.seen

    full = run(15)  # epoch 0 = 12 batches, then 3 batches of epoch 1; checkpoints at steps 5, 10, 15
    assert sorted(full[:48]) == list(range(N_IMAGES)) and full[48:] != full[:12]
    resumed = run(15, str(tmp_path / "ckpt" / "step=5.ckpt"))  # mid-epoch checkpoint (e.g. preemption)
    assert full[:20] + resumed == full  # continues epoch 0 where it stopped, then epoch 1 exactly as before
    first = run(5)
    after_end = run(12, str(tmp_path / "end5.ckpt"))  # checkpoint written after fit stopped at max_steps
    assert first + after_end[:28] == full[:48]
