"""FIDCallback inside a Trainer gives torch-fidelity's own FID / IS / precision / recall on the same images."""

import numpy as np
import pytest
import torch
import torch_fidelity
from lightning import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks import FIDCallback
from callbacks.sampling import generate_chunk
from tests.test_eval_common import (  # noqa: F401
    FakeGenerator,
    UInt8Images,
    dummy_loader,
    smooth_images,
)


def test_fid_callback_matches_torch_fidelity(tmp_path, inception_weights, fast_inception):  # noqa: F811
    ref_images = smooth_images(20, 16, seed=1)  # (20, 3, 16, 16) uint8
    ref_npz = tmp_path / "ref.npz"
    np.savez(ref_npz, arr_0=ref_images.permute(0, 2, 3, 1).numpy())  # ADM layout, images only
    model = FakeGenerator(num_classes=4)
    fid = FIDCallback(
        reference=str(ref_npz),
        num_samples=20,
        chunk_size=6,  # 4 chunks, the last one padded
        every_n_epochs=None,
        every_n_steps=1,
        inception_weights=inception_weights,
        inception_batch_size=10,
        compute_pr=True,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[fid],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=dummy_loader())

    plan = fid.plan(model)
    generated = torch.cat([generate_chunk(model.sample_images, plan, k, torch.device("cpu")) for k in range(4)])
    assert generated.shape == (20, 3, 16, 16) and generated.dtype == torch.uint8
    expected = torch_fidelity.calculate_metrics(
        input1=UInt8Images(generated),
        input2=UInt8Images(ref_images),
        fid=True,
        isc=True,
        prc=True,
        feature_extractor="inception-v3-compat",  # torch-fidelity's PRC defaults to VGG16; ADM uses Inception pool3
        feature_layer_prc="2048",
        cuda=False,
        batch_size=10,
        feature_extractor_weights_path=inception_weights,
        cache=False,
        verbose=False,
    )
    got = fid.last_metrics
    assert expected["frechet_inception_distance"] > 0
    assert got["fid"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-3)
    assert got["is"] == pytest.approx(expected["inception_score_mean"], rel=1e-3)
    assert got["is_std"] == pytest.approx(expected["inception_score_std"], rel=1e-2, abs=1e-6)
    assert got["precision"] == pytest.approx(expected["precision"])
    assert got["recall"] == pytest.approx(expected["recall"])
    assert trainer.callback_metrics["val/fid"].item() == pytest.approx(got["fid"], rel=1e-6)
    assert "val/is" in trainer.progress_bar_metrics
