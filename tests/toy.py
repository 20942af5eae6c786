"""A toy generator and data for testing the shared training logic without the real models."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_modules.base import GenerativeModule


class ToyNet(nn.Module):
    def __init__(self, num_classes: int = 4, dim: int = 16, image_size: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, dim)
        self.blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])
        self.head = nn.Linear(dim, 3 * image_size * image_size)
        self.image_size = image_size

    def forward(self, labels: Tensor, noise: Tensor) -> Tensor:
        h = self.embed(labels) + noise  # (B, D)
        for blk in self.blocks:
            h = h + torch.tanh(blk(h))
        return self.head(h).view(-1, 3, self.image_size, self.image_size)  # (B, 3, H, W)


class ToyGenerator(GenerativeModule):
    """Regresses a class-dependent target image; samples = net(label, noise)."""

    def __init__(
        self,
        num_classes: int = 4,
        dim: int = 16,
        image_size: int = 8,
        poison_step: int = -1,
        noise_std: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.num_classes, self.image_size, self.dim, self.poison_step = num_classes, image_size, dim, poison_step
        self.noise_std = noise_std
        self.net = ToyNet(num_classes, dim, image_size)
        self.init_ema()

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        noise = self.noise_std * torch.randn(batch["label"].shape[0], self.dim)  # global RNG, like dropout
        pred = self.net(batch["label"], noise)
        loss = (pred - batch["image"]).pow(2).mean()
        if self.global_step == self.poison_step:
            loss = loss * float("nan")
        return loss, {"mse": loss}

    @torch.no_grad()
    def sample_images(self, labels: Tensor, generator: torch.Generator | None = None, **_) -> Tensor:
        with self.sampling() as net:
            noise = torch.randn(labels.shape[0], self.dim, generator=generator, device=labels.device)
            return net(labels, noise).clamp(-1, 1)


class ToyImages(Dataset):
    def __init__(self, n: int = 64, num_classes: int = 4, image_size: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % num_classes
        self.images = torch.rand(num_classes, 3, image_size, image_size, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[self.labels[i]], "label": self.labels[i]}


class ToyData(L.LightningDataModule):
    def __init__(self, n: int = 64, batch_size: int = 8, num_classes: int = 4, image_size: int = 8) -> None:
        super().__init__()
        self.n, self.batch_size, self.num_classes, self.image_size = n, batch_size, num_classes, image_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ToyImages(self.n, self.num_classes, self.image_size), batch_size=self.batch_size)


def toy_dataset() -> ToyImages:
    """Distinct images per sample index, so every slice of a batch matters."""
    ds = ToyImages(n=64)
    g = torch.Generator().manual_seed(1)
    ds.images = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1
    ds.__class__ = _PerSampleImages
    return ds


class _PerSampleImages(ToyImages):
    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


class RandomImages(Dataset):
    """Random images in [-1, 1] with labels, for training the real tiny models a few steps."""

    def __init__(self, n: int = 64, num_classes: int = 10, image_size: int = 32) -> None:
        g = torch.Generator().manual_seed(2)
        self.images = torch.rand(n, 3, image_size, image_size, generator=g) * 2 - 1
        self.labels = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


class RandomTokens(Dataset):
    """Random token sequences with labels (a token-cache batch) for the tiny D-AR GPT."""

    def __init__(self, n: int = 64, num_classes: int = 10, length: int = 32, vocab: int = 256) -> None:
        g = torch.Generator().manual_seed(3)
        self.tokens = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"tokens": self.tokens[i], "label": self.labels[i]}
