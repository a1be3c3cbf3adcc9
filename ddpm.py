"""Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel, NeurIPS 2020) in one PyTorch file.

A line-for-line reimplementation of what the official TensorFlow code (hojonathanho/diffusion,
`diffusion_utils_2.py` and `models/unet.py`) computes: the beta schedules, the forward process
q(x_t | x_0), the reverse process p(x_{t-1} | x_t) and the variational bound for every
parameterisation of the paper's Table 2, the 35.7M-parameter U-Net, training (Algorithm 1),
sampling (Algorithm 2) and the negative log-likelihood in bits/dim.

Timestep convention, used everywhere: the code index t = 0..T-1 is the paper's t = 1..T, so
index 0 already means one step of noise and x_0 (the data) has no index of its own.

    python ddpm.py train --preset digits      # the CPU demo, minutes on 2 cores
    python ddpm.py train                      # the paper's CIFAR-10 run (a GPU week)
    python ddpm.py sample --checkpoint runs/cifar10/ckpt-0800000.pt --n 64

It imports torch, numpy and the standard library only, so it can be copied alone. evaluate.py evaluates a
checkpoint (the released weights, 50,000 samples in resumable chunks, FID, IS, the NLL's rate and distortion, the
figures, the digits score) and experiments.py runs the paper's findings on digits (Table 2, sampling steps).
"""
import argparse
import copy
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---- 1. Beta schedules (official `get_beta_schedule`, plus improved-diffusion's cosine) ----------------------------

BETA_SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")


MIN_ALPHA_BAR = 1e-60  # x0 from eps multiplies x_t by 1/sqrt(alpha-bar) <= 1e30: float32 (to 3.4e38) holds it


def get_beta_schedule(name, num_timesteps):
    """The variances beta_1..beta_T of q(x_t | x_{t-1}) as a float64 numpy array of shape [T].

    'linear' runs 1e-4 -> 0.02 at T=1000 (the paper); at other T both ends are scaled by 1000/T, as
    improved-diffusion's get_named_beta_schedule does, so that the total noise stays comparable.
    'quad', 'const', 'warmup10' and 'warmup50' keep the official fixed ends 1e-4 and 0.02 at any T, as the
    official get_beta_schedule does (only improved-diffusion's 'linear' is rescaled). 'jsd' is 1/T .. 1/2 and
    'cosine' is improved-diffusion's.

    eps-prediction's x0 = (x_t - sqrt(1 - alpha-bar) eps) / sqrt(alpha-bar) needs alpha-bar_T > 0, so every beta is
    below 1 ('jsd' ends at 0.999, not the official 1; 'cosine' is capped at 0.999 as improved-diffusion does;
    'linear' needs T >= 21), and alpha-bar_T >= MIN_ALPHA_BAR, so that float32 holds 1/sqrt(alpha-bar) (the fixed
    ends of 'const', 'quad' and 'warmup*' lose too much at very large T). A T outside is refused, naming the
    smallest or largest T that works; 'linear' and 'cosine' work at every larger T.
    """
    T = num_timesteps
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {T!r}")
    if name == "linear" and T < 21:  # its last beta, 0.02 * 1000/T, is 1 at T = 20: nothing of x_0 is left at t = T
        raise ValueError(f"the 'linear' schedule, scaled by 1000/T, needs T >= 21 (its last beta 0.02 * 1000/T "
                         f"reaches 1 at T = 20), got T = {T}; use T >= 21")
    betas = _betas(name, T)
    assert betas.shape == (T,) and ((betas > 0) & (betas < 1)).all()
    if np.log1p(-betas).sum() < np.log(MIN_ALPHA_BAR):  # alpha-bar falls as T grows: find the largest T that works
        low, high = 1, T
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if np.log1p(-_betas(name, mid)).sum() >= np.log(MIN_ALPHA_BAR) else (low, mid)
        raise ValueError(f"the '{name}' schedule leaves alpha-bar_T below {MIN_ALPHA_BAR:g} at T = {T}, so x0 from "
                         f"eps would overflow float32; use T <= {low}")
    return betas


def _betas(name, T):
    beta_start, beta_end = 1e-4, 0.02
    if name == "linear":
        scale = 1000 / T
        return np.linspace(beta_start * scale, beta_end * scale, T, dtype=np.float64)
    if name == "quad":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    if name == "const":
        return beta_end * np.ones(T, dtype=np.float64)
    if name == "jsd":  # 1/T, 1/(T-1), ..., 1/2, then 0.999 for the official 1 (the cap cosine uses)
        return np.minimum(1.0 / np.linspace(T, 1, T, dtype=np.float64), 0.999)
    if name in ("warmup10", "warmup50"):
        betas = beta_end * np.ones(T, dtype=np.float64)
        n = int(T * (0.1 if name == "warmup10" else 0.5))
        betas[:n] = np.linspace(beta_start, beta_end, n, dtype=np.float64)
        return betas
    if name == "cosine":  # Nichol & Dhariwal (2021): alphas_cumprod follows cos^2, betas capped at 0.999
        f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
        i = np.arange(T, dtype=np.float64)
        return np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)
    raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")


# ---- 2. Gaussian helpers: the KL between Gaussians and the discretised decoder L_0 (nats) --------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats. Arguments broadcast."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF that the official code uses (not erf)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) in nats, elementwise, for data x in {0..255} scaled to [-1, 1] under a Gaussian
    N(means, exp(log_scales)^2) integrated over each pixel's bin of width 2/255.

    The edge bins extend to -inf (x = -1) and +inf (x = 1), so the 256 bins sum to one
    (the paper's Eq. 13). Probabilities are floored at 1e-12 as in the official code.
    """
    assert x.shape == means.shape
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x):
    """Mean over every axis but the batch axis: [N, ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.dim())))


# ---- 3. The diffusion: q, the posterior, p and the bound, the losses, sampling (Sections 2-3, Algorithms 1-2) -----

def _model_device(model):
    """The device of a module's first parameter, or the CPU for a plain callable."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


MODEL_MEAN_TYPES = ("eps", "xstart", "xprev")
MODEL_VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")


class GaussianDiffusion:
    """The forward process q and the reverse process p_theta of one DDPM (official GaussianDiffusion2).

    model_mean_type: what the network predicts: 'eps' (the noise, the paper's choice), 'xstart'
        (x_0) or 'xprev' (the posterior mean mu~, the paper's "mu~ prediction").
    model_var_type: Sigma_theta: 'fixedlarge' (sigma^2 = beta, the CIFAR-10 choice), 'fixedsmall'
        (sigma^2 = beta~), 'learned' (the network outputs log sigma^2 directly, as in the paper)
        or 'learned_range' (improved-diffusion: an interpolation between log beta~ and log beta).
    loss_type: 'mse' (L_simple, Eq. 14), 'kl' (the true bound: one term L_{t-1} in bits/dim)
        or 'hybrid' (improved-diffusion: L_simple + T/1000 * the bound term with the mean detached).

    Every schedule buffer is float64 numpy; `_extract` casts to float32 (float64 for float64
    inputs) where it gathers, exactly as the official code does.
    """

    @staticmethod
    def check_types(model_mean_type, model_var_type, loss_type):
        """Raise a ValueError for an unknown type or a loss that cannot train the variance type."""
        for value, allowed, what in ((model_mean_type, MODEL_MEAN_TYPES, "model_mean_type"),
                                     (model_var_type, MODEL_VAR_TYPES, "model_var_type"),
                                     (loss_type, LOSS_TYPES, "loss_type")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        learned = model_var_type in ("learned", "learned_range")
        if loss_type == "mse" and learned:
            raise ValueError("loss_type 'mse' cannot train a learned variance (no gradient reaches it); "
                             "use loss_type 'hybrid' (L_simple + the bound) or 'kl'")
        if loss_type == "hybrid" and not learned:
            raise ValueError("loss_type 'hybrid' adds the bound to train a learned variance; with a fixed "
                             "variance it is plain L_simple, so use loss_type 'mse'")

    def __init__(self, *, betas, model_mean_type="eps", model_var_type="fixedlarge", loss_type="mse"):
        self.check_types(model_mean_type, model_var_type, loss_type)
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type

        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas < 1).all(), "need 0 < beta < 1"
        self.betas = betas
        self.num_timesteps = T = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)                                     # alpha-bar_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])          # alpha-bar_{t-1}
        assert self.alphas_cumprod_prev.shape == (T,)
        self.sqrt_alphas_cumprod_prev = np.sqrt(self.alphas_cumprod_prev)              # DDIM's x_0 coefficient
        self.one_minus_alphas_cumprod_prev = 1.0 - self.alphas_cumprod_prev
        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_betas = np.log(betas)
        # q(x_{t-1} | x_t, x_0), Eqs. 6-7. beta~ at index 0 is 0, so its log is taken from index 1.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]) if T > 1
            else np.maximum(self.posterior_variance, 1e-20))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # mu~ solved for x_0 with both ratios in float64 (improved-diffusion's _predict_xstart_from_xprev)
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        # Sigma_theta = beta_t ('fixedlarge'), except beta~ at index 0 for a better decoder likelihood
        self.fixedlarge_variance = np.append(self.posterior_variance[1], betas[1:]) if T > 1 else betas
        self.fixedlarge_log_variance = np.log(self.fixedlarge_variance)
        self._tensors = {}  # (device, dtype) -> {buffer name: tensor}: each buffer is copied once per device

    def _extract(self, name, t, x):
        """The float64 buffer `name` (an attribute such as 'betas', shape [T]) at indices t [N], as a tensor shaped
        [N, 1, ..., 1] like x: float32, or float64 for float64 x, cast from float64 as the official code does."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if (x.device, dtype) not in self._tensors:
            self._tensors[x.device, dtype] = {k: torch.as_tensor(v, dtype=dtype, device=x.device)
                                              for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        return self._tensors[x.device, dtype][name][t].reshape(-1, *([1] * (x.dim() - 1)))

    # --- forward process q ------------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), Eq. 4."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) as sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; [N x C x H x W]."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0), Eqs. 6-7."""
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._extract("posterior_variance", t, x_t)
        log_variance_clipped = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance_clipped

    # --- conversions between the three mean parameterisations ----------------------------------

    def predict_start_from_noise(self, x_t, t, noise):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), from Eq. 4."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * noise)

    def predict_noise_from_start(self, x_t, t, pred_xstart):
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), the inverse of predict_start_from_noise."""
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def predict_start_from_prev(self, x_t, t, x_prev):
        """x_0 = (1/coef1) mu~ - (coef2/coef1) x_t, from mu~(x_t, x_0) = coef1 x_0 + coef2 x_t (Eq. 7)."""
        return (self._extract("recip_posterior_mean_coef1", t, x_t) * x_prev
                - self._extract("posterior_mean_coef2_over_coef1", t, x_t) * x_t)

    # --- reverse process p_theta ------------------------------------------------------------------

    def p_mean_variance(self, model, x, t, clip_denoised=True):
        """Mean, variance, log-variance of p_theta(x_{t-1} | x_t), and the model's x_0 estimate.

        The network output is read through model_mean_type; with clip_denoised the x_0 estimate
        is clipped to [-1, 1] and the mean is the posterior mean at that x_0. This is what the
        official code samples with, and it differs from Algorithm 2, which uses no clipping:
        clip_denoised=False reproduces Algorithm 2 exactly.
        """
        N, C = x.shape[:2]
        model_output = model(x, t)
        if self.model_var_type in ("learned", "learned_range"):
            assert model_output.shape == (N, 2 * C, *x.shape[2:]), "learned variances need 2C output channels"
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == "learned":  # the paper: the network outputs log sigma^2 itself
                model_log_variance = model_var_values
            else:  # improved-diffusion: interpolate in log space between beta~_t and beta_t
                frac = (model_var_values + 1) / 2
                min_log = self._extract("posterior_log_variance_clipped", t, x)
                max_log = self._extract("log_betas", t, x)
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            assert model_output.shape == x.shape, f"model gave {tuple(model_output.shape)}, expected {tuple(x.shape)}"
            variance, log_variance = (("fixedlarge_variance", "fixedlarge_log_variance")
                                      if self.model_var_type == "fixedlarge"
                                      else ("posterior_variance", "posterior_log_variance_clipped"))
            model_variance = self._extract(variance, t, x) * torch.ones_like(x)
            model_log_variance = self._extract(log_variance, t, x) * torch.ones_like(x)

        maybe_clip = (lambda x0: x0.clamp(-1, 1)) if clip_denoised else (lambda x0: x0)
        if self.model_mean_type == "xprev":  # the network gives the mean; clipping never changes it
            pred_xstart = maybe_clip(self.predict_start_from_prev(x, t, model_output))
            model_mean = model_output
        else:
            pred_xstart = maybe_clip(model_output if self.model_mean_type == "xstart"
                                     else self.predict_start_from_noise(x, t, model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart}

    # --- the variational bound and the training losses -----------------------------------------

    def vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True):
        """One term of the bound, in bits/dim: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for
        index t > 0, and the decoder L_0 = -log p(x_0 | x_1) at index 0 (Eq. 5). output: [N]."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def prior_bpd(self, x_start):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, [N]. It has no parameters: ~1e-5 for 'linear'."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(qt_mean, qt_log_variance, 0.0 * qt_mean, 0.0 * qt_mean)) / math.log(2.0)

    @torch.inference_mode()
    def calc_bpd_loop(self, model, x_start, clip_denoised=True, generator=None):
        """The whole bound, L_T + sum_t L_{t-1}, in bits/dim for each image: an upper bound on the NLL.

        Returns {'total_bpd' [N], 'prior_bpd' [N], 'vb' [N, T] (index 0 is the decoder L_0),
        'xstart_mse' [N, T] (x_0 estimate vs x_0) and 'mse' [N, T] (eps estimate vs the noise)}.
        """
        N, T = x_start.shape[0], self.num_timesteps
        vb, xstart_mse, mse = (torch.zeros(N, T, device=x_start.device, dtype=x_start.dtype) for _ in range(3))
        for i in range(T - 1, -1, -1):
            t = torch.full((N,), i, dtype=torch.long, device=x_start.device)
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
            x_t = self.q_sample(x_start, t, noise=noise)
            out = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised)
            vb[:, i] = out["output"]
            xstart_mse[:, i] = mean_flat((out["pred_xstart"] - x_start) ** 2)
            mse[:, i] = mean_flat((self.predict_noise_from_start(x_t, t, out["pred_xstart"]) - noise) ** 2)
        prior_bpd = self.prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior_bpd, "prior_bpd": prior_bpd, "vb": vb,
                "xstart_mse": xstart_mse, "mse": mse}

    def training_losses(self, model, x_start, t, noise=None):
        """Algorithm 1's per-example loss at indices t [N], as a dict with 'loss' [N] and, where they
        apply, 'mse' (the squared error of the network's target) and 'vb' (the bound term, bits/dim)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type == "kl":  # the true bound; unclipped, as in training the official 'kl' models
            terms["loss"] = terms["vb"] = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False)["output"]
            return terms
        model_output = model(x_t, t)
        C = x_t.shape[1]
        if self.loss_type == "hybrid":  # the bound trains only the variance: the mean is frozen
            frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
            vb = self.vb_terms_bpd(lambda *_: frozen, x_start, x_t, t, clip_denoised=False)["output"]
            terms["vb"] = vb * self.num_timesteps / 1000.0
            model_output = model_output[:, :C]
        target = {"xprev": lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
                  "xstart": lambda: x_start, "eps": lambda: noise}[self.model_mean_type]()
        assert model_output.shape == target.shape == x_start.shape
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms.get("vb", 0.0)
        return terms

    # --- sampling: Algorithm 2, DDIM, and the one loop both run in ----------------------------------

    def p_sample(self, model, x, t, noise=None, clip_denoised=True):
        """One step of Algorithm 2: x_{t-1} = mean + sigma_t z from x_t [N x C x H x W], with no noise at index 0.
        Returns {'sample', 'pred_xstart'} (the x_0 estimate the step used)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
        if noise is None:
            noise = torch.randn_like(x)
        nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, noise=None, clip_denoised=True, eta=0.0):
        """One DDIM step (Song et al. 2021, Eq. 12; improved-diffusion's ddim_sample): {'sample', 'pred_xstart'}.

        x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z, sigma^2 = eta^2 beta~_t,
        with x0 the (clipped) estimate and eps rederived from it. eta=0 is deterministic; eta=1 is
        p_sample with sigma^2 = beta~ ('fixedsmall'). sigma is 0 at index 0 (beta~ = 0 there).
        """
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's beta~), got {eta}")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
        eps = self.predict_noise_from_start(x, t, out["pred_xstart"])
        sigma2 = eta ** 2 * self._extract("posterior_variance", t, x)
        eps_coef = (self._extract("one_minus_alphas_cumprod_prev", t, x) - sigma2).clamp(min=0).sqrt()  # 0 at beta=1
        sample = self._extract("sqrt_alphas_cumprod_prev", t, x) * out["pred_xstart"] + eps_coef * eps
        if eta:
            sample = sample + sigma2.sqrt() * (torch.randn_like(x) if noise is None else noise)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    @torch.inference_mode()
    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, generator=None, device=None,
                                  step=None, t_start=None, shared_noise=False):
        """The sampling loop: from x_T ~ N(0, I) (or `noise`, x_t at index t_start) down to index 0, calling
        step(model, x, t, noise=z, clip_denoised=...) (p_sample, Algorithm 2, unless given, e.g. a DDIM step) and
        yielding each step's dict with 't' added. z ~ N(0, I) comes from `generator`; shared_noise draws one
        z per step for every row (the paper's Figure 8). `shape` is [N, C, H, W]."""
        step = step or self.p_sample
        device = device if device is not None else _model_device(model)
        img = noise if noise is not None else torch.randn(*shape, generator=generator, device=device)
        t_start = self.num_timesteps - 1 if t_start is None else t_start
        for i in range(t_start, -1, -1):
            t = torch.full((len(img),), i, dtype=torch.long, device=img.device)
            z_shape = (1, *img.shape[1:]) if shared_noise else img.shape
            z = torch.randn(z_shape, generator=generator, device=img.device, dtype=img.dtype).expand_as(img)
            out = step(model, img, t, noise=z, clip_denoised=clip_denoised)
            out["t"] = i
            yield out
            img = out["sample"]

    def p_sample_loop(self, model, shape, **kwargs):
        """Algorithm 2 (or the sampler of kwargs' `step`): a sample x_0 of shape [N, C, H, W], in [-1, 1] when
        clipping. Takes p_sample_loop_progressive's keyword arguments."""
        for out in self.p_sample_loop_progressive(model, shape, **kwargs):
            pass
        return out["sample"]

    def ddim_sample_loop(self, model, shape, eta=0.0, **kwargs):
        """A DDIM sample [N, C, H, W] in num_timesteps model calls (50 on respace(d, "ddim50")); with eta=0 it is
        a function of x_T (`noise`). Takes p_sample_loop_progressive's keyword arguments."""
        return self.p_sample_loop(model, shape, step=functools.partial(self.ddim_sample, eta=eta), **kwargs)


# ---- 4. Fewer steps: respacing (improved-diffusion's SpacedDiffusion; with ddim_sample, DDIM's schedule) ----------

def space_timesteps(num_timesteps, section_counts):
    """The set of original indices 0..T-1 that a respaced diffusion keeps (improved-diffusion's rule).

    "50,25,10" (or [50, 25, 10]; 50 means "50") splits 0..T-1 into 3 equal sections and takes 50, 25 and 10 evenly
    strided, rounded indices from each, both ends included: "10" at T=1000 is {0, 111, ..., 888, 999}.
    "ddimN" uses the DDIM paper's integer stride from 0 instead: "ddim10" is {0, 100, ..., 900}.
    """
    if isinstance(section_counts, (str, int)) and not re.fullmatch(r"ddim\d+|\d+(,\d+)*", str(section_counts)):
        raise ValueError(f"steps must look like '100', '50,25,10' or 'ddim50', got {section_counts!r}")
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        count = int(section_counts[len("ddim"):])
        if not 1 <= count <= num_timesteps:
            raise ValueError(f"{section_counts!r} asks for {count} of {num_timesteps} steps; use ddimN with "
                             f"1 <= N <= {num_timesteps}, such as 'ddim{min(50, num_timesteps)}'")
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"no integer stride gives exactly {count} of {num_timesteps} steps; "
                         f"use another ddimN or plain section counts such as '{count}'")
    if isinstance(section_counts, (str, int)):
        section_counts = [int(c) for c in str(section_counts).split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (i < extra)  # the first `extra` sections are one step longer
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps (T={num_timesteps}); each "
                             f"section takes 1 to {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        # the stride summed step by step, then rounded, as improved-diffusion does ([10, 15, 20] of 300 keeps 149)
        kept += [start + round(x) for x in itertools.accumulate([0.0] + [stride] * (count - 1))]
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """The diffusion given by `betas`, keeping only the original indices `use_timesteps`.

    beta'_j = 1 - abar_{s_j} / abar_{s_(j-1)} (abar = 1 before the first kept step s_0), so
    alphas_cumprod at the kept steps is unchanged. Every method takes this diffusion's own index
    j = 0..len(use_timesteps)-1 and calls the model with the original index s_j, so a network trained
    on the full chain needs no change; calc_bpd_loop gives the (valid) bound of the shorter chain.
    """

    def __init__(self, use_timesteps, *, betas, **kwargs):
        alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        self.timestep_map, self.original_num_steps = sorted(use_timesteps), len(alphas_cumprod)
        if not self.timestep_map or not 0 <= self.timestep_map[0] <= self.timestep_map[-1] < len(alphas_cumprod):
            raise ValueError(f"use_timesteps must be a non-empty set of indices in [0, {len(alphas_cumprod)}); "
                             f"build it with space_timesteps")
        kept = alphas_cumprod[self.timestep_map]
        super().__init__(betas=1.0 - kept / np.append(1.0, kept[:-1]), **kwargs)
        self._timestep_maps = {}  # device -> the map as an int64 tensor, copied there once

    def original_timesteps(self, t):
        """The original indices s_t [N] for this diffusion's indices t [N], on t's device."""
        if t.device not in self._timestep_maps:
            self._timestep_maps[t.device] = torch.tensor(self.timestep_map, device=t.device)
        return self._timestep_maps[t.device][t]

    def _wrap_model(self, model):
        if getattr(model, "spaced_diffusion", None) is self:  # training_losses('kl') -> p_mean_variance
            return model
        wrapped = lambda x, t: model(x, self.original_timesteps(t))
        wrapped.spaced_diffusion = self
        return wrapped

    def p_mean_variance(self, model, x, t, clip_denoised=True):
        """GaussianDiffusion.p_mean_variance on this chain: the model sees the original index s_t."""
        return super().p_mean_variance(self._wrap_model(model), x, t, clip_denoised=clip_denoised)

    def training_losses(self, model, x_start, t, noise=None):
        """GaussianDiffusion.training_losses on this chain: t indexes the kept steps; the model sees s_t."""
        return super().training_losses(self._wrap_model(model), x_start, t, noise=noise)


def respace(diffusion, section_counts):
    """`diffusion` keeping space_timesteps(T, section_counts), e.g. respace(diffusion, "ddim50")."""
    if isinstance(diffusion, SpacedDiffusion):
        raise ValueError("this diffusion is already respaced; respace the original one")
    return SpacedDiffusion(space_timesteps(diffusion.num_timesteps, section_counts), betas=diffusion.betas,
                           model_mean_type=diffusion.model_mean_type, model_var_type=diffusion.model_var_type,
                           loss_type=diffusion.loss_type)


# ---- 5. The U-Net (official models/unet.py; names follow its variable layout, so weights load key for key) ---------

def get_timestep_embedding(timesteps, embedding_dim):
    """Sinusoidal embedding of integer indices [N] -> [N, dim]: [sin | cos] with frequencies
    exp(-k ln(10000) / (half - 1)), k = 0..half-1 (the official order, sin first)."""
    assert timesteps.dim() == 1
    half = embedding_dim // 2
    freqs = torch.exp(-math.log(10000) / (half - 1) * torch.arange(half, dtype=torch.float32, device=timesteps.device))
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if embedding_dim % 2 else emb


def Normalize(channels):
    """GroupNorm with the official 32 groups and TF's epsilon 1e-6 (torch's default is 1e-5)."""
    return nn.GroupNorm(32, channels, eps=1e-6)


def _init(module, scale=1.0):
    """TF variance_scaling(scale, 'fan_avg', 'uniform') == xavier_uniform with gain sqrt(scale);
    the official code turns scale 0 into 1e-10 (near-zero, not zero), biases start at 0."""
    nn.init.xavier_uniform_(module.weight, gain=math.sqrt(1e-10 if scale == 0 else scale))
    nn.init.zeros_(module.bias)
    return module


class ResnetBlock(nn.Module):
    """GN -> swish -> conv, + the timestep projection, GN -> swish -> dropout -> conv (init ~0), + skip."""

    def __init__(self, in_channels, out_channels, temb_channels, dropout):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = _init(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.temb_proj = _init(nn.Linear(temb_channels, out_channels))
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _init(nn.Conv2d(out_channels, out_channels, 3, padding=1), scale=0)
        if in_channels != out_channels:  # the official 'nin_shortcut': a 1x1 conv
            self.nin_shortcut = _init(nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 q, k, v and an output conv (init ~0)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v = (_init(nn.Conv2d(channels, channels, 1)) for _ in range(3))
        self.proj_out = _init(nn.Conv2d(channels, channels, 1), scale=0)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # q, k and v as one 1x1 conv with the three weights stacked: the same products in one kernel
        qkv = F.conv2d(h, torch.cat([self.q.weight, self.k.weight, self.v.weight]),
                       torch.cat([self.q.bias, self.k.bias, self.v.bias]))
        # [B, 3C, H, W] -> [B, 1, HW, C] x 3: a view, no copy, in channels_last; one head over all C
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, fused
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)  # channels_last again, without a copy
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """3x3 conv with stride 2 and TF 'SAME' padding, which pads 0 before and 1 after on even sizes."""

    def __init__(self, channels):
        super().__init__()
        self.conv = _init(nn.Conv2d(channels, channels, 3, stride=2))

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = _init(nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The official DDPM U-Net: eps_theta(x_t, t) (or x_0, mu~, and log sigma^2 with out_ch = 2C).

    x: [N, in_channels, resolution, resolution] in [-1, 1]; t: int64 code indices [N], 0..T-1.
    The CIFAR-10 defaults have 35,746,307 parameters (the paper's 35.7M).
    """

    @staticmethod
    def check_shape(ch, ch_mult, resolution):
        """Raise a ValueError for widths GroupNorm(32) cannot split or a resolution the levels cannot halve."""
        for c in {ch * m for m in ch_mult}:
            if c % 32:
                raise ValueError(f"every width ch*ch_mult must be a multiple of 32 for GroupNorm(32), got {c}")
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"resolution {resolution} must be divisible by 2^{len(ch_mult) - 1} for ch_mult {ch_mult}")

    def __init__(self, *, ch=128, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                 dropout=0.1, in_channels=3, resolution=32):
        super().__init__()
        self.ch, self.resolution, self.in_channels = ch, resolution, in_channels
        self.check_shape(ch, ch_mult, resolution)
        temb_ch = 4 * ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([_init(nn.Linear(ch, temb_ch)), _init(nn.Linear(temb_ch, temb_ch))])
        self.conv_in = _init(nn.Conv2d(in_channels, ch, 3, padding=1))

        curr_res, block_in, skip_chs = resolution, ch, [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * mult, temb_ch, dropout))
                block_in = ch * mult
                if curr_res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
                skip_chs.append(block_in)
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
                skip_chs.append(block_in)
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, dropout)
        self.mid.attn_1 = AttnBlock(block_in)  # always, at any resolution
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in + skip_chs.pop(), ch * mult, temb_ch, dropout))
                block_in = ch * mult
                if curr_res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)  # so up[level] holds that level's blocks, as in the official layout
        assert not skip_chs

        self.norm_out = Normalize(block_in)
        self.conv_out = _init(nn.Conv2d(block_in, out_ch, 3, padding=1), scale=0)

    def forward(self, x, t):
        assert x.shape[1:] == (self.in_channels, self.resolution, self.resolution), \
            f"UNet expects [N, {self.in_channels}, {self.resolution}, {self.resolution}], got {tuple(x.shape)}"
        temb = get_timestep_embedding(t, self.ch).to(x.dtype)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for down in self.down:
            for i, block in enumerate(down.block):
                h = block(hs[-1], temb)
                hs.append(down.attn[i](h) if len(down.attn) else h)
            if hasattr(down, "downsample"):
                hs.append(down.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)  # h first, then the skip
                if len(up.attn):
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- 6. Configuration: one dataclass per concern, and the paper's recipes as presets -------------------------------

PRECISIONS = ("fp32", "bf16")  # how the U-Net runs in training (autocast); fp32 is the paper's
MAX_SEED = 2 ** 32 - 1  # seeds are 0..MAX_SEED in every command
MAX_TIMESTEPS = 10 ** 6  # T: 1000 times the paper's; each of the diffusion's arrays is then 8 MB


def check_range(flag, value, low, high=math.inf):
    """Raise a one-sentence ValueError naming `flag` unless low <= value <= high (NaN fails)."""
    if not low <= value <= high:
        raise ValueError(f"{flag} must be " + (f"at least {low}" if high == math.inf else f"in [{low}, {high}]")
                         + f", got {value}")


@dataclass
class ModelConfig:
    """The U-Net of create_model_and_diffusion: the official unet.py arguments."""
    ch: int = 128                            # base width; every level is ch * ch_mult[level]
    ch_mult: tuple = (1, 2, 2, 2)            # one entry per resolution level (32, 16, 8, 4 for CIFAR-10)
    num_res_blocks: int = 2                  # resblocks per level going down (one more going up)
    attn_resolutions: tuple = (16,)          # spatial sizes that get a self-attention block
    dropout: float = 0.1                     # the paper swept {0.1,...,0.4} on CIFAR-10; 0 at 256x256
    in_channels: int = 3
    resolution: int = 32


@dataclass
class DiffusionConfig:
    """The diffusion of create_model_and_diffusion: the paper's Section 4 defaults, the rows of Table 2."""
    beta_schedule: str = "linear"            # 1e-4 -> 0.02
    num_timesteps: int = 1000                # T
    model_mean_type: str = "eps"             # the paper's eps-prediction
    model_var_type: str = "fixedlarge"       # sigma^2 = beta_t: CIFAR-10; the 256x256 models sample with beta~
    loss_type: str = "mse"                   # L_simple


@dataclass
class TrainConfig:
    """Algorithm 1's recipe (the official run_cifar.py values) and the run's bookkeeping."""
    data: str = "cifar10"                    # cifar10 | digits | a folder of images | a .npy/.npz of uint8 NHWC
    lr: float = 2e-4
    batch_size: int = 128                    # global batch, split across DDP ranks
    warmup: int = 5000                       # linear lr warmup from 0, in steps
    grad_clip: float = 1.0                   # global gradient norm
    ema_decay: float = 0.9999
    randflip: bool = True                    # random horizontal flips, p=0.5 per image
    steps: int = 800_000                     # the paper's CIFAR-10 run (released checkpoint: 790k); 0 = until stopped
    seed: int = 0                            # model init, data order, t, noise, flips and dropout all follow from it
    resize: bool = False                     # center-crop and resize images of another size to model.resolution
    log_every: int = 100                     # steps per log line; also how often DDP ranks agree to stop on a signal
    sample_every: int = 10_000               # steps per EMA sample grid (samples-{step}.png); 0 = never
    ckpt_every: int = 5000                   # steps per checkpoint; also one at the end and on SIGINT/SIGTERM
    keep_ckpts: int = 2                      # keep the newest K checkpoints (the official keep_checkpoint_max=2)
    precision: str = "fp32"                  # fp32 | bf16: bf16 autocasts the forward; weights, Adam and EMA stay fp32
    compile: bool = False                    # torch.compile the training forward
    out: str = ""                            # the run directory; "" means runs/<preset>


@dataclass
class Config:
    """A whole run: one dataclass per concern and the preset it started from; saved in every checkpoint."""
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "cifar10"

    def check(self):
        """Raise a ValueError that names the first bad value by its flag, before any data is read or file written."""
        t, m, d = self.train, self.model, self.diffusion
        # 0 for --steps, --warmup, --sample-every means: until stopped, no warmup, no grids. The upper bounds of T,
        # resblocks and resolution lie far past any published model, and keep each model quick to build.
        for flag, value, low, high in (
                ("--batch-size", t.batch_size, 1, math.inf), ("--log-every", t.log_every, 1, math.inf),
                ("--ckpt-every", t.ckpt_every, 1, math.inf), ("--keep-ckpts", t.keep_ckpts, 1, math.inf),
                ("--steps", t.steps, 0, math.inf), ("--warmup", t.warmup, 0, math.inf),
                ("--sample-every", t.sample_every, 0, math.inf), ("--seed", t.seed, 0, MAX_SEED),
                ("--model.ch", m.ch, 1, math.inf), ("--model.num-res-blocks", m.num_res_blocks, 1, 100),
                ("--model.in-channels", m.in_channels, 1, math.inf), ("--model.resolution", m.resolution, 1, 16384),
                ("--model.dropout", m.dropout, 0, 0.999), ("--diffusion.num-timesteps", d.num_timesteps, 1,
                                                           MAX_TIMESTEPS)):
            check_range(flag, value, low, high)
        if m.in_channels not in (1, 3):  # what images have (load_data)
            raise ValueError(f"--model.in-channels must be 1 (grayscale) or 3 (RGB), got {m.in_channels}")
        if not 0 < t.lr <= 1:  # 0 leaves the weights as initialised; Adam moves each weight by up to lr a step
            raise ValueError(f"--lr must be in (0, 1], got {t.lr}")
        if not t.grad_clip > 0:
            raise ValueError(f"--grad-clip must be greater than 0, got {t.grad_clip}")
        if not 0 <= t.ema_decay < 1:  # at 1 the EMA would stay the first step's weights
            raise ValueError(f"--ema-decay must be in [0, 1), got {t.ema_decay}")
        if t.precision not in PRECISIONS:
            raise ValueError(f"--precision: unknown precision {t.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if not m.ch_mult or min(m.ch_mult) < 1:
            raise ValueError(f"--model.ch-mult needs one positive multiplier per level, got {m.ch_mult}")
        levels = [m.resolution >> level for level in range(len(m.ch_mult))]
        if set(m.attn_resolutions) - set(levels):
            raise ValueError(f"--model.attn-resolutions {','.join(map(str, m.attn_resolutions))} names a size that is "
                             f"no level of this U-Net; use some of {','.join(map(str, levels))}, or '' for none")
        UNet.check_shape(m.ch, m.ch_mult, m.resolution)
        GaussianDiffusion.check_types(d.model_mean_type, d.model_var_type, d.loss_type)
        try:
            get_beta_schedule(d.beta_schedule, d.num_timesteps)
        except ValueError as e:  # the schedule's own rule, in the flags' words
            raise ValueError(f"--diffusion.beta-schedule {d.beta_schedule} --diffusion.num-timesteps "
                             f"{d.num_timesteps}: {e} (or --diffusion.beta-schedule cosine: any T)") from None
        params = _parameter_count(json.dumps({k: v for k, v in self.to_dict().items() if k in ("model", "diffusion")}))
        check_fits(16 * params, f"a U-Net of {f'{params:,}' if params < math.inf else 'over 2^63'} parameters "
                                f"(fp32 weights, EMA and Adam's two moments)",
                   "lower --model.ch, --model.ch-mult or --model.num-res-blocks")

    def to_dict(self):
        """Plain nested dict of ints, floats, strings and lists: safe for torch.load(weights_only=True)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # the JSON round trip turns tuples into lists

    @classmethod
    def from_dict(cls, d):
        """The inverse of to_dict; unknown sections or fields raise with the valid names."""
        sections = {f.name: f.default_factory for f in dataclasses.fields(cls) if f.name != "preset"}
        unknown = set(d) - set(sections) - {"preset"}
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; valid: {sorted(sections)} and 'preset'")
        kwargs = {"preset": d["preset"]} if "preset" in d else {}
        for name, section in sections.items():
            fields = {g.name: g for g in dataclasses.fields(section)}
            values = {k: v for k, v in d.get(name, {}).items() if k != "eval_bpd"}  # retired; older files hold it
            if set(values) - set(fields):
                raise ValueError(f"unknown {name} config field(s) {sorted(set(values) - set(fields))}; "
                                 f"valid: {sorted(fields)}")
            kwargs[name] = section(**{k: tuple(v) if isinstance(fields[k].default, tuple) else v
                                      for k, v in values.items()})
        return cls(**kwargs)


def _preset_256(data, randflip=True):
    """The official run_celebahq.py / run_lsun.py recipe: the 114M U-Net, eps/L_simple, sampling with beta~."""
    return Config(model=ModelConfig(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
                                    dropout=0.0, resolution=256),
                  diffusion=DiffusionConfig(model_var_type="fixedsmall"),
                  train=TrainConfig(data=data, lr=2e-5, batch_size=64, randflip=randflip, steps=0))


PRESETS = {
    # run_cifar.py: eps, sigma^2 = beta, L_simple, Adam 2e-4, batch 128, dropout 0.1, flips. 800k steps.
    "cifar10": Config,
    # The 256x256 runs train until stopped; the paper reports 0.5M (CelebA-HQ), 1.2M/2.4M/1.8M (LSUN).
    "celebahq256": lambda: _preset_256("celebahq"),
    "lsun_church256": lambda: _preset_256("lsun_church"),
    "lsun_bedroom256": lambda: _preset_256("lsun_bedroom"),
    # The paper's appendix says flips everywhere but bedroom; the official script (followed here) has none for cat.
    "lsun_cat256": lambda: _preset_256("lsun_cat", randflip=False),
    # The CPU demo (`make demo`): scikit-learn's 8x8 digits on 2 cores in 5-10 minutes, T=1000 as in the
    # paper. A 0.7M-parameter U-Net, and a larger lr, a shorter warmup and a faster EMA than the paper's,
    # which a 1,000-step run needs. No flips: digits are not mirror-symmetric.
    "digits": lambda: Config(model=ModelConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                                               dropout=0.1, in_channels=1, resolution=8),
                             train=TrainConfig(data="digits", lr=2e-3, batch_size=128, warmup=100, ema_decay=0.995,
                                               randflip=False, steps=1000, sample_every=1000, ckpt_every=500)),
}


def get_preset(name):
    """A fresh Config for a named preset; unknown names raise with the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[name]()
    config.preset = name
    return config


def create_model_and_diffusion(config):
    """The UNet and GaussianDiffusion described by a Config (2C output channels for learned variances)."""
    m, d = config.model, config.diffusion
    learned = d.model_var_type in ("learned", "learned_range")
    model = UNet(ch=m.ch, out_ch=m.in_channels * (2 if learned else 1), ch_mult=tuple(m.ch_mult),
                 num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
                 in_channels=m.in_channels, resolution=m.resolution)
    diffusion = GaussianDiffusion(betas=get_beta_schedule(d.beta_schedule, d.num_timesteps),
                                  model_mean_type=d.model_mean_type, model_var_type=d.model_var_type,
                                  loss_type=d.loss_type)
    return model, diffusion


@functools.lru_cache(maxsize=16)
def _parameter_count(sections):
    """The number of parameters of the U-Net of a config's model and diffusion sections (as JSON), counted on torch's
    meta device, which takes no memory, once per process (Config.check runs before every command); math.inf for
    sizes past int64."""
    try:
        with torch.device("meta"):  # shapes only
            return sum(p.numel() for p in create_model_and_diffusion(Config.from_dict(json.loads(sections)))[0]
                       .parameters())
    except (RuntimeError, TypeError, OverflowError):
        return math.inf


# ---- 7. Checkpoints and progress: plain tensors and Python values, written atomically; a bar for long loops -------

def progress_bar(iterable, total=None, desc="", enable=True):
    """`iterable` with a progress bar: tqdm when installed (redrawn once a minute in a log file, so a week-long run
    does not write gigabytes), else a plain line on stderr every 10% with the time spent and an estimate of the rest."""
    if not enable:
        return iterable
    total = len(iterable) if total is None else total
    try:
        from tqdm.auto import tqdm
        interval = 0.1 if sys.stderr.isatty() else 60
        return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=interval)
    except ImportError:
        return _plain_progress(iterable, total, desc)


def _plain_progress(iterable, total, desc):
    start = time.time()
    for i, item in enumerate(iterable):
        if i % max(1, total // 10) == 0:
            spent = time.time() - start
            rest = f", about {spent * (total - i) / i:.0f} s left" if i else ""
            print(f"{desc} {i}/{total}, {spent:.0f} s{rest}", file=sys.stderr, flush=True)
        yield item


def _log(line):
    """Print a line without breaking a tqdm bar."""
    try:
        from tqdm.auto import tqdm
        tqdm.write(line)
    except ImportError:
        print(line, flush=True)


def atomic_write(path, write):
    """Call write(f) on a temporary file, fsync, then rename it over `path`: a crash or Ctrl-C mid-write
    leaves the previous file (or none) intact, never half a file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as its own RuntimeError, without errno
        raise OSError(f"could not write {path}: {_write_failure(e, tmp)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_failure(e, tmp):
    """Why writing `tmp` failed, with the fix: a file-size limit, a full disk, or the system's own words."""
    size, errno = os.path.getsize(tmp) if os.path.exists(tmp) else 0, getattr(e, "errno", None)
    try:
        import resource  # POSIX
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        limited = limit != resource.RLIM_INFINITY and size >= limit
    except ImportError:
        limit, limited = None, False
    if errno == 27 or limited:
        return f"this process may not write files over {limit} bytes (ulimit -f); raise the limit and rerun"
    if errno == 28 or shutil.disk_usage(os.path.dirname(os.path.abspath(tmp))).free < (1 << 20):
        return "the disk is full; free space and rerun"
    return (str(e).strip().splitlines() or [type(e).__name__])[-1][:120]


def set_aside(path, why, then="making it again"):
    """Rename a file that cannot be used to path.unreadable (.unreadable2, ... when taken: nothing is ever deleted or
    written over), with one printed line: '<path> <why>; renamed it to <name> and <then>'."""
    aside, k = f"{path}.unreadable", 1
    while os.path.exists(aside):
        k += 1
        aside = f"{path}.unreadable{k}"
    os.replace(path, aside)
    print(f"{path} {why}; renamed it to {os.path.basename(aside)} and {then}", flush=True)


def check_out(path, folder=True):
    """Raise a one-sentence error unless `path` can be written, a folder (made later if missing) or a file to
    create: its nearest existing folder takes a file. Called before any work; creates nothing."""
    path = os.path.abspath(path)
    found, meant = ("a file", "a folder") if folder else ("a folder", "a file")
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise ValueError(f"--out {path} is {found}, where {meant} is meant; pass another --out")
    parent = path if folder else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        tempfile.TemporaryFile(dir=parent).close()  # NotADirectoryError where `parent` is a file
    except OSError as e:
        raise ValueError(f"cannot write --out {path} ({parent}: {e.strerror}); pass an --out you can write to") \
            from None


_LOCKS = {}  # real path of a folder -> the open lock file by which this process holds it


def lock_folder(folder):
    """Create `folder` if needed and hold it for this process: an exclusive lock on folder/.lock (flock; on Windows
    msvcrt.locking), so a second process that would write the folder is refused at once, in one sentence. The
    kernel drops the lock when the process ends, however it ends, so no stale lock is left. A process may lock a
    folder it holds again; release_locks() lets all go (every command does as it ends). Called after the checks,
    just before the first write."""
    key, created = os.path.realpath(folder), not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    if key in _LOCKS:
        return
    path = os.path.join(folder, ".lock")
    f = open(path, "a+")
    try:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            import msvcrt
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except (BlockingIOError, PermissionError):  # held; any other OSError (no locks on this file system) says itself
        f.seek(0)
        owner = f.read().strip()
        f.close()
        raise ValueError(f"{folder} is being written by another process{f' ({owner})' if owner else ''}; wait for "
                         f"it to end, or pass another --out") from None
    if not os.path.exists(path) or not os.path.samefile(path, f.fileno()):  # its holder removed it meanwhile
        f.close()
        return lock_folder(folder)
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {platform.node()}")
    f.flush()
    _LOCKS[key] = f, created


def release_locks():
    """Let go of every folder this process holds (lock_folder), newest first; one it made and wrote nothing into
    (the command failed first) is removed, so a failure leaves no empty folder."""
    while _LOCKS:
        folder, (f, created) = _LOCKS.popitem()
        try:
            if created and os.listdir(folder) == [".lock"]:
                os.remove(os.path.join(folder, ".lock"))  # still held: a process that opened it finds it gone
                os.rmdir(folder)
        except OSError:  # the folder went meanwhile, or another process made it again: leave it
            pass
        finally:
            f.close()


def save_checkpoint(path, state):
    """Write `state` (tensors and plain values only) atomically with torch.save."""
    atomic_write(path, lambda f: torch.save(state, f))


def torch_load(path):
    """torch.load(weights_only=True), so a file from someone else cannot run code; its warnings (another pickle
    protocol, ...) are silenced, as the callers' errors say what matters in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path):
    """Read a checkpoint with weights_only=True, so a file from someone else cannot run code."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder, not a checkpoint file; pass one of its ckpt-*.pt files")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass the path of a ckpt-*.pt file")
    try:
        return torch_load(path)
    except Exception:  # torch's message would advise weights_only=False, which runs the file's code: never say it
        raise ValueError(f"{path!r} is not a ddpm checkpoint or is damaged (truncated); pass a ckpt-*.pt written by "
                         f"ddpm.py train, or an earlier one") from None


def load_model(path, device="cpu"):
    """(model, diffusion, config) from a training checkpoint: the EMA weights, in eval mode and channels_last."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path!r} holds no 'config'/'model', so it is not a checkpoint written by ddpm.py train; "
                         f"pass released weights with --weights")
    config = Config.from_dict(ckpt["config"])
    model, diffusion = create_model_and_diffusion(config)
    load_state(model, ckpt["ema"] if "ema" in ckpt else ckpt["model"], path)
    return model.to(device, memory_format=torch.channels_last).eval(), diffusion, config


def load_state(module, state_dict, path):
    """module.load_state_dict(state_dict) (a module or an optimizer), refused in one sentence when the checkpoint
    `path` holds weights that do not fit the config saved in it."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError) as e:  # torch lists every misfit, over many lines
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ValueError(f"{path} holds weights that do not fit the config saved in it ({first[:120]}); the file was "
                         f"edited or damaged: pass another checkpoint") from None


# ---- 8. Data: uint8 NHWC arrays in memory, scaled to [-1, 1] per batch as the official tpu_utils does --------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
DIGITS_NUM_TRAIN = 1500  # digits split: images 0..1499 train, 1500..1796 (297 images) the held-out test set


def cache_dir():
    """Where downloads are kept (CIFAR-10 here, the Inception network in evaluate.py): $DDPM_CACHE, else
    ~/.cache/ddpm."""
    return os.environ.get("DDPM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ddpm")


def file_digest(path, algorithm="sha256"):
    """The hex digest of a file ('md5', 'sha256', ...), read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url, path, algorithm, digest, fix):
    """`path`, downloaded from `url` the first time (kept only when its digest is `digest`) and checked on every
    call: a file with another digest (cut short, damaged or substituted) is set aside as *.unreadable and downloaded
    again, never used. `fix` says what to do without network."""
    if os.path.exists(path) and file_digest(path, algorithm) != digest:  # cut short, damaged, or another file
        set_aside(path, f"has the wrong {algorithm}", "downloading it again")
    if not os.path.exists(path):
        import urllib.request
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tempfile.TemporaryFile(dir=os.path.dirname(path)).close()
        except OSError as e:
            raise ValueError(f"cannot write the cache folder {os.path.dirname(path)} ({e.strerror}); set DDPM_CACHE "
                             f"to a folder you can write") from None
        print(f"downloading {url} to {path}", file=sys.stderr)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as e:  # urllib's URLError is an OSError
            raise ConnectionError(f"cannot download {url} ({e}); {fix}") from None
        if hashlib.new(algorithm, data).hexdigest() != digest:
            raise ValueError(f"the file downloaded from {url} has the wrong {algorithm} (expected {digest}); the "
                             f"download is corrupt or the address serves another file, so nothing was kept: run "
                             f"again, or {fix}")
        atomic_write(path, lambda f: f.write(data))
    return path


def load_cifar10(split="train"):
    """CIFAR-10 as uint8 [N, 32, 32, 3] (50,000 train / 10,000 test), from the official python archive.

    The archive is downloaded once into cache_dir() and its md5 checked on every load, so a machine without
    network works as soon as the file is there. The pickles need numpy alone.
    """
    path = download(CIFAR10_URL, os.path.join(cache_dir(), "cifar-10-python.tar.gz"), "md5", CIFAR10_MD5,
                    f"without network, copy cifar-10-python.tar.gz from {CIFAR10_URL} into {cache_dir()} "
                    f"(or set DDPM_CACHE)")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    with tarfile.open(path, "r:gz") as tar:
        # The md5 above pins the official file, so unpickling it is safe.
        batches = [pickle.load(tar.extractfile(f"cifar-10-batches-py/{n}"), encoding="bytes")[b"data"]
                   for n in names]
    return np.concatenate(batches).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()  # NCHW rows -> NHWC


def load_digits(split="train", labels=False):
    """scikit-learn's bundled 8x8 digits (1,797 images, 0..16) as uint8 [N, 8, 8, 1] scaled to 0..255; with
    labels=True, (images, labels) with the classes 0..9 as int64 [N] in the same order.
    The split is fixed: the first 1,500 images train, the last 297 (other writers) are held out as 'test'."""
    images, targets = _sklearn_digits()
    part = slice(DIGITS_NUM_TRAIN) if split == "train" else slice(DIGITS_NUM_TRAIN, None)
    x = np.round(images[part] * (255 / 16)).astype(np.uint8)[..., None]
    return (x, targets[part].astype(np.int64)) if labels else x


@functools.lru_cache(maxsize=1)
def _sklearn_digits():
    """scikit-learn's digits (images, targets), parsed once per process (it reads a CSV on every call)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ImportError("--data digits needs scikit-learn: pip install scikit-learn") from None
    digits = sklearn_digits()
    return digits.images, digits.target


def _resize(x, resolution):
    """Center-crop uint8 [N, H, W, C] images to a square and resize them (bicubic, antialiased)."""
    H, W = x.shape[1:3]
    s = min(H, W)
    x = torch.from_numpy(np.array(x[:, (H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s]))  # a copy
    x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(resolution, resolution), mode="bicubic", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def load_image_folder(path, resolution=None, resize=False, in_channels=None):
    """Every image under `path` (sorted, recursively) as uint8 [N, H, W, C]: C=1 if all are grayscale,
    else 3; for a grayscale model (in_channels=1) a color image among them is refused by name. Images of mixed
    sizes need resize=True, which center-crops and resizes them to `resolution`."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImportError("--data FOLDER needs Pillow: pip install pillow") from None
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.startswith("."))
    if not files:
        raise ValueError(f"folder {path!r} holds no images; point --data at a folder of .png/.jpg files")
    images = []
    for f in progress_bar(files, len(files), "reading images", len(files) > 1000):
        try:
            with Image.open(f) as im:
                images.append(im.convert("L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"))
        except (UnidentifiedImageError, OSError):
            raise ValueError(f"{f} is not an image Pillow can read; remove it from {path}") from None
    color = [f for f, im in zip(files, images) if im.mode != "L"]
    if color and in_channels == 1 and len(color) < len(files):
        raise ValueError(f"{color[0]}{f' and {len(color) - 1} more' if len(color) > 1 else ''} in {path} "
                         f"{'are' if len(color) > 1 else 'is'} in color, the other {len(files) - len(color)} "
                         f"grayscale, and the model takes grayscale; convert or remove {'them' if len(color) > 1 else 'it'}")
    mode = "RGB" if color else "L"
    arrays = [np.asarray(im.convert(mode)).reshape(im.height, im.width, -1) for im in images]
    sizes = sorted({a.shape[:2] for a in arrays})
    if resize and resolution and sizes != [(resolution, resolution)]:
        arrays = [_resize(a[None], resolution)[0] for a in arrays]
    elif len(sizes) > 1:
        raise ValueError(f"the images in {path!r} have mixed sizes ({sizes[0]} ... {sizes[-1]}); pass --resize "
                         f"to center-crop and resize them to the model's resolution")
    return np.stack(arrays)


def load_data(source, split="train", *, resolution=None, in_channels=None, resize=False):
    """Images as a uint8 numpy array [N, H, W, C] from `source`:
    'cifar10' | 'digits' | a folder of images | a .npy/.npz file of uint8 NHWC (or NHW) images.

    split: 'train' or 'test' for cifar10 and digits; a folder or an array is one split, returned whole
    whichever split is asked, so point `source` at the images you mean. `resolution` and `in_channels`,
    when given, are checked against the model; resize=True center-crops and resizes instead of refusing.
    A .npy is memory-mapped, so arrays larger than memory work for training.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    if source == "cifar10":
        x = load_cifar10(split)
    elif source == "digits":
        x = load_digits(split)
    elif not os.path.exists(source):
        hint = (f"ddpm.py does not download {source}, so pass --data a folder or a .npy/.npz of its images"
                if source in {get_preset(name).train.data for name in PRESETS} else
                "pass a data set name, a folder of images, or a .npy/.npz file")
        raise FileNotFoundError(f"{source!r} is not 'cifar10' or 'digits' and no such file or folder exists; {hint}")
    elif os.path.isdir(source):
        x = load_image_folder(source, resolution, resize, in_channels)
    elif source.endswith((".npy", ".npz")):
        try:  # a .npy is memory-mapped; a .npz is an archive of arrays, the images under 'arr_0' (or its only one)
            x = np.load(source, mmap_mode="r")
            if isinstance(x, np.lib.npyio.NpzFile):
                with x:
                    keys = ["arr_0"] if "arr_0" in x else list(x.keys())
                    x = x[keys[0]] if len(keys) == 1 else None
        except Exception:  # numpy's message would advise allow_pickle=True, which runs the file's code
            raise ValueError(f"cannot read {source}: it is not a numpy .npy/.npz file or it is damaged; save the "
                             f"images as a uint8 NHWC array with numpy.save") from None
        if x is None:
            raise ValueError(f"{source} holds arrays {keys}; save the images under the key 'arr_0'")
    else:
        raise ValueError(f"--data {source!r} is a file but not .npy/.npz; pass a folder of images, or save "
                         f"the images as a uint8 NHWC array with numpy.save")
    if x.ndim == 3:
        x = x[..., None]  # NHW grayscale -> NHW1
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{source} holds a {x.dtype} array of shape {x.shape}; it must be uint8 images "
                         f"[N, H, W, C] with C = 1 or 3 (pixel values 0..255)")
    if resolution and x.shape[1:3] != (resolution, resolution):
        if not resize:
            raise ValueError(f"{source} holds {x.shape[1]}x{x.shape[2]} images but the model is {resolution}x"
                             f"{resolution}; resize them, or train with --resize (center-crop and resize) or "
                             f"--model.resolution {x.shape[1]}")
        x = _resize(x, resolution)
    if in_channels and x.shape[-1] != in_channels:
        kind = {1: "grayscale", 3: "RGB"}
        raise ValueError(f"{source} holds {kind[x.shape[-1]]} images but the model takes "
                         f"{kind.get(in_channels, in_channels)} (in_channels={in_channels}); "
                         f"convert the images, or train with --model.in-channels {x.shape[-1]}")
    return x


def normalize_data(x):
    """uint8 images [N, H, W, C] (numpy or tensor) -> float32 tensor [N, C, H, W] in [-1, 1]: x/127.5 - 1."""
    x = x if torch.is_tensor(x) else torch.from_numpy(np.array(x))  # a copy: memmaps are read-only
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def unnormalize_data(x):
    """float images [N, C, H, W] in [-1, 1] -> uint8 numpy [N, H, W, C]: (x+1)*127.5, clipped to
    [0, 255] and truncated, as the official image dumps do (so it is not an exact inverse of normalize_data:
    float rounding can turn a pixel v into v - 1)."""
    return ((x.detach().float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---- 9. Sampling a model: Algorithm 2 or DDIM in batches, PNG grids and .npz files --------------------------------

def image_grid(images, nrow=8, gap=128):
    """uint8 images [N, H, W, C] as one uint8 array [rows * (H + 1) - 1, nrow * (W + 1) - 1, C]: nrow per row, in
    order, with 1-pixel gaps of value `gap` (128: gray) between them."""
    (n, H, W, C), nrow = images.shape, min(nrow, len(images))
    grid = np.full((-(-n // nrow) * (H + 1) - 1, nrow * (W + 1) - 1, C), gap, np.uint8)
    for i, image in enumerate(images):
        r, c = i // nrow * (H + 1), i % nrow * (W + 1)
        grid[r:r + H, c:c + W] = image
    return grid


def save_image_grid(images, path, nrow=8, record=None):
    """Write uint8 images [N, H, W, C] as one PNG (image_grid), atomically, with `record` (a dict of the settings
    that made them) as JSON in its text chunk 'ddpm'; images under 32 px are enlarged (nearest) so 8x8 digits can
    be seen."""
    try:
        from PIL import Image, PngImagePlugin
    except ImportError:
        raise ImportError("writing PNG grids needs Pillow: pip install pillow") from None
    grid, scale, info = image_grid(images, nrow), max(1, 32 // images.shape[1]), PngImagePlugin.PngInfo()
    if record is not None:
        info.add_text("ddpm", json.dumps(record))
    image = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def sample_images(model, diffusion, n, seed=0, progress=False, ddim_eta=None, frames=None, generator=None):
    """n samples by Algorithm 2 (DDIM with ddim_eta) as float [n, C, H, W] in [-1, 1], the noise drawn from
    `generator`, else from `seed` on the model's device. With `frames`, a collection of code indices, the x0
    estimates at those indices instead, from T-1 down to 0, as [n, len(frames), C, H, W]: the paper's Figure 6."""
    device = _model_device(model)
    generator = generator or torch.Generator(device).manual_seed(seed)
    step = None if ddim_eta is None else functools.partial(diffusion.ddim_sample, eta=ddim_eta)
    shape = (n, model.in_channels, model.resolution, model.resolution)
    outs = diffusion.p_sample_loop_progressive(model, shape, generator=generator, device=device, step=step)
    outs = progress_bar(outs, diffusion.num_timesteps, "sampling", progress)
    if frames is not None:
        return torch.stack([out["pred_xstart"] for out in outs if out["t"] in frames], dim=1)
    for out in outs:  # Algorithm 2 to its end: the sample is the last step's
        pass
    return out["sample"]


def batch_seed(seed, i):
    """The seeding rule of every command that samples: batch i of a run with --seed draws its noise from this seed,
    so a run gives the same images whichever of its batches are drawn again, in whatever order."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def sample_batch(model, diffusion, seed, i, n, ddim_eta=None, progress=False):
    """Batch i of a sample run: n samples as uint8 [n, H, W, C], from batch_seed(seed, i)."""
    x = sample_images(model, diffusion, n, batch_seed(seed, i), progress, ddim_eta)
    if not torch.isfinite(x).all():  # uint8 would hide it: NaN becomes a black pixel
        raise FloatingPointError(f"{int((~torch.isfinite(x)).sum())} non-finite pixels in a batch of {n} samples: "
                                 f"the model diverged; sample an earlier checkpoint")
    return unnormalize_data(x)


def samples_file(shape):
    """The name of a samples file of uint8 images of this shape [N, H, W, C]: samples_{N}x{H}x{W}x{C}.npz."""
    return "samples_{}.npz".format("x".join(map(str, shape)))


def atomic_savez(path, **arrays):
    """np.savez written atomically (atomic_write): a crash never leaves half a file."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def weights_sha256(model):
    """sha256 of a model's state dict (names, then values in logical order): the weights' content, whatever their
    path or memory layout."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# Everything that decides a sample run's images, with the flag that sets it. The device too: CPU and CUDA generators
# draw different noise from the same seed.
SAMPLE_FLAGS = {"weights_sha256": "weights (--checkpoint/--weights)", "diffusion": "diffusion config",
                "respacing": "--respacing", "ddim_eta": "--ddim-eta", "clip_denoised": "x0 clipping",
                "seed": "--seed", "batch_size": "--batch-size", "device": "--device", "n": "--n"}


def sample_settings(model, config, respacing, ddim_eta, seed, batch_size):
    """The SAMPLE_FLAGS settings of a sample run (all but n), as JSON values: what its result file records."""
    return json.loads(json.dumps({
        "weights_sha256": weights_sha256(model), "diffusion": dataclasses.asdict(config.diffusion),
        "respacing": respacing, "ddim_eta": ddim_eta, "clip_denoised": True, "seed": seed, "batch_size": batch_size,
        "device": _model_device(model).type}))


def made_with(path, record):
    """Whether the result file `path` (a samples .npz or a PNG) was made with `record`'s settings (all but
    'source'), so a command that would write it has nothing to do. False when there is none, or it cannot be read
    (then it is set aside as *.unreadable, with one line). One made with other settings, or with none recorded, is
    refused in one sentence: no command replaces a result it was not asked for."""
    if not os.path.exists(path):
        return False
    try:
        if path.endswith(".png"):
            from PIL import Image
            with Image.open(path) as image:
                text = image.info.get("ddpm")
        else:
            with np.load(path) as f:
                text = str(f["record"]) if "record" in f.files else None
        old = json.loads(text) if text else None
    except PermissionError:
        raise
    except (OSError, ValueError, EOFError, KeyError, SyntaxError, zipfile.BadZipFile) as e:  # cut short, empty, ...
        set_aside(path, f"cannot be read ({type(e).__name__})")
        return False
    if old is None:
        raise ValueError(f"{path} exists but records no settings, so it may come from another model; delete it, "
                         f"or pass another --out")
    differ = [key for key in record if key != "source" and old.get(key) != record[key]]
    if differ:
        key = differ[0]
        raise ValueError(f"{path} holds samples made with other {SAMPLE_FLAGS.get(key, key)} "
                         f"({repr(old.get(key))[:40]}, now {repr(record[key])[:40]}); pass another --out, or delete "
                         f"it to make it again")
    return True


def check_fits(num_bytes, what, fix="ask for fewer"):
    """Refuse, in one sentence with `fix`, `what` when its num_bytes cannot fit in this machine's memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): an allocation failure says it later
        return
    if num_bytes > total:
        size = f"{num_bytes / 2 ** 30:,.1f} GiB" if num_bytes < math.inf else "more than 2^63 bytes"
        raise ValueError(f"{what} need {size} of memory, more than this machine's {total / 2 ** 30:,.1f} GiB; {fix}")


def save_samples(out, images, record):
    """Write uint8 images [N, H, W, C] as out/samples_file(...) (under 'arr_0', as the FID tools read them, and
    `record`, the dict of the settings that made them, as JSON under 'record'), and the first 64 as a PNG of the
    same name; returns the .npz path."""
    path = os.path.join(out, samples_file(images.shape))
    atomic_savez(path, arr_0=images, record=np.array(json.dumps(record)))
    save_image_grid(images[:64], path[:-4] + ".png", record=record)
    print(f"wrote {path} (uint8 {images.shape}, key 'arr_0') and {path[:-4]}.png")
    return path


def sample_batches(model, diffusion, n, batch_size, seed=0, ddim_eta=None, done=None):
    """n samples as uint8 [n, H, W, C]: batch i is sample_batch(seed, i) of batch_size images (the last holds the
    remainder). `done`: a dict of finished batches i -> uint8 arrays that is read and filled; one of another size
    (left by a run with another n) is drawn again. evaluate.py passes one backed by files to resume."""
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    done = {} if done is None else done
    for i, size in enumerate(progress_bar(sizes, len(sizes), "batches", len(sizes) > 1)):
        if i not in done or len(done[i]) != size:
            done[i] = sample_batch(model, diffusion, seed, i, size, ddim_eta, progress=len(sizes) == 1)
    return np.concatenate([done[i] for i in range(len(sizes))])


def progressive_frames(T, num_frames):
    """Figure 6's code indices: num_frames evenly spaced from T-1 (t = T, pure noise) down to 0 (the sample)."""
    return sorted({int(round(i)) for i in np.linspace(T - 1, 0, num_frames)}, reverse=True)


def save_progressive(model, diffusion, n, seed, path, ddim_eta=None, record=None, num_frames=21):
    """Figure 6 as the PNG `path`: one row per sample of batch 0 (batch_seed(seed, 0), so the last column is the
    images of `sample --n n` with a --batch-size of n or more), the x0 estimates at progressive_frames."""
    frames = progressive_frames(diffusion.num_timesteps, num_frames)
    x = sample_images(model, diffusion, n, batch_seed(seed, 0), True, ddim_eta, frames=frames)
    save_image_grid(unnormalize_data(x.flatten(0, 1)), path, x.shape[1], record)
    print(f"wrote {path}: {n} rows of x0 estimates, t = T .. 1")


def check_sample_request(model, n, ddim_eta):
    """The shape [n, H, W, C] of n samples of `model`, after refusing a --ddim-eta outside [0, 1] and samples that
    cannot fit in memory."""
    if ddim_eta is not None:  # the command lines' check (check_flags), for callers from Python
        check_range("--ddim-eta", ddim_eta, *FLAG_RANGES["ddim_eta"])
    shape = (n, model.resolution, model.resolution, model.in_channels)
    check_fits(math.prod(shape), f"--n {n} samples of {'x'.join(map(str, shape[1:]))} (uint8)")
    return shape


def sample_command(model, diffusion, out, n, batch_size, seed, progressive, ddim_eta, record, done=None):
    """The sampler behind `ddpm.py sample` and `evaluate.py sample`: n samples in batches (sample_batches, resumed
    from `done`) written by save_samples with `record` (sample_settings, n and the source), or with progressive=True
    Figure 6 (save_progressive) as out/progressive.png. Before any work it refuses a --ddim-eta outside [0, 1],
    samples that cannot fit in memory, and a result in `out` of other settings (made_with); the same settings
    again have nothing to do. It holds `out` (lock_folder) while it writes there."""
    shape = check_sample_request(model, n, ddim_eta)
    lock_folder(out)
    path = os.path.join(out, "progressive.png" if progressive else samples_file(shape))
    if progressive:  # Figure 6 is batch 0 whatever --batch-size is
        record = {k: v for k, v in record.items() if k != "batch_size"}
    if made_with(path, record):
        print(f"{path} already exists with these settings; nothing to do")
        return path
    if progressive:
        return save_progressive(model, diffusion, n, seed, path, ddim_eta, record)
    made_with(path[:-4] + ".png", record)  # the samples' picture, without its .npz: refused if of other settings
    return save_samples(out, sample_batches(model, diffusion, n, batch_size, seed, ddim_eta, done), record)


# ---- 10. Training (Algorithm 1): Adam with warmup, global-norm clipping, EMA, crash-safe checkpoints, DDP ---------

# train fields a resumed run may change; any other difference from the checkpoint's config refuses to resume
RESUMABLE_FIELDS = ("steps", "log_every", "sample_every", "ckpt_every", "keep_ckpts", "precision", "compile", "out")


def update_ema(ema_params, params, decay):
    """ema <- decay ema + (1 - decay) param for every pair, in place: TF's ExponentialMovingAverage (decay 0.9999
    in the paper), as one multi-tensor lerp over all tensors (torch.optim.swa_utils' EMA), not a kernel per tensor."""
    torch.optim.swa_utils.get_ema_multi_avg_fn(decay)(list(ema_params), list(params), None)


def adam(params, lr):
    """The paper's Adam (beta1 0.9, beta2 0.999, eps 1e-8), fused into one kernel over all tensors where this torch
    supports it on the parameters' device (CUDA; CPU from torch 2.4), else torch's default multi-tensor Adam."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except RuntimeError:  # "fused=True requires ... supported devices": an older torch on the CPU
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def autocast(device, precision="fp32"):
    """The context to run the U-Net in: 'fp32' (the default, the paper's numbers) changes nothing;
    'bf16' runs convolutions and matmuls in bfloat16 with fp32 accumulation (torch.autocast), 2-3x faster
    on CPUs with AVX512-BF16/AMX and on GPUs; the diffusion's own math stays fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(step, batch_size, num_examples, seed):
    """Dataset indices of the global batch at `step`: positions step*B .. step*B+B-1 of an endless chain of
    per-epoch shuffles. The data order is a function of (seed, step), so a resumed run continues it exactly."""
    pos = step * batch_size + np.arange(batch_size)
    epoch = pos // num_examples
    return np.concatenate([_epoch_permutation(seed, e, num_examples)[pos[epoch == e] % num_examples]
                           for e in np.unique(epoch)])


def list_checkpoints(out):
    """The ckpt-{step:07d}.pt files in a run directory, oldest first (temporary .tmp files are not listed)."""
    steps = {p: os.path.basename(p)[5:-3] for p in glob.glob(os.path.join(glob.escape(out), "ckpt-*.pt"))}
    return sorted((p for p in steps if steps[p].isdigit()), key=lambda p: int(steps[p]))


def _rng_state(generator, world):
    """Every RNG the run draws from: the generator of t, noise and flips, and torch's CPU and CUDA RNGs (dropout; one
    per rank)."""
    local = [torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None]
    per_rank = [local]
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, local)
    return {"torch": [s[0] for s in per_rank], "cuda": [s[1] for s in per_rank], "generator": generator.get_state()}


def _set_rng_state(state, generator, rank, world):
    generator.set_state(state["generator"])  # older checkpoints also hold numpy's and python's: nothing draws from them
    if len(state["torch"]) != world:  # another world size: dropout streams cannot be mapped, so reseed them
        print(f"note: resuming {len(state['torch'])} rank(s) as {world}; dropout is reseeded, not bit for bit")
        return
    torch.set_rng_state(state["torch"][rank])
    if state["cuda"][rank] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][rank])


def setup_distributed():
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL with one GPU
    per local rank, gloo on CPU. One process without torchrun is rank 0 of 1, on the GPU if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


@dataclass
class TrainState:
    """What a checkpoint holds besides the config: theta, its EMA, Adam's moments and every RNG, at `step`."""
    model: nn.Module                 # the raw weights theta (never the DDP or compile wrapper)
    ema: nn.Module                   # what samples and the NLL use
    opt: torch.optim.Optimizer
    generator: torch.Generator       # t, noise and flips of the global batch, the same stream on every rank
    step: int = 0
    last_good: str = None            # the newest checkpoint written or resumed from, named by the NaN guard


def resume_train_state(state, config, out, rank, world):
    """Load the newest readable checkpoint in `out` into `state`, if there is one: rank 0 reads it (moving
    unreadable ones aside as *.unreadable, so --keep-ckpts never counts them) and hands it to the other ranks,
    so no shared disk is needed. A checkpoint of another config (beyond RESUMABLE_FIELDS) is refused."""
    ckpt = None
    for path in reversed(list_checkpoints(out) if rank == 0 else []):
        try:
            ckpt = load_checkpoint(path)
            if not isinstance(ckpt, dict) or not {"config", "model", "ema", "optimizer", "rng"} <= ckpt.keys():
                raise ValueError(f"{path!r} lacks the config, optimizer or RNG state of a training checkpoint")
            print(f"resuming from {path}")
            break
        except ValueError as e:
            ckpt = None
            set_aside(path, f"is an unreadable checkpoint ({e})", "skipping it")
    if world > 1:
        box = [ckpt]
        dist.broadcast_object_list(box, src=0)
        ckpt = box[0]
    if ckpt is None:
        return
    now, saved = config.to_dict(), Config.from_dict(ckpt["config"]).to_dict()  # preset names aside
    diff = [f"{sec}.{k}: {saved[sec][k]!r} -> {now[sec][k]!r}" for sec in ("model", "diffusion", "train")
            for k in now[sec] if now[sec][k] != saved[sec][k] and not (sec == "train" and k in RESUMABLE_FIELDS)]
    if diff:
        raise ValueError(f"the checkpoint in {out} was trained with another config ({'; '.join(diff)}); "
                         f"resume with the run's own flags, or start a new --out")
    for module, key in ((state.model, "model"), (state.ema, "ema"), (state.opt, "optimizer")):
        load_state(module, ckpt[key], os.path.join(out, f"ckpt-{ckpt['step']:07d}.pt"))
    _set_rng_state(ckpt["rng"], state.generator, rank, world)
    state.step, state.last_good = ckpt["step"], f"ckpt-{ckpt['step']:07d}.pt"


def save_train_state(state, config, out, rank, world):
    """Write out/ckpt-{step:07d}.pt atomically (rank 0; every rank contributes its RNG state), then delete all but
    the newest train.keep_ckpts checkpoints."""
    ckpt = {"config": config.to_dict(), "step": state.step, "model": state.model.state_dict(),
            "ema": state.ema.state_dict(), "optimizer": state.opt.state_dict(),
            "rng": _rng_state(state.generator, world), "world_size": world}
    last_good, state.last_good = state.last_good, f"ckpt-{state.step:07d}.pt"
    if rank == 0:
        try:
            save_checkpoint(os.path.join(out, state.last_good), ckpt)
        except OSError as e:
            good = f"{os.path.join(out, last_good)} is still good" if last_good else "no checkpoint was written yet"
            raise OSError(f"{e}; {good}: free space, then rerun with --resume") from None
        for old in list_checkpoints(out)[:-config.train.keep_ckpts]:
            os.remove(old)


class Metrics:
    """Sums between two log lines, kept on the device (no host sync per step) and all-reduced across ranks when
    the line is written: the batch loss and gradient norm, and the per-example loss and count by quarter of t."""

    def __init__(self, device, step):
        self.loss, self.grad_norm = torch.zeros((), device=device), torch.zeros((), device=device)
        self.quarter_loss, self.quarter_count = torch.zeros(4, device=device), torch.zeros(4, device=device)
        self.step, self.clock, self.paused = step, time.time(), 0.0  # paused: seconds of sampling and saving

    def add(self, loss, grad_norm, losses, t, T):
        """Add one step's batch loss, gradient norm and per-example losses [b] at indices t [b]."""
        quarter = t * 4 // T  # 0: t in the first quarter of 0..T-1, ..., 3: the last
        self.loss += loss.detach()
        self.grad_norm += grad_norm
        self.quarter_loss.index_add_(0, quarter, losses.detach())
        self.quarter_count.index_add_(0, quarter, torch.ones_like(losses))

    def check_finite(self, step, last_good):
        """The NaN guard: raise before anything is saved, so the last good checkpoint stays the newest."""
        if not torch.isfinite(self.loss + self.grad_norm + self.quarter_loss.sum()):  # NaN or inf in any sum shows here
            raise FloatingPointError(f"non-finite loss or gradient norm by step {step}; stopped without saving, "
                                     f"so the last good checkpoint ({last_good}) stays: lower --lr or use fp32")

    def log(self, step, lr, batch_size, stop_requested, rank, world, out):
        """Write one `key=value` log line and one metrics.jsonl record (rank 0) and start new sums; return whether
        any rank was asked to stop (the ranks agree on a stop here, where they all meet)."""
        sums = torch.cat([self.loss[None], self.grad_norm[None], self.quarter_loss, self.quarter_count,
                          torch.tensor([float(stop_requested)], device=self.loss.device)])
        if world > 1:
            dist.all_reduce(sums)
        loss, grad_norm, quarter_loss, quarter_count, stop = sums.cpu().split([1, 1, 4, 4, 1])
        n = step - self.step
        if rank == 0:
            record = {"step": step, "loss": loss.item() / (n * world),
                      **{f"loss_q{q}": quarter_loss[q].item() / max(quarter_count[q].item(), 1) for q in range(4)},
                      "grad_norm": grad_norm.item() / (n * world), "lr": lr,
                      "img/s": n * batch_size / (time.time() - self.clock - self.paused)}
            _log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({**record, "time": time.time()}) + "\n")
        self.__init__(self.loss.device, step)
        return stop.item() > 0


class StopOnSignal:
    """Within `with`, the first SIGINT/SIGTERM only sets self.signal, so the loop writes a checkpoint and exits
    cleanly; a second one kills at once (the previous handler is back). Handlers need the main thread."""

    def __enter__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def request(self, signum, frame):
        """The signal handler: remember the signal and restore the previous handler for a second one."""
        self.signal = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def load_training_data(config, out, resume, rank, world):
    """The training images, after refusing bad input before any work: the config, a batch that does not split
    across the ranks, a run directory that holds checkpoints without --resume, fewer images than one batch."""
    tc, m = config.train, config.model
    config.check()
    if tc.batch_size % world:
        raise ValueError(f"--batch-size {tc.batch_size} does not split across {world} ranks; use a multiple of {world}")
    if rank == 0:
        check_out(out)
        _refuse_another_run(out, resume)
    data = load_data(tc.data, "train", resolution=m.resolution, in_channels=m.in_channels, resize=tc.resize)
    if len(data) < tc.batch_size:
        raise ValueError(f"--data {tc.data} holds {len(data)} images, fewer than one batch of {tc.batch_size}; "
                         f"lower --batch-size or add images")
    if rank == 0:
        lock_folder(out)  # the run directory is this process's from here on
        _refuse_another_run(out, resume)  # again, now that no other run can write it
    return data


def _refuse_another_run(out, resume):
    if list_checkpoints(out) and not resume:
        raise FileExistsError(f"{out} already holds checkpoints; pass --resume to continue that run or a new --out")


def write_run_config(config, out, model, data, world, device):
    """Print the resolved config and write it to out/config.json; print the run's size and where it runs."""
    text, tc = json.dumps(config.to_dict(), indent=1), config.train
    print(text)
    atomic_write(os.path.join(out, "config.json"), lambda f: f.write(text.encode()))
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(data):,} images; {world} rank(s) "
          f"on {device.type}; {tc.precision}; run directory {out}")
    if 0 < tc.steps < tc.warmup:  # allowed: a run that a --resume with more --steps will continue
        print(f"note: --warmup {tc.warmup} is longer than --steps {tc.steps}, so the lr stays below --lr {tc.lr:g} "
              f"for the whole run")


def start_train_state(config, out, rank, world, device):
    """(TrainState, diffusion): theta from train.seed (the same on every rank), its EMA and Adam, or all of them as
    the newest checkpoint in `out` left them."""
    tc = config.train
    torch.manual_seed(tc.seed)  # the same initial weights on every rank and in every run with this seed
    model, diffusion = create_model_and_diffusion(config)
    # channels_last (NHWC), which oneDNN and cuDNN convolve without reordering; before the EMA copies the model
    model.to(device, memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    state = TrainState(model, ema, adam(model.parameters(), tc.lr), torch.Generator(device).manual_seed(tc.seed))
    torch.manual_seed(tc.seed + 1 + rank)  # dropout: its own stream per rank
    resume_train_state(state, config, out, rank, world)
    return state, diffusion


def draw_batch(data, step, generator, config, rank, world, device):
    """This rank's (x_0, t, eps) of Algorithm 1 at `step`, each [B / ranks, ...] on `device`: x_0 ~ q(x_0) by
    batch_indices (flipped at random with train.randflip), t ~ U{0..T-1}, eps ~ N(0, I). The draws are made for the
    global batch B on every rank, which keeps its slice: so N ranks compute exactly what one process would."""
    B, b, T = config.train.batch_size, config.train.batch_size // world, config.diffusion.num_timesteps
    shard = slice(rank * b, (rank + 1) * b)
    x = normalize_data(data[batch_indices(step, B, len(data), config.train.seed)[shard]]).to(device, non_blocking=True)
    t = torch.randint(0, T, (B,), generator=generator, device=device)[shard]
    noise = torch.randn((B, *x.shape[1:]), generator=generator, device=device)[shard]
    flip = torch.rand(B, generator=generator, device=device)[shard] < 0.5  # drawn with or without flips: one stream
    if config.train.randflip:
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    x, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x, noise))  # like the model's weights
    return x, t, noise


def train(config, resume=False):
    """Algorithm 1 with the official recipe: t ~ U{0..T-1}, L_simple (or config.diffusion.loss_type) averaged over
    the global batch, Adam(eps 1e-8) with lr_k = lr * min(k / warmup, 1) for the k-th update (k from 0), gradients
    clipped at global norm grad_clip, then EMA <- decay * EMA + (1 - decay) * theta with decay 1e-10 at the first
    update (a copy) and ema_decay after. Training continues from the raw weights; samples and NLL use the EMA.

    Writes config.json, metrics.jsonl, samples-{step}.png and ckpt-{step:07d}.pt into the run directory
    (rank 0 only). resume=True continues from the newest readable checkpoint there, bit for bit on CPU.
    Returns the run directory.
    """
    tc, T, t_start = config.train, config.diffusion.num_timesteps, time.time()
    rank, world, device = setup_distributed()
    out = tc.out or os.path.join("runs", config.preset)
    data = load_training_data(config, out, resume, rank, world)
    state, diffusion = start_train_state(config, out, rank, world, device)
    if tc.steps and state.step >= tc.steps:  # before config.json is written: the run stays as it is
        print(f"{out} is already at step {state.step}, which --steps {tc.steps} does not pass: nothing to do; "
              f"pass a larger --steps to train on")
        return out
    model = state.model  # what runs (wrapped for DDP and compiled); state.model is what is saved
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if tc.compile:  # fused GroupNorm, swish and adds; the first call takes minutes
        model = torch.compile(model)
    if rank == 0:
        write_run_config(config, out, state.model, data, world, device)
    start, metrics = state.step, Metrics(device, state.step)
    model.train()
    with StopOnSignal() as stop:
        steps = range(start, tc.steps) if tc.steps else itertools.count(start)  # steps 0: until stopped
        for step in progress_bar(steps, tc.steps - start, "training", rank == 0 and tc.steps > 0):
            lr = tc.lr * min(step / tc.warmup, 1.0) if tc.warmup else tc.lr  # k = step: the first update has lr 0
            for group in state.opt.param_groups:
                group["lr"] = lr
            x, t, noise = draw_batch(data, step, state.generator, config, rank, world, device)
            with autocast(device, tc.precision):
                losses = diffusion.training_losses(model, x, t, noise=noise)["loss"].float()  # [b]
            loss = losses.mean()
            state.opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the rank means: the global batch mean
            grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), tc.grad_clip)
            state.opt.step()
            update_ema(state.ema.parameters(), state.model.parameters(), 1e-10 if step == 0 else tc.ema_decay)
            metrics.add(loss, grad_norm, losses, t, T)
            state.step = step + 1
            if after_step(state, diffusion, metrics, config, out, lr, stop.signal, rank, world):
                break
    if rank == 0:
        print(f"trained steps {start}..{state.step} in {(time.time() - t_start) / 60:.1f} min; run directory {out}")
    return out


def after_step(state, diffusion, metrics, config, out, lr, signal_name, rank, world):
    """What happens every k steps: a log line, an EMA sample grid, a checkpoint (also at the end and on a stop
    request). Returns whether to stop: at once on one rank; with several, when they meet at a log step."""
    tc, step = config.train, state.step
    stopping = signal_name is not None and world == 1
    if step % tc.log_every == 0 or step == tc.steps:
        metrics.check_finite(step, state.last_good)
        stopping = metrics.log(step, lr, tc.batch_size, signal_name is not None, rank, world, out)
    t_pause = time.time()
    if rank == 0 and tc.sample_every and step % tc.sample_every == 0:  # the same noise every time
        grid = sample_batch(state.ema, diffusion, tc.seed, 0, 64)  # batch 0 of `sample --seed <train seed>`
        save_image_grid(grid, os.path.join(out, f"samples-{step:07d}.png"))
    if step % tc.ckpt_every == 0 or step == tc.steps or stopping:
        metrics.check_finite(step, state.last_good)
        save_train_state(state, config, out, rank, world)
    metrics.paused += time.time() - t_pause  # img/s counts training only
    if stopping and rank == 0:
        print(f"stopped by {signal_name or 'a signal on another rank'} at step {step}; checkpoint "
              f"{state.last_good} written; continue with the same command plus --resume")
    return stopping


# ---- 11. The NLL over a data set: the bound in bits/dim, batch by batch, resumable --------------------------------

NLL_KEYS = ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse")


def dataset_bpd(model, diffusion, x_start, batch_size=256, seed=0, clip_denoised=True, done=None, progress=True):
    """calc_bpd_loop over a data set batch by batch, with dropout off, as the official bpd_eval: the bound in
    bits/dim and its terms. x_start: float [N, C, H, W] in [-1, 1] (each batch moves to the model's device).

    Batch b holds images b*batch_size.. and draws its noise from a generator seeded seed + b on the model's
    device, so every number depends on the model, the data, batch_size and seed only, not on which process or
    run computes which batch. `done`: a dict of finished batches b -> arrays that is read and filled (evaluate.py
    passes one backed by files to resume). Returns numpy float32 arrays over the images, as calc_bpd_loop's outputs:
    {'total_bpd' [N], 'prior_bpd' [N], 'vb' [N, T] (column 0 is the decoder L_0, column i > 0 is L_i),
    'xstart_mse' [N, T], 'mse' [N, T]}.
    """
    device, done = _model_device(model), {} if done is None else done
    batches = range(-(-len(x_start) // batch_size))
    model.eval()
    for b in progress_bar(batches, len(batches), "bits/dim", progress):
        if b not in done:
            x = x_start[b * batch_size:(b + 1) * batch_size].to(device)
            generator = torch.Generator(device).manual_seed(seed + b)
            terms = diffusion.calc_bpd_loop(model, x, clip_denoised=clip_denoised, generator=generator)
            done[b] = {k: terms[k].float().cpu().numpy() for k in NLL_KEYS}
    return {k: np.concatenate([done[b][k] for b in batches]) for k in NLL_KEYS}


# ---- 12. The command line: train and sample ------------------------------------------------------------------------

def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def sample_checkpoint(args):
    """`ddpm.py sample`: sample_command on a training checkpoint's EMA weights, respaced when asked."""
    check_flags(args)
    device = parse_device(args.device or default_device())
    out = args.out or os.path.splitext(args.checkpoint)[0] + "-samples"
    check_out(out)
    model, diffusion, config = load_model(args.checkpoint, device)
    if args.respacing:  # fewer steps: the model still sees its original indices
        diffusion = respace(diffusion, args.respacing)
    record = dict(sample_settings(model, config, args.respacing, args.ddim_eta, args.seed, args.batch_size),
                  n=args.n, source=os.path.abspath(args.checkpoint))
    return sample_command(model, diffusion, out, args.n, args.batch_size, args.seed, args.progressive, args.ddim_eta,
                          record)


CHOICES = {"beta_schedule": BETA_SCHEDULES, "model_mean_type": MODEL_MEAN_TYPES, "model_var_type": MODEL_VAR_TYPES,
           "loss_type": LOSS_TYPES, "precision": PRECISIONS}


def _int_tuple(text):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,2,2, got {text!r}") from None


ZERO_MEANS = {"steps": "; 0: until stopped", "warmup": "; 0: none", "sample_every": "; 0: never"}


def add_config_flags(parser, preset):
    """One flag per Config field: train fields as --name (--batch-size 64), model and diffusion fields as
    --section.name (--model.ch-mult 1,2,2,2, --diffusion.num-timesteps 100); underscores work for dashes. The
    help shows the defaults of `preset`."""
    for section in ("train", "model", "diffusion"):
        group = parser.add_argument_group(f"{section} config (defaults of --preset {preset})")
        defaults = getattr(get_preset(preset), section)
        for f in dataclasses.fields(defaults):
            prefix = "" if section == "train" else section + "."
            names = [f"--{prefix}{f.name.replace('_', '-')}"] + ([f"--{prefix}{f.name}"] if "_" in f.name else [])
            kind = ({"action": argparse.BooleanOptionalAction} if f.type is bool else
                    {"type": _int_tuple, "metavar": "INTS"} if f.type is tuple else
                    {"type": f.type, "metavar": f.type.__name__.upper()})
            if f.name in CHOICES:
                kind.update(choices=CHOICES[f.name], metavar=None)
            default = getattr(defaults, f.name) if f.name != "out" else f"runs/{preset}"
            default = ",".join(map(str, default)) if f.type is tuple else default
            group.add_argument(*names, dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                               help=f"default: {default}{ZERO_MEANS.get(f.name, '')}", **kind)


def config_from_args(args):
    """The preset's Config with every flag given on the command line applied, then range-checked."""
    config = get_preset(args.preset)
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".")
            setattr(getattr(config, section), name, value)
    config.check()
    return config


def parse_device(name):
    """torch.device(name), refused in one sentence unless this machine has it."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
        return device
    except (RuntimeError, AssertionError):  # an unknown type, no CUDA, a GPU index out of range
        raise ValueError(f"--device {name!r} is not a device of this machine"
                         f"{' (no CUDA GPU is visible)' if 'cuda' in name and not torch.cuda.is_available() else ''}; "
                         f"use cpu, or cuda / cuda:N with a visible GPU") from None


def run_cli(command, args):
    """command(args), where user error and a failed write (a full disk) exit with one 'error: ...' line and status 1,
    and Ctrl-C with one 'interrupted' line (what is kept, how to continue) and status 130: never a traceback."""
    try:
        return command(args)
    except KeyboardInterrupt as e:
        print(f"interrupted{f': {e}' if str(e) else ''}", file=sys.stderr, flush=True)
        sys.exit(130)
    except (ValueError, OSError, FloatingPointError, ImportError) as e:
        sys.exit(f"error: {e}")
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError; a bug keeps its traceback
        asked = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGT]i?B)", str(e))
        if not (isinstance(e, MemoryError) or asked or "size calculation overflowed" in str(e)):
            raise
        size = f" {int(asked[1]) / 2 ** 30:,.1f} GiB" if asked and asked[1] else f" {asked[2]}" if asked else ""
        sys.exit(f"error: out of memory: the model or a batch asked for{size or ' more than there is'}; lower "
                 f"--batch-size, or the model's size")
    finally:
        release_locks()


# The valid range of every numeric flag of ddpm.py sample, evaluate.py and experiments.py, by argparse name (train's
# are Config fields, which Config.check checks); each command checks the ranges that depend on its model or data.
FLAG_RANGES = {"n": (1,), "batch_size": (1,), "seed": (0, MAX_SEED), "ddim_eta": (0, 1), "max_examples": (1,),
               "frames": (1,), "samples_per_latent": (1,), "splits": (1,), "bootstrap": (2, 10 ** 5),
               "steps": (2,), "jobs": (1,), "timesteps": (1, MAX_TIMESTEPS), "interp_t": (1,)}


def check_flags(args):
    """Refuse, before any work, the first numeric flag in `args` outside its FLAG_RANGES range, naming it."""
    for name, bounds in FLAG_RANGES.items():
        if getattr(args, name, None) is not None:
            check_range("--" + name.replace("_", "-"), getattr(args, name), *bounds)


def main(argv=None):
    """The command line: `train` and `sample`; bad input exits with one sentence, not a traceback."""
    parser = argparse.ArgumentParser(prog="ddpm.py", allow_abbrev=False, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", allow_abbrev=False, help="train a DDPM (Algorithm 1); torchrun for DDP")
    p.add_argument("--preset", default="cifar10", choices=list(PRESETS), help="the recipe the flags below change")
    p.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint in --out")
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--preset", default="cifar10")
    preset = first.parse_known_args(argv)[0].preset  # `train --preset digits --help` shows the digits defaults
    add_config_flags(p, preset if preset in PRESETS else "cifar10")
    p = commands.add_parser("sample", allow_abbrev=False, help="draw samples with the EMA weights (Algorithm 2)")
    p.add_argument("--checkpoint", required=True, help="a ckpt-*.pt written by train")
    p.add_argument("--n", type=int, default=64, help="number of samples (evaluate.py sample: 50,000, resumable)")
    p.add_argument("--batch-size", type=int, default=256, help="samples drawn at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="output folder; default: next to the checkpoint")
    p.add_argument("--progressive", action="store_true", help="Figure 6: x0 at 21 steps, t = T to 1, a row per sample")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:1, ...; default: cuda if available")
    p.add_argument("--respacing", default="", help="fewer steps: '100', '50,25,10' or 'ddim50' (space_timesteps)")
    p.add_argument("--ddim-eta", type=float, default=None, help="sample with DDIM at this eta (0: deterministic)")
    args = parser.parse_args(argv)
    try:
        run_cli(lambda a: train(config_from_args(a), resume=a.resume) if a.command == "train" else
                sample_checkpoint(a), args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
