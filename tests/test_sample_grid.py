"""SampleGridCallback writes `samples/grid` images to TensorBoard every N steps and at the end of training."""

import io

import numpy as np
import torch
from lightning import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.utils import make_grid

from callbacks import SampleGridCallback
from callbacks.sampling import to_uint8
from tests.test_eval_common import FakeGenerator, dummy_loader


def test_sample_grid_logged_to_tensorboard(tmp_path):
    model = FakeGenerator(num_classes=4, image_size=16)
    grid_cb = SampleGridCallback(every_n_steps=2, classes=[0, 2], samples_per_class=3, seed=7)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=logger,
        callbacks=[grid_cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=dummy_loader())
    logger.experiment.flush()

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "samples/grid" in events.Tags()["images"]
    images = events.Images("samples/grid")
    assert [im.step for im in images] == [2, 3]  # step 2 by schedule, step 3 at train end
    assert (images[-1].height, images[-1].width) == (2 * 18 + 2, 3 * 18 + 2)  # 2 classes x 3 samples, 16 px + pad 2

    labels = torch.tensor([0, 0, 0, 2, 2, 2])
    expected = make_grid(to_uint8(model.sample_images(labels, torch.Generator().manual_seed(7))), nrow=3, padding=2)
    logged = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(logged, expected.permute(1, 2, 0).numpy())
