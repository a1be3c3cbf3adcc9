"""The tests of ddpm.py, evaluate.py, experiments.py and bench.py, in the code's order: the math check first, then the harness.

`pytest -m math` runs the math check alone, in seconds, with torch, numpy, scipy, pytest and hypothesis only: each
formula of ddpm.py's sections 1-5 (schedules, Gaussians, the diffusion, respacing and DDIM, the U-Net and its
initialisation), the training step (t, flips, data order, loss mean, clipping, EMA, lr warmup), the data scaling and
evaluate.py's formulas (FID, IS, the bootstrap, rate and distortion, the categorical baseline) against an independent
computation (float64 numpy written below from the paper's and the official code's equations, closed forms, the
official reference values, torch.distributions, brute force, Monte Carlo with a tolerance derived from the sample
size), each tolerance with its reason. Then ddpm.py's harness (checkpoints, data, sampling, training, the
configuration and the command line with its bad input), evaluate.py (sample, the NLL, Inception/FID/IS, figures,
released weights, the digits score), the experiments (Table 2, steps) and bench.py. Each bad-input test
sits beside the feature it tests and matches the key phrase of the message: what is wrong and the fix.

Dependencies, one rule: the math check needs torch, numpy, scipy, pytest and hypothesis; everything else needs
requirements-dev.txt (`make install`; `make test` runs the whole suite with it). Those packages are named once,
below (DevRequirement): where one is missing the math check still runs and every test that uses it fails, naming
the package. No test skips. Run everything with `make test` (python -m pytest -q test_ddpm.py).
"""
import copy
import dataclasses
import importlib
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import bench
import ddpm


class DevRequirement:
    """A package of requirements-dev.txt, imported at its first use: diffusers and scikit-learn take seconds to
    import, which `pytest -m math` does not pay. Where it is not installed, that use fails the test, naming it."""

    def __init__(self, name):
        self.name = name

    def __getattr__(self, attribute):
        if attribute.startswith("__"):  # pytest's and copy's probes (__test__, ...) import nothing
            raise AttributeError(attribute)
        try:
            module = importlib.import_module(self.name)
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(f"{self.name} needs {error.name}, which is not installed: the tests that use "
                                      f"it need requirements-dev.txt (make install)") from None
        return getattr(module, attribute)


try:
    import evaluate  # imported here, for the tests that monkeypatch it; it imports scipy
    import experiments
except ModuleNotFoundError:
    evaluate, experiments = DevRequirement("evaluate"), DevRequirement("experiments")
diffusers = DevRequirement("diffusers")
Image = DevRequirement("PIL.Image")
safetensors_torch = DevRequirement("safetensors.torch")
sklearn_datasets = DevRequirement("sklearn.datasets")


# ---- 1. Shared helpers and fixtures ----


# Sized for 2 CPU cores; every property is cheap per example. derandomize: the same examples on every run, so a
# wrong formula fails every time and a passing run is reproducible (the examples still vary widely).
CI = settings(max_examples=25, deadline=None, derandomize=True)
LN2 = math.log(2.0)
math_check = pytest.mark.math  # `pytest -m math`: every test of sections 3-9 carries it, and no other test


@pytest.fixture(autouse=True, scope="session")
def cache_outside_home(tmp_path_factory):
    """The suite never writes to the home folder: downloads and caches go to a temporary $DDPM_CACHE."""
    patch = pytest.MonkeyPatch()
    patch.setenv("DDPM_CACHE", str(tmp_path_factory.mktemp("ddpm-cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for every test: the suite's tensors are tiny, and a second thread waiting at OpenMP
    barriers makes each op slower, 10-50x on a shared 2-core machine (measured: the overfit test 299 s with two
    threads under load). The DDP test's processes get OMP_NUM_THREADS=1. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def diffusion_for(T=1000, schedule="linear", **kw):
    return ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule(schedule, T), **kw)


def tiny_unet(in_channels=1, seed=0, **kw):
    """The one tiny U-Net of this file: the digits preset's layout at ch=32 with one resblock per level (0.7M
    parameters for 1 channel), 8x8 inputs with `in_channels` channels, two levels and attention at 4x4, so every
    code path of the CIFAR-10 network runs in ms; dropout 0, its weights drawn from torch's generator seeded `seed`."""
    torch.manual_seed(seed)
    return ddpm.UNet(**{**dict(ch=32, out_ch=in_channels, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                               dropout=0.0, in_channels=in_channels, resolution=8), **kw})


def busy(module, seed=0):
    """The module in float64 with every weight, bias and GroupNorm affine random and O(1) (at the official init
    the last convs are ~1e-10 and GroupNorm's affine is 1 and 0, which would hide errors behind them)."""
    g = torch.Generator().manual_seed(seed)
    module = module.double().eval()
    with torch.no_grad():
        for name, q in module.named_parameters():
            if q.dim() > 1:
                fan = q[0].numel()
                q.copy_(torch.randn(q.shape, generator=g, dtype=q.dtype) / math.sqrt(fan))
            else:
                q.copy_(torch.randn(q.shape, generator=g, dtype=q.dtype) * 0.2 + (1.0 if "norm" in name and
                                                                                    name.endswith("weight") else 0.0))
    return module


def np64(x):
    return x.detach().numpy() if torch.is_tensor(x) else np.asarray(x)


def assert_close64(got, want, scale=1.0):
    """Two float64 computations of one quantity agree elementwise to 1e-9 of (|want| + scale): float64 rounding,
    ~1e-16 relative, amplified by the conditioning that `scale` (broadcast per row) states. Any formula change
    moves a value by far more."""
    got, want = np64(got), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err, bound = np.abs(got - want), 1e-9 * (np.abs(want) + scale)
    bad = ~(err <= bound)  # NaN fails too
    assert not bad.any(), f"{bad.sum()} of {bad.size} differ, first at {np.argwhere(bad)[0]}: {got[bad][0]} != {want[bad][0]}"


def assert_close(got, want, rtol, atol):
    """np.testing.assert_allclose on tensors or arrays (torch.testing imports ~500 modules: seconds of `-m math`)."""
    np.testing.assert_allclose(np64(got), np64(want), rtol=rtol, atol=atol)


def states_equal(a, b):
    """Exact equality of two nested checkpoint structures (tensors compared bitwise)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


DDPM_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddpm.py")


TINY_FLAGS = ["--preset", "digits", "--model.in-channels", "3", "--model.ch", "32", "--model.ch-mult", "1,2",
              "--model.num-res-blocks", "1", "--diffusion.num-timesteps", "10", "--diffusion.beta-schedule", "cosine",
              "--batch-size", "8", "--warmup", "2", "--sample-every", "0"]


def save_tiny_images(path):
    """24 random uint8 8x8 RGB images as a .npy at `path`: a dataset that loads in microseconds."""
    np.save(path, np.random.default_rng(0).integers(0, 256, (24, 8, 8, 3), dtype=np.uint8))
    return str(path)


@pytest.fixture
def images(tmp_path):
    """The tiny images' .npy in this test's folder."""
    return save_tiny_images(tmp_path / "images.npy")


def tiny_config(out, data, **train):
    """The tiny model of TINY_FLAGS as a Config (dropout and flips on, so the RNG state matters)."""
    config = ddpm.get_preset("digits")
    config.model = ddpm.ModelConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
                                    in_channels=3, resolution=8)
    config.diffusion = ddpm.DiffusionConfig(beta_schedule="cosine", num_timesteps=10)
    defaults = dict(data=data, lr=1e-3, batch_size=8, warmup=2, randflip=True, steps=4, log_every=2, ckpt_every=2,
                    sample_every=0, out=str(out))
    config.train = dataclasses.replace(config.train, **{**defaults, **train})
    return config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, one_thread):
    """The one trained tiny run, trained once for the tests that only read it: 6 steps of tiny_config (warmup 2) on the
    tiny images, a checkpoint and a metrics line at every step, on one thread like the tests' own runs (one_thread,
    so that they compare bit for bit); returns its folder. Checkpoints and log lines read no RNG: the trajectory is any
    tiny_config run's."""
    root = tmp_path_factory.mktemp("tiny-run")
    return ddpm.train(tiny_config(root / "run", save_tiny_images(root / "images.npy"), steps=6, log_every=1,
                                  ckpt_every=1, keep_ckpts=6))


def tiny_digits_config(T=25):
    """The digits preset at ch=32, one resblock per level (tiny_unet's network) and T=25 (the smallest linear
    schedule with every beta < 1 is T > 20, since betas end at 0.02 * 1000 / T)."""
    config = ddpm.get_preset("digits")
    config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 32, (1, 2), 1
    config.diffusion.num_timesteps = T
    return config


def _tiny_model_checkpoint(path, T=25, seed=0):
    """tiny_digits_config's model with random weights (seeded `seed`), saved as a checkpoint of `ddpm.py train` at
    `path`; returns ddpm.load_model of it."""
    config = tiny_digits_config(T)
    torch.manual_seed(seed)
    model, diffusion = ddpm.create_model_and_diffusion(config)
    # A larger output scale than the init's ~0, so the bound terms are not all equal.
    torch.nn.init.normal_(model.conv_out.weight, std=0.05)
    ddpm.save_checkpoint(path, {"config": config.to_dict(), "step": 0, "model": model.state_dict(),
                                 "ema": model.state_dict()})
    return ddpm.load_model(path)


def _run_cli(capsys, argv, main=None):
    result = (main or evaluate.main)(argv)
    return result, capsys.readouterr().out


def _one_line_error(capsys, main, argv, *patterns):
    """main(argv) exits non-zero with one line 'error: ...' matching every pattern, and prints no traceback; the
    line never advises weights_only=False or allow_pickle (both run a file's code)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message, err = str(e.value.code), capsys.readouterr().err
    assert e.value.code not in (0, None) and message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in err and "weights_only" not in message and "allow_pickle" not in message, message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


@pytest.fixture(autouse=True)
def release_locks():
    """Every test lets go of the folders it held (ddpm.lock_folder), as a command does when it ends."""
    yield
    ddpm.release_locks()


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model or data fails the test: what is checked with it must be checked before any work."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the input was checked")
    for module, name in ((ddpm, "load_model"), (evaluate, "load_for_sampling"), (ddpm, "load_data")):
        monkeypatch.setattr(module, name, work)


# ---- 2. The math check's float64 references ----
# Written from the paper and the official code (diffusion_utils_2.py, utils.py, improved-diffusion's learned_range,
# respace.py and DDIM), in numpy, never from ddpm.py's buffers. Every test from here to section 9 is marked `math`.


random_betas = arrays(np.float64, st.integers(1, 30), elements=st.floats(1e-5, 0.999))  # any valid schedule


# T that do not divide 1000 (37, 999) and the paper's 1000 come up often; linear needs T >= 21 to stay below beta 1
any_T = st.one_of(st.sampled_from([37, 999, 1000]), st.integers(21, 1200))


named_betas = st.builds(ddpm.get_beta_schedule, st.sampled_from(["linear", "cosine"]), any_T)


# schedules whose abar stays above ~1e-9, so that float64 keeps 1/coef1 and 1/sqrt(abar) well conditioned
schedules = st.one_of(named_betas, arrays(np.float64, st.integers(2, 30), elements=st.floats(1e-4, 0.5)))


class Ref:
    """The official float64 schedule buffers of `betas` [T] (diffusion_utils_2.py; the paper's Eqs. 4, 6, 7)."""

    def __init__(self, betas):
        self.betas = b = np.asarray(betas, dtype=np.float64)
        self.T = len(b)
        self.abar = np.array([np.prod(1 - b[:i + 1]) for i in range(self.T)])  # abar_t = prod_{s<=t} (1 - beta_s)
        self.abar_prev = np.concatenate([[1.0], self.abar[:-1]])
        self.post_var = b * (1 - self.abar_prev) / (1 - self.abar)  # beta~_t
        # log beta~ with index 0 (beta~ = 0) taking index 1's value; a 1-step chain floors beta~ at 1e-20
        self.post_logvar = np.log(np.concatenate([self.post_var[1:2], self.post_var[1:]]) if self.T > 1
                                  else np.maximum(self.post_var, 1e-20))
        self.coef1 = b * np.sqrt(self.abar_prev) / (1 - self.abar)  # mu~ = coef1 x_0 + coef2 x_t (Eq. 7)
        self.coef2 = (1 - self.abar_prev) * np.sqrt(1 - b) / (1 - self.abar)
        # fixedlarge: sigma^2 = beta, except beta~_1 at index 0
        self.large_var = np.concatenate([self.post_var[1:2], b[1:]]) if self.T > 1 else b

    def col(self, a, t, ndim):
        """a[t] shaped [N, 1, ..., 1] to broadcast against an [N, ...] array of `ndim` axes."""
        return np.asarray(a)[np.asarray(t)].reshape(-1, *[1] * (ndim - 1))


def ref_kl(m1, lv1, m2, lv2):
    """KL(N(m1, e^lv1) || N(m2, e^lv2)) in nats, the textbook form log(s2/s1) + (s1^2 + (m1-m2)^2)/(2 s2^2) - 1/2."""
    return 0.5 * (lv2 - lv1) + (np.exp(lv1) + (m1 - m2) ** 2) / (2 * np.exp(lv2)) - 0.5


def ref_decoder(x, mean, log_scale):
    """The official discretized_gaussian_log_likelihood (utils.py) in nats: tanh CDF, bins of 2/255, edge bins to
    +-inf beyond +-0.999, every probability floored at 1e-12."""
    cdf = lambda y: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    upper = cdf((x - mean + 1 / 255) / np.exp(log_scale))
    lower = cdf((x - mean - 1 / 255) / np.exp(log_scale))
    p = np.where(x < -0.999, upper, np.where(x > 0.999, 1 - lower, upper - lower))
    return np.log(np.maximum(p, 1e-12))


def ref_p_mean_variance(r, out, x, t, mean_type, var_type, clip):
    """(mean, variance, log-variance, x0_hat) of p(x_{t-1}|x_t) from the network output `out`: the official
    p_mean_variance, with improved-diffusion's learned_range (frac = (v+1)/2 between log beta~ and log beta)."""
    C, col = x.shape[1], lambda a: r.col(a, t, x.ndim)
    if var_type in ("learned", "learned_range"):
        out, v = out[:, :C], out[:, C:]
        frac = (v + 1) / 2
        logvar = v if var_type == "learned" else frac * col(np.log(r.betas)) + (1 - frac) * col(r.post_logvar)
        var = np.exp(logvar)
    else:
        var = col(r.large_var if var_type == "fixedlarge" else r.post_var) + 0 * x
        logvar = col(np.log(r.large_var) if var_type == "fixedlarge" else r.post_logvar) + 0 * x
    maybe_clip = (lambda a: np.clip(a, -1, 1)) if clip else (lambda a: a)
    if mean_type == "xprev":  # the network outputs mu~ itself
        return out, var, logvar, maybe_clip((out - col(r.coef2) * x) / col(r.coef1))
    x0 = maybe_clip(out if mean_type == "xstart" else (x - col(np.sqrt(1 - r.abar)) * out) / col(np.sqrt(r.abar)))
    return col(r.coef1) * x0 + col(r.coef2) * x, var, logvar, x0


def ref_vb_bpd(r, out, x0, xt, t, mean_type, var_type, clip):
    """One term of the bound in bits/dim [N]: the KL from the posterior for t > 0, the decoder at t = 0 (Eq. 5)."""
    mean, _, logvar, _ = ref_p_mean_variance(r, out, xt, t, mean_type, var_type, clip)
    col, axes = (lambda a: r.col(a, t, xt.ndim)), tuple(range(1, xt.ndim))
    kl = ref_kl(col(r.coef1) * x0 + col(r.coef2) * xt, col(r.post_logvar) + 0 * xt, mean, logvar).mean(axes)
    decoder = -ref_decoder(x0, mean, 0.5 * logvar).mean(axes)
    return np.where(np.asarray(t) == 0, decoder, kl) / LN2


def ref_q_sample(r, x0, t, noise):
    col = lambda a: r.col(a, t, x0.ndim)
    return col(np.sqrt(r.abar)) * x0 + col(np.sqrt(1 - r.abar)) * noise


def ref_prior_bpd(r, x0):
    """L_T = KL(q(x_T|x_0) || N(0, I)) in bits/dim [N], at the last index T-1."""
    a = r.abar[-1]
    return ref_kl(np.sqrt(a) * x0, np.log(1 - a), 0.0, 0.0).mean(tuple(range(1, x0.ndim))) / LN2


def fake_network(C=1, extra=0):
    """A deterministic stand-in network with output [N, C + extra, ...]: smooth in x, depending on t, large enough
    that x0_hat leaves [-1, 1] often (so clipping acts) and never zero (so a sign or factor error shows)."""
    def model(x, t):
        tt = t.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        out = 0.8 * torch.tanh(x[:, :C]) + 0.05 * torch.cos(tt) - 0.3 * x[:, :C] ** 2
        return torch.cat([out, torch.sin(3 * x[:, :extra] + tt)], 1) if extra else out
    return model


def fake_network_np(x, t, C=1, extra=0):
    tt = np.asarray(t, dtype=np.float64).reshape(-1, *[1] * (x.ndim - 1))
    out = 0.8 * np.tanh(x[:, :C]) + 0.05 * np.cos(tt) - 0.3 * x[:, :C] ** 2
    return np.concatenate([out, np.sin(3 * x[:, :extra] + tt)], 1) if extra else out


# ---- 3. Beta schedules (ddpm.py section 1) ----


@math_check
def test_linear_schedule_and_buffers_match_the_official_reference_values():
    """Every buffer of the linear T=1000 schedule equals the float64 values of the official code's formulas
    (diffusion_utils_2.py: linspace, cumprod, sqrt), written down here as numbers."""
    d = diffusion_for()
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)  # both float64: rounding only
    close(d.betas[[0, 1, 999]], [1e-4, 1.1991991991991993e-4, 0.02])
    close(d.alphas_cumprod[[0, 1, 499, 999]], [0.9999, 0.9997800920720721, 0.07858724288177824, 4.035829765375676e-05])
    close(d.sqrt_alphas_cumprod[999], 0.006352818087570016)
    close(d.sqrt_one_minus_alphas_cumprod[999], 0.99997982064757)
    close(d.sqrt_recip_alphas_cumprod[999], 157.41045725150062)
    close(d.sqrt_recipm1_alphas_cumprod[999], 157.40728081040757)
    assert d.posterior_variance[0] == 0
    close(d.posterior_variance[[1, 2, 999]], [5.4531876613021935e-05, 8.548911523090944e-05, 0.01999998352656061])
    close(d.posterior_log_variance_clipped[[0, 1, 999]], [-9.81672513529567, -9.81672513529567, -3.912023829100455])
    close(d.posterior_mean_coef1[[0, 1, 999]], [1.0000000000001101, 0.5452914995102903, 1.2835148717224682e-4])
    close(d.posterior_mean_coef2[[0, 1, 999]], [0.0, 0.4547084989905303, 0.9899486782675173])


@math_check
@CI
@given(T=st.one_of(st.sampled_from([21, 37, 100, 999, 1000]), st.integers(21, 1500)))
def test_schedules_follow_their_definitions(T):
    """Each named schedule equals its formula, written here as a loop, at any T (1000/T need not be whole): only
    'linear' is rescaled by 1000/T (improved-diffusion); quad, const and warmup keep the ends 1e-4, 0.02 (official)."""
    s = 1000 / T
    lin = [1e-4 * s + i * (0.02 * s - 1e-4 * s) / (T - 1) for i in range(T)]
    quad = [(1e-4 ** 0.5 + i * (0.02 ** 0.5 - 1e-4 ** 0.5) / (T - 1)) ** 2 for i in range(T)]
    abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    warm = lambda n: [1e-4 + i * (0.02 - 1e-4) / (n - 1) for i in range(n)] + [0.02] * (T - n)
    expected = {"linear": lin, "quad": quad, "const": [0.02] * T, "jsd": [min(1 / (T - i), 0.999) for i in range(T)],
                "warmup10": warm(int(T * 0.1)), "warmup50": warm(int(T * 0.5)),
                "cosine": [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]}
    assert set(expected) == set(ddpm.BETA_SCHEDULES)
    for name, values in expected.items():
        betas = ddpm.get_beta_schedule(name, T)
        assert betas.dtype == np.float64 and ((betas > 0) & (betas < 1)).all()
        np.testing.assert_allclose(betas, values, rtol=1e-12, atol=0, err_msg=name)  # float64 rounding only


def official_beta_schedule(name, beta_start, beta_end, T):
    """The official get_beta_schedule (diffusion_utils_2.py), in numpy, as it is written there."""
    if name == "quad":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    if name == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if name.startswith("warmup"):
        betas = beta_end * np.ones(T, dtype=np.float64)
        warmup_time = int(T * {"warmup10": 0.1, "warmup50": 0.5}[name])
        betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
        return betas
    assert name == "const"
    return beta_end * np.ones(T, dtype=np.float64)


@math_check
@pytest.mark.parametrize("T", [21, 50, 100, 1000, 4000])
def test_only_linear_is_rescaled_for_other_T(T):
    """At any T, 'linear' is the official schedule with both ends scaled by 1000/T (improved-diffusion's
    get_named_beta_schedule), and 'quad', 'const', 'warmup10', 'warmup50' are the official schedule with the fixed
    ends 1e-4, 0.02; at T=1000 every one is the official schedule. Both sides are float64 numpy: equal exactly."""
    scale = 1000 / T
    np.testing.assert_array_equal(ddpm.get_beta_schedule("linear", T),
                                  official_beta_schedule("linear", 1e-4 * scale, 0.02 * scale, T))
    for name in ("quad", "const", "warmup10", "warmup50"):
        np.testing.assert_array_equal(ddpm.get_beta_schedule(name, T), official_beta_schedule(name, 1e-4, 0.02, T),
                                      err_msg=name)
    with pytest.raises(ValueError, match="needs T >= 21"):  # only linear's rescaled end can reach beta = 1
        ddpm.get_beta_schedule("linear", 20)
    assert ddpm.get_beta_schedule("quad", 10)[-1] == ddpm.get_beta_schedule("const", 10)[-1] == 0.02


@math_check
def test_schedule_reference_values_and_the_smallest_linear_T():
    """improved-diffusion's cosine values; linear is 1e-4..0.02 at T=1000, ends at 20/21 at T=21 and would reach
    beta = 1 exactly at T=20, which is refused with the smallest T that works."""
    cos = ddpm.get_beta_schedule("cosine", 1000)
    assert abs(cos[0] - 4.128e-5) < 1e-8 and cos[-1] == 0.999  # improved-diffusion's values (4 digits given)
    assert abs(ddpm.get_beta_schedule("cosine", 4000)[0] - 9.866e-6) < 1e-9
    np.testing.assert_allclose(ddpm.get_beta_schedule("linear", 1000)[[0, -1]], [1e-4, 0.02], rtol=1e-15)
    assert abs(ddpm.get_beta_schedule("linear", 21)[-1] - 20 / 21) < 1e-15
    with pytest.raises(ValueError, match=r"needs T >= 21 .*got T = 20; use T >= 21$"):
        ddpm.get_beta_schedule("linear", 20)
    assert ddpm.get_beta_schedule("jsd", 5)[-1] == 0.999 and ddpm.get_beta_schedule("jsd", 5)[-2] == 0.5


@math_check
def test_every_schedule_at_every_T_works_or_names_the_smallest_T_that_does():
    """Each schedule at every T from 1 to 1000: either every beta is in (0, 1), so alpha-bar_T > 0 and eps-prediction's
    x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) is finite at every step (computed here from the betas in float64),
    or a ValueError that names the smallest T that works, which does, as does every T above it. At T up to 10^6
    (the largest --diffusion.num-timesteps): x0 from eps at t = T is finite in float32, or a refusal names the
    largest T that works (const: 0.98^T >= 1e-60), which does while the next does not."""
    for name in ddpm.BETA_SCHEDULES:
        smallest = None
        for T in range(1, 1001):
            try:
                betas = ddpm.get_beta_schedule(name, T)
            except ValueError as e:
                assert smallest is None, f"{name} refused at T={T} after working at T={smallest}"
                named = int(re.search(r"needs T >= (\d+)", str(e))[1])
                continue
            if smallest is None:
                smallest = T
                assert T == 1 or named == T, (name, T)  # the refusal named exactly this T
            abar = np.cumprod(1 - betas)
            assert ((betas > 0) & (betas < 1)).all() and abar[-1] > 0, (name, T)
            assert np.isfinite(np.sqrt(1 / abar)).all() and np.isfinite(np.sqrt(1 / abar - 1)).all(), (name, T)
        assert smallest == (21 if name == "linear" else 1), name
    x_t, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)  # float32, as models run
    for name in ddpm.BETA_SCHEDULES:  # and far past the paper's T: the fixed ends of const, quad, warmup lose x_0
        for T in (2000, 10 ** 4, 10 ** 6):
            try:
                betas = ddpm.get_beta_schedule(name, T)
            except ValueError as e:
                largest = int(re.search(r"use T <= (\d+)$", str(e))[1])
                assert name in ("const", "quad", "warmup10", "warmup50") and largest < T, (name, T)
                ddpm.get_beta_schedule(name, largest)
                with pytest.raises(ValueError, match=f"use T <= {largest}$"):
                    ddpm.get_beta_schedule(name, largest + 1)
                if name == "const":  # 0.98^T >= 1e-60
                    assert largest == math.floor(math.log(1e-60) / math.log(0.98))
                continue
            x0 = ddpm.GaussianDiffusion(betas=betas).predict_start_from_noise(x_t, torch.full((2,), T - 1), eps)
            assert torch.isfinite(x0).all(), (name, T)  # x0 from eps at t = T, in float32
    with np.errstate(all="ignore"):  # past the largest T, float32 does overflow: the rule is needed
        beyond = ddpm.GaussianDiffusion(betas=np.full(10 ** 4, 0.02))
    assert not torch.isfinite(beyond.predict_start_from_noise(x_t, torch.full((2,), 10 ** 4 - 1), eps)).all()
    for name, T in (("linear", 21), ("jsd", 1), ("cosine", 1), ("const", 1)):  # the smallest chains sample finite x0
        diffusion = ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule(name, T))
        zero = lambda x, t: torch.zeros_like(x)
        x = diffusion.p_sample_loop(zero, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all(), (name, T)


@math_check
def test_bad_schedule_and_diffusion_options_raise_with_the_valid_choices():
    """Unknown names list the valid ones; mse with a learned variance points to hybrid."""
    with pytest.raises(ValueError, match="cosine"):
        ddpm.get_beta_schedule("sigmoid", 10)
    for bad_T in (0, -3, 2.5, "10"):
        with pytest.raises(ValueError, match="positive int"):
            ddpm.get_beta_schedule("cosine", bad_T)
    with pytest.raises(ValueError, match="xprev"):
        diffusion_for(25, model_mean_type="v")
    with pytest.raises(ValueError, match="hybrid"):
        diffusion_for(25, model_var_type="learned", loss_type="mse")
    with pytest.raises(ValueError, match="mse"):
        diffusion_for(25, model_var_type="fixedsmall", loss_type="hybrid")
    with pytest.raises(AssertionError):
        ddpm.GaussianDiffusion(betas=np.array([0.1, 1.5]))


# ---- 4. Gaussian helpers: the KL and the discretised decoder (ddpm.py section 2) ----


@math_check
def test_normal_kl_reference_values_and_torch_distributions():
    """normal_kl gives the spec's values and equals torch.distributions' closed form."""
    z = torch.tensor(0.0, dtype=torch.float64)
    assert float(ddpm.normal_kl(z, z, z, z)) == 0
    assert float(ddpm.normal_kl(z + 1, z, z, z)) == 0.5
    assert abs(float(ddpm.normal_kl(z, torch.log(z + 0.5), z + 1, z)) - 0.5965735902799727) < 1e-15


@math_check
@CI
@given(arrays(np.float64, (4, 4), elements=st.floats(-3, 3)))
def test_normal_kl_is_the_gaussian_kl_and_nonnegative(a):
    """KL(N1||N2) matches torch.distributions, is >= 0, and is 0 exactly when the Gaussians are equal."""
    m1, lv1, m2, lv2 = map(torch.tensor, a)
    kl = ddpm.normal_kl(m1, lv1, m2, lv2)
    N = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(N(m1, torch.exp(0.5 * lv1)), N(m2, torch.exp(0.5 * lv2)))
    assert_close(kl, ref, rtol=1e-9, atol=1e-12)  # two float64 closed forms
    assert (kl >= -1e-12).all()
    assert ddpm.normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15  # -1 + lv - lv + 1 rounds to within 2 ulp of 0
    differ = ((m1 - m2).abs() > 1e-6) | ((lv1 - lv2).abs() > 1e-6)  # below that, float64 rounding can give 0
    assert (kl[differ] > 0).all()


@math_check
def test_decoder_reference_values():
    """discretized_gaussian_log_likelihood gives the spec's nats, including the 1e-12 clamp."""
    ls = torch.tensor(-4.908362567647835, dtype=torch.float64)
    cases = [((0, 0), -0.90501811), ((1, 1), -0.35344121), ((-1, -1), -0.35344121), ((0, 0.01), -1.73937760),
             ((1, 0.99), -1.58314074), ((-1, -0.9), -27.63102112)]
    for (x, m), nats in cases:
        got = ddpm.discretized_gaussian_log_likelihood(torch.tensor([x], dtype=torch.float64),
                                                       torch.tensor([m], dtype=torch.float64), ls)
        assert abs(float(got) - nats) < 1e-7, (x, m)  # the spec prints 8 decimals
    for x, nats in ((0, -5.7670574736), (0.5, -5.8925726456), (1, -1.8340951623), (-1, -1.8340951623)):
        got = ddpm.discretized_gaussian_log_likelihood(torch.tensor([x], dtype=torch.float64),
                                                       torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
        assert abs(float(got) - nats) < 1e-9
    # each of the three floors: the left edge bin, the right edge bin and an inner bin far from the mean
    for x, m in ((-1, -0.9), (1, 0.9), (0, 0.5)):
        got = ddpm.discretized_gaussian_log_likelihood(torch.tensor([float(x)], dtype=torch.float64),
                                                       torch.tensor([m], dtype=torch.float64), ls)
        assert float(got) == pytest.approx(math.log(1e-12), rel=1e-12)


@math_check
@CI
@given(st.floats(-1.2, 1.2), st.floats(-7, 1))
def test_decoder_probabilities_over_the_256_bins_sum_to_one(mean, log_scale):
    """The 256 bins of the discretised Gaussian cover the real line, so their probabilities sum to 1, and each
    bin's log-probability is the official formula's (tanh CDF, edge bins to +-inf), in float64."""
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    logp = ddpm.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    # the CDF telescopes to 1; each bin's 1e-12 floor can add at most 256e-12
    assert abs(float(logp.exp().sum()) - 1) < 1e-9
    # log of a difference of two CDFs: float64's ~1e-16 absolute error in each becomes ~1e-16/p relative in p
    want = ref_decoder(x.numpy(), mean, log_scale)
    assert_close64(logp, want, 1e-6 / np.exp(want))


# ---- 5. The diffusion: q, the posterior, p and the bound, the losses, sampling (ddpm.py section 3) ----


@math_check
def test_extract_gathers_every_buffer_by_name_exactly():
    """_extract(name, t, x) is the float64 buffer `name` at t: exactly for float64 x, its float32 cast otherwise."""
    # Regression guard: a cache that once served another array's values (x_0 -> mu~ -> x_0 came back off by ~1 at
    # t=1). Every buffer, gathered at both ends and the middle, must be its own numpy values.
    d = ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("linear", 1000))
    t = torch.tensor([0, 500, 999])
    names = [k for k, v in vars(d).items() if isinstance(v, np.ndarray)]
    assert {"betas", "alphas_cumprod", "posterior_mean_coef1", "fixedlarge_log_variance"} <= set(names)
    for _ in range(2):  # the second pass reads the cached tensors
        for name in names:
            expected = getattr(d, name)[[0, 500, 999]]
            got64 = d._extract(name, t, torch.zeros(3, 2, dtype=torch.float64)).flatten()
            assert torch.equal(got64, torch.tensor(expected, dtype=torch.float64)), name
            got32 = d._extract(name, t, torch.zeros(3, 2, 2)).flatten()
            assert torch.equal(got32, torch.tensor(expected, dtype=torch.float32)), name


@math_check
def test_diffusion_follows_the_input_dtype():
    """float64 inputs give float64 outputs (buffers cast at gather), float32 stays float32."""
    d = diffusion_for(25)
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(2, 1, 2, 2, dtype=dtype)
        t = torch.tensor([0, 9])
        assert d.q_sample(x, t).dtype == dtype
        assert d.p_sample(lambda x_, t_: torch.zeros_like(x_), x, t)["sample"].dtype == dtype


@math_check
@CI
@given(st.one_of(random_betas, named_betas), st.data())
def test_closed_form_q_equals_composing_single_steps(betas, data):
    """q(x_t|x_0) in closed form equals t+1 steps of q(x_s|x_{s-1}) = N(sqrt(1-b_s) x, b_s) composed exactly."""
    d = ddpm.GaussianDiffusion(betas=betas)
    t = data.draw(st.integers(0, len(betas) - 1))
    x0 = torch.tensor([[-1.0, -0.3, 0.0, 0.7, 1.0]], dtype=torch.float64)
    mean, var = x0.numpy()[0], 0.0
    for s in range(t + 1):  # each step scales the mean by sqrt(1-b) and the variance by (1-b), then adds b
        mean, var = math.sqrt(1 - betas[s]) * mean, (1 - betas[s]) * var + betas[s]
    mean, var = torch.from_numpy(mean)[None], torch.full_like(x0, var)
    q_mean, q_var, q_logvar = d.q_mean_variance(x0, torch.tensor([t]))
    assert_close(q_mean, mean, rtol=1e-10, atol=1e-12)  # float64: only rounding separates them
    assert_close(q_var.expand_as(var), var, rtol=1e-10, atol=1e-12)
    # log(1 - abar) loses relative precision where abar ~ 1 (tiny betas): compare in float64 with room for that
    assert_close(q_logvar.expand_as(var), torch.log(var), rtol=1e-7, atol=1e-9)
    noise = torch.tensor([[0.3, -1.2, 2.0, 0.0, -0.5]], dtype=torch.float64)  # x_t = mean + sqrt(var) * noise
    assert_close(d.q_sample(x0, torch.tensor([t]), noise=noise), mean + var.sqrt() * noise, rtol=1e-10, atol=1e-12)


@math_check
@settings(CI, max_examples=15)
@given(st.one_of(random_betas, named_betas), st.data())
def test_q_sample_moments_match_the_closed_form_and_preserve_unit_variance(betas, data):
    """q_sample's own draws (noise=None) have mean sqrt(abar) x_0 and variance 1 - abar per x_0 (Monte Carlo), and
    data of unit variance (balanced +-1) keeps unit variance at every t (the paper's variance-preserving process)."""
    t = data.draw(st.integers(0, len(betas) - 1))
    abar = float(np.prod(1 - betas[:t + 1]))
    d = ddpm.GaussianDiffusion(betas=betas)
    n = 20_000
    torch.manual_seed(t)
    x0 = torch.tensor([-1.0, 1.0, 0.4], dtype=torch.float64).repeat(n, 1)  # [n, 3]: 3 data values, n draws each
    xt = d.q_sample(x0, torch.full((n,), t))
    # The sample mean has standard error sqrt((1 - abar)/n) <= 0.007 and the sample variance (1 - abar) sqrt(2/n)
    # (Gaussian fourth moment); 6 standard errors, so a correct q_sample fails with probability < 1e-8 per check.
    se_mean, se_var = math.sqrt((1 - abar) / n), (1 - abar) * math.sqrt(2 / n)
    assert (xt.mean(0) - math.sqrt(abar) * x0[0]).abs().max() <= 6 * se_mean + 1e-12
    assert (xt.var(0) - (1 - abar)).abs().max() <= 6 * se_var + 1e-12
    # the columns -1 and 1 together are balanced +-1 data: mean 0, variance 1 exactly. Var[x_t] = abar + (1 - abar)
    # * (sample variance of the noise) + a cross term: standard error <= sqrt(2/(2n) + 4 abar (1 - abar)/(2n)).
    pooled = xt[:, :2].flatten()
    assert abs(pooled.var().item() - 1) <= 6 * math.sqrt((1 + 4 * abar * (1 - abar)) / (2 * n))


@math_check
def test_default_noise_is_standard_normal_in_every_sampler_and_loss():
    """Without `noise=`, training_losses, p_sample and ddim_sample draw N(0, I): L_simple of a zero network is
    mean(eps^2) ~ 1, and sample - mean has variance sigma^2 (Monte Carlo over n = 40,000 values: a sample mean of
    eps^2 has standard error sqrt(2/n) = 0.007, a sample variance sigma^2 sqrt(2/n); 6 standard errors)."""
    torch.manual_seed(0)
    d, n = diffusion_for(100), 40_000
    x0, t = torch.zeros(4, 1, 100, 100, dtype=torch.float64), torch.tensor([0, 10, 50, 99])
    zero = lambda x_, t_: torch.zeros_like(x_)
    assert abs(d.training_losses(zero, x0, t)["loss"].mean().item() - 1) < 6 * math.sqrt(2 / n)
    x, r = torch.ones(4, 1, 100, 100, dtype=torch.float64), Ref(d.betas)
    cases = {"p_sample": (d.p_sample(zero, x, t)["sample"], d.p_mean_variance(zero, x, t)["mean"], r.large_var),
             "ddim": (d.ddim_sample(zero, x, t, eta=0.5)["sample"],
                      d.ddim_sample(zero, x, t, noise=torch.zeros_like(x), eta=0.5)["sample"], 0.25 * r.post_var)}
    for name, (sample, mean, var) in cases.items():
        want = np.where(t.numpy() > 0, var[t.numpy()], 0.0)  # no noise at index 0
        got = (sample - mean).flatten(1).var(1).numpy()  # 10,000 values per example
        assert (np.abs(got - want) <= 6 * want * math.sqrt(2 / 1e4) + 1e-15).all(), (name, got, want)


@math_check
@CI
@given(st.one_of(random_betas, named_betas), st.data())
def test_posterior_is_the_bayes_product_by_precision_weighting(betas, data):
    """q(x_{t-1}|x_t,x_0) is proportional to q(x_t|x_{t-1}) q(x_{t-1}|x_0): precisions add, means weight."""
    if len(betas) < 2:
        betas = np.append(betas, 0.5)
    d = ddpm.GaussianDiffusion(betas=betas)
    i = data.draw(st.integers(1, len(betas) - 1))
    t = torch.tensor([i])
    x0 = torch.tensor([[-0.8, 0.1, 1.0]], dtype=torch.float64)
    xt = torch.tensor([[0.5, -2.0, 0.3]], dtype=torch.float64)
    abar_prev = np.prod(1 - betas[:i])                       # q(x_{t-1}|x_0) = N(sqrt(abar_prev) x0, 1 - abar_prev)
    a = 1 - betas[i]                                          # q(x_t|x_{t-1}) = N(sqrt(a) x_{t-1}, beta)
    precision = 1 / (1 - abar_prev) + a / betas[i]
    mean = (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(a) * xt / betas[i]) / precision
    p_mean, p_var, p_logvar = d.q_posterior_mean_variance(x0, xt, t)
    assert_close(p_mean, mean, rtol=1e-8, atol=1e-10)  # two float64 routes; cancellation only
    assert abs(float(p_var) - 1 / precision) <= 1e-9 * (1 / precision)
    assert abs(float(p_logvar) - math.log(1 / precision)) < 1e-8


@math_check
@CI
@given(schedules)
def test_posterior_at_index_0_is_the_data_and_the_log_variance_reuses_index_1(betas):
    """With abar_prev = 1 the posterior collapses onto x_0 (coef1 = 1, coef2 = 0, beta~ = 0); its clipped
    log-variance is index 1's log beta~ (the official posterior_log_variance_clipped)."""
    d = ddpm.GaussianDiffusion(betas=betas)
    x0 = torch.tensor([[-1.0, -0.2, 0.9]], dtype=torch.float64)
    xt = torch.tensor([[1.5, -0.7, 0.1]], dtype=torch.float64)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, torch.tensor([0]))
    assert_close(mean, x0, rtol=1e-12, atol=1e-15)
    assert float(var) == 0
    b0, b1 = betas[0], betas[1]  # beta~ at index 1 = b1 (1 - abar_0)/(1 - abar_1) = b1 b0 / (b0 + b1 - b0 b1)
    assert abs(float(logvar) - math.log(b1 * b0 / (b0 + b1 - b0 * b1))) < 1e-12 * abs(math.log(b0 * b1))


@math_check
def test_one_and_two_step_chains_at_index_0():
    """T = 1: beta~_0 = 0 has no index 1 to borrow from, so its log is log(1e-20) and fixedlarge is beta_0 itself;
    T = 2: index 0 borrows index 1's beta~ = b1 b0 / (b0 + b1 - b0 b1) for both."""
    x = torch.zeros(1, 1, dtype=torch.float64)
    tilde = 0.2 * 0.3 / (0.3 + 0.2 - 0.06)
    for betas, var_type, logvar in (([0.3], "fixedsmall", math.log(1e-20)), ([0.3], "fixedlarge", math.log(0.3)),
                                    ([0.3, 0.2], "fixedsmall", math.log(tilde)),
                                    ([0.3, 0.2], "fixedlarge", math.log(tilde))):
        d = ddpm.GaussianDiffusion(betas=np.array(betas), model_var_type=var_type)
        out = d.p_mean_variance(lambda x_, t_: torch.zeros_like(x_), x, torch.tensor([0]))
        assert abs(float(out["log_variance"]) - logvar) < 1e-12, (betas, var_type)


@math_check
@CI
@given(schedules, st.sampled_from(ddpm.MODEL_MEAN_TYPES))
def test_the_three_mean_parameterisations_agree_at_a_float64_reference(betas, mean_type):
    """A network that predicts its target exactly (eps, x_0 or mu~) gives x0_hat = x_0 and the mean mu~(x_0, x_t)
    at every t, unclipped: float64 against the reference built from the equations."""
    r = Ref(betas)
    T = r.T
    rng = np.random.default_rng(T)
    t = np.arange(T)
    x0, eps = rng.uniform(-1, 1, (T, 4)), rng.standard_normal((T, 4))
    xt = ref_q_sample(r, x0, t, eps)
    mu = r.col(r.coef1, t, 2) * x0 + r.col(r.coef2, t, 2) * xt
    target = {"eps": eps, "xstart": x0, "xprev": mu}[mean_type]
    d = ddpm.GaussianDiffusion(betas=betas, model_mean_type=mean_type)
    out = d.p_mean_variance(lambda *_: torch.from_numpy(target), torch.from_numpy(xt), torch.from_numpy(t),
                            clip_denoised=False)
    # conditioning: x0_hat amplifies rounding by 1/sqrt(abar) (eps) or 1/coef1 (mu~)
    scale = 1 + np.abs(xt).max() * (1 / np.sqrt(r.abar) + 1 / r.coef1)[:, None]
    assert_close64(out["pred_xstart"], x0, scale)
    assert_close64(out["mean"], mu, scale)
    # and the conversions alone: eps from x_0 (DDIM and calc_bpd_loop use it), x_0 from eps
    t_ = torch.from_numpy(t)
    assert_close64(d.predict_noise_from_start(torch.from_numpy(xt), t_, torch.from_numpy(x0)), eps,
                   1 + np.abs(xt).max() / np.sqrt(1 - r.abar)[:, None])
    assert_close64(d.predict_start_from_noise(torch.from_numpy(xt), t_, torch.from_numpy(eps)), x0, scale)


@math_check
@CI
@given(schedules, st.sampled_from(ddpm.MODEL_MEAN_TYPES), st.sampled_from(ddpm.MODEL_VAR_TYPES), st.booleans())
def test_p_mean_variance_and_p_sample_for_every_mean_and_variance_type(betas, mean_type, var_type, clip):
    """Every mean type x variance type x clipping: mean, variance, log-variance and x0_hat at every t equal the
    official p_mean_variance written in float64 numpy, and p_sample adds sigma z except at index 0."""
    r = Ref(betas)
    T = r.T
    learned = var_type in ("learned", "learned_range")
    d = ddpm.GaussianDiffusion(betas=betas, model_mean_type=mean_type, model_var_type=var_type,
                               loss_type="kl" if learned else "mse")
    rng = np.random.default_rng(T)
    t = np.arange(T)
    x = rng.standard_normal((T, 2, 3)) * 1.5
    x[:, 0, 0], x[:, 1, 0] = 3.0, -0.2  # x0_hat far outside [-1, 1] and, at small t, inside it
    out = fake_network_np(x, t, C=2, extra=2 if learned else 0)
    clip_arg = {} if clip else {"clip_denoised": False}  # clipping is the default
    got = d.p_mean_variance(fake_network(C=2, extra=2 if learned else 0), torch.from_numpy(x), torch.from_numpy(t),
                            **clip_arg)
    mean, var, logvar, x0 = ref_p_mean_variance(r, out, x, t, mean_type, var_type, clip)
    if clip and mean_type != "xprev":
        assert 0 < (np.abs(x0) == 1).mean() < 1  # clipping acts on some entries, not all
    scale = 1 + np.abs(x).max() * (1 / np.sqrt(r.abar) + 1 / r.coef1)[:, None, None]
    for key, want in (("pred_xstart", x0), ("mean", mean), ("variance", var), ("log_variance", logvar)):
        assert_close64(got[key], want, scale if key in ("pred_xstart", "mean") else np.abs(want))
    z = rng.standard_normal(x.shape)
    sample = d.p_sample(fake_network(C=2, extra=2 if learned else 0), torch.from_numpy(x), torch.from_numpy(t),
                        noise=torch.from_numpy(z), **clip_arg)["sample"]
    assert_close64(sample, mean + (t > 0)[:, None, None] * np.exp(0.5 * logvar) * z, scale)


@math_check
@CI
@given(schedules)
def test_learned_range_stays_strictly_inside_its_range_at_every_t(betas):
    """learned_range's log sigma^2 = frac log beta_t + (1 - frac) log beta~_t (beta~_1 at index 0) lies strictly
    between the two for v in (-1, 1), and reaches each end at v = -1 and v = 1, at every t including index 0."""
    r = Ref(betas)
    T = r.T
    d = ddpm.GaussianDiffusion(betas=betas, model_var_type="learned_range", loss_type="kl")
    t = np.repeat(np.arange(T), 5)
    v = np.tile([-1.0, -0.6, 0.1, 0.7, 1.0], T).reshape(-1, 1)
    got = np64(d.p_mean_variance(lambda x_, t_: torch.cat([torch.zeros_like(x_), torch.from_numpy(v)], 1),
                                 torch.zeros(len(t), 1, dtype=torch.float64), torch.from_numpy(t))["log_variance"])
    lo, hi = r.post_logvar[t][:, None], np.log(r.betas)[t][:, None]
    assert (lo < hi).all()  # beta~_t < beta_t, and beta~_1 < beta_0 at index 0
    frac = (v + 1) / 2
    assert_close64(got, frac * hi + (1 - frac) * lo, np.abs(lo))
    inner = np.abs(v[:, 0]) < 1
    assert ((got[inner] > lo[inner]) & (got[inner] < hi[inner])).all()
    np.testing.assert_allclose(got[v[:, 0] == -1], lo[v[:, 0] == -1], rtol=1e-12)
    np.testing.assert_allclose(got[v[:, 0] == 1], hi[v[:, 0] == 1], rtol=1e-12)


@math_check
@pytest.mark.parametrize("clip", [False, True])
def test_xprev_x0_is_the_official_arithmetic(clip):
    """mu~-prediction: x0_hat = (1/coef1) mu~ - (coef2/coef1) x_t with both ratios from float64 (improved-diffusion's
    _predict_xstart_from_xprev): equal to a float64 reference, and to the official float32 arithmetic to 2 ulp."""
    T = 1000
    r = Ref(np.linspace(1e-4, 0.02, T))
    coef1, coef2 = r.coef1, r.coef2
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1.2, 1.2, (T, 16))  # a few beyond [-1, 1], so clipping acts
    xt = ref_q_sample(r, x0, np.arange(T), rng.standard_normal((T, 16)))
    mu = coef1[:, None] * x0 + coef2[:, None] * xt  # a model that predicts mu~ exactly
    d = diffusion_for(T, model_mean_type="xprev")
    t = torch.arange(T)
    maybe_clip = (lambda v: np.clip(v, -1, 1)) if clip else (lambda v: v)
    # float64 in, float64 out: only float64 rounding, amplified by 1/coef1 <= 7.8e3 at t=999
    out = d.p_mean_variance(lambda *_: torch.from_numpy(mu), torch.from_numpy(xt), t, clip_denoised=clip)
    np.testing.assert_allclose(out["pred_xstart"].numpy(), maybe_clip(x0), rtol=0, atol=1e-10)
    assert torch.equal(out["mean"], torch.from_numpy(mu))  # the network's output is the mean
    # float32: the official graph casts 1/coef1 and coef2/coef1 to float32, multiplies and subtracts in float32
    mu32, xt32 = mu.astype(np.float32), xt.astype(np.float32)
    official = maybe_clip((1 / coef1).astype(np.float32)[:, None] * mu32
                          - (coef2 / coef1).astype(np.float32)[:, None] * xt32)
    out = d.p_mean_variance(lambda *_: torch.from_numpy(mu32), torch.from_numpy(xt32), t, clip_denoised=clip)
    ulp = np.spacing(np.abs(official).astype(np.float32))
    assert (np.abs(out["pred_xstart"].numpy() - official) <= 2 * ulp).all()  # (x_prev - coef2 x_t)/coef1 errs 1e-3
    assert torch.equal(out["mean"], torch.from_numpy(mu32))


@math_check
@CI
@given(st.integers(0, 999), st.sampled_from([torch.float32, torch.float64]))
def test_eps_xstart_xprev_conversions_round_trip(i, dtype):
    """eps -> x_0 -> eps and x_0 -> mu~ -> x_0 return what went in (an extra: ddpm.py against itself)."""
    d = diffusion_for()
    g = torch.Generator().manual_seed(i)
    x0, eps = torch.rand(2, 4, generator=g, dtype=dtype) * 2 - 1, torch.randn(2, 4, generator=g, dtype=dtype)
    t = torch.full((2,), i)
    xt = d.q_sample(x0, t, noise=eps)
    back = d.predict_start_from_noise(xt, t, eps)
    # 1/sqrt(abar) reaches 157 at t=999, so float32 errors in x_t are amplified by ~157
    tol = 1e-9 if dtype == torch.float64 else 2e-4 * float(d.sqrt_recip_alphas_cumprod[i])
    assert (back - x0).abs().max() < tol
    assert (d.predict_noise_from_start(xt, t, x0) - eps).abs().max() < tol * (10 if i < 5 else 1)
    if i > 0:  # at index 0 mu~ = x_0 exactly, fine; coef1 is tiny at large t, so solve only where well-posed
        mu = d.q_posterior_mean_variance(x0, xt, t)[0]
        err = (d.predict_start_from_prev(xt, t, mu) - x0).abs().max()
        assert err < (1e-8 if dtype == torch.float64 else 1e-6) / float(d.posterior_mean_coef1[i])


@math_check
def test_unclipped_eps_mean_is_algorithm_2():
    """clip_denoised=False gives Algorithm 2's x_{t-1} = (x_t - b/sqrt(1-abar) eps)/sqrt(a) + sigma z."""
    d = diffusion_for()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 500, 998, 999])
    out = d.p_sample(lambda x_, t_: eps, x, t, noise=z, clip_denoised=False)
    b = torch.tensor(d.betas)[t].reshape(-1, 1, 1, 1)
    abar = torch.tensor(d.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
    sigma2 = torch.where(t == 0, torch.tensor(d.posterior_variance[1]), torch.tensor(d.betas)[t]).reshape(-1, 1, 1, 1)
    expected = (x - b / torch.sqrt(1 - abar) * eps) / torch.sqrt(1 - b) + (t > 0).reshape(-1, 1, 1, 1) * sigma2.sqrt() * z
    assert_close(out["sample"], expected, rtol=1e-9, atol=1e-9)  # float64 algebraic identity


@math_check
def test_fixedlarge_reference_log_variances():
    """fixedlarge's log sigma^2 at indices 0 and 1 are the spec's -9.8167 and log beta_1 = -9.0287."""
    d = diffusion_for()
    x = torch.zeros(2, 1, dtype=torch.float64)
    out = d.p_mean_variance(lambda x_, t_: torch.zeros_like(x_), x, torch.tensor([0, 1]))
    np.testing.assert_allclose(out["log_variance"].flatten(), [-9.81672513529567, -9.028686371949341], rtol=1e-12)


@math_check
def test_prior_term_is_about_1e_5_bits_per_dim():
    """L_T for the linear schedule is the spec's 5.9e-10, 7.28e-6, 2.91e-5 bits/dim at x_0^2 = 0, 0.25, 1."""
    d = diffusion_for()
    x = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64).reshape(3, 1, 1, 1)
    np.testing.assert_allclose(d.prior_bpd(x).numpy(), [5.9e-10, 7.28e-6, 2.91e-5], rtol=0.01)  # spec: 2-3 digits


@math_check
@pytest.mark.parametrize("schedule, T", [("linear", 1000), ("linear", 37), ("cosine", 10)])
def test_prior_is_the_kl_at_the_last_index(schedule, T):
    """prior_bpd = KL(N(sqrt(abar_{T-1}) x_0, 1 - abar_{T-1}) || N(0, I)) / ln 2 to float64 rounding; at the index
    before (T-2) it would differ by > 1% (abar_{T-2} = abar_{T-1} / (1 - beta_{T-1})), far outside the tolerance."""
    r = Ref(ddpm.get_beta_schedule(schedule, T))
    x0 = np.array([0.5, -1.0, 1.0, 0.25, -0.75, 0.9]).reshape(2, 3, 1, 1)
    got = np64(ddpm.GaussianDiffusion(betas=r.betas).prior_bpd(torch.from_numpy(x0)))
    want = ref_prior_bpd(r, x0)
    np.testing.assert_allclose(got, want, rtol=1e-8)  # float64; cancellation in -1 - log(1-a) + (1-a) is ~1e-11
    r_before = Ref(r.betas[:-1])  # the same chain stopped one step earlier
    assert (np.abs(ref_prior_bpd(r_before, x0) / want - 1) > 0.01).all()


@math_check
def test_true_bound_weights_the_squared_eps_error():
    """For eps-prediction with sigma^2 = beta, L_{t-1} - (its minimum) = b^2/(2 sigma^2 a (1-abar)) * ||eps - eps_hat||^2,
    the paper's Eq. 12 weight: 0.2727 at index 1 and 0.0102 at index 999 (the spec's values)."""
    d = diffusion_for()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps, err = torch.randn(2, *x0.shape, generator=g, dtype=torch.float64)
    weights = {}
    for i in (1, 500, 999):
        t = torch.full((2,), i)
        xt = d.q_sample(x0, t, noise=eps)
        kl = lambda e: d.vb_terms_bpd(lambda x_, t_: e, x0, xt, t, clip_denoised=False)["output"]
        b, a, abar = d.betas[i], 1 - d.betas[i], d.alphas_cumprod[i]
        w = b ** 2 / (2 * b * a * (1 - abar))
        weights[i] = w
        expected = w * ddpm.mean_flat(err ** 2) / math.log(2)
        assert_close(kl(eps + err) - kl(eps), expected, rtol=1e-8, atol=1e-10)
    assert abs(weights[1] - 0.2727) < 1e-4 and abs(weights[999] - 0.0102) < 1e-4


@math_check
@CI
@given(schedules, st.sampled_from(ddpm.MODEL_MEAN_TYPES), st.sampled_from(ddpm.MODEL_VAR_TYPES), st.booleans())
def test_bound_terms_are_the_kl_and_the_decoder(betas, mean_type, var_type, clip):
    """vb_terms_bpd at every t: the KL from the posterior q(x_{t-1}|x_t,x_0) to p(x_{t-1}|x_t) for t > 0 and the
    decoder -log p(x_0|x_1) at t = 0, in bits/dim, equal to the float64 reference for every parameterisation."""
    r = Ref(betas)
    T = r.T
    learned = var_type in ("learned", "learned_range")
    d = ddpm.GaussianDiffusion(betas=betas, model_mean_type=mean_type, model_var_type=var_type,
                               loss_type="kl" if learned else "mse")
    rng = np.random.default_rng(T + 1)
    t = np.arange(T)
    x0 = rng.integers(0, 256, (T, 1, 2, 3)) / 127.5 - 1  # pixel values, so the decoder's bins apply
    xt = ref_q_sample(r, x0, t, rng.standard_normal(x0.shape))
    network = fake_network(C=1, extra=1 if learned else 0)
    clip_arg = {} if clip else {"clip_denoised": False}  # clipping is the default
    got = d.vb_terms_bpd(network, torch.from_numpy(x0), torch.from_numpy(xt), torch.from_numpy(t), **clip_arg)
    out = fake_network_np(xt, t, C=1, extra=1 if learned else 0)
    want = ref_vb_bpd(r, out, x0, xt, t, mean_type, var_type, clip)
    # the KL's (m1 - m2)^2 / sigma^2 amplifies the rounding of the means by up to ~1/(coef1 sigma^2)
    scale = 1e-3 * (1 + (1 / r.coef1 + 1 / np.sqrt(r.abar)) / np.exp(r.post_logvar))
    assert_close64(got["output"], want, scale)
    _, _, _, x0_hat = ref_p_mean_variance(r, out, xt, t, mean_type, var_type, clip)
    assert_close64(got["pred_xstart"], x0_hat, (1 + 1 / r.coef1 + 1 / np.sqrt(r.abar)).reshape(-1, 1, 1, 1))


@math_check
@pytest.mark.parametrize("T", [37, 1000])
def test_training_losses_for_every_table_2_parameterisation(T):
    """mse targets eps / x_0 / mu~; kl is one unclipped bound term; hybrid adds T/1000 times the bound term
    (with the mean's gradient stopped) to the mse: every loss against the float64 reference."""
    r = Ref(ddpm.get_beta_schedule("linear", T))
    rng = np.random.default_rng(T)
    t = np.array([0, 1, T // 3, T // 2, T - 2, T - 1])
    x0 = rng.integers(0, 256, (6, 2, 2, 2)) / 127.5 - 1
    noise = rng.standard_normal(x0.shape)
    xt = ref_q_sample(r, x0, t, noise)
    mu = r.col(r.coef1, t, 4) * x0 + r.col(r.coef2, t, 4) * xt
    args = torch.from_numpy(x0), torch.from_numpy(t)
    scale = 1e-3 * (1 + (1 / r.coef1[t] + 1 / np.sqrt(r.abar[t])) / np.exp(r.post_logvar[t]))
    for mean_type in ddpm.MODEL_MEAN_TYPES:
        target = {"eps": noise, "xstart": x0, "xprev": mu}[mean_type]
        for var_type, loss_type in (("fixedlarge", "mse"), ("fixedsmall", "mse"), ("fixedlarge", "kl"),
                                    ("learned", "kl"), ("learned_range", "kl"), ("learned", "hybrid"),
                                    ("learned_range", "hybrid")):
            extra = 2 if var_type.startswith("learned") else 0
            d = ddpm.GaussianDiffusion(betas=r.betas, model_mean_type=mean_type, model_var_type=var_type,
                                       loss_type=loss_type)
            got = d.training_losses(fake_network(C=2, extra=extra), *args, noise=torch.from_numpy(noise))
            out = fake_network_np(xt, t, C=2, extra=extra)
            mse = ((target - out[:, :2]) ** 2).mean((1, 2, 3))
            vb = ref_vb_bpd(r, out, x0, xt, t, mean_type, var_type, clip=False)
            want = {"mse": mse, "kl": vb, "hybrid": mse + T / 1000 * vb}[loss_type]
            assert_close64(got["loss"], want, scale)
    # hybrid: the vb term's gradient reaches the variance channels only
    d = ddpm.GaussianDiffusion(betas=r.betas, model_var_type="learned_range", loss_type="hybrid")
    out = torch.zeros(6, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    terms = d.training_losses(lambda x_, t_: out, *args, noise=torch.from_numpy(noise))
    grad_mean, grad_var = torch.autograd.grad(terms["vb"].sum(), out)[0].split(2, dim=1)
    assert (grad_mean == 0).all() and (grad_var.abs().sum((1, 2, 3)) > 0).all()


def replay_bpd_loop(r, model_np, x0, seed, timestep_map=None):
    """calc_bpd_loop's outputs in float64 numpy: for i = T-1 .. 0 the same noise draws (one randn of x0's shape per
    step, from a generator seeded `seed`), x_t, the clipped eps-model's bound term, x0_hat's and eps_hat's mse."""
    g, T = torch.Generator().manual_seed(seed), r.T
    tmap = np.arange(T) if timestep_map is None else np.asarray(timestep_map)
    vb, xstart_mse, mse = (np.zeros((len(x0), T)) for _ in range(3))
    for i in range(T - 1, -1, -1):
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64).numpy()
        t = np.full(len(x0), i)
        xt = ref_q_sample(r, x0, t, noise)
        out = model_np(xt, tmap[t])
        vb[:, i] = ref_vb_bpd(r, out, x0, xt, t, "eps", "fixedlarge", clip=True)
        _, _, _, x0_hat = ref_p_mean_variance(r, out, xt, t, "eps", "fixedlarge", clip=True)
        eps_hat = (xt - np.sqrt(r.abar[i]) * x0_hat) / np.sqrt(1 - r.abar[i])
        xstart_mse[:, i], mse[:, i] = ((x0_hat - x0) ** 2).mean((1, 2, 3)), ((eps_hat - noise) ** 2).mean((1, 2, 3))
    prior = ref_prior_bpd(r, x0)
    return {"total_bpd": vb.sum(1) + prior, "prior_bpd": prior, "vb": vb, "xstart_mse": xstart_mse, "mse": mse}


@math_check
@pytest.mark.parametrize("respacing", [None, "5"])
def test_calc_bpd_loop_outputs_equal_the_reference(respacing):
    """Every output of calc_bpd_loop (total, prior, each term, x0_hat's and eps_hat's mse) equals the float64
    reference on a diffusion of 30 steps and on the 5 steps respaced from it (whose terms form a valid bound)."""
    base = diffusion_for(30)
    d = base if respacing is None else ddpm.respace(base, respacing)
    tmap = None if respacing is None else sorted(ddpm.space_timesteps(30, respacing))
    kept = Ref(base.betas).abar[tmap] if tmap else None
    r = Ref(base.betas) if tmap is None else Ref(1 - kept / np.concatenate([[1.0], kept[:-1]]))
    x0 = np.random.default_rng(0).integers(0, 256, (2, 1, 3, 3)) / 127.5 - 1
    got = d.calc_bpd_loop(fake_network(), torch.from_numpy(x0), generator=torch.Generator().manual_seed(3))
    want = replay_bpd_loop(r, fake_network_np, x0, 3, tmap)
    assert set(got) == set(want)
    scale = 1e-3 * (1 + (1 / r.coef1 + 1 / np.sqrt(r.abar)) / np.exp(r.post_logvar)).sum()
    for key in want:
        assert_close64(got[key], want[key], scale)
    assert (want["vb"] >= 0).all() and (want["mse"] > 0).all()


@math_check
@pytest.mark.parametrize("schedule, T", [("cosine", 7), ("linear", 30)])
def test_sampling_loop_is_algorithm_2_step_by_step(schedule, T):
    """p_sample_loop from x_T runs t = T-1 .. 0 with fresh noise each step (none added at index 0): the same chain
    as the reference, written in float64 numpy with the generator's draws replayed in the loop's order."""
    r = Ref(ddpm.get_beta_schedule(schedule, T))
    d = ddpm.GaussianDiffusion(betas=r.betas)
    shape = (3, 2, 2, 2)  # N != C, so that a t of the wrong length cannot broadcast
    xT = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    steps = list(d.p_sample_loop_progressive(fake_network(C=2), shape, noise=xT,
                                             generator=torch.Generator().manual_seed(1)))
    assert [s["t"] for s in steps] == list(range(T - 1, -1, -1))
    g, x = torch.Generator().manual_seed(1), xT.numpy()
    for i, step in zip(range(T - 1, -1, -1), steps):
        z = torch.randn(shape, generator=g, dtype=torch.float64).numpy()
        t = np.full(3, i)
        mean, _, logvar, _ = ref_p_mean_variance(r, fake_network_np(x, t, C=2), x, t, "eps", "fixedlarge", True)
        x = mean + (i > 0) * np.exp(0.5 * logvar) * z
        assert_close64(step["sample"], x, 1 / np.sqrt(r.abar[i]))
    final = d.p_sample_loop(fake_network(C=2), shape, noise=xT, generator=torch.Generator().manual_seed(1))
    assert torch.equal(final, steps[-1]["sample"])


# ---- 6. Fewer steps: respacing and DDIM (ddpm.py section 4) ----


def ref_space_timesteps(T, counts):
    """improved-diffusion's space_timesteps (respace.py): per section, a fractional stride accumulated and rounded."""
    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        stride = (size - 1) / (count - 1) if count > 1 else 1
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return set(kept)


@math_check
def test_space_timesteps_examples():
    """space_timesteps gives improved-diffusion's sets for its documented examples and rejects impossible ones."""
    assert sorted(ddpm.space_timesteps(1000, "10")) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert sorted(ddpm.space_timesteps(1000, "ddim10")) == list(range(0, 1000, 100))
    assert sorted(ddpm.space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    # improved-diffusion's docstring: 300 steps as [10, 15, 20] strides each third separately
    kept = sorted(ddpm.space_timesteps(300, [10, 15, 20]))
    assert kept[:10] == list(range(0, 100, 11)) and kept[10] == 100 and kept[24] == 199 and kept[-1] == 299
    assert ddpm.space_timesteps(300, [10, 15, 20]) == ref_space_timesteps(300, [10, 15, 20])
    assert len(ddpm.space_timesteps(1000, "50,25,10")) == 85
    assert ddpm.space_timesteps(1000, "1000") == set(range(1000))
    assert sorted(ddpm.space_timesteps(37, "ddim5")) == [0, 8, 16, 24, 32]  # the first stride giving 5 steps
    assert ddpm.space_timesteps(37, "ddim37") == set(range(37))  # stride 1
    for bad in ("ddim999", "20,600", "0"):
        with pytest.raises(ValueError):
            ddpm.space_timesteps(1000, bad)
    for bad in ("ddim0", "ddim1001"):
        with pytest.raises(ValueError, match="1 <= N <= 1000"):
            ddpm.space_timesteps(1000, bad)
    betas = ddpm.get_beta_schedule("cosine", 10)
    for bad in ({0, 5, 10}, {-1, 3}, set()):  # indices outside 0..T-1, or none
        with pytest.raises(ValueError, match="use_timesteps"):
            ddpm.SpacedDiffusion(bad, betas=betas)
    for bad in ("foo", "ddimx", "10,", "1.5"):  # a typo on the command line gets the accepted forms, not int()'s
        with pytest.raises(ValueError, match="steps must look like '100', '50,25,10' or 'ddim50'"):
            ddpm.space_timesteps(1000, bad)


@math_check
@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_space_timesteps_properties(data):
    """Each of n equal sections keeps exactly its count of indices, from its first index to its last, the same
    set as improved-diffusion's loop; the respaced betas keep alphas_cumprod at the kept steps."""
    T = data.draw(st.one_of(st.sampled_from([37, 999]), st.integers(1, 400)))
    n = data.draw(st.integers(1, min(4, T)))
    counts = data.draw(st.lists(st.integers(1, T // n), min_size=n, max_size=n))
    kept = ddpm.space_timesteps(T, counts)
    bounds = np.cumsum([0] + [T // n + (i < T % n) for i in range(n)])  # the first T % n sections are longer
    for (lo, hi), count in zip(zip(bounds[:-1], bounds[1:]), counts):
        section = sorted(s for s in kept if lo <= s < hi)
        assert len(section) == count and section[0] == lo and (count == 1 or section[-1] == hi - 1)
    assert len(kept) == sum(counts)
    assert kept == ref_space_timesteps(T, counts)
    betas = ddpm.get_beta_schedule("cosine", T)
    spaced = ddpm.SpacedDiffusion(kept, betas=betas)
    abar = np.cumprod(1 - betas)[sorted(kept)]  # beta'_j = 1 - abar_{s_j} / abar_{s_(j-1)}, abar = 1 before s_0
    assert_close64(spaced.betas, 1 - abar / np.concatenate([[1.0], abar[:-1]]), 1e-6)
    assert spaced.timestep_map == sorted(kept)


@math_check
def test_respaced_betas_match_reference():
    """The linear schedule respaced to "10" has the betas in the spec (improved-diffusion's values)."""
    d = ddpm.respace(ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("linear", 1000)), "10")
    ref = [1e-4, 0.126308, 0.316844, 0.879788]
    # the spec quotes 6 significant digits
    np.testing.assert_allclose(d.betas[[0, 1, 2, -1]], ref, rtol=5e-6)
    # alphas_cumprod at the kept steps is exactly the original's (the definition of respacing)
    full = ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("linear", 1000))
    np.testing.assert_allclose(d.alphas_cumprod, full.alphas_cumprod[d.timestep_map], rtol=1e-12)


@math_check
def test_respaced_model_sees_original_indices():
    """A respaced diffusion calls the model with the original indices, once per call, in every method."""
    d = ddpm.respace(ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("linear", 100), loss_type="kl"), "ddim10")
    seen = []
    model = lambda x, t: (seen.append(t.tolist()), torch.zeros_like(x))[1]
    d.p_sample_loop(model, (1, 1, 2, 2))
    assert [s[0] for s in seen] == list(range(90, -1, -10))
    seen.clear()
    d.training_losses(model, torch.zeros(2, 1, 2, 2), torch.tensor([3, 9]))
    assert seen == [[30, 90]]


@math_check
def test_respacing_all_steps_reproduces_original():
    """Keeping every step gives the original diffusion: same buffers, samples, losses and bound."""
    T = 8
    base = ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("cosine", T), model_var_type="fixedsmall")
    spaced = ddpm.respace(base, str(T))
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        # betas are recomputed as 1 - abar_t / abar_{t-1}: float64 rounding only
        np.testing.assert_allclose(getattr(spaced, name), getattr(base, name), rtol=1e-12, atol=1e-18)
    model, x0 = tiny_unet(in_channels=3), torch.rand(2, 3, 8, 8) * 2 - 1
    runs = []
    for d in (base, spaced):
        g = torch.Generator().manual_seed(1)
        sample = d.p_sample_loop(model, x0.shape, generator=g)
        bpd = d.calc_bpd_loop(model, x0, generator=g)["total_bpd"]
        loss = d.training_losses(model, x0, torch.tensor([0, T - 1]), noise=torch.ones_like(x0))["loss"]
        runs.append((sample, bpd, loss))
    for a, b in zip(*runs):
        # float32 coefficients cast from float64 values that agree to 1e-12: identical up to an ulp
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def ref_ddim_step(r, eps_out, x, t, eta, clip, z):
    """Song et al.'s Eq. 12 with their Eq. 16 sigma: x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps
    + sigma z, sigma = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev), x0 clipped, eps rederived."""
    col = lambda a: r.col(a, t, x.ndim)
    _, _, _, x0 = ref_p_mean_variance(r, eps_out, x, t, "eps", "fixedlarge", clip)
    abar, abar_prev = col(r.abar), col(r.abar_prev)
    eps = (x - np.sqrt(abar) * x0) / np.sqrt(1 - abar)
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
    return np.sqrt(abar_prev) * x0 + np.sqrt(np.maximum(1 - abar_prev - sigma ** 2, 0)) * eps + sigma * z


@math_check
@CI
@given(schedules, st.sampled_from([0.0, 0.5, 0.3, 1.0]), st.booleans())
def test_ddim_step_is_song_et_al_eq_12(betas, eta, clip):
    """One DDIM step at every t equals the float64 reference of Song et al. Eq. 12, at eta = 0.3 and 0.5 (where eta
    and eta^2 differ) as well as 0 and 1, with and without clipping x0_hat."""
    r = Ref(betas)
    T = r.T
    rng = np.random.default_rng(T)
    t = np.arange(T)
    x, z = rng.standard_normal((T, 1, 2, 2)) * 1.5, rng.standard_normal((T, 1, 2, 2))
    d = ddpm.GaussianDiffusion(betas=betas)
    clip_arg = {} if clip else {"clip_denoised": False}  # clipping is the default
    got = d.ddim_sample(fake_network(), torch.from_numpy(x), torch.from_numpy(t), noise=torch.from_numpy(z),
                        eta=eta, **clip_arg)
    want = ref_ddim_step(r, fake_network_np(x, t), x, t, eta, clip, z)
    assert_close64(got["sample"], want, (1 + 1 / np.sqrt(r.abar)).reshape(-1, 1, 1, 1))


@math_check
def test_ddim_loop_at_eta_one_half_is_the_reference_chain():
    """ddim_sample_loop at eta = 0.5 on a respaced diffusion runs its indices T-1 .. 0 with one noise draw each,
    the chain of reference steps (the model sees the original indices)."""
    base = diffusion_for(40)
    d = ddpm.respace(base, "ddim8")
    tmap = np.array(sorted(ddpm.space_timesteps(40, "ddim8")))
    kept = np.cumprod(1 - base.betas)[tmap]
    r = Ref(1 - kept / np.concatenate([[1.0], kept[:-1]]))
    shape = (3, 2, 2, 2)  # N != C, so that a t of the wrong length cannot broadcast
    g = torch.Generator().manual_seed(4)
    got = d.ddim_sample_loop(fake_network(C=2), shape, eta=0.5, generator=g, device="cpu")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g).double().numpy()  # x_T, then one z per step, in the loop's order
    for i in range(r.T - 1, -1, -1):
        z = torch.randn(shape, generator=g).double().numpy()
        t = np.full(3, i)
        x = ref_ddim_step(r, fake_network_np(x, tmap[t], C=2), x, t, 0.5, True, z)
    # the loop runs in float32 (x_T is drawn in float32): float32 rounding through 8 steps of O(1) values
    np.testing.assert_allclose(np64(got), x, rtol=0, atol=2e-5)


@math_check
def test_ddim_eta1_is_ddpm_posterior():
    """DDIM with eta=1 adds noise of variance beta~_t and equals p_sample with sigma^2 = beta~ given the same noise."""
    T = 40
    ddim = ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("linear", T))
    ddpm_small = ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("linear", T), model_var_type="fixedsmall")
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(3, 1, 2, 2, generator=g), torch.randn(3, 1, 2, 2, generator=g)
    t, model = torch.tensor([1, 7, T - 1]), fake_network()
    a = ddim.ddim_sample(model, x, t, noise=z, eta=1.0)["sample"]
    a0 = ddim.ddim_sample(model, x, t, noise=torch.zeros_like(z), eta=1.0)["sample"]
    var = ((a - a0) / z).pow(2).mean(dim=(1, 2, 3))  # (sigma z)^2 / z^2 = sigma^2
    # float32 arithmetic on values of order 1
    assert_close(var, Ref(ddim.betas).post_var[t.numpy()], rtol=1e-4, atol=1e-7)
    assert_close(a, ddpm_small.p_sample(model, x, t, noise=z)["sample"], rtol=1e-5, atol=1e-5)


def _point_eps_model(x0, betas):
    """The exact eps predictor, at original indices t, for data that is the single point x0:
    eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    alphas_cumprod = torch.as_tensor(np.cumprod(1 - betas), dtype=torch.float32)

    def model(x, t):
        abar = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    return model


@math_check
def test_ddim_eta0_is_deterministic_and_exact():
    """DDIM with eta=0 is a function of x_T alone, and recovers a single-point data set exactly on any spacing."""
    d = ddpm.respace(ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("linear", 100)), "ddim10")
    g = torch.Generator().manual_seed(0)
    xT, x0 = torch.randn(2, 1, 4, 4, generator=g), torch.rand(1, 1, 4, 4, generator=g) * 1.8 - 0.9
    torch.manual_seed(0)
    a = d.ddim_sample_loop(fake_network(), xT.shape, noise=xT)
    torch.manual_seed(1)
    assert torch.equal(a, d.ddim_sample_loop(fake_network(), xT.shape, noise=xT))
    betas = ddpm.get_beta_schedule("linear", 100)
    for spacing in ("5", "ddim20", "3,7"):
        s = ddpm.respace(ddpm.GaussianDiffusion(betas=betas), spacing)
        out = s.ddim_sample_loop(_point_eps_model(x0, betas), (2, 1, 4, 4), eta=0.0)
        # each step maps the exact eps to the exact x0; float32 rounding only
        assert_close(out, x0.expand(2, -1, -1, -1), rtol=0, atol=1e-5)


# ---- 7. The U-Net (ddpm.py section 5) ----
# A float64 reference of the official network (models/unet.py, nn.py), written from the spec with explicit
# GroupNorm (32 groups, eps 1e-6, biased variance), swish, single-head attention scaled by C^-1/2, TF 'SAME'
# stride-2 padding (0 before, 1 after) and nearest 2x upsampling, reading the weights by their official names.
# Compared in float64, where rounding is ~1e-16: GroupNorm's eps 1e-5 instead of 1e-6 moves outputs by ~1e-6 of
# their size (more on near-constant channels), another attention scale by O(1).


def ref_swish(x):
    return x / (1 + torch.exp(-x))


def ref_group_norm(p, name, x, groups=32, eps=1e-6):
    B, C = x.shape[:2]
    h = x.reshape(B, groups, -1)
    mean, var = h.mean(-1, keepdim=True), ((h - h.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True)
    h = ((h - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return h * p[f"{name}.weight"][None, :, None, None] + p[f"{name}.bias"][None, :, None, None]


def ref_conv(p, name, x, stride=1, pad=None):
    """Convolution as a matrix product with the k x k patches (im2col); 'same' zero padding unless `pad`
    (left, right, top, bottom) is given."""
    w, b = p[f"{name}.weight"], p[f"{name}.bias"]
    k = w.shape[-1]
    pad = (k // 2,) * 4 if pad is None else pad
    H, W = x.shape[-2:]
    xp = torch.zeros(*x.shape[:2], H + pad[2] + pad[3], W + pad[0] + pad[1], dtype=x.dtype)
    xp[..., pad[2]:pad[2] + H, pad[0]:pad[0] + W] = x
    Ho, Wo = (xp.shape[-2] - k) // stride + 1, (xp.shape[-1] - k) // stride + 1
    patches = F.unfold(xp, k, stride=stride)  # [B, C k k, Ho Wo], channel-major like the weight's [O, C, k, k]
    return (w.reshape(len(w), -1) @ patches).reshape(len(x), len(w), Ho, Wo) + b[None, :, None, None]


def ref_dense(p, name, x):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def ref_resnet_block(p, name, x, temb):
    h = ref_conv(p, f"{name}.conv1", ref_swish(ref_group_norm(p, f"{name}.norm1", x)))
    h = h + ref_dense(p, f"{name}.temb_proj", ref_swish(temb))[:, :, None, None]
    h = ref_conv(p, f"{name}.conv2", ref_swish(ref_group_norm(p, f"{name}.norm2", h)))  # dropout: eval, identity
    if f"{name}.nin_shortcut.weight" in p:
        x = ref_conv(p, f"{name}.nin_shortcut", x)
    return x + h


def ref_attn_block(p, name, x):
    B, C, H, W = x.shape
    h = ref_group_norm(p, f"{name}.norm", x)
    q, k, v = (ref_conv(p, f"{name}.{n}", h).reshape(B, C, H * W) for n in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * C ** -0.5, dim=-1)  # over the keys j
    h = torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W)
    return x + ref_conv(p, f"{name}.proj_out", h)


def ref_timestep_embedding(t, dim):
    """[sin | cos] of t * exp(-k ln(10^4) / (half - 1)), k < half, zero-padded to an odd dim (float64 numpy)."""
    half = dim // 2
    args = np.asarray(t, dtype=np.float64)[:, None] * np.exp(-np.log(10000) * np.arange(half) / (half - 1))[None]
    emb = np.concatenate([np.sin(args), np.cos(args)], 1)
    return np.concatenate([emb, np.zeros((len(emb), dim % 2))], 1)


def ref_unet(p, x, t, ch, ch_mult, num_res_blocks, attn_resolutions):
    """The official model(): conv_in, the down levels (res blocks, attention at attn_resolutions, a stride-2 conv
    between levels), the middle (res, attn, res), the up levels over concat([h, skip]), then GN, swish, conv_out."""
    temb = torch.from_numpy(ref_timestep_embedding(t, ch))
    temb = ref_dense(p, "temb.dense.1", ref_swish(ref_dense(p, "temb.dense.0", temb)))
    hs, res = [ref_conv(p, "conv_in", x)], x.shape[-1]
    for level in range(len(ch_mult)):
        for i in range(num_res_blocks):
            h = ref_resnet_block(p, f"down.{level}.block.{i}", hs[-1], temb)
            hs.append(ref_attn_block(p, f"down.{level}.attn.{i}", h) if res in attn_resolutions else h)
        if level != len(ch_mult) - 1:
            hs.append(ref_conv(p, f"down.{level}.downsample.conv", hs[-1], stride=2, pad=(0, 1, 0, 1)))
            res //= 2
    h = ref_resnet_block(p, "mid.block_1", hs[-1], temb)
    h = ref_resnet_block(p, "mid.block_2", ref_attn_block(p, "mid.attn_1", h), temb)
    for level in reversed(range(len(ch_mult))):
        for i in range(num_res_blocks + 1):
            h = ref_resnet_block(p, f"up.{level}.block.{i}", torch.cat([h, hs.pop()], 1), temb)
            if res in attn_resolutions:
                h = ref_attn_block(p, f"up.{level}.attn.{i}", h)
        if level != 0:
            h = ref_conv(p, f"up.{level}.upsample.conv", h.repeat_interleave(2, -2).repeat_interleave(2, -1))
            res *= 2
    assert not hs
    return ref_conv(p, "conv_out", ref_swish(ref_group_norm(p, "norm_out", h)))


@math_check
def test_timestep_embedding_reference_values():
    """The sinusoidal embedding is sin-first with frequencies exp(-k ln 1e4/(half-1)): the spec's values, and the
    float64 formula at any t and any (also odd) width to float32 rounding of t * f (|t f| < 1e3, ulp 6e-5)."""
    e = ddpm.get_timestep_embedding(torch.tensor([1, 0]), 128)
    for i, v in ((0, 0.841471), (63, 1.0e-4), (64, 0.5403023), (127, 1.0)):
        assert abs(float(e[0, i]) - v) < 1e-6  # the spec's printed precision
    assert (e[1, :64] == 0).all() and (e[1, 64:] == 1).all()
    t = np.array([0, 1, 2, 17, 500, 999])
    for dim in (7, 32, 33, 128):
        got = ddpm.get_timestep_embedding(torch.from_numpy(t), dim)
        np.testing.assert_allclose(np64(got), ref_timestep_embedding(t, dim), rtol=0, atol=2e-4)


@math_check
def test_resnet_block_is_the_official_block_in_float64():
    """A ResnetBlock (with and without the 1x1 shortcut) equals the float64 reference, on an input whose channels
    are near-constant in some groups (variance ~1e-6, where GroupNorm's eps 1e-6 vs 1e-5 changes the output by
    ~2x) and O(1) in others; with dropout 1 the second conv sees zeros, so only its bias remains."""
    g = torch.Generator().manual_seed(1)
    for cin, cout in ((64, 64), (32, 64)):
        block = busy(ddpm.ResnetBlock(cin, cout, temb_channels=16, dropout=0.0), seed=cin)
        p = dict(block.named_parameters())
        x = torch.randn(2, cin, 4, 4, generator=g, dtype=torch.float64)
        x[0, : cin // 2] = 0.3 + 1e-3 * x[0, : cin // 2]  # near-constant: these groups' variance is ~1e-6
        temb = torch.randn(2, 16, generator=g, dtype=torch.float64)
        with torch.no_grad():
            got = block(x, temb)
        want = ref_resnet_block({f"b.{k}": v.detach() for k, v in p.items()}, "b", x, temb)
        assert_close64(got, want.numpy(), 1.0)
    block = busy(ddpm.ResnetBlock(32, 32, temb_channels=16, dropout=1.0)).train()
    with torch.no_grad():
        out = block(x[:, :32], temb)
    assert_close(out, x[:, :32] + block.conv2.bias[None, :, None, None], rtol=1e-12, atol=1e-12)


@math_check
def test_attention_block_is_single_head_softmax_scaled_by_c_to_the_minus_half():
    """AttnBlock equals the float64 reference: GroupNorm, 1x1 q, k, v, softmax(q k^T C^-1/2) over all positions,
    a 1x1 output conv and the residual."""
    block = busy(ddpm.AttnBlock(64), seed=3)
    p = {f"a.{k}": v.detach() for k, v in block.named_parameters()}
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    with torch.no_grad():
        got = block(x)
    assert_close64(got, ref_attn_block(p, "a", x).numpy(), 1.0)


@math_check
def test_resampling_is_tf_same_padding_and_nearest_neighbour():
    """Downsample: zero padding 0 before and 1 after, 3x3 conv with stride 2 (TF 'SAME'); Upsample: each pixel
    repeated 2x2, then a 3x3 conv. Both against the kernel-sum reference."""
    x = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    down, up = busy(ddpm.Downsample(32), seed=1), busy(ddpm.Upsample(32), seed=2)
    with torch.no_grad():
        d, u = down(x), up(x)
    p = {f"r.{k}": v.detach() for k, v in down.named_parameters()}
    assert_close64(d, ref_conv(p, "r.conv", x, stride=2, pad=(0, 1, 0, 1)).numpy(), 1.0)
    p = {f"r.{k}": v.detach() for k, v in up.named_parameters()}
    assert_close64(u, ref_conv(p, "r.conv", x.repeat_interleave(2, -2).repeat_interleave(2, -1)).numpy(), 1.0)


@math_check
def test_unet_forward_is_the_official_network_in_float64():
    """The whole U-Net (two levels, attention at 4x4 on the way down, in the middle and on the way up) equals the
    float64 reference network: at t = 0, where the embedding is exact in float32 ([0..0, 1..1]), to float64
    rounding; at other t to the float32 rounding of the embedding (|t f| < 1e3, so ~6e-5 absolute, times the
    ~O(1) gain of the embedding MLP into the output)."""
    config = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    model = busy(ddpm.UNet(**config, out_ch=3, dropout=0.0, in_channels=3, resolution=8), seed=7)
    p = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, t = torch.cat([x, x]), [0, 0, 1, 999]
    with torch.no_grad():
        got, want = model(x, torch.tensor(t)).numpy(), ref_unet(p, x, t, **config).numpy()
    assert np.abs(want).max() > 0.1 and np.abs(want[2:] - want[:2]).max() > 0.1  # a real signal that t changes
    assert_close64(got[:2], want[:2], np.abs(want).max())
    assert np.abs(got[2:] - want[2:]).max() <= 1e-3 * np.abs(want).max()


@math_check
def test_unet_parameter_counts_match_the_paper():
    """35,746,307 parameters for CIFAR-10 (35,749,766 with 6 output channels) and 113,673,219 at 256x256."""
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        assert count(ddpm.UNet()) == 35_746_307
        assert count(ddpm.UNet(out_ch=6)) == 35_749_766
        assert count(ddpm.UNet(ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0, resolution=256)) == 113_673_219
        cifar = ddpm.UNet()
    assert sum(isinstance(m, ddpm.ResnetBlock) for m in cifar.modules()) == 22
    assert sum(isinstance(m, ddpm.AttnBlock) for m in cifar.modules()) == 6


@math_check
def test_unet_uses_the_official_variable_names():
    """The state dict follows the official layout, so released weights load key for key."""
    with torch.device("meta"):
        keys = set(ddpm.UNet().state_dict())
    for k in ("temb.dense.0.weight", "temb.dense.1.bias", "conv_in.weight", "down.0.block.0.norm1.weight",
              "down.1.attn.0.q.weight", "down.1.attn.1.proj_out.bias", "down.0.downsample.conv.weight",
              "down.1.block.0.nin_shortcut.weight", "mid.block_1.conv1.weight", "mid.attn_1.k.weight",
              "mid.block_2.temb_proj.weight", "up.3.block.2.conv2.weight", "up.1.attn.2.v.weight",
              "up.3.upsample.conv.weight", "norm_out.weight", "conv_out.bias"):
        assert k in keys, k
    assert not any(k.startswith("down.3.downsample") or k.startswith("up.0.upsample") for k in keys)


ZERO_INIT = ("conv2", "proj_out", "conv_out")  # the official init_scale=0 layers: 1e-10, not 0


@math_check
def test_unet_initialisation_matches_the_official_scales():
    """Every Conv2d and Linear weight (the temb dense layers, conv_in, every resblock's conv1, conv2, temb_proj and
    nin_shortcut, attention's q, k, v, proj_out, the resamplers and conv_out) is U(+-b) with the official
    default_init bound b = sqrt(3 scale / ((fan_in + fan_out) / 2)), fan = k k channels, scale 1e-10 for conv2,
    proj_out and conv_out and 1 elsewhere (0.07134 for conv_in, 0.05103 for 3x3 128->128, ~7e-7 for conv_out):
    max |w| <= b, reaching 1 - 30/n of b, E w = 0 and E w^2 = b^2/3 to 6 standard errors over the n weights;
    biases 0, GroupNorm 1 and 0 with 32 groups and eps 1e-6."""
    torch.manual_seed(0)
    m = ddpm.UNet(ch_mult=(1, 2), attn_resolutions=(16,), dropout=0.0)  # the CIFAR-10 widths, two levels
    layers = [(name, mod) for name, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    names = [name for name, _ in layers]
    assert {"temb.dense.0", "temb.dense.1", "conv_in", "conv_out", "down.0.downsample.conv", "up.1.upsample.conv",
            "down.1.block.0.nin_shortcut", "down.1.attn.0.q", "mid.attn_1.proj_out",
            "up.0.block.2.temb_proj"} <= set(names)
    # 12 resblocks x 3 + 7 nin shortcuts + 6 attention blocks x 4 + 2 temb dense + conv_in, conv_out and 2 resamplers
    assert len(names) == 12 * 3 + 7 + 6 * 4 + 2 + 4  # every layer of this network, checked one by one below
    for name, mod in layers:
        w = mod.weight.detach()  # float32 sums over <= 1e6 weights: ~1e-6 relative, far inside the tolerances
        receptive = w[0, 0].numel() if w.dim() == 4 else 1
        fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
        scale = 1e-10 if name.split(".")[-1] in ZERO_INIT else 1.0
        bound, n = math.sqrt(3 * scale / ((fan_in + fan_out) / 2)), w.numel()
        # P(max |w| < (1 - 30/n) b) = (1 - 30/n)^n < e^-30; Var(w^2) = 4 b^4 / 45, so mean(w^2) has
        # sd 0.89 (b^2/3) / sqrt(n)
        assert (1 - 30 / n) * bound < w.abs().max() <= bound * (1 + 1e-6), name
        assert abs(w.mean().item()) < 6 * bound / math.sqrt(3 * n), name
        assert abs(w.square().mean().item() / (bound ** 2 / 3) - 1) < 6 * 0.895 / math.sqrt(n), name
        assert (mod.bias == 0).all(), name
    assert math.sqrt(3 / ((3 + 128) * 9 / 2)) == pytest.approx(0.07134, abs=1e-5)  # the spec's example bounds
    assert math.sqrt(3 / (128 * 9)) == pytest.approx(0.05103, abs=1e-5)
    for name, p in m.named_parameters():
        if "norm" in name:
            assert (p == (1 if name.endswith("weight") else 0)).all(), name
    norms = [n for n in m.modules() if isinstance(n, torch.nn.GroupNorm)]
    assert norms and all(n.eps == 1e-6 and n.num_groups == 32 for n in norms)


@math_check
def test_unet_output_shape_and_near_zero_output_at_init():
    """The output has the input's shape (2C for learned variances) and is ~0 at init (conv_out's scale 1e-10)."""
    torch.manual_seed(0)
    m = ddpm.UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16).eval()
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    t = torch.randint(0, 1000, (8,))
    with torch.no_grad():
        out = m(x, t)
        assert out.shape == x.shape and 0 < out.abs().max() < 1e-4
        assert ddpm.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16,
                         out_ch=6)(x, t).shape == (8, 6, 16, 16)


@math_check
def test_unet_rejects_a_wrong_input_size_with_the_expected_one():
    """A wrong image size names the expected shape."""
    with pytest.raises(AssertionError, match=r"\[N, 1, 8, 8\]"):
        tiny_unet()(torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of 32"):
        ddpm.UNet(ch=48)
    with pytest.raises(ValueError, match="divisible by 2\\^3"):
        ddpm.UNet(ch=32, resolution=36)  # 36 halves to 18 and 9, not a third time
    ddpm.UNet(ch=32, resolution=40)  # 40, 20, 10, 5: fine


# ---- 8. The training step and data scaling: EMA, lr warmup, the update, draw_batch, data order (ddpm.py 8, 10) ----


@math_check
def test_update_ema_is_official_formula():
    """update_ema sets ema <- decay * ema + (1 - decay) * param for every tensor, in place."""
    g = torch.Generator().manual_seed(0)
    params, ema = [[torch.randn(5, 3, generator=g), torch.randn(7, generator=g)] for _ in range(2)]
    for decay in (0.9999, 0.9):
        expected = [decay * e.double() + (1 - decay) * p.double() for e, p in zip(ema, params)]
        ddpm.update_ema(ema, params, decay)
        for e, x in zip(ema, expected):
            assert_close(e.double(), x, rtol=1e-6, atol=1e-7)  # lerp vs the product form: fp32 rounding
    ddpm.update_ema(ema, params, 1e-10)  # the official first step: ema becomes a copy of the parameters
    for e, p in zip(ema, params):
        assert_close(e, p, rtol=1e-6, atol=1e-7)


def _q_sample64(betas, x, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 4) in float64, from Ref's loop-built abar."""
    abar = Ref(betas).abar[t.numpy()].reshape(-1, 1, 1, 1)
    return np.sqrt(abar) * np64(x).astype(np.float64) + np.sqrt(1 - abar) * np64(noise).astype(np.float64)


@math_check
def test_training_steps_follow_the_official_recipe(tmp_path, images, monkeypatch):
    """Each update backpropagates the mean over batch and pixels of ||eps - eps_theta(x_t, t)||^2 (a float64
    reimplementation), clips the trained parameters' gradients at global norm grad_clip (scaled by
    grad_clip / (norm + 1e-6), torch's formula) and logs the pre-clip norm and the batch-mean loss; the k-th update
    (k from 0) has lr * min(k / warmup, 1) (0 at first, so the weights stay as initialised); the EMA is a copy after
    the first update, then d * ema + (1 - d) * theta, also at the first update after a resume; and a resumed run
    continues the data, t, noise and flip stream of an uninterrupted one."""
    config = tiny_config(tmp_path / "run", images, steps=2, warmup=2, log_every=1, ckpt_every=100,
                         ema_decay=0.9, grad_clip=1e-3)  # far below the gradient norm (~0.3-3): clipping is active
    config.model = dataclasses.replace(config.model, dropout=0.0)  # so the test can recompute the forward
    betas, steps = ddpm.get_beta_schedule("cosine", 10), []
    original_losses, original_clip = ddpm.GaussianDiffusion.training_losses, torch.nn.utils.clip_grad_norm_
    original_ema, flat = ddpm.update_ema, lambda tensors: torch.cat([p.detach().flatten() for p in tensors])

    def training_losses(self, model, x, t, noise=None, **kw):
        out = original_losses(self, model, x, t, noise=noise, **kw)
        steps.append(dict(model=model, x=x.detach().clone(), t=t.clone(), noise=noise.detach().clone(),
                          losses=out["loss"].detach().double()))
        return out

    def clip_grad_norm_(parameters, max_norm, *args, **kw):
        s, parameters = steps[-1], list(parameters)
        s["clipped"], s["max_norm"] = [id(p) for p in parameters], max_norm
        s["grad"] = [p.grad.detach().double().clone() for p in parameters]
        reference = copy.deepcopy(s["model"]).double()  # the weights before this update
        out = reference(torch.from_numpy(_q_sample64(betas, s["x"], s["t"], s["noise"])), s["t"])
        loss = ((s["noise"].double() - out) ** 2).mean()  # one mean over batch, channels and pixels
        s["want"] = torch.autograd.grad(loss, list(reference.parameters()))
        s["norm"] = s["returned"] = original_clip(parameters, max_norm, *args, **kw)
        s["after"] = [p.grad.detach().double().clone() for p in parameters]
        return s["returned"]

    def update_ema(ema_params, params, decay):
        ema_params, params = list(ema_params), list(params)
        original_ema(ema_params, params, decay)
        steps[-1]["ema"], steps[-1]["theta"], steps[-1]["decay"] = flat(ema_params), flat(params), decay

    monkeypatch.setattr(ddpm.GaussianDiffusion, "training_losses", training_losses)
    monkeypatch.setattr(ddpm, "update_ema", update_ema)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)
    run = ddpm.train(config)
    ddpm.train(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=4)), resume=True)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert len(steps) == 4 and [r["step"] for r in logged] == [1, 2, 3, 4]
    for s, record in zip(steps, logged):
        assert s["clipped"] == [id(p) for p in s["model"].parameters()] and s["max_norm"] == 1e-3
        got, want = torch.cat([g.flatten() for g in s["grad"]]), torch.cat([g.flatten() for g in s["want"]])
        # float32 forward and backward against float64: ~1e-6 relative; a sum instead of a mean is 8x off
        assert (got - want).norm() <= 1e-4 * want.norm()
        norm = got.norm().item()  # the global norm over all tensors, before clipping
        assert float(s["returned"]) == pytest.approx(norm, rel=1e-5)  # float32 sums against float64
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-5)
        scale = min(1.0, 1e-3 / (norm + 1e-6))
        assert_close(flat(s["after"]), got * scale, rtol=1e-5, atol=1e-12)  # fp32 scaling of fp32 gradients
        assert record["loss"] == pytest.approx(s["losses"].mean().item(), rel=1e-6)  # the batch mean is logged
    lrs = [r["lr"] for r in logged]  # the lr of update k = 0..3, warmup 2
    np.testing.assert_allclose(lrs, [0, 1e-3 / 2, 1e-3, 1e-3], rtol=1e-12, atol=0)
    torch.manual_seed(config.train.seed)
    init = flat(ddpm.create_model_and_diffusion(config)[0].parameters())
    assert torch.equal(steps[0]["theta"], init) and not torch.equal(steps[1]["theta"], init)
    # the official first update: decay 1e-10, a copy (here update 0 has lr 0, so the values alone cannot tell)
    assert [s["decay"] for s in steps] == [1e-10, 0.9, 0.9, 0.9]
    assert_close(steps[0]["ema"], steps[0]["theta"], rtol=1e-6, atol=1e-9)  # 1e-10 of the initial weights: nothing
    for prev, s in zip(steps, steps[1:]):  # later updates, the first after the resume too: the same lerp
        assert_close(s["ema"], 0.9 * prev["ema"] + 0.1 * s["theta"], rtol=1e-5, atol=1e-7)
    # the resumed step drew what step 2 of an uninterrupted run draws: the same data order, t, noise and flips
    generator, data = torch.Generator().manual_seed(config.train.seed), np.load(images)
    for step in range(4):
        x, t, noise = ddpm.draw_batch(data, step, generator, config, 0, 1, "cpu")
        assert torch.equal(x, steps[step]["x"]) and torch.equal(t, steps[step]["t"])
        assert torch.equal(noise, steps[step]["noise"])


@math_check
def test_draw_batch_t_is_uniform_on_0_to_T_minus_1_and_flips_the_width_with_probability_one_half():
    """draw_batch's x_0 is data[batch_indices(step)] scaled by x/127.5 - 1 (float64) and flipped along the width
    (dim 3 of NCHW) for a fraction 1/2 of the images, t takes every index 0..T-1 with probability 1/T and nothing
    outside, eps is N(0, I); with randflip off nothing flips; two ranks' slices are the one-process batch."""
    B, T, N, step = 4096, 10, 50, 3
    config = tiny_config("unused", "unused", batch_size=B, seed=5)
    data = np.random.default_rng(1).integers(0, 256, (N, 8, 8, 3), dtype=np.uint8)
    x, t, noise = ddpm.draw_batch(data, step, torch.Generator().manual_seed(0), config, 0, 1, "cpu")
    want = torch.from_numpy(data[ddpm.batch_indices(step, B, N, 5)].transpose(0, 3, 1, 2) / 127.5 - 1)
    x = x.double()
    same = ((x - want).abs().amax((1, 2, 3)) < 1e-6).numpy()  # float32 rounding only
    flipped = ((x - want.flip(3)).abs().amax((1, 2, 3)) < 1e-6).numpy()
    assert (same ^ flipped).all()  # every image is its data image, as it is or mirrored left-right
    # a binomial(B, 1/2) fraction: 6 standard errors (0.047) around 1/2
    assert abs(flipped.mean() - 0.5) < 6 * math.sqrt(0.25 / B)
    counts = np.bincount(t.numpy(), minlength=T)
    assert t.min() == 0 and t.max() == T - 1 and len(counts) == T
    assert (np.abs(counts - B / T) < 6 * math.sqrt(B * (1 / T) * (1 - 1 / T))).all()  # multinomial, 6 sd each
    e = noise.double()
    assert abs(e.mean()) < 6 / math.sqrt(e.numel()) and abs(e.var() - 1) < 6 * math.sqrt(2 / e.numel())
    off = dataclasses.replace(config, train=dataclasses.replace(config.train, randflip=False))
    x_off = ddpm.draw_batch(data, step, torch.Generator().manual_seed(0), off, 0, 1, "cpu")[0].double()
    assert (x_off - want).abs().max() < 1e-6
    ranks = [ddpm.draw_batch(data, step, torch.Generator().manual_seed(0), config, r, 2, "cpu") for r in (0, 1)]
    for whole, halves in zip((x, t, noise), zip(*ranks)):
        assert torch.equal(torch.cat(halves).to(whole.dtype), whole)


@math_check
def test_batch_indices_shuffle_anew_every_epoch_and_continue_across_any_batching():
    """The data order is an endless chain of permutations of 0..n-1, a different one each epoch and for each
    seed, and a function of the position only: any batch size (and so a resumed run) reads the same chain."""
    n, seed, epochs = 10, 3, 6
    chain = np.concatenate([ddpm.batch_indices(s, 1, n, seed) for s in range(epochs * n)])  # one index per step
    blocks = chain.reshape(epochs, n)
    assert all(sorted(b) == list(range(n)) for b in blocks)
    assert len({tuple(b) for b in blocks}) == epochs and not (blocks == np.arange(n)).all(1).any()
    for B in (3, 7, 10, 25):
        for step in range(epochs * n // B):
            assert np.array_equal(ddpm.batch_indices(step, B, n, seed), chain[step * B:(step + 1) * B])
    assert not np.array_equal(ddpm.batch_indices(0, n, n, seed + 1), blocks[0])


@math_check
def test_data_scaling_is_x_over_127_5_minus_1_and_back_truncated_and_clipped():
    """normalize_data maps uint8 NHWC v to NCHW v/127.5 - 1 (float64 reference, all 256 values); unnormalize_data
    maps NCHW y to NHWC floor(clip((y+1) 127.5, 0, 255)), out-of-range inputs included; the round trip returns v,
    or v - 1 exactly where float32 arithmetic (numpy) puts (v/127.5 - 1 + 1) 127.5 below v."""
    v = np.random.default_rng(0).permutation(np.arange(1024) % 256).astype(np.uint8).reshape(2, 4, 8, 16)  # NHWC
    for images in (v, torch.from_numpy(v)):
        got = ddpm.normalize_data(images)
        assert got.dtype == torch.float32 and got.shape == (2, 16, 4, 8)
        # two float32 roundings of values in [-1, 2]: at most 2.4e-7 apart; 1/128 instead of 1/127.5 moves 0.008
        assert_close(got, v.transpose(0, 3, 1, 2) / 127.5 - 1, rtol=0, atol=2.4e-7)
    assert ddpm.normalize_data(np.array([0, 255], np.uint8).reshape(1, 1, 2, 1)).flatten().tolist() == [-1.0, 1.0]
    # half-way between two levels (float32 error ~1e-5 cannot cross a level), the ends, and beyond them
    y = np.concatenate([(np.arange(-20, 276) + 0.5) / 127.5 - 1, [-1, 1, 0, -0.5, -1.0001, 1.0001, -3, 5, -1e9, 1e9]])
    y = np.resize(y, 2 * 3 * 4 * 13).astype(np.float32).reshape(2, 3, 4, 13)  # NCHW
    got = ddpm.unnormalize_data(torch.from_numpy(y))
    want = np.floor(np.clip((y.astype(np.float64) + 1) * 127.5, 0, 255)).transpose(0, 2, 3, 1)
    assert got.dtype == np.uint8 and got.shape == (2, 4, 13, 3) and np.array_equal(got, want)
    levels = np.arange(256, dtype=np.uint8)
    back = ddpm.unnormalize_data(ddpm.normalize_data(levels.reshape(1, 1, 256, 1))).ravel()
    f32 = np.float32
    emulated = np.floor((levels.astype(f32) / f32(127.5) - f32(1) + f32(1)) * f32(127.5)).astype(np.uint8)
    assert np.array_equal(back, emulated) and ((back == levels) | (back == levels - 1)).all()
    assert back[0] == 0 and back[255] == 255


# ---- 9. The evaluation formulas (evaluate.py: Fréchet distance, Inception Score, bootstrap, rate/distortion) ----
# The last of the math check: evaluate.py's formulas on small synthetic inputs, with numpy and scipy only (the
# digits images come from a synthetic uint8 set, so scikit-learn is not needed).


def ref_inception_score(probs, num_splits):
    """The OpenAI Inception Score in plain Python: per consecutive split (sizes N k // splits), p(y) is the split's
    mean row, score = exp(mean over its rows of sum_y p log(p / p(y))), 0 log 0 = 0; (mean, population std)."""
    N, scores = len(probs), []
    for k in range(num_splits):
        part = [list(map(float, row)) for row in probs[k * N // num_splits:(k + 1) * N // num_splits]]
        p_y = [sum(row[y] for row in part) / len(part) for y in range(len(part[0]))]
        kls = [sum(p * math.log(p / q) for p, q in zip(row, p_y) if p > 0) for row in part]
        scores.append(math.exp(sum(kls) / len(kls)))
    mean = sum(scores) / len(scores)
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


def frechet_by_eigh(mu1, sigma1, mu2, sigma2):
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) a second way: the trace of
    (S1^1/2 S2 S1^1/2)^1/2 from symmetric eigendecompositions (numpy), not scipy's sqrtm of S1 S2."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1).clip(min=0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(inner).sum())


@math_check
def test_frechet_identical_statistics_is_zero():
    """Identical statistics are at Fréchet distance 0."""
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(8), _random_cov(rng, 8)
    # sqrtm(sigma^2) == sigma up to float64 round-off on a well-conditioned 8x8 matrix
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


@math_check
def test_frechet_mean_shift_is_squared_norm():
    """Equal covariances and a pure mean shift give ||mu1 - mu2||^2."""
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.standard_normal(6), rng.standard_normal(6), _random_cov(rng, 6)
    expected = float(((mu1 - mu2) ** 2).sum())
    assert evaluate.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@math_check
def test_frechet_diagonal_covariances_scalar_formula():
    """Diagonal covariances give sum_i (mu1_i - mu2_i)^2 + (sqrt(s1_i) - sqrt(s2_i))^2."""
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum())
    got = evaluate.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9)  # float64 throughout: round-off only


@math_check
def test_frechet_symmetric_and_matches_eigenvalue_route():
    """d(a, b) = d(b, a), and Tr sqrt(S1 S2) equals the sum of the square roots of the eigenvalues of
    sqrt(S1) S2 sqrt(S1), an independent way to compute the same trace."""
    rng = np.random.default_rng(3)
    mu1, mu2, s1, s2 = rng.standard_normal(7), rng.standard_normal(7), _random_cov(rng, 7), _random_cov(rng, 7)
    ab, ba = evaluate.frechet_distance(mu1, s1, mu2, s2), evaluate.frechet_distance(mu2, s2, mu1, s1)
    expected = frechet_by_eigh(mu1, s1, mu2, s2)
    assert ab == pytest.approx(ba, rel=1e-9) and ab == pytest.approx(expected, rel=1e-8)  # two float64 routes


@math_check
def test_frechet_singular_covariances_stay_finite():
    """Rank-deficient covariances (fewer samples than features, or zero) give a finite distance, and the
    eps offset for an exactly singular product shifts it by no more than ~D * eps."""
    rng = np.random.default_rng(4)
    s1, s2 = _random_cov(rng, 16, rank=3), _random_cov(rng, 16, rank=3)
    low = evaluate.frechet_distance(np.zeros(16), s1, np.ones(16), s2)
    assert np.isfinite(low) and low > 0
    with pytest.warns(UserWarning, match="singular"):
        got = evaluate.frechet_distance(np.zeros(4), np.zeros((4, 4)), np.ones(4), np.zeros((4, 4)))
    assert got == pytest.approx(4.0, abs=1e-4)  # ||mu||^2 = 4; the 1e-6 * I offset changes it by ~8e-6


@math_check
def test_frechet_rejects_mismatched_shapes():
    """Statistics of different sizes raise instead of broadcasting."""
    with pytest.raises(ValueError, match="shape"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@math_check
def test_feature_statistics_are_the_mean_and_np_cov():
    """feature_statistics, summed in 10,000-row chunks, equals np.mean and the unbiased np.cov."""
    features = np.random.default_rng(8).standard_normal((25_000, 3)).astype(np.float32) * [1, 2, 3] + 5
    mu, sigma = evaluate.feature_statistics(features)
    # both in float64 from the same float32 values; only summation order differs
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-10)


@math_check
def test_inception_score_bounds():
    """Identical predictions give IS 1; one-hot predictions spread uniformly over K classes give IS K."""
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.ones(7))
    mean, std = evaluate.inception_score(np.tile(p, (50, 1)), num_splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)  # KL(p || p) = 0 exactly
    K = 5
    onehot = np.eye(K)[np.arange(10 * 4 * K) % K]  # every split holds each class 4 times
    mean, std = evaluate.inception_score(onehot, num_splits=10)
    assert mean == pytest.approx(K, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)  # exp(log K)
    with pytest.raises(ValueError, match="probability"):
        evaluate.inception_score(rng.standard_normal((20, 3)))  # logits, not probabilities


@math_check
def test_inception_score_is_per_split_against_a_plain_loop():
    """On rows that differ within and across splits (a different class mix per split, zeros included), each
    split's score uses its own p(y), the score is exp of the mean KL (not the mean of exp), and the result is the
    mean and the population std over the splits, for splits that do not divide N."""
    rng = np.random.default_rng(6)
    probs = np.concatenate([rng.dirichlet(alpha, size) for alpha, size in
                            (([5, 1, 1, 1, 0.2], 6), ([0.3, 0.3, 4, 2, 1], 6), ([1, 1, 1, 1, 1], 11))])
    probs[::4, 1] = 0  # some exact zeros: 0 log 0 = 0
    probs /= probs.sum(1, keepdims=True)
    for splits in (1, 3, 4, 7):
        want = ref_inception_score(probs, splits)
        # float64 sums in another order: round-off ~1e-15 relative
        assert evaluate.inception_score(probs, splits) == pytest.approx(want, rel=1e-10, abs=1e-12), splits


class _TinyDigitsClassifier(nn.Module):
    """A stand-in for the pinned digits classifier: 3 random linear features of the 64 pixels and a softmax head
    over 10 classes (3 features, so a few images give a nonsingular covariance)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head = nn.Linear(64, 3), nn.Linear(3, 10)

    def features(self, x):
        return self.fc(x.flatten(1))


def _synthetic_digits(n, seed, high=256):
    return np.random.default_rng(seed).integers(0, high, (n, 8, 8, 1), dtype=np.uint8)


@math_check
def test_digits_score_is_the_frechet_distance_to_the_train_split_and_its_bootstrap(monkeypatch):
    """DigitsScore's reference is the train split's feature mean and unbiased covariance; digits-FD and digits-IS
    are the Fréchet distance to it and the one-split Inception Score, and each +- is the ddof=1 std over resamples
    drawn with replacement by rng.integers(0, N, N) from default_rng(seed): all recomputed by brute force (float64
    statistics, the eigendecomposition route to the matrix root, the plain-loop Inception Score)."""
    classifier, train, images = _TinyDigitsClassifier().eval(), _synthetic_digits(40, 1), _synthetic_digits(12, 2, 128)
    monkeypatch.setattr(evaluate, "load_digits_classifier", lambda path=None: (classifier, 0.5))
    monkeypatch.setattr(evaluate, "digits_images", lambda split: train if split == "train" else _synthetic_digits(9, 3))

    def outputs(x):  # the network's features and class probabilities, in float64
        with torch.no_grad():
            f = classifier.features(torch.from_numpy(x.transpose(0, 3, 1, 2) / 127.5 - 1).float())
            return f.double().numpy(), classifier.head(f).double().softmax(1).numpy()

    score = evaluate.DigitsScore(seed=4, num_bootstrap=15)
    train_features = outputs(train)[0]
    stats = lambda f: (f.mean(0), np.cov(f, rowvar=False))
    mu, sigma = stats(train_features)
    np.testing.assert_allclose(score.reference[0], mu, rtol=1e-6, atol=1e-7)  # float32 features, float64 sums
    np.testing.assert_allclose(score.reference[1], sigma, rtol=1e-6, atol=1e-7)
    assert abs(score(train)["fd"]) < 1e-6  # the train split itself: sqrtm round-off only
    features, probs = outputs(images)
    rng = np.random.default_rng(4)
    resamples = [rng.integers(0, 12, 12) for _ in range(15)]
    fds = [frechet_by_eigh(*stats(features[i]), mu, sigma) for i in resamples]
    iss = [ref_inception_score(probs[i], 1)[0] for i in resamples]
    got = score(images)
    # float32 features, two matrix-root routes on 3x3 covariances: ~1e-6 relative
    assert got["fd"] == pytest.approx(frechet_by_eigh(*stats(features), mu, sigma), rel=1e-5)
    assert got["is"] == pytest.approx(ref_inception_score(probs, 1)[0], rel=1e-5) and got["n"] == 12
    assert got["fd_std"] == pytest.approx(np.std(fds, ddof=1), rel=1e-4)
    assert got["is_std"] == pytest.approx(np.std(iss, ddof=1), rel=1e-4)


@math_check
def test_pixel_categorical_bits_per_dim_against_counts(monkeypatch):
    """The per-pixel categorical baseline on a synthetic uint8 set with 4 grey levels: -log2 of add-one smoothed
    frequencies (count + 1) / (N + K) counted pixel by pixel in a loop, averaged over pixels; its samples'
    frequencies at a pixel match its probabilities (Monte Carlo, 5 standard errors); the reference points' uniform
    entries are log2 K and 8 bits."""
    levels = np.array([0, 7, 100, 255], np.uint8)
    rng = np.random.default_rng(7)
    train = levels[rng.choice(4, (30, 3, 3, 1), p=[0.5, 0.3, 0.15, 0.05])]
    test = levels[rng.integers(0, 4, (4, 3, 3, 1))]
    model = evaluate.PixelCategorical(train)
    flat_train, flat_test = train.reshape(30, -1), test.reshape(4, -1)
    for n in range(4):
        bits = [-math.log2(((flat_train[:, d] == flat_test[n, d]).sum() + 1) / (30 + 4)) for d in range(9)]
        assert model.nll_bpd(test[n:n + 1])[0] == pytest.approx(np.mean(bits), rel=1e-12)
    samples = model.sample(4000, seed=1).reshape(4000, -1)
    for d in (0, 4):
        for k, level in enumerate(levels):
            p = ((flat_train[:, d] == level).sum() + 1) / 34
            assert abs((samples[:, d] == level).mean() - p) <= 5 * math.sqrt(p * (1 - p) / 4000), (d, level)
    monkeypatch.setattr(evaluate, "digits_images", lambda split: train)  # digits_nll_references fits the train split
    refs = evaluate.digits_nll_references(test)
    assert refs["uniform_levels"] == 2.0 and refs["uniform_256"] == 8.0 and refs["num_levels"] == 4


@math_check
def test_rate_distortion_and_the_nll_summary_against_loops():
    """rate[i] = mean over examples of prior + sum_{j > i} vb[:, j], rmse[i] = 127.5 sqrt(mean xstart_mse[:, i])
    (plain loops); the summary's rate is L_1..L_{T-1} + the prior, its distortion L_0 (vb[:, 0]), each with the
    standard error std(ddof=1)/sqrt(N), and rate + distortion = the total; Table 4's rows sit at reverse times T,
    0.9 T, ..., 0.1 T, paper t = T - r + 1, index T - r."""
    rng = np.random.default_rng(9)
    N, T = 5, 7
    vb, prior, mse = rng.uniform(0, 2, (N, T)), rng.uniform(0, 1e-3, N), rng.uniform(0, 0.5, (N, T))
    rate, rmse = evaluate.rate_distortion(vb, prior, mse)
    for i in range(T):
        loop = sum(prior[n] + sum(vb[n, j] for j in range(i + 1, T)) for n in range(N)) / N
        assert rate[i] == pytest.approx(loop, rel=1e-12)
        assert rmse[i] == pytest.approx(127.5 * math.sqrt(sum(mse[n, i] for n in range(N)) / N), rel=1e-12)
    total = vb.sum(1) + prior
    s = evaluate.nll_summary({"vb": vb, "prior_bpd": prior, "xstart_mse": mse, "total_bpd": total})
    se = lambda v: (float(np.mean(v)), float(np.std(v, ddof=1) / math.sqrt(len(v))))
    for key, values in (("total_bpd", total), ("prior_bpd", prior), ("rate_bpd", vb[:, 1:].sum(1) + prior),
                        ("distortion_bpd", vb[:, 0])):
        assert s[key] == pytest.approx(se(values), rel=1e-12), key
    assert s["rate_bpd"][0] + s["distortion_bpd"][0] == pytest.approx(s["total_bpd"][0], rel=1e-12)
    assert s["rate_bpd"][0] == pytest.approx(rate[0], rel=1e-12) and s["xstart_rmse"] == pytest.approx(rmse[0])
    assert evaluate.mean_and_stderr([3.0]) == (3.0, 0.0) and s["num_examples"] == N
    rows = evaluate.table4_rows(np.arange(1000.0), np.arange(1000.0) + 0.5)
    assert rows == [(r, 1000 - r + 1, float(1000 - r), 1000 - r + 0.5) for r in range(1000, 0, -100)]
    assert [r[0] for r in evaluate.table4_rows(np.zeros(25), np.zeros(25))] == [25, 23, 20, 18, 15, 13, 10, 8, 5, 3]


# ---- 10. Checkpoints ----


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    """save_checkpoint + load_model gives back the EMA weights and the config; a truncated file is a clear error."""
    c = tiny_digits_config()
    model, _ = ddpm.create_model_and_diffusion(c)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    ddpm.save_checkpoint(path, {"config": c.to_dict(), "step": 3, "model": model.state_dict(), "ema": ema})
    assert torch.load(path, weights_only=True)["step"] == 3
    loaded, diffusion, config = ddpm.load_model(path)
    assert config == c and diffusion.num_timesteps == 25 and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.items())
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        ddpm.load_model(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ddpm.load_model(tmp_path / "nope.pt")


def test_checkpoint_survives_kill_mid_save(tmp_path):
    """A process killed (SIGKILL) in the middle of save_checkpoint leaves the previous file whole."""
    path = str(tmp_path / "ckpt.pt")
    ddpm.save_checkpoint(path, {"step": 1, "w": torch.ones(1000)})
    newer = {"step": 2, "w": torch.zeros(1000)}
    pid = os.fork()  # a copy of this process is the one killed: no second interpreter and torch import to wait for
    if pid == 0:
        try:
            def dying_save(obj, f):
                f.write(b"x" * 4096)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            torch.save = dying_save
            ddpm.save_checkpoint(path, newer)
        finally:
            os._exit(1)  # reached only if the kill did not land; the child never returns into pytest
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    state = ddpm.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert ddpm.list_checkpoints(str(tmp_path)) == []  # a leftover .tmp file is never taken for a checkpoint


def test_a_file_that_is_not_a_ddpm_checkpoint_gets_one_line(tmp_path, capsys):
    """Random bytes, a pickled object, a config.json, a folder, released weights given as --checkpoint and a training
    checkpoint given as --weights each get one line naming the problem and the fix, never torch's weights_only advice."""
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with open(tmp_path / "object.pt", "wb") as f:
        pickle.dump({"model": ddpm.ModelConfig()}, f)  # an object: torch.load(weights_only=True) refuses it
    (tmp_path / "config.json").write_text('{"model": {"ch": 32}}')
    os.makedirs(tmp_path / "run")
    _tiny_model_checkpoint(tmp_path / "ckpt.pt")
    torch.save(ddpm.load_checkpoint(tmp_path / "ckpt.pt")["model"], tmp_path / "state_dict.pt")
    for name in ("random.pt", "object.pt", "config.json"):
        _one_line_error(capsys, ddpm.main, ["sample", "--checkpoint", str(tmp_path / name), "--out", str(tmp_path)],
                        "is not a ddpm checkpoint or is damaged", "pass a ckpt-.*pt written by ddpm.py train")
        _one_line_error(capsys, evaluate.main, ["sample", "--weights", str(tmp_path / name), "--out", str(tmp_path)],
                        "not a .*weights file or it is damaged")
    _one_line_error(capsys, ddpm.main, ["sample", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path)],
                    "is a folder, not a checkpoint file", r"pass one of its ckpt-\*\.pt files")
    _one_line_error(capsys, evaluate.main, ["sample", "--weights", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path)],
                    "is a checkpoint of ddpm.py train, not released weights", "pass it with --checkpoint")
    _one_line_error(capsys, ddpm.main, ["sample", "--checkpoint", str(tmp_path / "state_dict.pt"), "--out",
                                        str(tmp_path)], "not a checkpoint written by ddpm.py train",
                    "pass released weights with --weights")
    _one_line_error(capsys, ddpm.main, ["sample", "--checkpoint", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path),
                                        "--respacing", "ddim0"], "'ddim0' asks for 0 of 25 steps", "1 <= N <= 25")


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused_in_one_sentence(tmp_path, capsys):
    """A checkpoint whose config was edited (model.ch 32 -> 64) is refused by both sample commands in one sentence
    that names the first misfit, before anything is written; never torch's many-line size-mismatch traceback."""
    _tiny_model_checkpoint(tmp_path / "ckpt.pt")
    ckpt = ddpm.load_checkpoint(tmp_path / "ckpt.pt")
    ckpt["config"]["model"]["ch"] = 64
    ddpm.save_checkpoint(tmp_path / "bad.pt", ckpt)
    for main in (ddpm.main, evaluate.main):
        _one_line_error(capsys, main, ["sample", "--checkpoint", str(tmp_path / "bad.pt"), "--device", "cpu", "--out",
                                       str(tmp_path / "s")],
                        r"bad.pt holds weights that do not fit the config saved in it \(size mismatch for \S+: "
                        r"copying a param with shape .*\); the file was edited or damaged: pass another checkpoint$")
    assert not (tmp_path / "s").exists()


HOLD = ("import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\nf.write('pid of the holder')\nf.flush()\n"
        "print('held', flush=True)\ntime.sleep(120)")


def _holder(folder):
    """Another process that holds `folder` as lock_folder does (an exclusive flock on folder/.lock, with a line
    saying who), holding it when this returns; plain Python, so it starts in milliseconds."""
    os.makedirs(folder, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, os.path.join(folder, ".lock")], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_folder_that_another_process_writes_is_refused_at_once(tmp_path, images, capsys):
    """While another process holds a folder, every command that would write it is refused in one sentence naming
    the folder and the holder, and writes nothing there: train, both samples, nll, figures, digits-score, table2.
    Killed with SIGKILL (no cleanup runs), the holder leaves no stale lock: the same train then runs. And with two
    ddpm processes: while `ddpm.lock_folder` holds a folder in another process, `sample` into it exits 1 naming it."""
    ckpt, out, held = tmp_path / "ckpt.pt", tmp_path / "out", tmp_path / "held"
    other = subprocess.Popen([sys.executable, "-c", "import sys, time\nimport ddpm\nddpm.lock_folder(sys.argv[1])\n"
                              "print('held', flush=True)\ntime.sleep(120)", str(held)],
                             cwd=os.path.dirname(DDPM_PY), stdout=subprocess.PIPE, text=True)  # imports meanwhile
    _tiny_model_checkpoint(ckpt)
    train = ["train", *TINY_FLAGS, "--data", images, "--steps", "1", "--out", str(out)]
    model = ["--checkpoint", str(ckpt), "--device", "cpu", "--out", str(out)]
    holder = _holder(out)
    try:
        for main, argv in ((ddpm.main, train), (ddpm.main, ["sample", *model, "--n", "1"]),
                           (evaluate.main, ["sample", *model, "--n", "1"]),
                           (evaluate.main, ["nll", *model, "--data", "digits", "--max-examples", "1"]),
                           (evaluate.main, ["figures", *model, "--n", "1"]),
                           (evaluate.main, ["digits-score", *model, "--n", "2", "--nll-images", "1"]),
                           (experiments.main, ["table2", "--steps", "2", "--timesteps", "25", "--out", str(out)])):
            _one_line_error(capsys, main, argv, rf"^error: {re.escape(str(out))} is being written by another process "
                                                rf"\(pid of the holder\); wait for it to end, or pass another --out$")
        assert os.listdir(out) == [".lock"]
    finally:
        holder.kill()  # SIGKILL
        holder.wait()
    ddpm.main(train)
    assert ddpm.list_checkpoints(str(out)) == [str(out / "ckpt-0000001.pt")]
    try:
        assert other.stdout.readline() == "held\n"
        _one_line_error(capsys, ddpm.main, ["sample", *model[:-1], str(held), "--n", "1"],
                        rf"^error: {re.escape(str(held))} is being written by another process \(pid {other.pid} on "
                        rf"{re.escape(platform.node())}\); wait for it to end, or pass another --out$")
        assert os.listdir(held) == [".lock"]
    finally:
        other.kill()
        other.wait()
    os.makedirs(tmp_path / "empty")  # release_locks removes only a folder it made and nothing was written into
    for name in ("empty", "new", "written"):
        ddpm.lock_folder(tmp_path / name)
        ddpm.lock_folder(tmp_path / name)  # held already: no second lock, no error
    (tmp_path / "written" / "result.txt").write_text("x")
    ddpm.release_locks()
    assert os.listdir(tmp_path / "empty") == [".lock"] and not (tmp_path / "new").exists()
    assert sorted(os.listdir(tmp_path / "written")) == [".lock", "result.txt"]


# ---- 11. Data ----


def fake_cifar10(cache, monkeypatch, corrupt=False):
    """A small archive in the official format (data_batch_1..5 and test_batch pickles), trusted by its md5."""
    rng = np.random.default_rng(0)
    batches = {**{f"data_batch_{i}": 3 for i in range(1, 6)}, "test_batch": 2}
    data = {name: rng.integers(0, 256, (n, 3072), dtype=np.uint8) for name, n in batches.items()}
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, "cifar-10-python.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for name, x in data.items():
            blob = pickle.dumps({b"data": x, b"labels": [0] * len(x), b"batch_label": name.encode()})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    monkeypatch.setenv("DDPM_CACHE", str(cache))
    monkeypatch.setattr(ddpm, "CIFAR10_MD5", ddpm.file_digest(path, "md5"))
    if corrupt:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    return data


def test_cifar10_loads_official_format(tmp_path, monkeypatch):
    """The train split is data_batch_1..5 in order, the test split test_batch, each row R..G..B turned into NHWC."""
    data = fake_cifar10(tmp_path / "cache", monkeypatch)
    train, test = ddpm.load_data("cifar10", "train"), ddpm.load_data("cifar10", "test", resolution=32, in_channels=3)
    assert train.shape == (15, 32, 32, 3) and test.shape == (2, 32, 32, 3) and train.dtype == np.uint8
    row = data["data_batch_2"][1]  # the official layout: 1024 red, then 1024 green, then 1024 blue, row-major
    assert np.array_equal(train[4, 5, 7], [row[5 * 32 + 7], row[1024 + 5 * 32 + 7], row[2048 + 5 * 32 + 7]])
    assert np.array_equal(test.reshape(2, -1, 3).transpose(0, 2, 1).reshape(2, -1), data["test_batch"])


def test_cifar10_bad_md5_offline_and_an_unwritable_cache(tmp_path, monkeypatch, capsys):
    """A truncated archive fails its md5 and is set aside as *.unreadable with one line (never used, never deleted)
    and downloaded again; with no network the error says where to put it. A cache folder that cannot be written
    (here under a regular file) is refused before the download, naming DDPM_CACHE."""
    fake_cifar10(tmp_path / "cache", monkeypatch, corrupt=True)

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")
    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(ConnectionError, match="copy cifar-10-python.tar.gz"):
        ddpm.load_data("cifar10")
    assert "has the wrong md5; renamed it to cifar-10-python.tar.gz.unreadable and downloading it again" in \
        capsys.readouterr().out
    assert os.listdir(tmp_path / "cache") == ["cifar-10-python.tar.gz.unreadable"]
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(ValueError, match=r"cannot write the cache folder .*file/cache \(Not a directory\); set "
                                         r"DDPM_CACHE to a folder you can write"):
        ddpm.load_data("cifar10")


def test_digits_split_and_scaling():
    """digits: 1,500 train and 297 held-out test images, 0..16 scaled to 0..255, as [N, 8, 8, 1], with their labels."""
    train, test = ddpm.load_data("digits", "train", resolution=8, in_channels=1), ddpm.load_data("digits", "test")
    assert train.shape == (1500, 8, 8, 1) and test.shape == (297, 8, 8, 1)
    assert np.array_equal(np.concatenate([train, test])[..., 0], np.round(sklearn_datasets.load_digits().images * 255 / 16))
    (x, y), labels = ddpm.load_digits("test", labels=True), evaluate.digits_labels("train")
    assert np.array_equal(x, test) and y.dtype == labels.dtype == np.int64 and not labels.flags.writeable
    assert np.array_equal(np.concatenate([labels, y]), sklearn_datasets.load_digits().target)


def test_folder_and_arrays(tmp_path):
    """A folder of PNGs, a .npy and a .npz all load as the same uint8 NHWC array; --resize fits other sizes."""
    x = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "imgs" / "sub")
    for i, image in enumerate(x):
        Image.fromarray(image).save(tmp_path / "imgs" / ("sub" if i == 2 else "") / f"{i}.png")
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", arr_0=x)
    for source in ("imgs", "x.npy", "x.npz"):
        assert np.array_equal(ddpm.load_data(str(tmp_path / source), "test", resolution=8, in_channels=3), x), source
    assert ddpm.load_data(str(tmp_path / "x.npy"), resolution=16, resize=True).shape == (3, 16, 16, 3)
    os.makedirs(tmp_path / "gray")
    Image.fromarray(x[0, :, :, 0]).save(tmp_path / "gray" / "0.png")
    assert np.array_equal(ddpm.load_data(str(tmp_path / "gray")), x[:1, :, :, :1])  # all grayscale: C = 1
    Image.fromarray(x[0, :, :, 0]).save(tmp_path / "imgs" / "gray.png")
    assert ddpm.load_data(str(tmp_path / "imgs")).shape == (4, 8, 8, 3)  # mixed modes: all RGB


def test_bad_inputs_get_one_clear_sentence(tmp_path, images):
    """Missing path, mixed sizes, a non-image, a channel mismatch and too few images each raise a specific message."""
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        ddpm.load_data(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "mixed")
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(ValueError, match="mixed sizes.*--resize"):
        ddpm.load_data(str(tmp_path / "mixed"))
    (tmp_path / "mixed" / "notes.txt").write_text("not a picture")
    with pytest.raises(ValueError, match="notes.txt is not an image"):
        ddpm.load_data(str(tmp_path / "mixed"), resize=True, resolution=8)
    with pytest.raises(ValueError, match="RGB images but the model takes grayscale.*--model.in-channels 3"):
        ddpm.load_data(images, in_channels=1)
    with pytest.raises(ValueError, match="8x8 images but the model is 32x32.*--resize"):
        ddpm.load_data(images, resolution=32)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ddpm.train(tiny_config(tmp_path / "run", images, batch_size=32))
    np.save(tmp_path / "floats.npy", np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="must be uint8 images"):
        ddpm.load_data(str(tmp_path / "floats.npy"))
    with pytest.raises(SystemExit, match="^error: .*no such file or folder"):  # one sentence, no traceback
        ddpm.main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])


def test_data_and_samples_files_that_cannot_serve_get_one_line(tmp_path, capsys):
    """A text file named .npy, a samples file with 0 or 1 images for FID, fewer samples than IS splits, and RGB
    data for a grayscale model in `evaluate.py nll` each get one line whose fix is a flag of that command."""
    (tmp_path / "text.npy").write_text("not an array")
    _one_line_error(capsys, ddpm.main, ["train", "--preset", "digits", "--data", str(tmp_path / "text.npy"),
                                        "--out", str(tmp_path / "run")],
                    r"cannot read .*text\.npy: it is not a numpy \.npy/\.npz file", "save the images")
    _one_line_error(capsys, evaluate.main, ["is", str(tmp_path / "text.npy")], "it is not a numpy .npy/.npz file")
    for n in (0, 1):
        np.savez(tmp_path / f"{n}.npz", arr_0=np.zeros((n, 8, 8, 3), np.uint8))
        _one_line_error(capsys, evaluate.main, ["fid", str(tmp_path / f"{n}.npz"), "--ref", str(tmp_path / "1.npz")],
                        rf"{n}\.npz holds {n} image\(s\)", r"FID .*needs at least 2", "pass more")
    np.savez(tmp_path / "20.npz", arr_0=np.zeros((20, 8, 8, 3), np.uint8))
    _one_line_error(capsys, evaluate.main, ["is", str(tmp_path / "20.npz"), "--splits", "50"],
                    r"holds 20 image\(s\)", "--splits 50 needs at least 50", "lower --splits or pass more samples")
    _tiny_model_checkpoint(tmp_path / "ckpt.pt")  # grayscale 8x8
    message = _one_line_error(capsys, evaluate.main, ["nll", "--checkpoint", str(tmp_path / "ckpt.pt"), "--data",
                                                      str(tmp_path / "20.npz"), "--out", str(tmp_path / "eval")],
                              "holds 8x8x3 images", "the model takes 8x8x1", "pass --data images of that shape")
    assert "--model" not in message and "--resize" not in message  # flags evaluate.py does not have


def test_a_color_image_among_grayscale_ones_is_named(tmp_path):
    """A folder of grayscale PNGs with one RGB file is refused for a grayscale model in one sentence naming that
    file; for an RGB model every image is read as RGB."""
    os.makedirs(tmp_path / "grey")
    for i in range(5):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "grey" / f"{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "grey" / "3b.png")
    with pytest.raises(ValueError, match=r"grey/3b.png in .*grey is in color, the other 5 grayscale, and the model "
                                         r"takes grayscale; convert or remove it$"):
        ddpm.load_data(str(tmp_path / "grey"), resolution=8, in_channels=1)
    assert ddpm.load_data(str(tmp_path / "grey"), in_channels=3).shape == (6, 8, 8, 3)


# ---- 12. Sampling: the loops' plumbing and sample_images ----


def test_sampling_loop_shapes_range_and_determinism():
    """p_sample_loop returns [N,C,H,W], the same for the same generator seed, and its progressive form ends where
    the loop ends."""
    d = diffusion_for(25)
    model = tiny_unet().eval()
    a = d.p_sample_loop(model, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    b = d.p_sample_loop(model, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 1, 8, 8) and torch.equal(a, b)
    steps = list(d.p_sample_loop_progressive(model, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)))
    assert [s["t"] for s in steps] == list(range(24, -1, -1))
    assert torch.equal(steps[-1]["sample"], a)
    # the loop runs under inference_mode; its output and the schedule tensors it cached still train
    assert a.is_inference() and d.calc_bpd_loop(model, a)["total_bpd"].is_inference()
    dk = diffusion_for(25, loss_type="kl")
    x = dk.p_sample_loop(model, (2, 1, 8, 8))
    loss = dk.training_losses(model.train(), x, torch.tensor([0, 12]))["loss"].sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad) and torch.isfinite(loss)


def test_progressive_frames_start_at_t_equals_T():
    """sample_images' Figure 6 frames: the x0 estimates at the given indices, from T-1 (t = T) down to 0: the first
    is the estimate from the pure noise x_T that the seed draws (Eq. 15, recomputed here), the last the sample."""
    # A gentle schedule, abar_T = 0.95^10 = 0.60: at a real schedule's abar_T ~ 1e-5 nearly every x0 estimate at
    # t = T is clipped to +-1, which would hide a wrong x_T, t or formula. O(1) weights: eps_hat far from 0.
    betas = np.full(10, 0.05)
    d, model = ddpm.GaussianDiffusion(betas=betas), busy(tiny_unet()).float()
    frames = ddpm.sample_images(model, d, 2, seed=3, frames={9, 8, 4, 0})
    assert frames.shape == (2, 4, 1, 8, 8)  # t = 9, 8, 4, 0
    assert_close(frames[:, -1], ddpm.sample_images(model, d, 2, seed=3), rtol=0, atol=0)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))  # sample_images' first draw
    with torch.no_grad():
        eps = model(x_T, torch.full((2,), 9)).double()
    abar_T = np.prod(1 - betas)
    x0_hat = ((x_T.double() - math.sqrt(1 - abar_T) * eps) / math.sqrt(abar_T)).clamp(-1, 1)
    assert (x0_hat.abs() < 1).double().mean() > 0.3  # mostly inside [-1, 1]: the values themselves are compared
    assert_close(frames[:, 0], x0_hat, rtol=0, atol=1e-5)  # float32 arithmetic on O(1) values against float64


def test_sample_batch_refuses_non_finite_samples(tmp_path, capsys):
    """A diverged model's NaN samples raise FloatingPointError (exit 1, one line, from every command) instead of
    becoming black uint8 pixels; the output folder the command made for them is gone with the failure."""
    model = tiny_unet()
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"\d+ non-finite pixels in a batch of 2 samples.*earlier checkpoint"):
        ddpm.sample_batch(model, diffusion_for(10, "cosine"), seed=0, i=0, n=2)
    _tiny_model_checkpoint(tmp_path / "c.pt")
    ckpt = ddpm.load_checkpoint(tmp_path / "c.pt")
    ckpt["ema"]["conv_out.bias"].fill_(float("nan"))
    ddpm.save_checkpoint(tmp_path / "nan.pt", ckpt)
    _one_line_error(capsys, ddpm.main, ["sample", "--checkpoint", str(tmp_path / "nan.pt"), "--n", "2", "--out",
                                        str(tmp_path / "s")], "non-finite pixels in a batch of 2 samples")
    assert not (tmp_path / "s").exists()


# ---- 13. Training (Algorithm 1): learning, its config, resume, the NaN guard, DDP, signals, bf16, compile ----


def test_a_tiny_model_overfits_one_batch():
    """Algorithm 1 on one fixed batch drives L_simple well below its initial value of ~1."""
    torch.manual_seed(0)
    d = diffusion_for(25)
    model = tiny_unet().to(memory_format=torch.channels_last)  # as train() runs it: oneDNN's layout, 1.3x faster
    x0 = (torch.rand(16, 1, 8, 8) * 2 - 1).contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, foreach=True)  # one kernel per op over all tensors: faster
    losses = []
    for step in range(100):
        t = torch.randint(0, 25, (16,))
        loss = d.training_losses(model, x0, t)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[:5]) > 0.8 and np.mean(losses[-20:]) < 0.35, (losses[:5], losses[-20:])


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 50), st.integers(1, 20), st.integers(0, 30))
def test_batch_indices_visit_every_example_once_per_epoch(n, batch_size, steps):
    """The data order is a chain of permutations: each epoch's n consecutive positions hold every index once."""
    order = np.concatenate([ddpm.batch_indices(s, batch_size, n, seed=3) for s in range(steps + n)])
    for epoch in range(len(order) // n):
        assert sorted(order[epoch * n:(epoch + 1) * n]) == list(range(n))


@pytest.mark.parametrize("section, field, value, message", [
    ("train", "log_every", 0, "--log-every .*at least 1"), ("train", "lr", -1.0, r"--lr must be in \(0, 1\]"),
    ("train", "ema_decay", 2.0, r"--ema-decay .*in \[0, 1\)"), ("train", "ema_decay", 1.0, r"--ema-decay .*in \[0, 1\), got 1.0"), ("train", "precision", "fp16", "unknown precision"),
    ("model", "ch", 0, "--model.ch .*at least 1"), ("model", "resolution", 0, "--model.resolution must be"),
    ("model", "ch_mult", (), "--model.ch-mult needs one positive"), ("model", "ch", 48, "multiple of 32"),
    ("diffusion", "beta_schedule", "linear", "--diffusion.beta-schedule linear --diffusion.num-timesteps 10: .*needs T >= 21"), ("diffusion", "loss_type", "kl2", "unknown loss_type")])
def test_train_checks_its_config_before_any_work(tmp_path, section, field, value, message):
    """train() called from Python checks the config as the command line does, before reading data or writing."""
    config = tiny_config(tmp_path / "run", str(tmp_path / "missing.npy"))
    setattr(getattr(config, section), field, value)  # the tiny config has T=10
    with pytest.raises(ValueError, match=message):
        ddpm.train(config)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0"], r"--lr must be in \(0, 1\], got 0\.0\b"),
    (["--lr=-1e-3"], r"--lr must be in \(0, 1\], got -0\.001\b"),
    (["--grad-clip", "0"], r"--grad-clip .*greater than 0.* 0\.0\b"),
    (["--model.attn-resolutions", "3"], r"--model.attn-resolutions 3 .*no level of this U-Net.*use some of 8,4\b")])
def test_values_that_would_train_nothing_or_silently_differ_are_refused(tmp_path, capsys, no_work, argv, message):
    """--lr 0 or below (also written '--lr=-1e-3'), --grad-clip 0, and an attention resolution that matches no level
    of the U-Net are refused before the data is read."""
    _one_line_error(capsys, ddpm.main, ["train", "--preset", "digits", "--out", str(tmp_path / "run"), *argv], message)
    assert not os.path.exists(tmp_path / "run")


def test_a_negative_lr_after_a_space_is_refused_by_argparse(tmp_path, capsys, no_work):
    """`--lr -1e-3` reads as a flag, so argparse exits 2 naming --lr (as for any flag missing its value), with no
    traceback and before the data is read; `--lr=-1e-3` reaches ddpm's own range check (the test above)."""
    with pytest.raises(SystemExit) as e:
        ddpm.main(["train", "--preset", "digits", "--out", str(tmp_path / "run"), "--lr", "-1e-3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert re.search(r"error: argument --lr: expected one argument$", err.strip()), err
    assert not os.path.exists(tmp_path / "run")


def test_resume_is_bit_for_bit(tmp_path, images, capsys, tiny_run):
    """Training 3 steps, then resuming to 6 (past a truncated newer checkpoint) equals 6 uninterrupted steps exactly."""
    whole = torch.load(os.path.join(tiny_run, "ckpt-0000006.pt"), weights_only=True)  # checkpointed at every step
    ddpm.train(tiny_config(tmp_path / "b", images, steps=3, ckpt_every=3))
    with open(tmp_path / "b" / "ckpt-0000005.pt", "wb") as f:  # a half-written file from a crash
        f.write(open(tmp_path / "b" / "ckpt-0000003.pt", "rb").read()[:1000])
    ddpm.train(tiny_config(tmp_path / "b", images, steps=6, ckpt_every=3), resume=True)
    assert re.search(r"ckpt-0000005.pt is an unreadable checkpoint \(.*\); renamed it to ckpt-0000005.pt.unreadable "
                     r"and skipping it", capsys.readouterr().out)
    resumed = torch.load(tmp_path / "b" / "ckpt-0000006.pt", weights_only=True)
    for key in ("model", "ema", "optimizer", "rng", "step"):
        assert states_equal(whole[key], resumed[key]), key


def test_resume_refuses_other_config_and_unasked_overwrite(tmp_path, images):
    """Resuming with another config names the differing fields; training into a used run directory needs --resume."""
    ddpm.train(tiny_config(tmp_path / "a", images, steps=1, ckpt_every=1))
    with pytest.raises(ValueError, match=r"model\.dropout: 0\.1 -> 0\.0.*train\.lr: 0\.001 -> 0\.002"):
        config = tiny_config(tmp_path / "a", images, steps=2, lr=2e-3)
        config.model.dropout = 0.0
        ddpm.train(config, resume=True)
    with pytest.raises(FileExistsError, match="--resume"):  # before the data is read: it does not exist
        ddpm.train(tiny_config(tmp_path / "a", str(tmp_path / "missing.npy"), steps=2))


def test_keep_ckpts_never_deletes_a_readable_checkpoint_for_an_unreadable_one(tmp_path, images, capsys):
    """Good checkpoints at steps 1 and 2 and a truncated one at step 5: --resume continues from step 2, moves the
    truncated file aside (not counted by --keep-ckpts 2), and keeps step 2 beside the new step 3."""
    run = ddpm.train(tiny_config(tmp_path / "run", images, steps=2, ckpt_every=1, keep_ckpts=2))
    with open(os.path.join(run, "ckpt-0000005.pt"), "wb") as f:
        f.write(open(os.path.join(run, "ckpt-0000002.pt"), "rb").read()[:1000])
    ddpm.train(tiny_config(tmp_path / "run", images, steps=3, ckpt_every=1, keep_ckpts=2), resume=True)
    assert ddpm.list_checkpoints(run) == [os.path.join(run, f"ckpt-000000{s}.pt") for s in (2, 3)]
    log = capsys.readouterr().out
    assert "renamed it to ckpt-0000005.pt.unreadable" in log and "resuming from" in log
    assert ddpm.load_checkpoint(os.path.join(run, "ckpt-0000002.pt"))["step"] == 2
    assert ddpm.load_checkpoint(os.path.join(run, "ckpt-0000003.pt"))["step"] == 3
    assert os.path.getsize(os.path.join(run, "ckpt-0000005.pt.unreadable")) == 1000  # kept, for a person to inspect


def test_nan_guard_keeps_last_good_checkpoint(tmp_path, images):
    """A diverging run stops with a clear error and writes no checkpoint after the last finite one."""
    config = tiny_config(tmp_path / "a", images, steps=20, warmup=0, lr=1.0, grad_clip=1e30, log_every=1,
                         ckpt_every=1, keep_ckpts=5)  # the largest --lr, unclipped: diverges in a few steps
    with pytest.raises(FloatingPointError, match="non-finite.*last good checkpoint"):
        ddpm.train(config)
    steps = [int(os.path.basename(p)[5:-3]) for p in ddpm.list_checkpoints(str(tmp_path / "a"))]
    assert steps and steps == list(range(1, len(steps) + 1)) and len(steps) < 20
    last = torch.load(ddpm.list_checkpoints(str(tmp_path / "a"))[-1], weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["model"].values())


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")])
def test_a_full_disk_while_a_checkpoint_is_written_names_the_good_one(tmp_path, images, capsys, monkeypatch, failure):
    """A write that fails (ENOSPC, or torch's own RuntimeError for it, which carries no errno: then the free space
    says it) stops the run with one sentence that says the disk is full and which checkpoint is still good; that
    checkpoint is whole and nothing half-written stays."""
    if isinstance(failure, RuntimeError):  # the disk torch could not write to has no space left
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100 << 30, 100 << 30, 0))
    save, calls = torch.save, []
    def full_disk(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"x" * 100)
            raise failure
        save(obj, f)
    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    _one_line_error(capsys, ddpm.main, ["train", *TINY_FLAGS, "--data", images, "--out", str(out), "--steps", "3",
                                        "--ckpt-every", "1", "--log-every", "1"],
                    f"could not write {out / 'ckpt-0000002.pt'}: the disk is full",
                    f"{out / 'ckpt-0000001.pt'} is still good", "free space, then rerun with --resume")
    assert ddpm.list_checkpoints(str(out)) == [str(out / "ckpt-0000001.pt")]
    assert ddpm.load_checkpoint(out / "ckpt-0000001.pt")["step"] == 1
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_ddp_two_gloo_processes_equal_one_process(tmp_path, images):
    """torchrun with 2 CPU processes (gloo) and the global batch split in two trains the same weights as one process
    (dropout off: each rank has its own dropout stream, so only with dropout 0 are the two runs the same function)."""
    flags = ["--data", images, "--steps", "3", "--log-every", "3", "--ckpt-every", "3", "--model.dropout", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             DDPM_PY, "train", *TINY_FLAGS, *flags, "--out", str(tmp_path / "ddp")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ddpm.main(["train", *TINY_FLAGS, *flags, "--out", str(tmp_path / "one")])  # while torchrun starts its processes
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "2 rank(s)" in stdout
    ddp, one = (torch.load(tmp_path / d / "ckpt-0000003.pt", weights_only=True) for d in ("ddp", "one"))
    assert len(ddp["rng"]["torch"]) == 2
    for key in ("model", "ema"):
        for name in one[key]:  # the ranks sum gradients in another order; where a gradient nearly cancels
            # (|g| ~ Adam's eps) Adam turns that float32 rounding into ~1% of an lr step: 3.7e-6 measured at lr 1e-3
            torch.testing.assert_close(ddp[key][name], one[key][name], rtol=1e-4, atol=2e-5)


def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path, images, capsys, monkeypatch):
    """SIGTERM during training writes a checkpoint at the current step and exits cleanly (`ddpm.py train` returns,
    status 0), and the previous handler is back afterwards."""
    out, previous, sent, log = tmp_path / "run", signal.getsignal(signal.SIGTERM), [], ddpm._log

    def log_then_sigterm(line):  # the signal arrives mid-run, from outside the loop, as `kill` sends it
        log(line)
        if line.startswith("step=") and not sent:
            # only while train's handler is in place: the default action would end this test run
            assert getattr(signal.getsignal(signal.SIGTERM), "__func__", None) is ddpm.StopOnSignal.request
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(ddpm, "_log", log_then_sigterm)
    assert ddpm.main(["train", *TINY_FLAGS, "--data", images, "--out", str(out), "--steps", "100000",
                      "--log-every", "1", "--ckpt-every", "100000"]) is None  # no SystemExit: status 0
    assert sent and "stopped by SIGTERM" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is previous
    (ckpt,) = ddpm.list_checkpoints(str(out))
    assert 1 <= torch.load(ckpt, weights_only=True)["step"] < 100000


def test_channels_last_keeps_weights_and_output():
    """The U-Net in channels_last, as ddpm.py runs it, keeps the state_dict key for key and the output to fp32
    rounding."""
    model, x, t = busy(tiny_unet(in_channels=3)).float(), torch.randn(3, 3, 8, 8), torch.tensor([0, 5, 999])
    keys, ref = list(model.state_dict()), model(x, t)
    fast = model.to(memory_format=torch.channels_last)
    assert list(fast.state_dict()) == keys
    # the same products summed in another order: fp32 rounding of O(1) activations
    torch.testing.assert_close(fast(x, t), ref, rtol=1e-4, atol=1e-4)


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_agrees_with_fp32():
    """Under autocast bf16 the U-Net output and the training loss agree with fp32 to bf16 precision."""
    model = busy(tiny_unet(in_channels=3)).float().to(memory_format=torch.channels_last)
    d = ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("linear", 100))
    x0, t, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 10, 50, 99]), torch.randn(4, 3, 8, 8)
    ref_out, ref_loss = model(x0, t), d.training_losses(model, x0, t, noise=noise)["loss"]
    with ddpm.autocast("cpu", "bf16"):
        out, loss = model(x0, t), d.training_losses(model, x0, t, noise=noise)["loss"]
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (0.4% per rounding); over ~20 layers that random-walks to ~2%
    assert _rel_err(out, ref_out) < 5e-2
    torch.testing.assert_close(loss, ref_loss, rtol=5e-2, atol=0)
    with pytest.raises(ValueError):
        ddpm.autocast("cpu", "fp16")


def test_bf16_training_step_runs_on_cpu(tmp_path, images, tiny_run):
    """--precision bf16 autocasts on CPU: each step's logged loss is the fp32 run's (same seed, batches, t and noise)
    to bf16 precision, yet not bit-identical to it, so the network did run in bf16; near 1 at initialisation."""
    losses = {}
    for precision, run in (("fp32", tiny_run), ("bf16", ddpm.train(tiny_config(tmp_path / "bf16", images, steps=4,
                                                                             log_every=1, ckpt_every=4, precision="bf16")))):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            losses[precision] = np.array([record["loss"] for record in map(json.loads, f) if "loss" in record])[:4]
    fp32, bf16 = losses["fp32"], losses["bf16"]
    assert len(fp32) == len(bf16) == 4 and np.isfinite(bf16).all()
    assert 0.5 < bf16[0] < 1.5  # L_simple at init is E[eps^2] = 1 (output layer ~0)
    # bf16 keeps 8 significant bits (0.4% per rounding) of the network's output, which is ~0 at init (the first two
    # updates: lr 0, then the loss at the initial weights) and O(1e-2) after two real updates, while the loss is
    # dominated by eps^2 (fp32): bf16 moves it by ~1e-5 relative (measured 5e-6 at step 4); a wrong cast or scale, O(1)
    np.testing.assert_allclose(bf16, fp32, rtol=1e-4, atol=0)
    assert not np.array_equal(bf16, fp32)  # with --precision ignored the two runs would be bit for bit the same


def test_compiled_agrees_with_eager():
    """The U-Net compiled (as train --compile does) leaves the module's state_dict keys as they were,
    and its output and gradients agree with eager."""
    model = busy(tiny_unet(in_channels=3)).float().to(memory_format=torch.channels_last)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 999])
    ref = model(x, t)
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    keys = list(model.state_dict())
    # Inductor's C++ code generation takes minutes for even this model on 2 cores (measured 130 s forward +
    # 100 s backward under load), so CI checks graph capture and AOTAutograd; bench.py --compile runs inductor.
    compiled = torch.compile(model, backend="aot_eager")
    assert list(model.state_dict()) == keys and compiled._orig_mod is model
    out = compiled(x, t)
    out.square().mean().backward()
    # the same kernels run in the same order once captured: fp32 rounding at most
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_a_resume_with_nothing_to_do_says_so_and_changes_nothing(tmp_path, images, capsys):
    """--resume with a --steps the run has reached (1 or 2 for a run at step 2) says so in one line and trains
    nothing: every file of the run, config.json and metrics.jsonl included, keeps its bytes."""
    out = tmp_path / "run"
    argv = ["train", *TINY_FLAGS, "--data", images, "--out", str(out), "--steps", "2", "--log-every", "1",
            "--warmup", "5"]
    ddpm.main(argv)
    assert "note: --warmup 5 is longer than --steps 2, so the lr stays below --lr 0.002 for the whole run" in \
        capsys.readouterr().out  # allowed (a --resume may go on), and said
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    for steps in ("1", "2"):
        capsys.readouterr()
        ddpm.main([*argv, "--resume", "--steps", steps])
        assert capsys.readouterr().out.splitlines() == [
            f"resuming from {out / 'ckpt-0000002.pt'}",
            f"{out} is already at step 2, which --steps {steps} does not pass: nothing to do; pass a larger --steps "
            f"to train on"]
        assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_a_model_too_big_for_memory_is_refused_in_one_sentence(tmp_path, capsys, no_work, monkeypatch):
    """--model.ch 4194304 (a U-Net of 1.2e16 parameters) or 10^12 (past int64) is refused before any data is read, in
    one line with the memory it needs and what to lower: its size is read on torch's meta device, which takes no
    memory. Memory that runs out later (a batch too big) ends in one line with the size asked for, not a traceback."""
    for ch, size in ((2 ** 22, r"11,945,095,116,881,921 parameters .* need 177,995,787.8 GiB"), (10 ** 12, "over 2\\^63 parameters"),
                     (10 ** 20, r"over 2\^63 parameters .* need more than 2\^63 bytes")):  # 10^20: past int64 too
        _one_line_error(capsys, ddpm.main, ["train", "--preset", "digits", "--model.ch", str(ch), "--out",
                                            str(tmp_path / "run")],
                        rf"^error: a U-Net of {size}", r"\(fp32 weights, EMA and Adam's two moments\) need .* of "
                        r"memory, more than this machine's [\d,.]+ GiB; lower --model.ch, --model.ch-mult or "
                        r"--model.num-res-blocks$")
    assert not (tmp_path / "run").exists()
    def out_of_memory(args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. "
                           "Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(ddpm, "sample_checkpoint", out_of_memory)
    _one_line_error(capsys, ddpm.main, ["sample", "--checkpoint", "c.pt"], r"^error: out of memory: the model or a "
                    r"batch asked for 8.0 GiB; lower --batch-size, or the model's size$")


# ---- 14. Configuration and the command line ----


def test_presets_round_trip_and_reject_unknown_fields():
    """Every preset survives to_dict/from_dict; unknown presets, sections and fields raise with valid names."""
    for name in ddpm.PRESETS:
        c = ddpm.get_preset(name)
        assert ddpm.Config.from_dict(c.to_dict()) == c and c.preset == name
    with pytest.raises(ValueError, match="digits"):
        ddpm.get_preset("mnist")
    with pytest.raises(ValueError, match="ch_mult"):
        ddpm.Config.from_dict({"model": {"chmult": [1]}})
    with pytest.raises(ValueError, match="section"):
        ddpm.Config.from_dict({"optim": {}})
    c = ddpm.get_preset("cifar10")
    assert (c.diffusion.model_var_type, c.diffusion.loss_type, c.train.ema_decay, c.model.dropout) == \
           ("fixedlarge", "mse", 0.9999, 0.1)
    assert ddpm.get_preset("celebahq256").diffusion.model_var_type == "fixedsmall"


def test_cli_rejects_unknown_flags_and_wrong_types(capsys):
    """Unknown flags, abbreviations, wrong types and out-of-range values stop before any work."""
    for argv in (["train", "--bogus", "1"], ["train", "--batch-size", "abc"], ["train", "--model.ch-mult", "1,x"],
                 ["train", "--precision", "fp16"], ["train", "--step", "5"], ["train", "--preset", "nope"]):
        with pytest.raises(SystemExit) as e:
            ddpm.main(argv)
        assert e.value.code == 2, argv
    with pytest.raises(SystemExit, match="--batch-size .*at least 1"):
        ddpm.main(["train", "--batch-size", "0"])


def test_cli_flags_reach_every_config_field():
    """Every field of every config section has a flag, and flags override the preset with the right types."""
    parser = ddpm.argparse.ArgumentParser()
    ddpm.add_config_flags(parser, "cifar10")
    dests = {a.dest for a in parser._actions} - {"help"}
    fields = {f"{s}.{f.name}" for s in ("model", "diffusion", "train")
              for f in dataclasses.fields(type(getattr(ddpm.Config(), s)))}
    assert dests == fields
    args = parser.parse_args(["--lr", "3e-4", "--model.ch_mult", "1,2", "--no-randflip",
                              "--diffusion.num-timesteps", "50"])
    args.preset = "cifar10"
    config = ddpm.config_from_args(args)
    assert (config.train.lr, config.model.ch_mult, config.train.randflip, config.diffusion.num_timesteps) == \
        (3e-4, (1, 2), False, 50)


def test_train_and_sample_cli_smoke(tmp_path, images, capsys):
    """`train` writes config.json, metrics.jsonl, a grid and a weights_only checkpoint; `sample` the npz and PNGs."""
    out = tmp_path / "run"
    ddpm.main(["train", *TINY_FLAGS, "--data", images, "--out", str(out), "--steps", "2", "--log-every", "1",
               "--sample-every", "2", "--ckpt-every", "2"])
    log = capsys.readouterr().out
    assert "parameters" in log and "step=2 loss=" in log and "loss_q3=" in log and "img/s=" in log
    assert sorted(os.listdir(out)) == [".lock", "ckpt-0000002.pt", "config.json", "metrics.jsonl", "samples-0000002.png"]
    ckpt = torch.load(out / "ckpt-0000002.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["model"]["ch"] == 32
    assert {"model", "ema", "optimizer", "rng"} <= set(ckpt)
    ddpm.main(["sample", "--checkpoint", str(out / "ckpt-0000002.pt"), "--n", "5", "--batch-size", "2"])
    samples = np.load(out / "ckpt-0000002-samples" / "samples_5x8x8x3.npz")["arr_0"]
    assert samples.shape == (5, 8, 8, 3) and samples.dtype == np.uint8
    assert sorted(os.listdir(out / "ckpt-0000002-samples")) == [".lock", "samples_5x8x8x3.npz", "samples_5x8x8x3.png"]
    ddpm.main(["sample", "--checkpoint", str(out / "ckpt-0000002.pt"), "--n", "2", "--progressive"])
    # min(T, 20) = 10 columns and 2 rows of 8 px images with 1 px gaps, enlarged 4x
    assert Image.open(out / "ckpt-0000002-samples" / "progressive.png").size == (10 * 36 - 4, 2 * 36 - 4)


def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, no_work):
    """--out in /proc or /sys, under a file, or naming a file where a folder is meant (and the reverse for
    fid-stats) is refused in one sentence before a model or data is loaded (root ignores chmod, so no chmod case)."""
    (tmp_path / "file").write_text("x")
    os.makedirs(tmp_path / "folder")
    sample = ["sample", "--checkpoint", str(tmp_path / "ckpt.pt"), "--out"]
    for out, why in (("/proc/ddpm-out", r"cannot write --out /proc/ddpm-out \(/proc: "),
                     ("/sys/ddpm-out", r"cannot write --out /sys/ddpm-out \(/sys: "),
                     (str(tmp_path / "file" / "sub"), r"\(.*file: Not a directory\)"),
                     (str(tmp_path / "file"), r"is a file, where a folder is meant")):
        _one_line_error(capsys, ddpm.main, [*sample, out], why, "pass (an|another) --out")
        _one_line_error(capsys, ddpm.main, ["train", "--data", "digits", "--out", out], why)
    _one_line_error(capsys, evaluate.main, ["nll", "--checkpoint", "c.pt", "--out", str(tmp_path / "file")],
                    "is a file, where a folder is meant", "pass another --out")
    _one_line_error(capsys, evaluate.main, ["fid-stats", "--out", str(tmp_path / "folder")],
                    "is a folder, where a file is meant", "pass another --out")
    _one_line_error(capsys, evaluate.main, ["fid-stats", "--out", "/proc/stats.npz"], "cannot write --out")
    assert sorted(os.listdir(tmp_path)) == ["file", "folder"]  # nothing made


def test_the_device_is_checked_at_start(capsys, no_work):
    """--device foo, and a CUDA device this machine does not have, are refused before the model is loaded."""
    for device in ("foo", "cuda:99") + (() if torch.cuda.is_available() else ("cuda",)):
        message = _one_line_error(capsys, ddpm.main, ["sample", "--checkpoint", "c.pt", "--device", device],
                                  f"--device '{device}' is not a device of this machine", "use cpu, or cuda")
        assert ("no CUDA GPU" in message) == (device.startswith("cuda") and not torch.cuda.is_available())
        _one_line_error(capsys, evaluate.main, ["nll", "--checkpoint", "c.pt", "--device", device], "use cpu")


SEED_RANGE = r"--seed must be in \[0, 4294967295\], got "
MODEL = ["--checkpoint", "c.pt"]


@pytest.mark.parametrize("main, argv, phrase", [
    (ddpm.main, ["sample", *MODEL, "--n", "0"], "--n must be at least 1, got 0"),
    (ddpm.main, ["sample", *MODEL, "--batch-size", "-3"], "--batch-size must be at least 1, got -3"),
    (ddpm.main, ["sample", *MODEL, "--seed", "-1"], SEED_RANGE + "-1"),
    (ddpm.main, ["sample", *MODEL, "--seed", str(2 ** 32)], SEED_RANGE + "4294967296"),
    (ddpm.main, ["sample", *MODEL, "--ddim-eta", "1.5"], r"--ddim-eta must be in \[0, 1\], got 1.5"),
    (ddpm.main, ["sample", *MODEL, "--ddim-eta", "nan"], r"--ddim-eta must be in \[0, 1\], got nan"),
    (ddpm.main, ["train", "--seed", "-1"], SEED_RANGE + "-1"),
    (ddpm.main, ["train", "--lr", "inf"], r"--lr must be in \(0, 1\], got inf"),
    (ddpm.main, ["train", "--lr", "2"], r"--lr must be in \(0, 1\], got 2.0"),
    (ddpm.main, ["train", "--model.num-res-blocks", str(10 ** 12)], r"--model.num-res-blocks must be in \[1, 100\]"),
    (ddpm.main, ["train", "--model.resolution", str(10 ** 12)], r"--model.resolution must be in \[1, 16384\]"),
    (ddpm.main, ["train", "--diffusion.num-timesteps", str(10 ** 12)], r"--diffusion.num-timesteps must be in \[1, "
                                                                         r"1000000\]"),
    (experiments.main, ["table2", "--jobs", str(10 ** 12)], r"--jobs must be in \[1, 21\]"),
    (experiments.main, ["table2", "--timesteps", str(10 ** 12)], r"--timesteps must be in \[1, 1000000\]"),
    (evaluate.main, ["digits-score", *MODEL, "--bootstrap", str(10 ** 12)], r"--bootstrap must be in \[2, 100000\]"),
    (ddpm.main, ["train", "--diffusion.num-timesteps", "20"], "--diffusion.num-timesteps 20: .*needs T >= 21"),
    (evaluate.main, ["sample", *MODEL, "--ddim-eta", "-0.1"], r"--ddim-eta must be in \[0, 1\], got -0.1"),
    (evaluate.main, ["sample", *MODEL, "--seed", "-2"], SEED_RANGE + "-2"),
    (evaluate.main, ["nll", *MODEL, "--max-examples", "0"], "--max-examples must be at least 1, got 0"),
    (evaluate.main, ["nll", *MODEL, "--seed", "-1"], SEED_RANGE + "-1"),
    (evaluate.main, ["figures", *MODEL, "--frames", "0"], "--frames must be at least 1, got 0"),
    (evaluate.main, ["figures", *MODEL, "--samples-per-latent", "0"], "--samples-per-latent must be at least 1"),
    (evaluate.main, ["figures", *MODEL, "--interp-t", "0"], "--interp-t must be at least 1, got 0"),
    (evaluate.main, ["digits-score", *MODEL, "--bootstrap", "-1"], r"--bootstrap must be in \[2, 100000\], got -1"),
    (evaluate.main, ["digits-score", *MODEL, "--bootstrap", "1"], r"--bootstrap must be in \[2, 100000\], got 1"),
    (evaluate.main, ["digits-score", *MODEL, "--nll-images", "-5"], r"--nll-images must be in \[1, 297\]"),
    (evaluate.main, ["digits-score", *MODEL, "--nll-images", "5000"], r"--nll-images must be in \[1, 297\]"),
    (evaluate.main, ["is", "x.npz", "--splits", "0"], "--splits must be at least 1, got 0"),
    (evaluate.main, ["fid-stats", "--max-examples", "-1"], "--max-examples must be at least 1, got -1"),
    (experiments.main, ["table2", "--steps", "1"], "--steps must be at least 2, got 1"),
    (experiments.main, ["table2", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    (experiments.main, ["table2", "--seed", "-1"], SEED_RANGE + "-1"),
    (experiments.main, ["table2", "--timesteps", "-3"], r"--timesteps must be in \[1, 1000000\], got -3"),
    (experiments.main, ["steps", *MODEL, "--bootstrap", "0"], r"--bootstrap must be in \[2, 100000\], got 0"),
    (experiments.main, ["steps", *MODEL, "--n", "0"], "--n must be at least 1, got 0")])
def test_every_numeric_flag_is_range_checked_before_any_work(tmp_path, capsys, no_work, main, argv, phrase):
    """Each command's numeric flags at 0, below 0, too large or NaN: one line naming the flag the user typed, its
    range and the value, before a model or data is read and before anything is written."""
    out = {"is": [], "fid-stats": ["--out", str(tmp_path / "out.npz")]}.get(argv[0], ["--out", str(tmp_path / "out")])
    _one_line_error(capsys, main, [*argv, *out], phrase)
    assert os.listdir(tmp_path) == []


def test_messages_name_the_real_cause_and_a_fix_that_can_be_typed(tmp_path, capsys):
    """A file-size limit (ulimit -f) is not called a full disk; --respacing 0 is not told to use fewer steps; plain
    weights of a model that is no released one are not told to pass a flag the command lacks; and `train --help`
    shows the chosen preset's defaults and what 0 means."""
    import resource
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, limits[1]))  # Python ignores SIGXFSZ: the write fails
    try:
        with pytest.raises(OSError, match=r"could not write .*big.pt: this process may not write files over 65536 "
                                          r"bytes \(ulimit -f\); raise the limit and rerun"):
            ddpm.save_checkpoint(tmp_path / "big.pt", {"w": torch.zeros(1 << 15)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert os.listdir(tmp_path) == []
    model, _, _ = _tiny_model_checkpoint(tmp_path / "c.pt")
    message = _one_line_error(capsys, ddpm.main, ["sample", "--checkpoint", str(tmp_path / "c.pt"), "--respacing",
                                                  "0", "--out", str(tmp_path / "s")],
                              r"cannot take 0 steps from a section of 25 steps \(T=25\); each section takes 1 to 25$")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    message = _one_line_error(capsys, evaluate.main, ["sample", "--weights", str(tmp_path / "plain.pt"), "--out",
                                                      str(tmp_path / "s")],
                              r"ch_mult \(1, 2\), neither .* a checkpoint of ddpm.py train goes with --checkpoint")
    assert "pass preset=" not in message and not (tmp_path / "s").exists()
    with pytest.raises(SystemExit) as e:
        ddpm.main(["train", "--preset", "digits", "--help"])
    shown = capsys.readouterr().out
    assert e.value.code == 0 and "defaults of --preset digits" in shown
    for flag, text in (("--steps INT", "default: 1000; 0: until stopped"), ("--lr FLOAT", "default: 0.002"),
                       ("--out STR", "default: runs/digits"), ("--model.ch INT", "default: 32")):
        assert re.search(rf"{re.escape(flag)}\s+{re.escape(text)}", shown), flag


# ---- 15. evaluate.py sample: resumable chunks, their records, Ctrl-C ----


def _sample_cli(ckpt, out, *flags):
    """`evaluate.py sample` of 3 images in chunks of 2 from `ckpt` into `out`; the npz it writes, loaded."""
    evaluate.main(["sample", "--checkpoint", str(ckpt), "--n", "3", "--batch-size", "2", "--out", str(out), *flags])
    return np.load(os.path.join(out, "samples_3x8x8x1.npz"))["arr_0"]  # the digits preset: 1 channel


def test_sample_chunks_resume(tmp_path, images, tiny_run):
    """An `evaluate.py sample` run that finds chunks from an interrupted run reuses them and gives the same npz as a
    fresh run, and as `ddpm.py sample` with the same flags."""
    ckpt = os.path.join(tiny_run, "ckpt-0000001.pt")
    args = ["sample", "--checkpoint", ckpt, "--n", "3", "--batch-size", "2", "--out"]
    evaluate.main([*args, str(tmp_path / "fresh")])
    model, diffusion, _ = ddpm.load_model(ckpt)
    seed = int(np.random.SeedSequence([0, 0]).generate_state(1)[0])  # chunk 0 of --seed 0
    chunk = ddpm.unnormalize_data(ddpm.sample_images(model, diffusion, 2, seed))
    os.makedirs(tmp_path / "resumed")
    shutil.copy(tmp_path / "fresh" / "settings.json", tmp_path / "resumed" / "settings.json")
    np.savez(tmp_path / "resumed" / "chunk-seed0-batch2-00000.npz", arr_0=chunk)
    evaluate.main([*args, str(tmp_path / "resumed")])
    ddpm.main([*args, str(tmp_path / "plain")])
    fresh, resumed, plain = (np.load(tmp_path / d / "samples_3x8x8x3.npz")["arr_0"] for d in ("fresh", "resumed", "plain"))
    assert np.array_equal(fresh, resumed) and np.array_equal(fresh, plain)
    # the last chunk draws only the remainder; one left by a run with another --n is drawn again at its size
    last = ddpm.unnormalize_data(ddpm.sample_images(model, diffusion, 1, seed))
    np.savez(tmp_path / "resumed" / "chunk-seed0-batch2-00001.npz", arr_0=last)
    evaluate.main([*args[:4], "4", *args[5:], str(tmp_path / "resumed")])
    assert np.load(tmp_path / "resumed" / "samples_4x8x8x3.npz")["arr_0"].shape == (4, 8, 8, 3)


def test_sample_never_mixes_chunks_of_other_settings(tmp_path, one_thread, monkeypatch, capsys):
    """A run interrupted after its first chunk, rerun with another --respacing, --ddim-eta or --seed... into the same
    --out, is refused before any sampling and leaves the chunk; the original settings then finish it exactly."""
    _tiny_model_checkpoint(tmp_path / "ckpt.pt")
    fresh = _sample_cli(tmp_path / "ckpt.pt", tmp_path / "fresh")
    calls, sample_images = [], ddpm.sample_images
    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample_images(*a, **kw)
    monkeypatch.setattr(ddpm, "sample_images", interrupted)
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one line that says what is kept and how to continue
        _sample_cli(tmp_path / "ckpt.pt", tmp_path / "out")
    assert e.value.code == 130
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith("interrupted: ") and f"1 of 2 chunks are kept in {tmp_path / 'out'}" in last_line
    assert "rerun the same command" in last_line
    monkeypatch.setattr(ddpm, "sample_images", sample_images)
    assert sorted(os.listdir(tmp_path / "out")) == [".lock", "chunk-seed0-batch2-00000.npz", "settings.json"]
    chunk = np.load(tmp_path / "out" / "chunk-seed0-batch2-00000.npz")["arr_0"]
    for flags, setting in ((["--respacing", "10"], "--respacing"), (["--ddim-eta", "0"], "--ddim-eta")):
        calls.clear()
        monkeypatch.setattr(ddpm, "sample_images", interrupted)  # a refusal draws nothing
        with pytest.raises(SystemExit, match=f"^error: .*out holds samples made with other {setting} "
                                             f".*use another --out"):
            _sample_cli(tmp_path / "ckpt.pt", tmp_path / "out", *flags)
        assert calls == [] and sorted(os.listdir(tmp_path / "out")) == [".lock", "chunk-seed0-batch2-00000.npz", "settings.json"]
        assert np.array_equal(np.load(tmp_path / "out" / "chunk-seed0-batch2-00000.npz")["arr_0"], chunk)
    monkeypatch.setattr(ddpm, "sample_images", sample_images)
    other = ddpm.load_checkpoint(tmp_path / "ckpt.pt")  # the same config with other weights, at the same path
    other["ema"] = {k: v + 0.01 for k, v in other["ema"].items()}
    ddpm.save_checkpoint(tmp_path / "other.pt", other)
    with pytest.raises(SystemExit, match=r"holds samples made with other weights .*ckpt.pt sha256 [0-9a-f]{12}, now .*other.pt"):
        _sample_cli(tmp_path / "other.pt", tmp_path / "out")
    assert np.array_equal(_sample_cli(tmp_path / "ckpt.pt", tmp_path / "out"), fresh)  # the chunk reused, the rest drawn
    # the record is the weights' content, not their path: a copy at another path reuses the file
    assert np.array_equal(np.load(tmp_path / "out" / "samples_3x8x8x1.npz")["arr_0"], fresh)


def test_sample_refuses_a_stale_final_file(tmp_path, one_thread, capsys):
    """A finished samples_*.npz from other weights or another --respacing is refused (and kept) rather than reported
    as done; from the same weights (even at another path) and settings it is done."""
    _tiny_model_checkpoint(tmp_path / "a.pt", seed=0)
    _tiny_model_checkpoint(tmp_path / "b.pt", seed=1)
    made = _sample_cli(tmp_path / "a.pt", tmp_path / "out")
    stamp = os.stat(tmp_path / "out" / "samples_3x8x8x1.npz").st_mtime_ns
    for ckpt, flags, setting in (("b.pt", [], "weights"), ("a.pt", ["--respacing", "10"], "--respacing"),
                                 ("a.pt", ["--seed", "1"], "--seed"), ("a.pt", ["--batch-size", "3"], "--batch-size")):
        with pytest.raises(SystemExit, match=f"^error: .*out holds samples made with other {setting} "):
            _sample_cli(tmp_path / ckpt, tmp_path / "out", *flags)  # a later --batch-size overrides the first
    assert os.stat(tmp_path / "out" / "samples_3x8x8x1.npz").st_mtime_ns == stamp  # kept as it was
    shutil.copy(tmp_path / "a.pt", tmp_path / "copy.pt")
    capsys.readouterr()
    assert np.array_equal(_sample_cli(tmp_path / "copy.pt", tmp_path / "out"), made)
    assert "already exists with these settings; nothing to do" in capsys.readouterr().out
    os.remove(tmp_path / "out" / "settings.json")  # a file with no record (another tool's): not taken as done
    np.savez(tmp_path / "out" / "samples_3x8x8x1.npz", arr_0=made)
    with pytest.raises(SystemExit, match="samples_3x8x8x1.npz exists but records no settings, so it may come from "
                                         "another model; delete it, or pass another --out"):
        _sample_cli(tmp_path / "a.pt", tmp_path / "out")


def test_no_sample_command_writes_over_samples_of_other_settings(tmp_path, capsys):
    """One rule for both sample commands: `ddpm.py sample` into a folder that holds `evaluate.py sample`'s samples of
    other settings (--seed 1) is refused in one sentence naming --seed, before any sampling, and the file stays; with
    the same settings each finds the other's file done. Figure 6's PNG records its settings and follows the same rule.
    A result file that cannot be read is set aside as *.unreadable, with one line, and made again."""
    _tiny_model_checkpoint(tmp_path / "a.pt")
    made, out = _sample_cli(tmp_path / "a.pt", tmp_path / "out"), tmp_path / "out"
    stamp = os.stat(out / "samples_3x8x8x1.npz").st_mtime_ns
    plain = ["sample", "--checkpoint", str(tmp_path / "a.pt"), "--n", "3", "--batch-size", "2", "--out", str(out),
             "--device", "cpu"]
    _one_line_error(capsys, ddpm.main, [*plain, "--seed", "1"], r"samples_3x8x8x1.npz holds samples made with other "
                    r"--seed \(0, now 1\); pass another --out, or delete it to make it again$")
    ddpm.main(plain)
    assert "already exists with these settings; nothing to do" in capsys.readouterr().out
    assert os.stat(out / "samples_3x8x8x1.npz").st_mtime_ns == stamp
    ddpm.main([*plain, "--progressive"])
    _one_line_error(capsys, evaluate.main, [*plain, "--progressive", "--respacing", "5"],
                    r"progressive.png holds samples made with other --respacing \('', now '5'\)")
    with Image.open(out / "progressive.png") as image:
        assert json.loads(image.info["ddpm"])["seed"] == 0 and json.loads(image.info["ddpm"])["respacing"] == ""
    (out / "samples_3x8x8x1.npz").write_bytes(b"")  # a copy cut short
    ddpm.main(plain)
    assert "samples_3x8x8x1.npz cannot be read (" in capsys.readouterr().out
    assert np.array_equal(np.load(out / "samples_3x8x8x1.npz")["arr_0"], made)
    assert os.path.getsize(out / "samples_3x8x8x1.npz.unreadable") == 0


def test_ctrl_c_during_sample_says_what_is_kept(tmp_path, capsys, monkeypatch):
    """A real SIGINT (Python's own handler, as Ctrl-C sends it) to `evaluate.py sample` after its first chunk: status
    130, one line saying which chunks are kept and that a rerun continues, and no traceback
    (test_sample_never_mixes_... shows the rerun continues exactly)."""
    _tiny_model_checkpoint(tmp_path / "ckpt.pt")
    save = ddpm.atomic_savez

    def save_then_sigint(path, **arrays):  # the signal lands mid-run, after the first chunk is on disk
        save(path, **arrays)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # so it raises KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(ddpm, "atomic_savez", save_then_sigint)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["sample", "--checkpoint", str(tmp_path / "ckpt.pt"), "--n", "1000", "--batch-size", "1",
                       "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 130, err
    kept = sorted(k for k in os.listdir(tmp_path / "out") if k.startswith("chunk-seed0-batch1-"))
    (line,) = [line for line in err.splitlines() if "interrupted" in line]
    assert "Traceback" not in err and line.startswith("interrupted: ")
    assert f"{len(kept)} of 1000 chunks are kept in {tmp_path / 'out'}" in line and "rerun the same command" in line
    assert kept == ["chunk-seed0-batch1-00000.npz"]  # the first chunk, whole; the signal came before the second
    assert sorted(os.listdir(tmp_path / "out")) == [".lock"] + kept + ["settings.json"]


# ---- 16. The NLL: ddpm.dataset_bpd through evaluate.py nll, rate and distortion, Table 4, resume ----


def test_nll_agrees_with_calc_bpd_loop(tmp_path):
    """evaluate_nll equals calc_bpd_loop called directly with batch b's generator seeded seed + b, and its
    rate + distortion + prior parts add up to the total bound for every example."""
    model, diffusion, _ = _tiny_model_checkpoint(str(tmp_path / "ckpt.pt"))
    x = ddpm.normalize_data(ddpm.load_data("digits", "test")[:5])
    got = evaluate.evaluate_nll(model, diffusion, x, batch_size=3, seed=7, progress=False)
    for b, sl in enumerate((slice(0, 3), slice(3, 5))):
        want = diffusion.calc_bpd_loop(model, x[sl], generator=torch.Generator().manual_seed(7 + b))
        for k in evaluate.NLL_KEYS:
            assert np.array_equal(got[k][sl], want[k].numpy()), k  # the same computation, bit for bit
    s = evaluate.nll_summary(got)
    # float64 sums of float32 terms: round-off ~1e-6 relative
    assert s["rate_bpd"][0] + s["distortion_bpd"][0] == pytest.approx(s["total_bpd"][0], rel=1e-5)
    per_example = got["vb"][:, 1:].sum(1) + got["prior_bpd"] + got["vb"][:, 0]
    assert np.allclose(per_example, got["total_bpd"], rtol=1e-5)
    # The rate-distortion curve against a loop over paper times t = 1..T (independent of the cumsum).
    T = diffusion.num_timesteps
    rate, rmse = evaluate.rate_distortion(got["vb"], got["prior_bpd"], got["xstart_mse"])
    for t in (1, 2, T // 2, T):
        loop = np.mean([got["prior_bpd"][n] + sum(got["vb"][n, s] for s in range(t, T)) for n in range(5)])
        assert rate[t - 1] == pytest.approx(loop, rel=1e-6)
        assert rmse[t - 1] == pytest.approx(127.5 * np.sqrt(got["xstart_mse"][:, t - 1].mean()), rel=1e-6)
    assert rate[0] == pytest.approx(s["rate_bpd"][0], rel=1e-6) and rmse[0] == pytest.approx(s["xstart_rmse"])
    rows = evaluate.table4_rows(rate, rmse)
    assert [r[0] for r in rows] == [25, 23, 20, 18, 15, 13, 10, 8, 5, 3] and rows[0][1] == 1 and rows[-1][1] == 23


def test_nll_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """An evaluation interrupted after one batch and rerun gives the same arrays as an uninterrupted one,
    recomputing only the missing batches; a rerun with another batch size refuses to mix results."""
    model, diffusion, _ = _tiny_model_checkpoint(str(tmp_path / "ckpt.pt"))
    x = ddpm.normalize_data(ddpm.load_data("digits", "test")[:5])
    full = evaluate.evaluate_nll(model, diffusion, x, batch_size=2, seed=3, out_dir=str(tmp_path / "a"), progress=False)

    calls, real = [], diffusion.calc_bpd_loop

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and not resuming:
            raise RuntimeError("simulated crash")  # a kill or Ctrl-C mid-evaluation
        return real(*args, **kwargs)
    resuming = False
    monkeypatch.setattr(diffusion, "calc_bpd_loop", interrupted)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate.evaluate_nll(model, diffusion, x, batch_size=2, seed=3, out_dir=str(tmp_path / "b"), progress=False)
    assert sorted(f for f in os.listdir(tmp_path / "b") if f.startswith("batch")) == ["batch-00000.npz"]
    calls.clear()
    resuming = True
    resumed = evaluate.evaluate_nll(model, diffusion, x, batch_size=2, seed=3, out_dir=str(tmp_path / "b"),
                                    progress=False)
    assert len(calls) == 2  # batches 1 and 2 only; batch 0 came from disk
    for k in evaluate.NLL_KEYS:
        assert np.array_equal(full[k], resumed[k]), k
    with pytest.raises(ValueError, match="holds batches made with other --batch-size .*use another --out"):
        evaluate.evaluate_nll(model, diffusion, x, batch_size=3, seed=3, out_dir=str(tmp_path / "b"), progress=False)
    # two chains of one length: the same number of steps, other timesteps, so other bounds
    five, ddim_five = ddpm.respace(diffusion, "5"), ddpm.respace(diffusion, "ddim5")
    assert ddim_five.num_timesteps == five.num_timesteps == 5
    evaluate.evaluate_nll(model, five, x, batch_size=2, seed=3, out_dir=str(tmp_path / "c"), progress=False)
    with pytest.raises(ValueError, match="holds batches made with other --respacing .*use another --out"):
        evaluate.evaluate_nll(model, ddim_five, x, batch_size=2, seed=3, out_dir=str(tmp_path / "c"), progress=False)


def test_resume_folder_refuses_other_settings_and_sets_aside_unreadable_pieces(tmp_path, capsys):
    """A ResumeFolder reads back the pieces a run wrote; a rerun with other settings is refused in one sentence naming
    the first differing setting's flag and the fix; a truncated or empty piece is renamed *.unreadable with one
    printed line and reported missing (so it is made again), never raised; a piece in a folder that records no
    settings is refused, not taken."""
    settings, flags = {"seed": 0, "batch_size": 2}, {"seed": "--seed", "batch_size": "--batch-size"}
    folder = evaluate.ResumeFolder(tmp_path / "out", settings, flags, "batches")
    assert folder.load("a.npz") is None and os.listdir(tmp_path / "out") == [".lock"]  # held; nothing else written
    done = folder.pieces({0: "a.npz", 1: "b.json"})
    done[0], done[1] = {"x": np.arange(3)}, {"ok": True}
    again = evaluate.ResumeFolder(tmp_path / "out", settings, flags, "batches")
    read = again.pieces({0: "a.npz", 1: "b.json", 2: "c.npz"})
    assert sorted(read) == [0, 1] and np.array_equal(read[0]["x"], np.arange(3)) and read[1] == {"ok": True}
    for other, message in (({"seed": 1, "batch_size": 3}, r"other --seed \(0, now 1\)"),
                           ({"seed": 0, "batch_size": 3}, r"other --batch-size \(2, now 3\)")):
        with pytest.raises(ValueError, match=rf"out holds batches made with {message}; rerun with those settings to "
                                             rf"continue, or use another --out$"):
            evaluate.ResumeFolder(tmp_path / "out", other, flags, "batches")
    data = (tmp_path / "out" / "a.npz").read_bytes()
    (tmp_path / "out" / "a.npz").write_bytes(data[:len(data) // 2])  # a copy cut short: zipfile.BadZipFile
    (tmp_path / "out" / "b.json").write_bytes(b"")                    # a full disk: an empty file
    (tmp_path / "out" / "c.npz").write_bytes(b"")
    capsys.readouterr()
    assert again.pieces({0: "a.npz", 1: "b.json", 2: "c.npz"}) == {}
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(re.search(r"cannot be read .*; renamed it to \w\.\w+\.unreadable and making it "
                                             r"again$", line) for line in lines), lines
    assert sorted(os.listdir(tmp_path / "out")) == [".lock", "a.npz.unreadable", "b.json.unreadable", "c.npz.unreadable",
                                                    "settings.json"]
    (tmp_path / "out" / "settings.json").write_text('{"seed": 0, "bat')  # a record cut short
    earlier = time.time() - 10
    for name in ("a.npz", "b.npz", "result.png"):  # made with it by an earlier run: their settings are unknown now
        (tmp_path / "out" / name).write_bytes(b"made by the earlier run")
        os.utime(tmp_path / "out" / name, (earlier, earlier))
    folder = evaluate.ResumeFolder(tmp_path / "out", settings, flags, "batches")
    assert folder.pieces({0: "a.npz"}) == {}
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path / 'out' / 'settings.json'} cannot be read (JSONDecodeError); renamed it to "
        f"settings.json.unreadable and setting aside what was made with it as it is met",
        f"{tmp_path / 'out' / 'a.npz'} cannot be read (ValueError: made before its folder's settings.json was lost); "
        f"renamed it to a.npz.unreadable2 and making it again"]  # the first a.npz.unreadable is kept
    folder.save("a.npz", np.arange(2))
    folder.claim(["result.png"])  # a result file of the lost run is set aside, not written over
    assert "result.png was made before its folder's settings.json was lost" in capsys.readouterr().out
    again = evaluate.ResumeFolder(tmp_path / "out", settings, flags)  # a later run, another object: the same rule
    assert np.array_equal(again.load("a.npz"), np.arange(2)) and again.load("b.npz") is None
    assert sorted(f for f in os.listdir(tmp_path / "out") if "unreadable" in f) == [
        "a.npz.unreadable", "a.npz.unreadable2", "b.json.unreadable", "b.npz.unreadable", "c.npz.unreadable",
        "result.png.unreadable", "settings.json.unreadable"]
    (tmp_path / "fresh-result.png").write_bytes(b"made by who knows")  # a result in a folder with no record
    with pytest.raises(ValueError, match="fresh-result.png exists but .* holds no record"):
        evaluate.ResumeFolder(tmp_path, settings, flags).claim(["fresh-result.png"])
    os.makedirs(tmp_path / "unrecorded")
    np.savez(tmp_path / "unrecorded" / "a.npz", x=np.arange(3))
    with pytest.raises(ValueError, match="a.npz exists but .*unrecorded holds no record of the settings it was made "
                                         "with .*; delete it, or use another --out"):
        evaluate.ResumeFolder(tmp_path / "unrecorded", settings).load("a.npz")


def test_digits_samples_are_sample_batch_s_read_back_and_never_replaced(tmp_path, one_thread, monkeypatch):
    """digits_samples gives ddpm.sample_batch's images (those of `ddpm.py sample --batch-size 128`), reads them back
    on a rerun without sampling, and keeps them beside another model's samples in the same folder."""
    (a, diffusion, _), (b, _, _) = (_tiny_model_checkpoint(tmp_path / f"{k}.pt", seed=k) for k in (0, 1))
    made = evaluate.digits_samples(a, diffusion, 3, 5, str(tmp_path / "cache"))
    assert np.array_equal(made, ddpm.sample_batch(a, diffusion, 5, 0, 3))
    other = evaluate.digits_samples(b, diffusion, 3, 5, str(tmp_path / "cache"))
    assert not np.array_equal(made, other) and len(os.listdir(tmp_path / "cache")) == 2
    monkeypatch.setattr(ddpm, "sample_batch", lambda *a, **k: pytest.fail("sampled again"))
    assert np.array_equal(evaluate.digits_samples(a, diffusion, 3, 5, str(tmp_path / "cache")), made)


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
    with np.load(os.path.join(out, "nll-test.npz")) as f:
        assert f["vb"].shape == (4, 25) and f["total_bpd"].shape == (4,)
        assert summary["total_bpd"][0] == pytest.approx(f["total_bpd"].astype(np.float64).mean())
    with open(os.path.join(out, "nll-test-table4.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("reverse_time") and len(lines) == 11 and lines[1].startswith("25,1,")
    assert float(lines[1].split(",")[2]) == pytest.approx(summary["rate_bpd"][0], abs=1e-5)  # 5 decimals in the CSV
    with open(os.path.join(out, "nll-test.json")) as f:
        assert json.load(f)["num_examples"] == 4


# ---- 17. evaluate.py: the Inception network, FID and IS ----


class _InceptionStandIn(nn.Module):
    """A tiny network with the call signature of inception-2015-12-05.pt: uint8-range images [N, 3, H, W] of
    any size, resized inside (to 16x16 here, 299x299 there), scaled as (x - 128) / 128; 2048-d (here 12-d)
    features with return_features=True, else a softmax over the classes, without the output bias when asked."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.output = nn.Linear(12, 10)
        nn.init.normal_(self.output.weight, std=3.0)  # predictions that vary between images
        nn.init.normal_(self.output.bias, std=3.0)  # a large bias, so no_output_bias visibly matters

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        batch_size, channels, height, width = img.shape
        assert channels == 3
        x = F.interpolate(img.to(torch.float32), size=(16, 16), mode="bilinear", align_corners=False)
        features = self.layers((x - 128.0) / 128.0).reshape(batch_size, -1)
        if return_features:
            return features
        if no_output_bias:
            logits = F.linear(features, self.output.weight, None)
        else:
            logits = self.output(features)
        return F.softmax(logits, 1)


@pytest.fixture
def inception_standin(tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.10+ deprecates TorchScript; the real file is one
        net = torch.jit.script(_InceptionStandIn().eval())
    path = str(tmp_path / "inception-standin.pt")
    net.save(path)
    return net, path


def test_inception_feature_path_end_to_end(tmp_path, capsys, inception_standin):
    """fid-stats, fid and is through the CLI equal the statistics, distance and score computed from the
    stand-in's outputs on the whole NCHW batch at once (layout, grayscale repeat, batching, no_output_bias)."""
    net, path = inception_standin
    rng = np.random.default_rng(6)
    ref = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    samples = np.clip(ref.astype(int) + rng.integers(-60, 60, ref.shape), 0, 255).astype(np.uint8)
    np.save(tmp_path / "ref.npy", ref)
    np.savez(tmp_path / "samples.npz", arr_0=samples)  # the layout `ddpm.py sample` writes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stand-in's sha256 is not the real network's: expected warning
        stats = str(tmp_path / "stats.npz")
        _run_cli(capsys, ["fid-stats", "--data", str(tmp_path / "ref.npy"), "--out", stats, "--inception", path,
                          "--batch-size", "7", "--device", "cpu", "--no-progress"])
        written = (tmp_path / "stats.npz").read_bytes()  # other statistics are not written over them, unasked
        _one_line_error(capsys, evaluate.main, ["fid-stats", "--data", str(tmp_path / "ref.npy"), "--max-examples",
                                                "20", "--out", stats, "--inception", path, "--device", "cpu"],
                        r"stats.npz holds other statistics \(40 images of .*ref.npy train\); pass another --out, or "
                        r"delete it to replace it$")
        assert (tmp_path / "stats.npz").read_bytes() == written
        fid, out = _run_cli(capsys, ["fid", str(tmp_path / "samples.npz"), "--ref", stats, "--inception", path,
                                     "--batch-size", "16", "--device", "cpu", "--no-progress"])
        fid_data, _ = _run_cli(capsys, ["fid", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npy"),
                                        "--inception", path, "--device", "cpu", "--no-progress"])
        (is_mean, is_std), is_out = _run_cli(capsys, ["is", str(tmp_path / "samples.npz"), "--inception", path,
                                                      "--splits", "4", "--device", "cpu", "--no-progress"])
        os.makedirs(tmp_path / "pngs")
        for i, image in enumerate(samples):
            Image.fromarray(image).save(tmp_path / "pngs" / f"{i:03d}.png")
        is_pngs, _ = _run_cli(capsys, ["is", str(tmp_path / "pngs"), "--inception", path, "--splits", "4",
                                       "--device", "cpu", "--no-progress"])
    with torch.no_grad():
        nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
        f_ref, f_smp = (net(nchw(a), return_features=True).double().numpy() for a in (ref, samples))
        probs = net(nchw(samples), no_output_bias=True).double().numpy()
        probs_bias = net(nchw(samples)).double().numpy()
    mu, sigma, info = evaluate.load_fid_stats(stats)
    # float32 network outputs accumulated in float64: batch-size-dependent round-off only
    assert np.allclose(mu, f_ref.mean(0), atol=1e-6) and np.allclose(sigma, np.cov(f_ref, rowvar=False), atol=1e-6)
    assert info["num_images"] == 40
    mu_ref, sigma_ref = f_ref.mean(0), np.cov(f_ref, rowvar=False)
    expected = evaluate.frechet_distance(*evaluate.feature_statistics(f_smp), mu_ref, sigma_ref)
    assert fid == pytest.approx(expected, rel=1e-5) and fid_data == pytest.approx(expected, rel=1e-5) and fid > 0
    assert (is_mean, is_std) == pytest.approx(evaluate.inception_score(probs, 4), rel=1e-5)
    assert is_pngs == pytest.approx((is_mean, is_std), rel=1e-9)  # PNG is lossless: the same images, same order
    got = evaluate.inception_outputs(net, samples, what="probs", batch_size=16, progress=False)
    assert np.allclose(got, probs, atol=1e-6) and not np.allclose(got, probs_bias, atol=1e-2)  # bias left out
    assert "40 samples" in out and "stats.npz (40 images of" in out and "40 samples" in is_out
    # Grayscale images are repeated to 3 channels, as StyleGAN2-ADA does.
    gray = ref[..., :1]
    got = evaluate.inception_outputs(net, gray, batch_size=9, progress=False)
    with torch.no_grad():
        want = net(nchw(np.repeat(gray, 3, axis=-1)), return_features=True).double().numpy()
    assert np.allclose(got, want, atol=1e-6)


def test_inception_download_checks_sha256(tmp_path, monkeypatch, inception_standin):
    """A download with the right sha256 is cached and loads; a wrong one is refused and nothing is kept;
    a cached file that changed is refused; a missing --inception file raises."""
    _, path = inception_standin
    digest = ddpm.file_digest(path)
    url = "file://" + os.path.abspath(path)
    with pytest.raises(ValueError, match="sha256"):
        evaluate.download_inception(url, str(tmp_path / "cache"), sha256="0" * 64)
    assert not os.path.exists(tmp_path / "cache" / evaluate.INCEPTION_FILENAME)
    cached = evaluate.download_inception(url, str(tmp_path / "cache"), sha256=digest)
    assert ddpm.file_digest(cached) == digest
    with pytest.raises(ValueError, match="sha256"):
        evaluate.download_inception(url, str(tmp_path / "cache"))  # the cached stand-in is not the real network
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "offline"))  # offline and nothing cached: say where to put it
    with pytest.raises(ConnectionError, match=f"--inception PATH, or copy it to {tmp_path / 'offline'}"):
        evaluate.download_inception("file:///nonexistent/inception.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.load_inception(str(tmp_path / "missing.pt"))
    with pytest.warns(UserWarning, match="not the standard"):
        evaluate.load_inception(path)


def test_inception_bad_input(tmp_path, inception_standin):
    """Samples of the wrong dtype or shape and statistics files without mu/sigma raise a clear error."""
    net, _ = inception_standin
    with pytest.raises(ValueError, match="uint8"):
        evaluate.inception_outputs(net, np.zeros((4, 8, 8, 3), np.float32), progress=False)
    with pytest.raises(ValueError, match="uint8"):
        evaluate.inception_outputs(net, np.zeros((4, 3, 8, 8), np.uint8), progress=False)  # NCHW, not NHWC
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        ddpm.load_data(str(tmp_path / "floats.npz"))
    np.savez(tmp_path / "bad_stats.npz", m=np.zeros(3), s=np.eye(3))
    with pytest.raises(ValueError, match="mu"):
        evaluate.load_fid_stats(str(tmp_path / "bad_stats.npz"))
    with pytest.raises(ValueError, match="mu"):
        evaluate.is_stats_file(str(tmp_path / "bad_stats.npz"))
    np.savez(tmp_path / "half_stats.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="mu"):
        evaluate.is_stats_file(str(tmp_path / "half_stats.npz"))
    with pytest.raises(FileNotFoundError):
        evaluate.load_fid_stats(str(tmp_path / "nope.npz"))
    # Through the CLI: one sentence, before any network is loaded (--inception names no file at all).
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="error: .*no 'mu'/'sigma'"):
        evaluate.main(["fid", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "bad_stats.npz"),
                       "--inception", str(tmp_path / "nope.pt")])


# ---- 18. evaluate.py figures: Figures 6-8 and the loss curve ----


def test_figures_cli(tmp_path, capsys):
    """`evaluate.py figures` writes Figures 6-8 as PNGs of the expected grid sizes, and the loss curve from
    metrics.jsonl when matplotlib is installed."""
    _tiny_model_checkpoint(str(tmp_path / "ckpt.pt"))
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(0, 50, 10):
            f.write(json.dumps({"step": step, "loss": 1.0 / (step + 1), "lr": 1e-3}) + "\n")
        f.write('{"step": 50, "lo')  # a half-written line of a running job is skipped
    out = str(tmp_path / "fig")
    paths, _ = _run_cli(capsys, ["figures", "--checkpoint", str(tmp_path / "ckpt.pt"), "--n", "2", "--frames", "4",
                                 "--samples-per-latent", "3", "--data", "digits", "--interp-t", "5", "--out", out,
                                 "--device", "cpu"])
    scale, tile = 4, 8 + 1  # 8x8 digits enlarged 4x by save_image_grid; 1-pixel gaps between the tiles
    sizes = {os.path.basename(p): Image.open(p).size for p in paths}
    assert sizes["fig6-progressive.png"] == ((4 * tile - 1) * scale, (2 * tile - 1) * scale)
    assert sizes["fig7-shared-latents.png"] == ((5 * tile - 1) * scale, (4 * tile - 1) * scale)  # x0, xt, 3 samples
    assert sizes["fig8-interpolation.png"] == ((13 * tile - 1) * scale, (2 * tile - 1) * scale)  # x0, 11 lambdas, x0'
    assert "loss.png" in sizes  # matplotlib is in requirements-dev.txt
    _one_line_error(capsys, evaluate.main, ["figures", "--checkpoint", str(tmp_path / "ckpt.pt"), "--n", "2",
                                            "--frames", "4", "--samples-per-latent", "3", "--data", "digits",
                                            "--interp-t", "5", "--out", out, "--device", "cpu", "--seed", "1"],
                    r"fig holds figures made with other --seed \(0, now 1\)")  # never written over, unasked
    assert {os.path.basename(p): Image.open(p).size for p in paths} == sizes
    with pytest.raises(SystemExit, match="interp-t"):
        evaluate.main(["figures", "--checkpoint", str(tmp_path / "ckpt.pt"), "--interp-t", "26", "--device", "cpu"])
    (tmp_path / "empty.jsonl").write_text('{"step": 1}\n')  # refused before any sampling
    with pytest.raises(SystemExit, match="no line with 'step' and 'loss'"):
        evaluate.main(["figures", "--checkpoint", str(tmp_path / "ckpt.pt"),
                       "--metrics", str(tmp_path / "empty.jsonl"), "--device", "cpu"])


# ---- 19. evaluate.py: released weights (the official/pesser layout and diffusers' port) ----


def ddpm_unet2d(block_out_channels, attn_level, sample_size, dropout):
    """diffusers' UNet2DModel with the google/ddpm-* settings and random weights, GroupNorm affines included
    (at their init of 1 and 0 a swapped norm1/norm2 or a lost bias would go unnoticed)."""
    levels = len(block_out_channels)
    unet = diffusers.UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=block_out_channels, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False,
        downsample_padding=0, dropout=dropout, attention_head_dim=None,
        down_block_types=tuple("AttnDownBlock2D" if i == attn_level else "DownBlock2D" for i in range(levels)),
        up_block_types=tuple("AttnUpBlock2D" if i == levels - 1 - attn_level else "UpBlock2D" for i in range(levels)))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    return unet.eval()


def assert_same_function(model, unet):
    """Our UNet and diffusers' UNet2DModel agree on random x and t in eval mode."""
    res = model.resolution
    x, t = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 917])
    with torch.no_grad():
        ours, theirs = model(x, t), unet(x, t).sample
    assert theirs.std() > 0.1  # a real signal, so agreement means something
    # Both float32, same operations in a different order and kernels (diffusers' attention, fused GroupNorm):
    # rounding of ~1e-7 relative per op over ~40 layers; measured 1.8e-6 on the CIFAR-10 config.
    assert (ours - theirs).abs().max().item() <= 1e-4


def assert_same_weights(a, b):
    """Two modules hold the same keys and bit-identical tensors."""
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_cifar10_diffusers_snapshot_loads_exactly_in_safetensors_and_bin(tmp_path):
    """The exact google/ddpm-cifar10-32 U-Net, saved by diffusers either way, loads into UNet as the same function."""
    torch.manual_seed(0)
    unet = ddpm_unet2d((128, 256, 256, 256), attn_level=1, sample_size=32, dropout=0.1)
    unet.save_pretrained(tmp_path / "safetensors", safe_serialization=True)
    unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "safetensors" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").exists()
    model, diffusion, config = evaluate.load_pretrained(tmp_path / "safetensors")
    assert not model.training and sum(p.numel() for p in model.parameters()) == 35_746_307
    assert config.preset == "cifar10" and config.model == ddpm.get_preset("cifar10").model
    assert (diffusion.model_mean_type, diffusion.model_var_type) == ("eps", "fixedlarge")
    assert_same_function(model, unet)
    assert_same_weights(evaluate.load_pretrained(tmp_path / "bin")[0], model)


def test_256_layout_at_reduced_width_loads_exactly_and_samples_with_fixedsmall(tmp_path):
    """The 256x256 family's layout (ch_mult 1,1,2,2,4,4, attention at level 4), at width 32 and 32x32, loads as the
    same function from a snapshot's unet/ folder, from 2022-era attention key names, and gets the dataset's preset."""
    torch.manual_seed(0)
    unet = ddpm_unet2d((32, 32, 64, 64, 128, 128), attn_level=4, sample_size=32, dropout=0.0)
    snapshot = tmp_path / "models--google--ddpm-ema-church-256" / "snapshots" / "5a1118b"
    unet.save_pretrained(snapshot / "unet")
    model, diffusion, config = evaluate.load_pretrained(snapshot)
    assert config.preset == "lsun_church256" and diffusion.model_var_type == "fixedsmall"
    assert (config.model.ch, config.model.ch_mult, config.model.attn_resolutions, config.model.resolution) == \
        (32, (1, 1, 2, 2, 4, 4), (2,), 32)
    assert_same_function(model, unet)

    # Files saved before diffusers renamed its attention layers (the google/ddpm-* .bin date from July 2022;
    # diffusers still renames such keys on load) say query/key/value/proj_attn for to_q/to_k/to_v/to_out.0.
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in unet.state_dict().items():
        for new, former in old_names.items():
            key = key.replace(f".{new}.", f".{former}.")
        old[key] = value
    assert any(".proj_attn." in k for k in old)
    (tmp_path / "plain").mkdir()
    torch.save(old, tmp_path / "plain" / "diffusion_pytorch_model.bin")
    (tmp_path / "plain" / "config.json").write_text((snapshot / "unet" / "config.json").read_text())
    plain, diffusion, config = evaluate.load_pretrained(tmp_path / "plain")  # no dataset in the path: the 256 recipe
    assert config.preset == "256x256" and diffusion.model_var_type == "fixedsmall"
    assert_same_weights(plain, model)


def test_sample_command_draws_from_a_diffusers_snapshot(tmp_path):
    """`evaluate.py sample --weights FOLDER --n 16` samples a randomly initialised save_pretrained snapshot."""
    torch.manual_seed(0)
    snapshot = tmp_path / "ddpm-ema-cat-256"  # the 256 family at width 32 and 32x32, so 1000 steps take seconds
    ddpm_unet2d((32, 32, 64, 64, 128, 128), attn_level=4, sample_size=32, dropout=0.0).save_pretrained(snapshot)
    evaluate.main(["sample", "--weights", str(snapshot), "--n", "16", "--batch-size", "16", "--out", str(tmp_path / "s"),
               "--respacing", "10"])  # 10 of the 1000 steps keep the test fast; the full loop is the same code
    images = np.load(tmp_path / "s" / "samples_16x32x32x3.npz")["arr_0"]
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
    assert (tmp_path / "s" / "samples_16x32x32x3.png").exists()
    for run in ("d1", "d2"):  # deterministic DDIM (eta 0) on 10 respaced steps: the same images from the same seed
        evaluate.main(["sample", "--weights", str(snapshot), "--n", "4", "--batch-size", "4", "--out", str(tmp_path / run),
                   "--respacing", "ddim10", "--ddim-eta", "0"])
    d1, d2 = (np.load(tmp_path / r / "samples_4x32x32x3.npz")["arr_0"] for r in ("d1", "d2"))
    assert np.array_equal(d1, d2) and d1.std() > 0


def test_official_layout_state_dict_round_trips(tmp_path):
    """A state dict in the official/pesser layout, made from our own UNet, loads back identically."""
    torch.manual_seed(0)
    model = tiny_unet()
    torch.save(model.state_dict(), tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="preset="):  # ch_mult (1, 2) is no released model: say how it samples
        evaluate.load_pretrained(tmp_path / "model.ckpt")
    loaded, diffusion, config = evaluate.load_pretrained(tmp_path / "model.ckpt", preset="digits")
    assert config.model == ddpm.ModelConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                                            dropout=0.1, in_channels=1, resolution=8)
    assert_same_weights(loaded, model)

    # pesser's file names say the dataset; without config.json the resolution is the preset's (256).
    big = ddpm.UNet(ch=32, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,), dropout=0.0, resolution=256)
    (tmp_path / "ema_diffusion_lsun_cat_model").mkdir()
    torch.save(big.state_dict(), tmp_path / "ema_diffusion_lsun_cat_model" / "model-1761000.ckpt")
    loaded, diffusion, config = evaluate.load_pretrained(tmp_path / "ema_diffusion_lsun_cat_model" / "model-1761000.ckpt")
    assert config.preset == "lsun_cat256" and diffusion.model_var_type == "fixedsmall"
    assert config.model.attn_resolutions == (16,) and config.model.resolution == 256
    assert_same_weights(loaded, big)


def test_bad_weights_give_clear_errors(tmp_path):
    """A truncated file, a wrong-architecture state dict, a misfit DDPM one and a folder without config each raise."""
    torch.manual_seed(0)
    model = ddpm.UNet(ch=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), dropout=0.0)
    state = model.state_dict()
    torch.save(state, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        evaluate.load_pretrained(tmp_path / "truncated.pt")
    safetensors_torch.save_file(state, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        evaluate.load_pretrained(tmp_path / "truncated.safetensors")

    torch.save({"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match="neither the official layout"):
        evaluate.load_pretrained(tmp_path / "resnet.pt")
    misfit = {k: v for k, v in state.items() if k != "mid.attn_1.q.bias"}
    misfit["conv_out.weight"], misfit["extra.weight"] = torch.zeros(6, 32, 3, 3), torch.zeros(1)
    torch.save(misfit, tmp_path / "misfit.pt")
    with pytest.raises(ValueError, match="does not fit the DDPM U-Net") as error:
        evaluate.load_pretrained(tmp_path / "misfit.pt")
    assert all(name in str(error.value) for name in ("mid.attn_1.q.bias", "extra.weight", "conv_out.weight"))
    del state["conv_in.weight"]
    torch.save(state, tmp_path / "no_conv_in.pt")
    with pytest.raises(ValueError, match="conv_in.weight"):
        evaluate.load_pretrained(tmp_path / "no_conv_in.pt")

    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="holds no config.json"):
        evaluate.load_pretrained(tmp_path / "snapshot")
    with pytest.raises(FileNotFoundError):
        evaluate.load_pretrained(tmp_path / "nowhere")
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .ckpt/.pt/.bin/.safetensors weights file"):
        evaluate.load_pretrained(tmp_path / "weights.h5")


def test_a_diffusers_snapshot_that_computes_differently_is_refused(tmp_path):
    """A UNet2DModel whose config changes the function but not the keys (cos-first embedding) is not taken as DDPM."""
    torch.manual_seed(0)
    unet = ddpm_unet2d((32, 64), attn_level=1, sample_size=8, dropout=0.0)
    unet.register_to_config(flip_sin_to_cos=True)
    unet.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="flip_sin_to_cos=True"):
        evaluate.load_pretrained(tmp_path / "other")


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
def test_p_sample_equals_diffusers_ddpm_scheduler_at_every_t(variance_type):
    """With the same model output and noise, p_sample gives DDPMScheduler.step's x_{t-1} and x0 at all 1000 t."""
    T = 1000
    g = torch.Generator().manual_seed(0)
    diffusion = ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("linear", T),
                                       model_var_type=variance_type.replace("_", ""))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                        variance_type=variance_type, clip_sample=True)
    t = torch.arange(T)
    noise = torch.randn(T, 3, 4, 4, generator=g)
    x_t = diffusion.q_sample(torch.rand(T, 3, 4, 4, generator=g) * 2 - 1, t, noise)
    eps = noise + 0.3 * torch.randn(T, 3, 4, 4, generator=g)  # a fake eps-model, off enough that about half the x0 clip
    for dtype in (torch.float32, torch.float64):
        x, model_output = x_t.to(dtype), eps.to(dtype)
        # diffusers draws its noise inside step() from the generator we pass: seed i at t = i, same draw here.
        z = torch.stack([torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(i), dtype=dtype)
                         for i in range(T)])
        ours = diffusion.p_sample(lambda *_: model_output, x, t, noise=z)
        assert 0.2 < (ours["pred_xstart"].abs() == 1).double().mean() < 0.8  # both clipped and unclipped x0 occur
        if dtype == torch.float64:  # diffusers' step with its abar replaced by the exact float64 one
            scheduler.alphas_cumprod = torch.from_numpy(diffusion.alphas_cumprod)
            scheduler.one = torch.tensor(1.0, dtype=dtype)
        steps = [scheduler.step(model_output[i:i + 1], i, x[i:i + 1], generator=torch.Generator().manual_seed(i))
                 for i in range(T)]
        prev = torch.cat([s.prev_sample for s in steps])
        pred_xstart = torch.cat([s.pred_original_sample for s in steps])
        # float32: diffusers computes abar in float32 and derives beta_t = 1 - abar_t/abar_{t-1} and 1 - abar_t from
        # it; near t=0 both lose 3-4 digits to cancellation (ulp 6e-8 against 1e-4), so its posterior coefficients are
        # off by up to ~1e-3 relative (measured max difference 8e-5). float64 on both sides: the same formula, so
        # only rounding remains (measured 1.5e-13).
        tol = 2e-4 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(prev, ours["sample"], atol=tol, rtol=0)
        torch.testing.assert_close(pred_xstart, ours["pred_xstart"], atol=tol, rtol=0)

    # The documented exception: for fixed_large diffusers' variance at t=0 is beta_1 = 1e-4, the official code's is
    # beta~_2 = 5.45e-5 (a better decoder L_0), and for fixed_small diffusers clamps beta~_1 = 0 to 1e-20 where the
    # official log-variance reuses beta~_2. No step adds noise at t=0, so samples agree (checked above); only the
    # likelihood of the decoder term L_0 sees the official value, which calc_bpd_loop uses.
    ours_var0 = torch.exp(diffusion.p_mean_variance(lambda *_: eps[:1], x_t[:1], t[:1])["log_variance"]).flatten()[0]
    assert ours_var0.item() == pytest.approx(5.4531876613021935e-05, rel=1e-6)  # float32 cast of the float64 value
    diffusers_var0 = {"fixed_large": 1e-4, "fixed_small": 1e-20}[variance_type]
    assert scheduler._get_variance(0).item() == pytest.approx(diffusers_var0, rel=1e-6)


# ---- 20. evaluate.py: the digits score (the pinned classifier, DigitsScore, PixelCategorical) ----


@pytest.fixture(scope="module")
def digits_score():
    return evaluate.DigitsScore(seed=0)  # the pinned classifier, the bootstrap of every printed table


# The figures docs/evidence.md and the README print for the pinned classifier: its held-out accuracy (291 of 297)
# and the scale at N = 256, seed 0, 100 resamples, as (digits-FD, its std, digits-IS, its std) to the printed 2 decimals.
PINNED_ACCURACY = 291 / 297


PINNED_SCALE = {"floor": ("17.93", "6.80", "9.56", "0.11"), "baseline": ("413.89", "13.98", "3.00", "0.12")}


def test_digits_classifier_is_the_pinned_file(tmp_path, monkeypatch, capsys):
    """The scoring network is read from the pinned file: a file whose bytes differ (one flipped byte) or a missing
    file is refused with one line that says how to restore it, and a nonzero exit, before any work."""
    pinned = evaluate.DIGITS_CLASSIFIER_FILE
    assert ddpm.file_digest(pinned) == evaluate.DIGITS_CLASSIFIER_SHA256
    data = bytearray(open(pinned, "rb").read())
    data[len(data) // 2] ^= 1
    (tmp_path / "digits-classifier.pt").write_bytes(bytes(data))
    monkeypatch.setattr(evaluate, "_DIGITS_CLASSIFIERS", {})
    for path in (tmp_path / "digits-classifier.pt", tmp_path / "missing.pt"):
        monkeypatch.setattr(evaluate, "DIGITS_CLASSIFIER_FILE", str(path))
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["digits-score", "--checkpoint", str(tmp_path / "never-read.pt"), "--device", "cpu"])
        message = str(exit_info.value.code)
        assert message.startswith("error: the digits classifier") and "\n" not in message
        assert "git checkout -- " + path.name in message
        assert ("is not the pinned file" if path.name != "missing.pt" else "is missing") in message


def test_digits_classifier_rebuild_compares_and_never_replaces(tmp_path, monkeypatch, capsys):
    """`evaluate.py digits-classifier` writes the retrained network to --out and says whether its bytes are the
    pinned file's; it refuses --out naming the pinned file, so the pinned file is never replaced."""
    pinned_digest = ddpm.file_digest(evaluate.DIGITS_CLASSIFIER_FILE)
    pinned = evaluate.load_digits_classifier()[0]
    capsys.readouterr()
    retrained = evaluate.DigitsClassifier()
    retrained.load_state_dict(pinned.state_dict())
    monkeypatch.setattr(evaluate, "train_digits_classifier", lambda seed: retrained.eval())  # what this CPU trains
    out = tmp_path / "rebuilt.pt"
    assert _run_cli(capsys, ["digits-classifier", "--out", str(out)])[0] is True
    assert ddpm.file_digest(out) == pinned_digest
    with torch.no_grad():
        retrained.fc.weight[3, 5] += 0.125  # another CPU's last bits, grown by 20 epochs
    reproduced, printed = _run_cli(capsys, ["digits-classifier", "--out", str(out)])
    assert reproduced is False and "largest weight difference 0.125" in printed
    assert ddpm.file_digest(out) != pinned_digest == ddpm.file_digest(evaluate.DIGITS_CLASSIFIER_FILE)
    with pytest.raises(SystemExit, match="error: --out .* is the pinned classifier"):
        evaluate.main(["digits-classifier", "--out", evaluate.DIGITS_CLASSIFIER_FILE])
    assert ddpm.file_digest(evaluate.DIGITS_CLASSIFIER_FILE) == pinned_digest


def test_digits_score_floor_baseline_and_identity(digits_score):
    """digits-FD is 0 for the train split itself, equals the Frechet distance computed from eigendecompositions,
    and puts real held-out digits (the floor) far below independent-pixel samples (the baseline), whose
    digits-IS is lower; the pinned classifier's held-out accuracy, the floor and the baseline are the documented
    figures to the printed precision."""
    train, test = ddpm.load_digits("train"), ddpm.load_digits("test")
    labels = sklearn_datasets.load_digits().target[len(train):]  # the held-out digits' classes, from scikit-learn itself
    probs = evaluate.digits_classifier_outputs(digits_score.classifier, test)[1]
    assert (probs.argmax(1) == labels).mean() == digits_score.accuracy == PINNED_ACCURACY
    assert abs(digits_score(train)["fd"]) < 1e-6  # identical sets: sqrtm round-off only
    scale = evaluate.digits_score_scale(digits_score, n=256, seed=0)
    for name, printed in PINNED_SCALE.items():
        s = scale[name]
        assert tuple(f"{v:.2f}" for v in (s["fd"], s["fd_std"], s["is"], s["is_std"])) == printed, name
    floor, baseline = scale["floor"], scale["baseline"]
    features = lambda x: evaluate.digits_classifier_outputs(digits_score.classifier, x)[0]
    # float64 statistics, two matrix-root routes: agreement to round-off of the 64x64 eigenproblems
    stats = lambda f: (f.mean(0), np.cov(f, rowvar=False))
    assert floor["fd"] == pytest.approx(frechet_by_eigh(*stats(features(test[:256])), *stats(features(train))), rel=1e-6)
    assert floor["fd"] + 3 * floor["fd_std"] < (baseline["fd"] - 3 * baseline["fd_std"]) / 5  # a wide margin
    assert floor["is"] - 3 * floor["is_std"] > baseline["is"] + 3 * baseline["is_std"]
    probs = evaluate.digits_classifier_outputs(digits_score.classifier, test[:256])[1]
    p_y = probs.mean(0)
    assert floor["is"] == pytest.approx(np.exp(np.mean([(p * np.log(p / p_y)).sum() for p in probs])), rel=1e-9)


def test_pixel_categorical_against_counts():
    """The per-pixel categorical baseline's NLL equals add-one smoothed frequencies counted pixel by pixel in
    a loop, and its samples' frequencies at a pixel match its probabilities (Monte Carlo, 5 standard errors)."""
    train, test = ddpm.load_digits("train")[:300], ddpm.load_digits("test")[:5]
    model = evaluate.PixelCategorical(train)
    levels = sorted(set(train.ravel().tolist()))
    flat_train, flat_test = train.reshape(len(train), -1), test.reshape(len(test), -1)
    for n in range(len(test)):
        bits = [-math.log2(((flat_train[:, d] == flat_test[n, d]).sum() + 1) / (len(train) + len(levels)))
                for d in range(flat_test.shape[1])]
        assert model.nll_bpd(test[n:n + 1])[0] == pytest.approx(np.mean(bits), rel=1e-12)
    samples = model.sample(4000, seed=1).reshape(4000, -1)
    d = 36  # a pixel in the middle of the digits: many levels occur there
    for k, level in enumerate(levels):
        p = model.probs[d, k]
        assert abs((samples[:, d] == level).mean() - p) <= 5 * math.sqrt(p * (1 - p) / 4000) + 1e-12
    refs = evaluate.digits_nll_references(test)
    assert refs["uniform_levels"] == pytest.approx(math.log2(17)) and refs["uniform_256"] == 8.0


# ---- 21. The experiments: Table 2 and steps (and digits-score on their checkpoint) ----


def test_table2_and_steps_end_to_end_tiny(tmp_path, capsys, monkeypatch, digits_score):
    """`experiments.py table2` with a tiny budget trains, samples and scores all seven rows (a number or
    'unstable' in every cell), a rerun reads the finished rows instead of training again and refuses other
    settings; `experiments.py steps` on one row's checkpoint prints both samplers at each count and the answer."""
    out = str(tmp_path / "table2")
    argv = ["table2", "--steps", "2", "--timesteps", "25", "--n", "8", "--nll-images", "2", "--jobs", "1",
            "--bootstrap", "3", "--out", out]
    row_config = experiments.table2_config
    def small_batches(*args):  # the rows' own recipe at a batch of 16, not 128: the same code, 8x less work
        config = row_config(*args)
        config.train.batch_size = 16
        return config
    monkeypatch.setattr(experiments, "table2_config", small_batches)
    results, printed = _run_cli(capsys, argv, experiments.main)
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "**" not in line]
    assert len(rows) == 1 + 7 + 2  # header, the paper's six rows and the hybrid, floor and baseline
    for line in rows[1:8]:
        cells = [c.strip() for c in line.strip("|").split("|")][3:]
        assert all(c == "unstable" or re.fullmatch(r"-?\d+\.\d+ ± \d+\.\d+", c) for c in cells), line
    assert results["eps-Lsimple"]["train"]["status"] == "ok" and "Table 1's NLL contrast" in printed
    assert os.path.isfile(os.path.join(out, "eps-Lsimple", "ckpt-0000001.pt"))  # the half-budget checkpoint
    calls, real_train = [], ddpm.train
    monkeypatch.setattr(ddpm, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    again, printed_again = _run_cli(capsys, argv, experiments.main)
    table = lambda text: text.split("\nTable 2 on 8x8")[1].split("\ntime:")[0]
    assert calls == [] and table(printed_again) == table(printed)
    with pytest.raises(SystemExit, match="error: .* holds rows made with other --steps .*use another --out"):
        experiments.main(argv[:2] + ["3"] + argv[3:])
    ckpt = os.path.join(out, "eps-Lsimple", "ckpt-0000002.pt")
    steps, printed = _run_cli(capsys, ["steps", "--checkpoint", ckpt, "--counts", "25,5", "--n", "8", "--device",
                                       "cpu", "--bootstrap", "3", "--out", str(tmp_path / "steps")], experiments.main)
    assert [(r["sampler"], r["evaluations"]) for r in steps] == [("ancestral", 25), ("ancestral", 5), ("ddim", 25),
                                                                  ("ddim", 5)]
    assert "Within the uncertainty of 25 ancestral steps" in printed
    with pytest.raises(SystemExit, match="error: --counts must be"):
        experiments.main(["steps", "--checkpoint", ckpt, "--counts", "50", "--device", "cpu"])
    report, printed = _run_cli(capsys, ["digits-score", "--checkpoint", ckpt, "--n", "8", "--nll-images", "2",
                                        "--device", "cpu", "--bootstrap", "3", "--out", str(tmp_path / "score")])
    for words in ("test NLL bound", "per-pixel categorical model", "uniform over the 17 grey levels 4.09",
                  "uniform over 256 levels 8.00", "digits-FD", "floor: real held-out digits", "How to read"):
        assert words in printed
    assert list(report["nll"]) == pytest.approx(list(results["eps-Lsimple"]["nll"]["nll"]))  # same images and seed


@pytest.mark.parametrize("command, flags, phrase", [
    ("table2", ["--n", "500"], r"--n 500 must be in \[2, 297\]"),
    ("table2", ["--nll-images", "0"], r"--nll-images must be in \[1, 297\]"),
    ("table2", ["--timesteps", "10"], r"--timesteps 10 \(linear schedule\): .*needs T >= 21 .*use T >= 21"),
    ("table2", ["--timesteps", "0"], r"--timesteps must be in \[1, 1000000\], got 0"),
    ("digits-score", ["--n", "1"], r"--n 1 must be in \[2, 297\]"),
    ("digits-score", ["--nll-images", "400"], r"--nll-images must be in \[1, 297\], .* got 400"),
    ("steps", ["--n", "298"], r"--n 298 must be in \[2, 297\]")])
def test_digits_counts_are_refused_before_any_work_or_write(tmp_path, capsys, no_work, command, flags, phrase):
    """--n and --nll-images outside what the 297 held-out digits serve, and a T that breaks the schedule, are refused
    in one line before a model is loaded or anything is written (so a corrected rerun is not refused as 'other
    settings')."""
    out = tmp_path / "out"
    model = [] if command == "table2" else ["--checkpoint", str(tmp_path / "never-read.pt"), "--device", "cpu"]
    main = experiments.main if command in ("table2", "steps") else evaluate.main
    _one_line_error(capsys, main, [command, *model, *flags, "--out", str(out)], phrase)
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:the product of the covariances")  # 4 samples, 64 features
def test_every_command_draws_the_same_images(tmp_path, monkeypatch, capsys):
    """One checkpoint, seed, n, batch size and sampler give bit-identical images from every command that samples:
    `ddpm.py sample`, `evaluate.py sample`, `evaluate.py digits-score`, `experiments.py steps` (against `sample
    --respacing`) and Figure 6 of `evaluate.py figures` (its last column, against `sample` in one batch)."""
    ckpt = str(tmp_path / "ckpt.pt")
    _tiny_model_checkpoint(ckpt, seed=2)  # T = 25

    def sample(main, *flags, n=4, batch=2):
        out = tmp_path / f"{main.__module__}{len(os.listdir(tmp_path))}"
        main(["sample", "--checkpoint", ckpt, "--n", str(n), "--batch-size", str(batch), "--seed", "5", "--out",
              str(out), "--device", "cpu", *flags])
        return np.load(out / f"samples_{n}x8x8x1.npz")["arr_0"]
    plain = sample(ddpm.main)
    assert plain.shape == (4, 8, 8, 1) and len(np.unique(plain)) > 10  # real images, not a constant
    assert np.array_equal(sample(evaluate.main), plain)
    assert not np.array_equal(sample(ddpm.main, batch=4), plain)  # the batch size is part of the rule
    scored = []
    real_call = evaluate.DigitsScore.__call__
    monkeypatch.setattr(evaluate.DigitsScore, "__call__", lambda self, images: scored.append(images) or
                        real_call(self, images))
    monkeypatch.setattr(evaluate, "DIGITS_SAMPLE_BATCH", 2)
    monkeypatch.setattr(experiments, "plot_steps", lambda *args: False)  # images only here; the table2 test plots
    common = ["--checkpoint", ckpt, "--n", "4", "--seed", "5", "--bootstrap", "2", "--device", "cpu"]
    evaluate.main(["digits-score", *common, "--nll-images", "2", "--out", str(tmp_path / "score")])
    assert np.array_equal(scored[0], plain)  # the samples are scored first, then the floor and the baseline
    scored.clear()
    experiments.main(["steps", *common, "--counts", "25,5", "--out", str(tmp_path / "steps")])
    by_row = scored[2:]  # after the floor and the baseline: ancestral 25, 5, then DDIM 25, 5
    for images, flags in zip(by_row, (["--respacing", "25"], ["--respacing", "5"],
                                      ["--respacing", "ddim25", "--ddim-eta", "0"],
                                      ["--respacing", "ddim5", "--ddim-eta", "0"])):
        assert np.array_equal(images, sample(ddpm.main, *flags)), flags
    rows = []
    monkeypatch.setattr(evaluate, "save_rows", lambda r, path: rows.append(r))
    evaluate.main(["figures", "--checkpoint", ckpt, "--n", "2", "--seed", "5", "--device", "cpu",
                   "--out", str(tmp_path / "figures")])
    assert np.array_equal(ddpm.unnormalize_data(rows[0][:, -1]), sample(ddpm.main, n=2, batch=2))
    capsys.readouterr()


# ---- 22. bench.py: ours against diffusers' UNet2DModel ----


def test_bench_networks_match_and_run():
    """bench.py builds diffusers' UNet2DModel as the same function as ours (with our weights ported, the same output;
    the same parameter count and forward FLOPs), times the calls it is given, reports ours/diffusers as their time
    over ours, and a child's runner runs every row."""
    config = bench.unet_config(small=True)
    config.ch_mult, config.resolution = (1, 2), 8  # the tiny layout: attention at 4x4 on the way down and up
    config.attn_resolutions = (4,)
    counts = [sum(p.numel() for p in bench.build(impl, config)[0].parameters()) for impl in ("ours", "diffusers")]
    assert counts[0] == counts[1]
    flops = [bench.count_flops(impl, config)[0] for impl in ("ours", "diffusers")]
    assert flops[0] == flops[1] > 0  # a misplaced attention block keeps the count but changes the FLOPs
    # Another norm eps, embedding or attention-head setting keeps both counts but changes the function.
    theirs = bench.build("diffusers", config)[0].eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():  # GroupNorm affines and biases off their init of 1 and 0
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    ours = bench.build("ours", config)[0].eval()
    ours.load_state_dict(evaluate.diffusers_to_official(theirs.state_dict()))
    assert_same_function(ours, theirs)
    calls = []
    seconds = bench.timed(lambda: calls.append(time.sleep(0.01)), torch.device("cpu"), warmup=2, steps=3)
    assert len(calls) == 5 and len(seconds) == 3 and all(0.01 <= s < 1 for s in seconds)  # warm-up calls untimed
    assert bench.pair_ratio([1.0, 2.0, 1.0], [3.0, 3.0, 4.0]) == 3.0  # the median of 3, 1.5 and 4: ours 3x faster
    steps, peak_memory, n_params = bench.make_runner({"device": "cpu", "impl": "ours", "precision": "bf16", "compile": False,
                                                      "channels_last": True, "batch_size": 2, "small": True})
    assert n_params == 2_245_763 and all(steps[row]() > 0 for row in ("train", "sample", "nll"))
    assert peak_memory() > 0
