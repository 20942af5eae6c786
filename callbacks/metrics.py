"""FID / IS / precision-recall from Inception features, and reference statistics (npz) for FID.

The math is torch-fidelity's (FID from (mu, sigma) via eigenvalues of sigma1 @ sigma2, IS over 10 shuffled splits of
the bias-free logits, k-NN precision/recall with k=3); this module only adapts inputs and the reference npz layouts:

- ardiff reference npz (`ardiff eval --write-ref`): `mu` (2048,) float64, `sigma` (2048,2048) float64,
  optional `features` (M,2048) float32 for precision/recall.
- ADM reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`): `mu`, `sigma` (FID uses these) and `arr_0`
  (M,H,W,3) uint8 images (used for precision/recall only, as in the ADM suite).
- any npz with only `arr_0`: statistics are computed from the images.

Metric state and DDP synchronisation are torchmetrics `Metric`s: `IndexedFeatures` (per-sample features, gathered
from all ranks and put back in sample-index order, for FID/IS/PR which need every feature) and `FeatureMoments`
(sums of features and of their outer products, summed over ranks, for a Frechet distance of any feature space).
`compute()` syncs, so it must run on every rank.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torchmetrics import Metric

from callbacks.inception import extract_features
from datamodules.images import nhwc_to_nchw


@dataclass
class ReferenceStats:
    mu: np.ndarray  # (2048,) float64
    sigma: np.ndarray  # (2048, 2048) float64
    features: Tensor | None = None  # (M, 2048) float32, for precision/recall
    num_images: int | None = None

    def save(self, path: str) -> None:
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.features is not None:
            arrays["features"] = self.features.cpu().numpy()
        np.savez(path, **arrays)


def fid_statistics(pool: Tensor) -> dict[str, np.ndarray]:
    """(N, 2048) features -> {'mu', 'sigma'} in float64 (the dtype of ADM's reference statistics)."""
    return fid_features_to_statistics(pool.detach().cpu().double())


def stats_from_features(pool: Tensor, keep_features: bool = True) -> ReferenceStats:
    stats = fid_statistics(pool)
    features = pool.detach().cpu().float() if keep_features else None
    return ReferenceStats(stats["mu"], stats["sigma"], features, num_images=pool.shape[0])


def frechet_distance(stats: dict[str, np.ndarray], ref: "ReferenceStats | dict[str, np.ndarray]") -> float:
    """Frechet distance between statistics {'mu', 'sigma'} and reference statistics (float64, torch-fidelity's
    formula: ||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 sum sqrt(eig(S1 S2)))."""
    ref_stats = ref if isinstance(ref, dict) else {"mu": ref.mu, "sigma": ref.sigma}
    stats = {k: np.asarray(stats[k], dtype=np.float64) for k in ("mu", "sigma")}
    ref_stats = {k: np.asarray(ref_stats[k], dtype=np.float64) for k in ("mu", "sigma")}
    return fid_statistics_to_metric(stats, ref_stats, verbose=False)["frechet_inception_distance"]


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """(N, 1008) bias-free logits -> (mean, std) over `splits` splits, shuffled with torch-fidelity's seed."""
    out = isc_features_to_metric(logits.detach().cpu(), splits=splits)
    return out["inception_score_mean"], out["inception_score_std"]


def precision_recall(pool: Tensor, ref_features: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al.): k-NN manifolds of generated (pool) vs reference features."""
    gen, real = pool.detach().float(), ref_features.to(pool.device).float()  # (N, 2048), (M, 2048)
    out = prc_features_to_metric(gen, real, prc_neighborhood=k, save_cpu_ram=True, verbose=False)
    return out["precision"], out["recall"]


def compute_metrics(
    pool: Tensor, logits: Tensor | None, ref: ReferenceStats, compute_pr: bool = False, is_splits: int = 10
) -> dict[str, float]:
    """pool (N,2048), logits (N,1008) or None -> {'fid', 'is', 'is_std', 'precision', 'recall'} (as configured)."""
    metrics = {"fid": frechet_distance(fid_statistics(pool), ref)}
    if logits is not None:
        metrics["is"], metrics["is_std"] = inception_score(logits, is_splits)
    if compute_pr:
        if ref.features is None:
            raise ValueError("precision/recall needs reference features: an npz with `features` or `arr_0` images")
        metrics["precision"], metrics["recall"] = precision_recall(pool, ref.features)
    return metrics


def load_reference(
    path: str, inception: torch.nn.Module | None = None, need_features: bool = False, batch_size: int = 64
) -> ReferenceStats:
    """Load reference statistics from an ardiff or ADM npz (see module docstring).

    The `arr_0` images are run through `inception` only when the npz lacks `mu`/`sigma`, or when `need_features`
    (precision/recall) and it lacks `features`.
    """
    with np.load(path) as npz:
        keys = set(npz.files)
        mu = npz["mu"].astype(np.float64) if "mu" in keys else None
        sigma = npz["sigma"].astype(np.float64) if "sigma" in keys else None
        features = torch.from_numpy(npz["features"]) if "features" in keys else None
        wanted = (mu is None or sigma is None or need_features) and features is None
        images = npz["arr_0"] if wanted and "arr_0" in keys else None
    if images is not None:
        if inception is None:
            raise ValueError(f"{path}: computing statistics from `arr_0` images needs an Inception model")
        features = extract_features(inception, nhwc_to_nchw(images), batch_size)["pool"].cpu()
    if need_features and features is None:
        raise ValueError(f"{path}: precision/recall needs `features` or `arr_0` images (keys: {sorted(keys)})")
    if mu is None or sigma is None:
        if features is None:
            raise ValueError(f"{path}: has neither `mu`/`sigma` nor `features`/`arr_0` (keys: {sorted(keys)})")
        return stats_from_features(features)
    return ReferenceStats(mu, sigma, features, num_images=None if features is None else features.shape[0])


class IndexedFeatures(Metric):
    """Per-sample feature rows tagged with their global sample index; `compute()` gathers all ranks' rows and
    returns them in index order, checking that the indices are exactly 0..N-1 (each sample measured once)."""

    full_state_update = False

    def __init__(self, dims: dict[str, int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.dims = dict(dims)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        for name in self.dims:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update_empty(self) -> None:
        """Add (0, D) rows: call once on every rank, so that a rank owning no sample still gathers 2-d tensors."""
        self.update(torch.zeros(0, dtype=torch.long), **{n: torch.zeros(0, d) for n, d in self.dims.items()})

    def update(self, index: Tensor, **features: Tensor) -> None:
        """index (n,) int64, features name -> (n, D)."""
        self.index.append(index.to(self.device, torch.long))
        for name in self.dims:
            getattr(self, name).append(features[name].detach().float().to(self.device))

    def compute(self, num_samples: int | None = None) -> dict[str, Tensor]:
        """name -> (N, D) float32 on CPU, rows in sample-index order."""
        from torchmetrics.utilities.data import dim_zero_cat

        idx = dim_zero_cat(self.index).cpu()
        order = idx.argsort()
        expected = torch.arange(num_samples if num_samples is not None else idx.numel())
        if not torch.equal(idx[order], expected):
            raise RuntimeError("gathered sample indices are not exactly 0..N-1: ranks disagree on the sample plan")
        return {name: dim_zero_cat(getattr(self, name)).cpu()[order] for name in self.dims}


class FeatureMoments(Metric):
    """Count, sum and sum of outer products of feature vectors (float64), summed over ranks: enough for the mean and
    covariance of any number of samples without keeping them. `compute()` -> {'mu': (D,), 'sigma': (D,D)} float64
    numpy, sigma with the unbiased (N-1) normalisation of np.cov."""

    full_state_update = False

    def __init__(self, dim: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dim = dim
        self.add_state("n", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("s", default=torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ss", default=torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: Tensor) -> None:
        """features (n, D)."""
        f = features.detach().to(self.device, torch.float64)
        self.n += f.shape[0]
        self.s += f.sum(0)
        self.ss += f.T @ f

    def compute(self) -> dict[str, np.ndarray]:
        n = float(self.n)
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {n:.0f}")
        s, ss = self.s.cpu().numpy(), self.ss.cpu().numpy()
        mu = s / n
        sigma = (ss - n * np.outer(mu, mu)) / (n - 1)
        return {"mu": mu, "sigma": sigma}
