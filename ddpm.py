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
    python ddpm.py sample --checkpoint runs/cifar10/ckpt-*.pt --n 64

It imports torch, numpy and the standard library only, so it can be copied alone.
"""
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _progress(iterable, total=None, desc="", enable=True):
    """Wrap `iterable` in a tqdm bar if tqdm is installed, else print a plain line every 10%."""
    if not enable:
        return iterable
    try:
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)
    except ImportError:
        pass
    total = total if total is not None else len(iterable)

    def plain():
        for i, item in enumerate(iterable):
            if i % max(1, total // 10) == 0:
                print(f"{desc} {i}/{total}", file=sys.stderr, flush=True)
            yield item
    return plain()


# ------------------------------------------------------------------------------------------------
# 1. Beta schedules (official `get_beta_schedule`, plus improved-diffusion's cosine)
# ------------------------------------------------------------------------------------------------

BETA_SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")


def get_beta_schedule(name, num_timesteps):
    """The variances beta_1..beta_T of q(x_t | x_{t-1}) as a float64 numpy array of shape [T].

    'linear' runs 1e-4 -> 0.02 for T=1000 (the paper); for other T both ends are scaled by
    1000/T as improved-diffusion does, so that the total noise stays comparable.
    """
    T = num_timesteps
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {T!r}")
    scale = 1000 / T
    beta_start, beta_end = 1e-4 * scale, 0.02 * scale
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    elif name == "const":
        betas = beta_end * np.ones(T, dtype=np.float64)
    elif name == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    elif name in ("warmup10", "warmup50"):
        betas = beta_end * np.ones(T, dtype=np.float64)
        n = int(T * (0.1 if name == "warmup10" else 0.5))
        betas[:n] = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif name == "cosine":  # Nichol & Dhariwal (2021): alphas_cumprod follows cos^2, betas capped at 0.999
        f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
        i = np.arange(T, dtype=np.float64)
        betas = np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)
    else:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    assert betas.shape == (T,)
    return betas


# ------------------------------------------------------------------------------------------------
# 2. Gaussian helpers: the KL between Gaussians and the discretised decoder L_0 (nats)
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# 3. The diffusion: forward process, reverse process, losses and the bound (Sections 2-3)
# ------------------------------------------------------------------------------------------------

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

    def __init__(self, *, betas, model_mean_type="eps", model_var_type="fixedlarge", loss_type="mse"):
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
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type

        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "need 0 < beta <= 1"
        self.betas = betas
        self.num_timesteps = T = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)                                     # alpha-bar_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])          # alpha-bar_{t-1}
        assert self.alphas_cumprod_prev.shape == (T,)
        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0), Eqs. 6-7. beta~ at index 0 is 0, so its log is taken from index 1.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]) if T > 1
            else np.maximum(self.posterior_variance, 1e-20))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self._buffers = {}  # (array bytes, device, dtype) -> tensor, so each buffer is copied once per device

    def _extract(self, arr, t, x):
        """arr[t] for a float64 numpy buffer arr [T] and indices t [N], shaped [N, 1, ..., 1] like x.

        The cache is keyed by the array's contents, not id(arr): callers pass temporaries such as
        `1.0 - alphas_cumprod`, and a freed temporary's id is reused by the next one.
        """
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        key = (arr.tobytes(), x.device, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.as_tensor(arr, dtype=dtype).to(x.device)
        return self._buffers[key][t].reshape(-1, *([1] * (x.dim() - 1)))

    # --- forward process q ------------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), Eq. 4."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self._extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) as sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; [N x C x H x W]."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0), Eqs. 6-7."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = self._extract(self.posterior_variance, t, x_t)
        log_variance_clipped = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance_clipped

    # --- conversions between the three mean parameterisations ----------------------------------

    def predict_start_from_noise(self, x_t, t, noise):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), from Eq. 4."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * noise)

    def predict_noise_from_start(self, x_t, t, pred_xstart):
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), the inverse of predict_start_from_noise."""
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def predict_start_from_prev(self, x_t, t, x_prev):
        """x_0 from the posterior mean mu~(x_t, x_0) = coef1 x_0 + coef2 x_t, solved for x_0."""
        return (self._extract(1.0 / self.posterior_mean_coef1, t, x_t) * x_prev
                - self._extract(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t) * x_t)

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
                min_log = self._extract(self.posterior_log_variance_clipped, t, x)
                max_log = self._extract(np.log(self.betas), t, x)
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            assert model_output.shape == x.shape, f"model returned {tuple(model_output.shape)}, expected {tuple(x.shape)}"
            if self.model_var_type == "fixedlarge":  # sigma^2 = beta_t, but beta~ at index 0 for a better L_0
                variance = np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1 else self.betas
            else:  # fixedsmall: sigma^2 = beta~_t
                variance = self.posterior_variance
            log_variance = self.posterior_log_variance_clipped if self.model_var_type == "fixedsmall" else np.log(variance)
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

    def p_sample(self, model, x, t, noise=None, clip_denoised=True):
        """One step of Algorithm 2: x_{t-1} = mean + sigma_t z, with no noise at index 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
        if noise is None:
            noise = torch.randn_like(x)
        nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, progress=False,
                                  generator=None, device=None):
        """Run Algorithm 2 from x_T ~ N(0, I) (or `noise`) and yield each step's dict
        {'t', 'sample', 'pred_xstart'}, from index T-1 down to 0."""
        device = device if device is not None else _model_device(model)
        img = noise if noise is not None else torch.randn(*shape, generator=generator, device=device)
        for i in _progress(range(self.num_timesteps - 1, -1, -1), self.num_timesteps, "sampling", progress):
            t = torch.full((shape[0],), i, dtype=torch.long, device=img.device)
            z = torch.randn(img.shape, generator=generator, device=img.device, dtype=img.dtype)
            out = self.p_sample(model, img, t, noise=z, clip_denoised=clip_denoised)
            out["t"] = i
            yield out
            img = out["sample"]

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, progress=False, generator=None,
                      device=None):
        """Algorithm 2: a sample x_0 of shape `shape` = [N, C, H, W], in [-1, 1] when clipping."""
        for out in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, progress, generator, device):
            final = out
        return final["sample"]

    # --- the variational bound and the training losses -----------------------------------------

    def vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True):
        """One term of the bound, in bits/dim: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for
        index t > 0, and the decoder L_0 = -log p(x_0 | x_1) at index 0 (Eq. 5). output: [N]."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

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

    def prior_bpd(self, x_start):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, [N]. It has no parameters: ~1e-5 for 'linear'."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(qt_mean, qt_log_variance, 0.0 * qt_mean, 0.0 * qt_mean)) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(self, model, x_start, clip_denoised=True, progress=False, generator=None):
        """The whole bound, L_T + sum_t L_{t-1}, in bits/dim for each image: an upper bound on the NLL.

        Returns {'total_bpd' [N], 'prior_bpd' [N], 'vb' [N, T] (index 0 is the decoder L_0),
        'xstart_mse' [N, T] (x_0 estimate vs x_0) and 'mse' [N, T] (eps estimate vs the noise)}.
        """
        N, T = x_start.shape[0], self.num_timesteps
        vb, xstart_mse, mse = (torch.zeros(N, T, device=x_start.device) for _ in range(3))
        for i in _progress(range(T - 1, -1, -1), T, "bpd", progress):
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


# ------------------------------------------------------------------------------------------------
# 3b. Fewer steps: respacing (improved-diffusion) and DDIM (Song, Meng & Ermon 2021)
# ------------------------------------------------------------------------------------------------

def space_timesteps(num_timesteps, section_counts):
    """The set of original indices 0..T-1 that a respaced diffusion keeps (improved-diffusion's rule).

    "50,25,10" (or [50, 25, 10]; 50 means "50") splits 0..T-1 into 3 equal sections and takes 50, 25 and 10 evenly
    strided, rounded indices from each, both ends included: "10" at T=1000 is {0, 111, ..., 888, 999}.
    "ddimN" uses the DDIM paper's integer stride from 0 instead: "ddim10" is {0, 100, ..., 900}.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        count = int(section_counts[len("ddim"):])
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
            raise ValueError(f"cannot take {count} steps from a section of {size} (T={num_timesteps}); "
                             f"use fewer steps or fewer sections")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        kept += [start + round(j * stride) for j in range(count)]
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
        return super().p_mean_variance(self._wrap_model(model), x, t, clip_denoised=clip_denoised)

    def training_losses(self, model, x_start, t, noise=None):
        return super().training_losses(self._wrap_model(model), x_start, t, noise=noise)


def respace(diffusion, section_counts):
    """`diffusion` keeping space_timesteps(T, section_counts), e.g. respace(diffusion, "ddim50")."""
    if isinstance(diffusion, SpacedDiffusion):
        raise ValueError("this diffusion is already respaced; respace the original one")
    return SpacedDiffusion(space_timesteps(diffusion.num_timesteps, section_counts), betas=diffusion.betas,
                           model_mean_type=diffusion.model_mean_type, model_var_type=diffusion.model_var_type,
                           loss_type=diffusion.loss_type)


def ddim_sample(diffusion, model, x, t, noise=None, clip_denoised=True, eta=0.0):
    """One DDIM step (Song et al. Eq. 12) from x_t [N x C x H x W]: {'sample', 'pred_xstart'}.

    x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z, sigma^2 = eta^2 beta~_t,
    with x0 the (clipped) estimate and eps rederived from it. eta=0 is deterministic; eta=1 is
    p_sample with sigma^2 = beta~ ('fixedsmall'). No noise at index 0. Also diffusion.ddim_sample.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's beta~), got {eta}")
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
    eps = diffusion.predict_noise_from_start(x, t, out["pred_xstart"])
    sigma2 = eta ** 2 * diffusion.posterior_variance  # float64, like every coefficient
    dir_coef = np.sqrt(np.maximum(1.0 - diffusion.alphas_cumprod_prev - sigma2, 0.0))  # 0 - rounding when beta=1
    sample = (diffusion._extract(np.sqrt(diffusion.alphas_cumprod_prev), t, x) * out["pred_xstart"]
              + diffusion._extract(dir_coef, t, x) * eps)
    if eta:  # sigma is 0 at index 0 (beta~_0 = 0), so no mask is needed
        noise = torch.randn_like(x) if noise is None else noise
        sample = sample + diffusion._extract(np.sqrt(sigma2), t, x) * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


@torch.no_grad()
def ddim_sample_loop_progressive(diffusion, model, shape, noise=None, clip_denoised=True, eta=0.0,
                                 progress=False, generator=None, device=None):
    """DDIM from x_T ~ N(0, I) (or `noise`), yielding {'t', 'sample', 'pred_xstart'} from index T-1
    down to 0: num_timesteps model calls, e.g. 50 on respace(diffusion, "ddim50")."""
    device = device if device is not None else _model_device(model)
    img = noise if noise is not None else torch.randn(*shape, generator=generator, device=device)
    for i in _progress(range(diffusion.num_timesteps - 1, -1, -1), diffusion.num_timesteps, "ddim", progress):
        t = torch.full((shape[0],), i, dtype=torch.long, device=img.device)
        z = torch.randn(img.shape, generator=generator, device=img.device, dtype=img.dtype) if eta else None
        out = ddim_sample(diffusion, model, img, t, noise=z, clip_denoised=clip_denoised, eta=eta)
        out["t"] = i
        yield out
        img = out["sample"]


def ddim_sample_loop(diffusion, model, shape, noise=None, clip_denoised=True, eta=0.0, progress=False,
                     generator=None, device=None):
    """A DDIM sample of shape [N, C, H, W], in [-1, 1] when clipping; eta=0 is a function of x_T."""
    for out in ddim_sample_loop_progressive(diffusion, model, shape, noise, clip_denoised, eta, progress,
                                            generator, device):
        final = out
    return final["sample"]


# DDIM works on every diffusion, respaced or not, with improved-diffusion's method names.
GaussianDiffusion.ddim_sample = ddim_sample
GaussianDiffusion.ddim_sample_loop_progressive = ddim_sample_loop_progressive
GaussianDiffusion.ddim_sample_loop = ddim_sample_loop


def _model_device(model):
    """The device of a module's first parameter, or the CPU for a plain callable."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# 4. The U-Net (official models/unet.py; names follow its variable layout, so weights load key for key)
# ------------------------------------------------------------------------------------------------

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

    def __init__(self, *, ch=128, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                 dropout=0.1, in_channels=3, resolution=32):
        super().__init__()
        self.ch, self.resolution, self.in_channels = ch, resolution, in_channels
        for c in {ch * m for m in ch_mult}:
            if c % 32:
                raise ValueError(f"every width ch*ch_mult must be a multiple of 32 for GroupNorm(32), got {c}")
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"resolution {resolution} must be divisible by 2^{len(ch_mult) - 1} for ch_mult {ch_mult}")
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
        temb = get_timestep_embedding(t, self.ch)
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


# ------------------------------------------------------------------------------------------------
# 4b. Running the U-Net fast: these change how it runs, never what it computes or its weights' names
# ------------------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16")


def update_ema(ema_params, params, decay):
    """ema <- ema - (1 - decay) (ema - param) for every pair, in place: TF's ExponentialMovingAverage
    (decay 0.9999 in the paper), as one torch._foreach_lerp_ over all tensors, not a kernel per tensor."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema_params), list(params), 1.0 - decay)


def autocast(device, precision="fp32"):
    """The context to run the U-Net in: 'fp32' (the default, the paper's numbers) changes nothing;
    'bf16' runs convolutions and matmuls in bfloat16 with fp32 accumulation (torch.autocast), 2-3x faster
    on CPUs with AVX512-BF16/AMX and on GPUs; the diffusion's own math stays fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def optimize_model(model, channels_last=True, compile=False):
    """The model, moved in place to channels_last (NHWC) memory, which oneDNN and cuDNN convolve without
    reordering, and with compile=True compiled in place by torch.compile (fused GroupNorm, swish and adds;
    the first call takes minutes). Its state_dict keeps the official names and values."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()  # nn.Module.compile keeps the state_dict keys (torch.compile(model) adds '_orig_mod.')
    return model


# ------------------------------------------------------------------------------------------------
# 5. Configuration: one dataclass per concern, and the paper's recipes as presets
# ------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    ch: int = 128                            # base width; every level is ch * ch_mult[level]
    ch_mult: tuple = (1, 2, 2, 2)            # one entry per resolution level (32, 16, 8, 4 for CIFAR-10)
    num_res_blocks: int = 2                  # resblocks per level going down (one more going up)
    attn_resolutions: tuple = (16,)          # spatial sizes that get a self-attention block
    dropout: float = 0.1                     # the paper swept {0.1,...,0.4} on CIFAR-10; 0 at 256x256
    in_channels: int = 3
    resolution: int = 32


@dataclass
class DiffusionConfig:
    beta_schedule: str = "linear"            # 1e-4 -> 0.02
    num_timesteps: int = 1000                # T
    model_mean_type: str = "eps"             # the paper's eps-prediction
    model_var_type: str = "fixedlarge"       # sigma^2 = beta_t: CIFAR-10; the 256x256 models sample with beta~
    loss_type: str = "mse"                   # L_simple


@dataclass
class TrainConfig:
    data: str = "cifar10"                    # cifar10 | digits | a folder of images | a .npy/.npz of uint8 NHWC
    lr: float = 2e-4
    batch_size: int = 128                    # global batch, split across DDP ranks
    warmup: int = 5000                       # linear lr warmup from 0, in steps
    grad_clip: float = 1.0                   # global gradient norm
    ema_decay: float = 0.9999
    randflip: bool = True                    # random horizontal flips, p=0.5 per image
    steps: int = 800_000                     # the paper's CIFAR-10 run; the released checkpoint is at 790k
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "cifar10"

    def to_dict(self):
        """Plain nested dict of ints, floats, strings and lists: safe for torch.load(weights_only=True)."""
        def plain(v):
            return list(v) if isinstance(v, tuple) else v
        return {f.name: ({k: plain(v) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
                         if dataclasses.is_dataclass(getattr(self, f.name)) else getattr(self, f.name))
                for f in dataclasses.fields(self)}

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
            values = d.get(name, {})
            if set(values) - set(fields):
                raise ValueError(f"unknown {name} config field(s) {sorted(set(values) - set(fields))}; "
                                 f"valid: {sorted(fields)}")
            kwargs[name] = section(**{k: tuple(v) if isinstance(fields[k].default, tuple) else v
                                      for k, v in values.items()})
        return cls(**kwargs)


def _preset_256(data, randflip=True, model_var_type="fixedsmall"):
    """The official run_celebahq.py / run_lsun.py recipe: the 114M U-Net, eps/L_simple, sampling with beta~."""
    return Config(model=ModelConfig(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
                                    dropout=0.0, resolution=256),
                  diffusion=DiffusionConfig(model_var_type=model_var_type),
                  train=TrainConfig(data=data, lr=2e-5, batch_size=64, randflip=randflip, steps=0))


PRESETS = {
    # run_cifar.py: eps, sigma^2 = beta, L_simple, Adam 2e-4, batch 128, dropout 0.1, flips. 800k steps.
    "cifar10": lambda: Config(preset="cifar10"),
    # The 256x256 runs train until stopped; the paper reports 0.5M (CelebA-HQ), 1.2M/2.4M/1.8M (LSUN).
    "celebahq256": lambda: _preset_256("celebahq"),
    "lsun_church256": lambda: _preset_256("lsun_church"),
    "lsun_bedroom256": lambda: _preset_256("lsun_bedroom"),
    # The paper's appendix says flips everywhere but bedroom; the official script turns them off for cat.
    # The official code wins.
    "lsun_cat256": lambda: _preset_256("lsun_cat", randflip=False),
    # The CPU demo: scikit-learn's 8x8 digits on 2 cores in minutes. Everything but the size is the paper's
    # choice, except a shorter warmup, a larger lr and a faster EMA, which a 6k-step run needs.
    "digits": lambda: Config(preset="digits",
                             model=ModelConfig(ch=64, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,),
                                               dropout=0.1, in_channels=1, resolution=8),
                             train=TrainConfig(data="digits", lr=1e-3, batch_size=128, warmup=200,
                                               ema_decay=0.999, randflip=False, steps=6000)),
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


# ------------------------------------------------------------------------------------------------
# 6. Checkpoints: plain tensors and Python values, written atomically
# ------------------------------------------------------------------------------------------------

def save_checkpoint(path, state):
    """Write `state` (tensors and plain values only) to a temporary file, fsync, then rename over
    `path`, so a crash or Ctrl-C mid-save leaves the previous file intact."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint with weights_only=True, so a file from someone else cannot run code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass the path of a ckpt-*.pt file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {e}); the file is truncated "
                         f"or not a ddpm checkpoint, so use an earlier ckpt-*.pt") from None


def load_model(path, device="cpu", use_ema=True):
    """(model, diffusion, config) from a training checkpoint, in eval mode with the EMA weights."""
    ckpt = load_checkpoint(path)
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path!r} holds no 'config'/'model'; it is not a checkpoint written by ddpm.py train")
    config = Config.from_dict(ckpt["config"])
    model, diffusion = create_model_and_diffusion(config)
    model.load_state_dict(ckpt["ema"] if use_ema and "ema" in ckpt else ckpt["model"])
    return model.to(device).eval(), diffusion, config
