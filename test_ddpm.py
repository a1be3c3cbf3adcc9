
# ---- evaluate.py ----
# Fréchet distance and IS against closed forms, the Inception feature path with a TorchScript stand-in,
# the resumable NLL against calc_bpd_loop, the CLI end to end on a tiny digits model, and bad input.
import json as _json
import os as _os
import warnings as _warnings

import numpy as _np
import pytest as _pytest
import torch as _torch
import torch.nn as _nn
import torch.nn.functional as _F

import ddpm as _ddpm
import evaluate


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * _np.eye(d))


def test_frechet_identical_statistics_is_zero():
    """Identical statistics are at Fréchet distance 0."""
    rng = _np.random.default_rng(0)
    mu, sigma = rng.standard_normal(8), _random_cov(rng, 8)
    # sqrtm(sigma^2) == sigma up to float64 round-off on a well-conditioned 8x8 matrix
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_mean_shift_is_squared_norm():
    """Equal covariances and a pure mean shift give ||mu1 - mu2||^2."""
    rng = _np.random.default_rng(1)
    mu1, mu2, sigma = rng.standard_normal(6), rng.standard_normal(6), _random_cov(rng, 6)
    expected = float(((mu1 - mu2) ** 2).sum())
    assert evaluate.frechet_distance(mu1, sigma, mu2, sigma) == _pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_diagonal_covariances_scalar_formula():
    """Diagonal covariances give sum_i (mu1_i - mu2_i)^2 + (sqrt(s1_i) - sqrt(s2_i))^2."""
    rng = _np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = float(((mu1 - mu2) ** 2).sum() + ((_np.sqrt(s1) - _np.sqrt(s2)) ** 2).sum())
    got = evaluate.frechet_distance(mu1, _np.diag(s1), mu2, _np.diag(s2))
    assert got == _pytest.approx(expected, rel=1e-9)  # float64 throughout: round-off only


def test_frechet_symmetric_and_matches_eigenvalue_route():
    """d(a, b) = d(b, a), and Tr sqrt(S1 S2) equals the sum of the square roots of the eigenvalues of
    sqrt(S1) S2 sqrt(S1), an independent way to compute the same trace."""
    rng = _np.random.default_rng(3)
    mu1, mu2, s1, s2 = rng.standard_normal(7), rng.standard_normal(7), _random_cov(rng, 7), _random_cov(rng, 7)
    ab, ba = evaluate.frechet_distance(mu1, s1, mu2, s2), evaluate.frechet_distance(mu2, s2, mu1, s1)
    w, v = _np.linalg.eigh(s1)
    root1 = (v * _np.sqrt(w)) @ v.T
    tr = _np.sqrt(_np.clip(_np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    expected = float(((mu1 - mu2) ** 2).sum() + _np.trace(s1) + _np.trace(s2) - 2 * tr)
    assert ab == _pytest.approx(ba, rel=1e-9) and ab == _pytest.approx(expected, rel=1e-8)  # two float64 routes


def test_frechet_singular_covariances_stay_finite():
    """Rank-deficient covariances (fewer samples than features, or zero) give a finite distance, and the
    eps offset for an exactly singular product shifts it by no more than ~D * eps."""
    rng = _np.random.default_rng(4)
    low = evaluate.frechet_distance(_np.zeros(16), _random_cov(rng, 16, rank=3), _np.ones(16), _random_cov(rng, 16, rank=3))
    assert _np.isfinite(low) and low > 0
    with _pytest.warns(UserWarning, match="singular"):
        got = evaluate.frechet_distance(_np.zeros(4), _np.zeros((4, 4)), _np.ones(4), _np.zeros((4, 4)))
    assert got == _pytest.approx(4.0, abs=1e-4)  # ||mu||^2 = 4; the 1e-6 * I offset changes it by ~8e-6


def test_frechet_rejects_mismatched_shapes():
    """Statistics of different sizes raise instead of broadcasting."""
    with _pytest.raises(ValueError, match="shape"):
        evaluate.frechet_distance(_np.zeros(3), _np.eye(3), _np.zeros(4), _np.eye(4))


def test_inception_score_bounds():
    """Identical predictions give IS 1; one-hot predictions spread uniformly over K classes give IS K."""
    rng = _np.random.default_rng(5)
    p = rng.dirichlet(_np.ones(7))
    mean, std = evaluate.inception_score(_np.tile(p, (50, 1)), num_splits=10)
    assert mean == _pytest.approx(1.0, abs=1e-12) and std == _pytest.approx(0.0, abs=1e-12)  # KL(p || p) = 0 exactly
    K = 5
    onehot = _np.eye(K)[_np.arange(10 * 4 * K) % K]  # every split holds each class 4 times
    mean, std = evaluate.inception_score(onehot, num_splits=10)
    assert mean == _pytest.approx(K, rel=1e-12) and std == _pytest.approx(0.0, abs=1e-9)  # exp(log K)
    with _pytest.raises(ValueError, match="probability"):
        evaluate.inception_score(rng.standard_normal((20, 3)))  # logits, not probabilities


class _InceptionStandIn(_nn.Module):
    """A tiny network with the call signature of inception-2015-12-05.pt: uint8-range images [N, 3, H, W] of
    any size, resized inside (to 16x16 here, 299x299 there), scaled as (x - 128) / 128; 2048-d (here 12-d)
    features with return_features=True, else a softmax over the classes, without the output bias when asked."""

    def __init__(self):
        super().__init__()
        self.layers = _nn.Sequential(_nn.Conv2d(3, 12, 3, stride=2), _nn.ReLU(), _nn.AdaptiveAvgPool2d(1))
        self.output = _nn.Linear(12, 10)
        _nn.init.normal_(self.output.bias, std=3.0)  # a large bias, so no_output_bias visibly matters

    def forward(self, img: _torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> _torch.Tensor:
        batch_size, channels, height, width = img.shape
        assert channels == 3
        x = _F.interpolate(img.to(_torch.float32), size=(16, 16), mode="bilinear", align_corners=False)
        features = self.layers((x - 128.0) / 128.0).reshape(batch_size, -1)
        if return_features:
            return features
        if no_output_bias:
            logits = _F.linear(features, self.output.weight, None)
        else:
            logits = self.output(features)
        return _F.softmax(logits, 1)


@_pytest.fixture
def inception_standin(tmp_path):
    _torch.manual_seed(0)
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.10+ deprecates TorchScript; the real file is one
        net = _torch.jit.script(_InceptionStandIn().eval())
    path = str(tmp_path / "inception-standin.pt")
    net.save(path)
    return net, path


def _run_cli(capsys, argv):
    result = evaluate.main(argv)
    return result, capsys.readouterr().out


def test_inception_feature_path_end_to_end(tmp_path, capsys, inception_standin):
    """fid-stats, fid and is through the CLI equal the statistics, distance and score computed from the
    stand-in's outputs on the whole NCHW batch at once (layout, grayscale repeat, batching, no_output_bias)."""
    net, path = inception_standin
    rng = _np.random.default_rng(6)
    ref = rng.integers(0, 256, (40, 8, 8, 3), dtype=_np.uint8)
    samples = _np.clip(ref.astype(int) + rng.integers(-60, 60, ref.shape), 0, 255).astype(_np.uint8)
    _np.save(tmp_path / "ref.npy", ref)
    _np.savez(tmp_path / "samples.npz", arr_0=samples)  # the layout `ddpm.py sample` writes
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")  # the stand-in's sha256 is not the real network's: expected warning
        stats = str(tmp_path / "stats.npz")
        _run_cli(capsys, ["fid-stats", "--data", str(tmp_path / "ref.npy"), "--out", stats, "--inception", path,
                          "--batch-size", "7", "--device", "cpu", "--no-progress"])
        fid, out = _run_cli(capsys, ["fid", str(tmp_path / "samples.npz"), "--ref", stats, "--inception", path,
                                     "--batch-size", "16", "--device", "cpu", "--no-progress"])
        fid_data, _ = _run_cli(capsys, ["fid", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npy"),
                                        "--inception", path, "--device", "cpu", "--no-progress"])
        (is_mean, is_std), is_out = _run_cli(capsys, ["is", str(tmp_path / "samples.npz"), "--inception", path,
                                                      "--splits", "4", "--device", "cpu", "--no-progress"])
    with _torch.no_grad():
        nchw = lambda a: _torch.from_numpy(a).permute(0, 3, 1, 2)
        f_ref, f_smp = (net(nchw(a), return_features=True).double().numpy() for a in (ref, samples))
        probs = net(nchw(samples), no_output_bias=True).double().numpy()
        probs_bias = net(nchw(samples)).double().numpy()
    mu, sigma, info = evaluate.load_fid_stats(stats)
    # float32 network outputs accumulated in float64: batch-size-dependent round-off only
    assert _np.allclose(mu, f_ref.mean(0), atol=1e-6) and _np.allclose(sigma, _np.cov(f_ref, rowvar=False), atol=1e-6)
    assert info["num_images"] == 40
    expected = evaluate.frechet_distance(f_smp.mean(0), _np.cov(f_smp, rowvar=False), f_ref.mean(0), _np.cov(f_ref, rowvar=False))
    assert fid == _pytest.approx(expected, rel=1e-5) and fid_data == _pytest.approx(expected, rel=1e-5) and fid > 0
    assert (is_mean, is_std) == _pytest.approx(evaluate.inception_score(probs, 4), rel=1e-5)
    got = evaluate.inception_outputs(net, samples, what="probs", batch_size=16, progress=False)
    assert _np.allclose(got, probs, atol=1e-6) and not _np.allclose(got, probs_bias, atol=1e-2)  # bias left out
    assert "40 samples" in out and "stats.npz (40 images of" in out and "40 samples" in is_out
    # Grayscale images are repeated to 3 channels, as StyleGAN2-ADA does.
    gray = ref[..., :1]
    got = evaluate.inception_outputs(net, gray, batch_size=9, progress=False)
    with _torch.no_grad():
        want = net(nchw(_np.repeat(gray, 3, axis=-1)), return_features=True).double().numpy()
    assert _np.allclose(got, want, atol=1e-6)


def test_inception_download_checks_sha256(tmp_path, inception_standin):
    """A download with the right sha256 is cached and loads; a wrong one is refused and nothing is kept;
    a cached file that changed is refused; a missing --inception file raises."""
    _, path = inception_standin
    digest = evaluate.sha256_file(path)
    url = "file://" + _os.path.abspath(path)
    with _pytest.raises(ValueError, match="sha256"):
        evaluate.download_inception(url, str(tmp_path / "cache"), sha256="0" * 64)
    assert not _os.path.exists(tmp_path / "cache" / evaluate.INCEPTION_FILENAME)
    cached = evaluate.download_inception(url, str(tmp_path / "cache"), sha256=digest)
    assert evaluate.sha256_file(cached) == digest
    with _pytest.raises(ValueError, match="sha256"):
        evaluate.download_inception(url, str(tmp_path / "cache"))  # the cached stand-in is not the real network
    with _pytest.raises(RuntimeError, match="--inception PATH"):
        evaluate.download_inception("file:///nonexistent/inception.pt", str(tmp_path / "offline"))
    with _pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.load_inception(str(tmp_path / "missing.pt"))
    with _pytest.warns(UserWarning, match="not the standard"):
        evaluate.load_inception(path)


def test_inception_bad_input(tmp_path, inception_standin):
    """Samples of the wrong dtype or shape and statistics files without mu/sigma raise a clear error."""
    net, _ = inception_standin
    with _pytest.raises(ValueError, match="uint8"):
        evaluate.inception_outputs(net, _np.zeros((4, 8, 8, 3), _np.float32), progress=False)
    with _pytest.raises(ValueError, match="uint8"):
        evaluate.inception_outputs(net, _np.zeros((4, 3, 8, 8), _np.uint8), progress=False)  # NCHW, not NHWC
    _np.savez(tmp_path / "floats.npz", arr_0=_np.zeros((4, 8, 8, 3), _np.float32))
    with _pytest.raises(ValueError, match="uint8"):
        evaluate.load_images(str(tmp_path / "floats.npz"))
    _np.savez(tmp_path / "bad_stats.npz", m=_np.zeros(3), s=_np.eye(3))
    with _pytest.raises(ValueError, match="mu"):
        evaluate.load_fid_stats(str(tmp_path / "bad_stats.npz"))
    with _pytest.raises(ValueError, match="mu"):
        evaluate.is_stats_file(str(tmp_path / "bad_stats.npz"))
    _np.savez(tmp_path / "half_stats.npz", mu=_np.zeros(3))
    with _pytest.raises(ValueError, match="mu"):
        evaluate.is_stats_file(str(tmp_path / "half_stats.npz"))
    with _pytest.raises(FileNotFoundError):
        evaluate.load_fid_stats(str(tmp_path / "nope.npz"))


def _tiny_model_checkpoint(path, T=25, seed=0):
    """The digits preset at ch=32, one resblock per level and T=25 (the smallest linear schedule with every
    beta < 1 is T > 20, since betas end at 0.02 * 1000 / T), with random weights: a checkpoint of `ddpm.py train`."""
    config = _ddpm.get_preset("digits")
    config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 32, (1, 2), 1
    config.diffusion.num_timesteps = T
    _torch.manual_seed(seed)
    model, diffusion = _ddpm.create_model_and_diffusion(config)
    # A larger output scale than the init's ~0, so the bound terms are not all equal.
    _torch.nn.init.normal_(model.conv_out.weight, std=0.05)
    _ddpm.save_checkpoint(path, {"config": config.to_dict(), "step": 0, "model": model.state_dict(),
                                 "ema": model.state_dict()})
    return _ddpm.load_model(path)


def test_nll_agrees_with_calc_bpd_loop(tmp_path):
    """evaluate_nll equals calc_bpd_loop called directly with batch b's generator seeded seed + b, and its
    rate + distortion + prior parts add up to the total bound for every example."""
    model, diffusion, _ = _tiny_model_checkpoint(str(tmp_path / "ckpt.pt"))
    x = _ddpm.normalize_data(_ddpm.load_data("digits", "test")[:5])
    got = evaluate.evaluate_nll(model, diffusion, x, batch_size=3, seed=7, progress=False)
    for b, sl in enumerate((slice(0, 3), slice(3, 5))):
        want = diffusion.calc_bpd_loop(model, x[sl], generator=_torch.Generator().manual_seed(7 + b))
        for k in evaluate.NLL_KEYS:
            assert _np.array_equal(got[k][sl], want[k].numpy()), k  # the same computation, bit for bit
    s = evaluate.nll_summary(got)
    # float64 sums of float32 terms: round-off ~1e-6 relative
    assert s["rate_bpd"][0] + s["distortion_bpd"][0] == _pytest.approx(s["total_bpd"][0], rel=1e-5)
    per_example = got["vb"][:, 1:].sum(1) + got["prior_bpd"] + got["vb"][:, 0]
    assert _np.allclose(per_example, got["total_bpd"], rtol=1e-5)
    # The rate-distortion curve against a loop over paper times t = 1..T (independent of the cumsum).
    T = diffusion.num_timesteps
    rate, rmse = evaluate.rate_distortion(got["vb"], got["prior_bpd"], got["xstart_mse"])
    for t in (1, 2, T // 2, T):
        loop = _np.mean([got["prior_bpd"][n] + sum(got["vb"][n, s] for s in range(t, T)) for n in range(5)])
        assert rate[t - 1] == _pytest.approx(loop, rel=1e-6)
        assert rmse[t - 1] == _pytest.approx(127.5 * _np.sqrt(got["xstart_mse"][:, t - 1].mean()), rel=1e-6)
    assert rate[0] == _pytest.approx(s["rate_bpd"][0], rel=1e-6) and rmse[0] == _pytest.approx(s["xstart_rmse"])
    rows = evaluate.table4_rows(rate, rmse)
    assert [r[0] for r in rows] == [25, 23, 20, 18, 15, 13, 10, 8, 5, 3] and rows[0][1] == 1 and rows[-1][1] == 23


def test_nll_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """An evaluation interrupted after one batch and rerun gives the same arrays as an uninterrupted one,
    recomputing only the missing batches; a rerun with another batch size refuses to mix results."""
    model, diffusion, _ = _tiny_model_checkpoint(str(tmp_path / "ckpt.pt"))
    x = _ddpm.normalize_data(_ddpm.load_data("digits", "test")[:5])
    full = evaluate.evaluate_nll(model, diffusion, x, batch_size=2, seed=3, out_dir=str(tmp_path / "a"), progress=False)

    calls, real = [], diffusion.calc_bpd_loop

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and not resuming:
            raise RuntimeError("simulated crash")  # a kill or Ctrl-C mid-evaluation
        return real(*args, **kwargs)
    resuming = False
    monkeypatch.setattr(diffusion, "calc_bpd_loop", interrupted)
    with _pytest.raises(RuntimeError, match="simulated crash"):
        evaluate.evaluate_nll(model, diffusion, x, batch_size=2, seed=3, out_dir=str(tmp_path / "b"), progress=False)
    assert sorted(f for f in _os.listdir(tmp_path / "b") if f.startswith("batch")) == ["batch-00000.npz"]
    calls.clear()
    resuming = True
    resumed = evaluate.evaluate_nll(model, diffusion, x, batch_size=2, seed=3, out_dir=str(tmp_path / "b"),
                                    progress=False)
    assert len(calls) == 2  # batches 1 and 2 only; batch 0 came from disk
    for k in evaluate.NLL_KEYS:
        assert _np.array_equal(full[k], resumed[k]), k
    with _pytest.raises(ValueError, match="batch_size"):
        evaluate.evaluate_nll(model, diffusion, x, batch_size=3, seed=3, out_dir=str(tmp_path / "b"), progress=False)


def test_nll_cli_end_to_end(tmp_path, capsys):
    """`evaluate.py nll` on a digits checkpoint prints the bound, rate, distortion and Table 4 and writes the
    per-example/per-t .npz, the CSV and the JSON summary, consistent with each other."""
    _tiny_model_checkpoint(str(tmp_path / "ckpt.pt"))
    out = str(tmp_path / "eval")
    summary, printed = _run_cli(capsys, ["nll", "--checkpoint", str(tmp_path / "ckpt.pt"), "--data", "digits",
                                         "--split", "test", "--max-examples", "4", "--batch-size", "3", "--out", out,
                                         "--device", "cpu", "--no-progress"])
    for word in ("NLL (the bound)", "prior L_T", "rate", "distortion L_0", "x0 RMSE", "Table 4"):
        assert word in printed
    with _np.load(_os.path.join(out, "nll-test.npz")) as f:
        assert f["vb"].shape == (4, 25) and f["total_bpd"].shape == (4,)
        assert summary["total_bpd"][0] == _pytest.approx(f["total_bpd"].astype(_np.float64).mean())
    with open(_os.path.join(out, "nll-test-table4.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("reverse_time") and len(lines) == 11 and lines[1].startswith("25,1,")
    assert float(lines[1].split(",")[2]) == _pytest.approx(summary["rate_bpd"][0], abs=1e-5)  # 5 decimals in the CSV
    with open(_os.path.join(out, "nll-test.json")) as f:
        assert _json.load(f)["num_examples"] == 4


def test_figures_cli(tmp_path, capsys):
    """`evaluate.py figures` writes Figures 6-8 as PNGs of the expected grid sizes, and the loss curve from
    metrics.jsonl when matplotlib is installed."""
    PIL = _pytest.importorskip("PIL.Image")
    _tiny_model_checkpoint(str(tmp_path / "ckpt.pt"))
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(0, 50, 10):
            f.write(_json.dumps({"step": step, "loss": 1.0 / (step + 1), "lr": 1e-3}) + "\n")
        f.write('{"step": 50, "lo')  # a half-written line of a running job is skipped
    out = str(tmp_path / "fig")
    paths, _ = _run_cli(capsys, ["figures", "--checkpoint", str(tmp_path / "ckpt.pt"), "--n", "2", "--frames", "4",
                                 "--samples-per-latent", "3", "--data", "digits", "--out", out, "--device", "cpu"])
    scale, tile = 8, 8 + 2  # 8x8 digits enlarged 8x; each tile has a 2-pixel border
    sizes = {_os.path.basename(p): PIL.open(p).size for p in paths}
    assert sizes["fig6-progressive.png"] == ((4 * tile + 2) * scale, (2 * tile + 2) * scale)
    assert sizes["fig7-shared-latents.png"] == ((5 * tile + 2) * scale, (4 * tile + 2) * scale)  # x0, xt, 3 samples
    assert sizes["fig8-interpolation.png"] == ((13 * tile + 2) * scale, (2 * tile + 2) * scale)  # x0, 11 lambdas, x0'
    try:
        import matplotlib  # noqa: F401
        assert "loss.png" in sizes
    except ImportError:
        assert "loss.png" not in sizes
