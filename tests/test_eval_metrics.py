"""Reference statistics from npz mu/sigma, from raw arr_0 images, from a PNG folder and from shards; `ardiff eval`."""

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ardiff import evaluate
from callbacks.inception import build_inception, extract_features
from callbacks.metrics import fid_statistics, load_reference
from tests.test_eval_common import smooth_images  # noqa: F401


def nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def test_reference_from_adm_mu_sigma_and_from_raw_images(tmp_path, inception_weights, fast_inception):  # noqa: F811
    images = smooth_images(12, 16, seed=2)
    inception = build_inception(inception_weights)
    pool = extract_features(inception, images, batch_size=5)["pool"]
    stats = fid_statistics(pool)
    adm, raw = tmp_path / "adm.npz", tmp_path / "raw.npz"
    np.savez(adm, arr_0=nhwc(images), mu=stats["mu"], sigma=stats["sigma"])  # VIRTUAL_imagenet256_labeled layout
    np.savez(raw, arr_0=nhwc(images))

    from_stats = load_reference(str(adm))  # mu/sigma only: no Inception needed
    assert from_stats.features is None and from_stats.mu.dtype == np.float64
    np.testing.assert_array_equal(from_stats.mu, stats["mu"])
    with pytest.raises(ValueError, match="needs an Inception model"):
        load_reference(str(adm), need_features=True)
    with_features = load_reference(str(adm), inception, need_features=True)  # PR features from arr_0
    torch.testing.assert_close(with_features.features, pool, rtol=1e-5, atol=1e-6)

    from_images = load_reference(str(raw), inception)
    np.testing.assert_allclose(from_images.mu, stats["mu"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(from_images.sigma, stats["sigma"], rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="neither"):
        np.savez(tmp_path / "empty.npz", labels=np.zeros(3))
        load_reference(str(tmp_path / "empty.npz"), inception)


def test_ardiff_eval_write_ref_from_folder_and_shards_then_evaluate(
    tmp_path,
    inception_weights,  # noqa: F811
    fast_inception,  # noqa: F811
    capsys,
):
    real, other = smooth_images(12, 16, seed=3), smooth_images(12, 16, seed=4)
    folder = tmp_path / "real"
    folder.mkdir()
    with wds.TarWriter(str(tmp_path / "real-000000.tar")) as tar:
        for i, img in enumerate(nhwc(real)):
            Image.fromarray(img).save(folder / f"{i:04d}.png")
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            tar.write({"__key__": f"img{i:04d}", "png": buf.getvalue(), "cls": str(i % 3)})
    np.savez(tmp_path / "real.npz", arr_0=nhwc(real))
    np.savez(tmp_path / "other.npz", arr_0=nhwc(other))
    common = ["--inception-weights", inception_weights, "--batch-size", "5"]

    assert evaluate.main([str(folder), "--write-ref", str(tmp_path / "ref_png.npz"), *common]) == 0
    tar = str(tmp_path / "real-000000.tar")
    assert evaluate.main([tar, "--write-ref", str(tmp_path / "ref_tar.npz"), "--image-size", "16", *common]) == 0
    with np.load(tmp_path / "ref_png.npz") as a, np.load(tmp_path / "ref_tar.npz") as b:
        assert a["features"].shape == (12, 2048) and a["sigma"].shape == (2048, 2048)
        np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-6)
    capsys.readouterr()

    # the same images against their own statistics: FID 0, precision = recall = 1
    out_json = tmp_path / "metrics.json"
    real_npz = str(tmp_path / "real.npz")
    cmd = [real_npz, "--ref", str(tmp_path / "ref_png.npz"), "--pr", "--json", str(out_json), *common]
    assert evaluate.main(cmd) == 0
    table = capsys.readouterr().out
    assert "| fid |" in table and "| precision |" in table
    metrics = json.loads(out_json.read_text())
    trace = float(np.trace(np.load(tmp_path / "ref_png.npz")["sigma"]))
    assert abs(metrics["fid"]) < 1e-5 * trace and metrics["precision"] == metrics["recall"] == 1.0
    assert metrics["num_images"] == 12 and "is" in metrics

    # other images against the ADM-layout reference (mu/sigma of the real ones): FID clearly > 0
    stats = load_reference(str(tmp_path / "ref_png.npz"))
    np.savez(tmp_path / "adm.npz", arr_0=nhwc(real), mu=stats.mu, sigma=stats.sigma)
    cmd = [str(tmp_path / "other.npz"), "--ref", str(tmp_path / "adm.npz"), "--format", "json", "--no-is", *common]
    assert evaluate.main(cmd) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["fid"] > 1e-3 * trace and "is" not in metrics
