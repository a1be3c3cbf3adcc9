"""The paper's Table 1 for any ddpm checkpoint: NLL in bits/dim (with rate, distortion and Table 4),
FID and IS with the standard TF-compatible Inception, and the paper's figures.

    python evaluate.py nll --checkpoint runs/cifar10/ckpt-0800000.pt --data cifar10 --split test
    python evaluate.py fid-stats --data cifar10 --split train          # reference mu/sigma, once
    python evaluate.py fid samples.npz --ref runs/eval/fid_stats_cifar10_train.npz
    python evaluate.py is samples.npz
    python evaluate.py figures --checkpoint runs/cifar10/ckpt-0800000.pt

`--weights PATH` replaces `--checkpoint PATH` for the authors' released models (ddpm.load_pretrained).
It imports ddpm.py, torch, numpy and scipy; matplotlib (plots) and Pillow (PNGs) only where used.

Timestep convention, as in ddpm.py: code index t = 0..T-1 is the paper's t = 1..T.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
import zipfile

import numpy as np
import scipy.linalg
import scipy.special
import torch

import ddpm

# The paper's sample-quality protocol (Section 4, Appendix B): printed next to every FID and IS.
PAPER_NUM_SAMPLES = 50_000
PAPER_PROTOCOL = ("the paper: 50,000 samples from the EMA model, 1000 steps, sigma^2 = beta, "
                  "FID against the training set")


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


class Progress:
    """A progress bar with an ETA over `total` units: tqdm when installed, else a plain line on stderr
    at most every 10% or every minute. `initial` units count as done (resumed work) and are left out of
    the rate, so the ETA after a resume is not fooled by the batches that were loaded from disk."""

    def __init__(self, total, desc, unit="img", initial=0, enable=True):
        self.total, self.desc, self.unit, self.enable = total, desc, unit, enable
        self.n = self.start_n = self.last_n = initial
        self.start = self.last = time.time()
        self.bar = None
        if enable:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, k, **postfix):
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
            if postfix:
                self.bar.set_postfix(postfix)
            return
        now = time.time()
        if not self.enable or (self.n < self.total and self.n - self.last_n < self.total / 10 and now - self.last < 60):
            return
        self.last, self.last_n = now, self.n
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        fmt = lambda s: f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}" if math.isfinite(s) else "?"
        extra = "".join(f", {k} {v}" for k, v in postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / max(self.total, 1):.0f}%), "
              f"elapsed {fmt(now - self.start)}, ETA {fmt(eta)}{extra}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def atomic_savez(path, **arrays):
    """np.savez written atomically (ddpm.atomic_write): a crash never leaves half a file."""
    ddpm.atomic_write(path, lambda f: np.savez(f, **arrays))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# 1. Models: every command loads through one function
# ------------------------------------------------------------------------------------------------

def add_model_args(parser):
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", help="a ckpt-*.pt written by `ddpm.py train` (its EMA weights are used)")
    group.add_argument("--weights", help="the authors' released weights (a diffusers folder or a converted file)")
    parser.add_argument("--device", default=default_device(), help="cuda, cuda:1, cpu ... (default: %(default)s)")
    parser.add_argument("--respacing", default="", help="fewer steps: '100', '50,25,10' or 'ddim50' (default: all T)")


def load_model_from_args(args, device):
    """(model, diffusion, config) for --checkpoint (EMA weights) or --weights, in eval mode: dropout off."""
    model, diffusion, config = ddpm.load_for_sampling(args, device)
    if args.respacing:  # fewer steps; the bound of the shorter chain is still a valid bound
        diffusion = ddpm.respace(diffusion, args.respacing)
    return model.eval(), diffusion, config


def load_data_for(config, data, split):
    """ddpm.load_data's images, refused in one sentence unless their shape is the model's (evaluate.py has no flag
    that changes the model or the images)."""
    images = ddpm.load_data(data, split)
    want = (config.model.resolution, config.model.resolution, config.model.in_channels)
    if images.shape[1:] != want:
        raise ValueError(f"{data} holds {'x'.join(map(str, images.shape[1:]))} images (H x W x C) but the model takes "
                         f"{'x'.join(map(str, want))}; pass --data images of that shape")
    return images


def model_name(args):
    """A name for output folders: <run folder>-<checkpoint name> (runs/cifar10/ckpt-0800000.pt ->
    cifar10-ckpt-0800000), or the name of the --weights file or folder."""
    if args.checkpoint:
        path = os.path.abspath(args.checkpoint)
        return f"{os.path.basename(os.path.dirname(path))}-{os.path.splitext(os.path.basename(path))[0]}"
    return os.path.splitext(os.path.basename(args.weights.rstrip("/\\")))[0]


# ------------------------------------------------------------------------------------------------
# 2. NLL: the bound in bits/dim, its rate and distortion (Section 4.3) and the paper's Table 4
# ------------------------------------------------------------------------------------------------

NLL_KEYS = ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse")


def evaluate_nll(model, diffusion, x_start, *, batch_size=256, seed=0, clip_denoised=True, out_dir=None,
                 run_info=None, progress=True):
    """calc_bpd_loop over a whole data set, batch by batch, resumable.

    x_start: float [N, C, H, W] in [-1, 1] (CPU; each batch moves to the model's device).
    Returns numpy float32 arrays {'total_bpd' [N], 'prior_bpd' [N], 'vb' [N, T] (bits/dim; column 0 is the
    decoder L_0, column i > 0 is L_i), 'xstart_mse' [N, T] and 'mse' [N, T]}, exactly calc_bpd_loop's outputs.

    Batch b draws its noise from a torch.Generator seeded with seed + b, so the result depends on the model,
    the data, batch_size and seed only. With `out_dir`, each finished batch is written atomically to
    out_dir/batch-00000.npz and a rerun loads it instead of recomputing it: an interrupted evaluation
    continues where it stopped and gives the same numbers. out_dir/manifest.json records what the batches
    were computed from, and a rerun with another model, data, batch size, seed or device type refuses
    to mix them.
    """
    N, T = x_start.shape[0], diffusion.num_timesteps
    if N == 0:
        raise ValueError("no images to evaluate; check --data/--split/--max-examples")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    num_batches = math.ceil(N / batch_size)
    done = {}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        # What the numbers depend on; run_info (paths, names) is recorded but not compared.
        # The device type too: CPU and CUDA generators draw different noise from the same seed.
        manifest = dict(num_examples=N, batch_size=batch_size, seed=seed, num_timesteps=T, device=device.type,
                        clip_denoised=clip_denoised, model_sha256=ddpm.weights_sha256(model),
                        data_sha256=hashlib.sha256(x_start.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
        manifest_path = os.path.join(out_dir, "manifest.json")
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                old = json.load(f)
            differ = sorted(k for k in manifest if old.get(k) != manifest[k])
            if differ:
                raise ValueError(f"{out_dir} holds batches of another evaluation (differs in {', '.join(differ)}: "
                                 f"{', '.join(f'{k}={old.get(k)!r}' for k in differ)}); rerun with those settings "
                                 f"to resume it, or pass another --out")
        else:
            with open(manifest_path + ".tmp", "w") as f:
                json.dump(dict(manifest, info=run_info or {}), f, indent=1)
            os.replace(manifest_path + ".tmp", manifest_path)
        for b in range(num_batches):
            path = os.path.join(out_dir, f"batch-{b:05d}.npz")
            if os.path.exists(path):
                try:
                    with np.load(path) as f:
                        done[b] = {k: f[k] for k in NLL_KEYS}
                except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # e.g. a disk that filled up
                    print(f"recomputing {path}: unreadable ({e})", file=sys.stderr)

    bar = Progress(N, "nll", "img", initial=sum(len(r["total_bpd"]) for r in done.values()), enable=progress)
    results = []
    for b in range(num_batches):
        if b not in done:
            x = x_start[b * batch_size:(b + 1) * batch_size].to(device)
            generator = torch.Generator(device=device).manual_seed(seed + b)
            out = diffusion.calc_bpd_loop(model, x, clip_denoised=clip_denoised, generator=generator)
            done[b] = {k: out[k].float().cpu().numpy() for k in NLL_KEYS}
            if out_dir is not None:
                atomic_savez(os.path.join(out_dir, f"batch-{b:05d}.npz"), **done[b])
            so_far = np.concatenate([done[i]["total_bpd"] for i in sorted(done)])
            bar.update(len(x), bpd=f"{so_far.mean():.4f}")
        results.append(done[b])
    bar.close()
    return {k: np.concatenate([r[k] for r in results]) for k in NLL_KEYS}


def mean_and_stderr(values):
    """(mean, standard error of the mean) of per-example values; the error is 0 for one example."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def rate_distortion(vb, prior_bpd, xstart_mse):
    """The progressive-coding curves of Section 4.3 at every paper time t = 1..T, as arrays indexed by the
    code index i = t - 1:

    rate[i]: bits/dim received once x_t is known, L_T + sum_{s=t}^{T-1} L_s = prior + sum_{j > i} vb[:, j],
      averaged over examples. rate[0] is the paper's total rate (1.78 bits/dim on CIFAR-10).
    rmse[i]: the RMSE of the x_0 estimate from x_t on the 0..255 scale, sqrt(mean over examples and pixels of
      xstart_mse[:, i]) * 127.5, since the data is scaled to [-1, 1]. rmse[0] is the paper's 0.95.
    The paper's reverse time T - t + 1 is T - i.
    """
    vb = np.asarray(vb, dtype=np.float64)
    after = np.cumsum(vb[:, ::-1], axis=1)[:, ::-1]                   # after[:, i] = sum_{j >= i} vb[:, j]
    after = np.concatenate([after[:, 1:], np.zeros_like(after[:, :1])], axis=1)  # sum_{j > i} vb[:, j]
    rate = (np.asarray(prior_bpd, dtype=np.float64)[:, None] + after).mean(axis=0)
    rmse = np.sqrt(np.asarray(xstart_mse, dtype=np.float64).mean(axis=0)) * 127.5
    return rate, rmse


def table4_rows(rate, rmse):
    """The paper's Table 4: (reverse time, paper t, rate bits/dim, RMSE 0..255) at reverse times
    T, 0.9 T, ..., 0.1 T (1000, 900, ..., 100 for T = 1000), rounded to steps for other T."""
    T = len(rate)
    reverse_times = sorted({max(1, math.floor(k * T / 10 + 0.5)) for k in range(1, 11)}, reverse=True)
    return [(r, T - r + 1, float(rate[T - r]), float(rmse[T - r])) for r in reverse_times]


def nll_summary(results):
    """Scalars of Table 1 and Section 4.3 from evaluate_nll's arrays: each as (mean, standard error).
    Rate = L_1 + ... + L_T (the KL terms and the prior), distortion = L_0 (the decoder), in bits/dim;
    rate + distortion = the total bound for every example."""
    vb, prior = np.asarray(results["vb"], np.float64), np.asarray(results["prior_bpd"], np.float64)
    return {"total_bpd": mean_and_stderr(results["total_bpd"]),
            "prior_bpd": mean_and_stderr(prior),
            "rate_bpd": mean_and_stderr(vb[:, 1:].sum(axis=1) + prior),
            "distortion_bpd": mean_and_stderr(vb[:, 0]),
            "xstart_rmse": float(np.sqrt(np.asarray(results["xstart_mse"], np.float64)[:, 0].mean()) * 127.5),
            "num_examples": int(len(prior))}


def _pyplot(what):
    """matplotlib.pyplot on the file-only Agg backend, or None after a hint that `what` needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no {what}: pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def _save_figure(plt, fig, path):
    """Write fig as a PNG at 120 dpi, free it, and return True (what the plot functions report)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_rate_distortion(path, rate, rmse):
    """The paper's Figure 5 (distortion and rate against reverse time, and distortion against rate) as a PNG.
    Returns False, with a hint, when matplotlib is not installed."""
    plt = _pyplot("rate-distortion plot")
    if plt is None:
        return False
    T = len(rate)
    reverse_time = T - np.arange(T)  # code index i <-> reverse time T - i
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(reverse_time, rmse)
    axes[0].set(xlabel="reverse process steps (T - t + 1)", ylabel="distortion (RMSE, 0..255)")
    axes[1].plot(reverse_time, rate)
    axes[1].set(xlabel="reverse process steps (T - t + 1)", ylabel="rate (bits/dim)")
    axes[2].plot(rate, rmse)
    axes[2].set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE, 0..255)")
    return _save_figure(plt, fig, path)


def cmd_nll(args):
    device = torch.device(args.device)
    model, diffusion, config = load_model_from_args(args, device)
    images = load_data_for(config, args.data, args.split)
    if args.max_examples is not None:
        images = images[:args.max_examples]
    x_start = ddpm.normalize_data(images)
    out = args.out or os.path.join("runs", "eval", model_name(args))
    os.makedirs(out, exist_ok=True)
    T = diffusion.num_timesteps
    print(f"NLL of {args.checkpoint or args.weights} on {args.data} {args.split} ({len(x_start)} images, "
          f"T={T}, EMA weights, x0 clipped, batch {args.batch_size}, seed {args.seed}, {device})", flush=True)
    results = evaluate_nll(model, diffusion, x_start, batch_size=args.batch_size, seed=args.seed,
                           out_dir=os.path.join(out, f"nll-{args.split}-batches"),
                           run_info={"model": args.checkpoint or args.weights, "data": args.data, "split": args.split},
                           progress=not args.no_progress)
    summary = nll_summary(results)
    rate, rmse = rate_distortion(results["vb"], results["prior_bpd"], results["xstart_mse"])
    stem = os.path.join(out, f"nll-{args.split}")
    atomic_savez(stem + ".npz", **results, rate=rate, rmse=rmse)
    with open(stem + "-table4.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["reverse_time", "t", "rate_bits_per_dim", "distortion_rmse_0_255"])
        for row in table4_rows(rate, rmse):
            writer.writerow([row[0], row[1], f"{row[2]:.5f}", f"{row[3]:.5f}"])
    with open(stem + ".json", "w") as f:
        json.dump(dict(summary, data=args.data, split=args.split, num_timesteps=T, seed=args.seed,
                       model=args.checkpoint or args.weights), f, indent=1)
    plotted = plot_rate_distortion(stem + "-rate-distortion.png", rate, rmse)

    (m, s), (pm, _), (rm, rs), (dm, ds) = (summary[k] for k in ("total_bpd", "prior_bpd", "rate_bpd", "distortion_bpd"))
    print(f"  NLL (the bound)      {m:.4f} ± {s:.4f} bits/dim   (mean ± standard error, "
          f"{summary['num_examples']} images)")
    print(f"  prior L_T            {pm:.3g} bits/dim")
    print(f"  rate L_1 + ... + L_T {rm:.4f} ± {rs:.4f} bits/dim")
    print(f"  distortion L_0       {dm:.4f} ± {ds:.4f} bits/dim")
    print(f"  x0 RMSE at t=1       {summary['xstart_rmse']:.4f} (0..255 scale)")
    print("  Table 4: reverse time, rate (bits/dim), RMSE (0..255)")
    for r, _, rt, e in table4_rows(rate, rmse):
        print(f"    {r:5d}  {rt:.5f}  {e:9.5f}")
    if args.data == "cifar10":
        print("  the paper (L_simple, test): NLL <= 3.75 (train 3.72), rate 1.78, distortion 1.97, RMSE 0.95; "
              "Table 4 in README")
    print(f"wrote {stem}.npz (per example, per t), {stem}-table4.csv, {stem}.json"
          + (f", {stem}-rate-distortion.png" if plotted else ""))
    return summary


# ------------------------------------------------------------------------------------------------
# 3. The Inception network of StyleGAN2-ADA, clean-fid and EDM (a TorchScript port of TF's 2015 graph)
# ------------------------------------------------------------------------------------------------

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"


def cache_dir():
    """Where downloads live, as for ddpm.py's CIFAR-10 archive: $DDPM_CACHE, else ~/.cache/ddpm."""
    return os.environ.get("DDPM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ddpm")


def download_inception(url=INCEPTION_URL, cache=None, sha256=INCEPTION_SHA256):
    """The path of the Inception network in the cache folder (cache_dir()), downloaded once and checked
    against `sha256` each time, so a corrupt or substituted file is refused before it produces a number."""
    cache = cache or cache_dir()
    path = os.path.join(cache, INCEPTION_FILENAME)
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{path}.part{os.getpid()}"
        print(f"downloading {url} to {path}", file=sys.stderr)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
            got = sha256_file(tmp)
            if got != sha256:
                raise ValueError(f"the file downloaded from {url} has sha256 {got}, expected {sha256}; the download "
                                 f"is corrupt or the address serves another file, so nothing was kept: run again, or "
                                 f"fetch {INCEPTION_FILENAME} by hand and pass --inception PATH")
            os.replace(tmp, path)
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(f"cannot download the Inception network ({e}); on a machine with internet "
                                  f"access fetch {url} and pass --inception PATH, or copy it to {path}") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    got = sha256_file(path)
    if got != sha256:
        raise ValueError(f"{path} has sha256 {got}, expected {sha256}; it is corrupt or another network, so "
                         f"delete it to download it again, or pass the right file with --inception PATH")
    return path


def load_inception(path=None, device="cpu"):
    """(network, sha256) for the TorchScript Inception at `path`, or the cached/downloaded standard one.

    The network takes uint8-range images [N, 3, H, W] (any H, W: it resizes to 299x299 inside) and returns
    the 2048-d pool features with `return_features=True`, or the softmax over 1008 classes of the logits
    without their bias with `no_output_bias=True` (the original TF Inception Score, as StyleGAN2-ADA does).
    A file at `path` with another sha256 is used with a warning: its numbers are not comparable.
    """
    if path is None:
        path = download_inception()
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"--inception {path!r} does not exist; download {INCEPTION_URL} "
                                f"(sha256 {INCEPTION_SHA256[:12]}...) and pass its path")
    digest = sha256_file(path)
    if digest != INCEPTION_SHA256:
        warnings.warn(f"{path} is not the standard {INCEPTION_FILENAME} (sha256 {digest[:12]}..., expected "
                      f"{INCEPTION_SHA256[:12]}...): FID and IS from it cannot be compared with published ones")
    try:
        with warnings.catch_warnings():  # torch 2.10+ deprecates TorchScript; the standard network exists only as one
            warnings.simplefilter("ignore", DeprecationWarning)
            network = torch.jit.load(path, map_location=device).eval()
    except RuntimeError as e:
        raise ValueError(f"{path} is not a TorchScript file ({str(e).splitlines()[0]}); use the .pt from "
                         f"{INCEPTION_URL}, not the StyleGAN3 .pkl") from None
    return network, digest


def load_images(source, split="train"):
    """uint8 images [N, H, W, C], C = 1 or 3, from a .npz/.npy of samples (what `ddpm.py sample` writes),
    a folder of PNGs, or a data set name; ddpm.load_data refuses other dtypes and shapes with one sentence."""
    return ddpm.load_data(source, split)


@torch.inference_mode()
def inception_outputs(network, images, *, what="features", batch_size=200, device="cpu", progress=True):
    """Run the Inception network over uint8 images [N, H, W, C] (C = 1 is repeated to 3, as StyleGAN2-ADA
    does) and return float32 [N, D]: the pool features (what='features', D = 2048 for the real network)
    or the class probabilities from the logits without bias (what='probs', D = 1008)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, H, W, C] with C = 1 or 3, got {images.dtype} {images.shape}; "
                         f"convert samples in [-1, 1] with ddpm.unnormalize_data")
    if what not in ("features", "probs"):
        raise ValueError(f"unknown what={what!r}; choose 'features' or 'probs'")
    kwargs = {"return_features": True} if what == "features" else {"no_output_bias": True}
    outputs = []
    bar = Progress(len(images), f"inception {what}", "img", enable=progress)
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).to(device).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        outputs.append(network(x, **kwargs).float().cpu().numpy())
        bar.update(len(x))
    bar.close()
    return np.concatenate(outputs)


# ------------------------------------------------------------------------------------------------
# 4. FID and IS
# ------------------------------------------------------------------------------------------------

def feature_statistics(features):
    """(mu [D], sigma [D, D]) in float64 of features [N, D], with the unbiased covariance (np.cov's), as
    pytorch-fid and TTUR use. Summed in float64 chunks: 50,000 x 2048 features are never copied whole."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
    mu = features.mean(axis=0, dtype=np.float64)
    sigma = np.zeros((features.shape[1], features.shape[1]))
    for s in range(0, len(features), 10_000):
        centered = features[s:s + 10_000].astype(np.float64) - mu
        sigma += centered.T @ centered
    return mu, sigma / (len(features) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), with scipy's sqrtm.

    As in pytorch-fid and TTUR: when the product is singular (scipy warns, or the root is not finite),
    eps * I is added to both covariances; the imaginary part that round-off leaves in the root is dropped
    only when it is below 1e-3 on the diagonal, and a larger one raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    D = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (D, D) or sigma2.shape != (D, D):
        raise ValueError(f"statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; were they computed with the same network?")
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught) or not np.isfinite(covmean).all():
        warnings.warn(f"the product of the covariances is singular; adding {eps} to their diagonals "
                      f"(too few samples for {D} features?)")
        offset = np.eye(D) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary part up to {np.abs(covmean.imag).max():.3g}; "
                             f"the statistics are not valid covariances")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, num_splits=10):
    """(mean, std) over `num_splits` equal consecutive splits of exp(E_x KL(p(y|x) || p(y))), p(y) being the
    split's mean prediction: the original OpenAI Inception Score. probs: [N, K], each row a distribution."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < num_splits:
        raise ValueError(f"need class probabilities [N >= {num_splits}, K], got shape {probs.shape}")
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1, atol=1e-3):
        raise ValueError("each row of probs must be a probability distribution (softmax outputs), not logits")
    N = len(probs)
    scores = []
    for k in range(num_splits):
        part = probs[k * N // num_splits:(k + 1) * N // num_splits]
        kl = scipy.special.rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1)  # 0 log 0 = 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def save_fid_stats(path, mu, sigma, *, num_images, source, inception_sha256):
    """Write mu/sigma in the .npz layout of pytorch-fid and TTUR, plus what they were computed from."""
    atomic_savez(path, mu=mu, sigma=sigma, num_images=num_images, source=np.array(source),
                 inception_sha256=np.array(inception_sha256))


def load_fid_stats(path):
    """(mu, sigma, info) from a pytorch-fid/TTUR-style .npz; info holds num_images, source and the network's
    sha256 where the file records them (files written by fid-stats do)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"statistics file {path!r} does not exist; write it with "
                                f"`python evaluate.py fid-stats --data ... --out {path}`")
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} holds {sorted(f.keys())} but no 'mu'/'sigma'; it is not FID statistics, so "
                             f"write them with `python evaluate.py fid-stats`")
        info = {k: f[k].item() for k in ("num_images", "source", "inception_sha256") if k in f}
        return f["mu"], f["sigma"], info


def is_stats_file(path):
    """True for a .npz that holds FID statistics (any of 'mu'/'sigma': load_fid_stats checks both), False for
    anything else, which --ref then reads as images. A .npz that is neither raises the statistics error."""
    if not (path.endswith(".npz") and os.path.isfile(path)):
        return False
    with np.load(path) as f:
        keys = set(f.keys())
    if not keys & {"mu", "sigma"} and ("arr_0" in keys or len(keys) == 1):
        return False  # one array of images, as ddpm.load_data reads it
    load_fid_stats(path)  # raises for a file without both 'mu' and 'sigma'
    return True


def check_count(images, need, source, what, fix=f"pass more (the paper uses {PAPER_NUM_SAMPLES:,})"):
    """`images`, unless there are fewer than `need`: then one sentence saying what needs them."""
    if len(images) < need:
        raise ValueError(f"{source} holds {len(images)} image(s), but {what} needs at least {need}; {fix}")
    return images


def warn_protocol(n, what):
    if n < PAPER_NUM_SAMPLES:
        print(f"WARNING: {what} from {n:,} samples cannot be compared with the paper's ({PAPER_NUM_SAMPLES:,}); "
              f"fewer samples bias FID upward and IS downward", file=sys.stderr)


def cmd_fid_stats(args):
    images = load_images(args.data, args.split)
    if args.max_examples is not None:
        images = images[:args.max_examples]
    check_count(images, 2, args.data, "the statistics (a covariance)")
    network, digest = load_inception(args.inception, args.device)
    features = inception_outputs(network, images, batch_size=args.batch_size, device=args.device,
                                 progress=not args.no_progress)
    mu, sigma = feature_statistics(features)
    name = os.path.splitext(os.path.basename(args.data.rstrip("/\\")))[0]
    out = args.out or os.path.join("runs", "eval", f"fid_stats_{name}_{args.split}.npz")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    save_fid_stats(out, mu, sigma, num_images=len(images), source=f"{args.data} {args.split}", inception_sha256=digest)
    print(f"wrote {out}: mu {mu.shape}, sigma {sigma.shape} of {len(images):,} images ({args.data} {args.split})")
    return out


def cmd_fid(args):
    # Read and check every input before the long Inception passes.
    samples = check_count(load_images(args.samples), 2, args.samples, "FID (a covariance)")
    if is_stats_file(args.ref):
        mu_ref, sigma_ref, info = load_fid_stats(args.ref)
        ref, ref_desc = None, args.ref + (f" ({info['num_images']:,} images of {info.get('source', '?')})"
                                          if "num_images" in info else "")
    else:
        ref, info = check_count(load_images(args.ref, args.ref_split), 2, args.ref, "FID (a covariance)"), {}
        ref_desc = f"{args.ref} {args.ref_split} ({len(ref):,} images)"
        if ref.shape[1:3] != samples.shape[1:3]:
            print(f"WARNING: samples are {samples.shape[1]}x{samples.shape[2]} but the reference is "
                  f"{ref.shape[1]}x{ref.shape[2]}", file=sys.stderr)
    network, digest = load_inception(args.inception, args.device)
    if info.get("inception_sha256", digest) != digest:
        print(f"WARNING: {args.ref} was computed with another Inception network; this FID is meaningless",
              file=sys.stderr)
    run = lambda images: feature_statistics(inception_outputs(network, images, batch_size=args.batch_size,
                                                              device=args.device, progress=not args.no_progress))
    if ref is not None:
        mu_ref, sigma_ref = run(ref)
    mu, sigma = run(samples)
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    print(f"FID {fid:.4f}: {len(samples):,} samples from {args.samples} against {ref_desc}")
    print(f"  protocol of {PAPER_PROTOCOL}")
    warn_protocol(len(samples), "FID")
    return fid


def cmd_is(args):
    samples = check_count(load_images(args.samples), args.splits, args.samples, f"--splits {args.splits}",
                          "lower --splits or pass more samples")
    network, _ = load_inception(args.inception, args.device)
    probs = inception_outputs(network, samples, what="probs", batch_size=args.batch_size, device=args.device,
                              progress=not args.no_progress)
    mean, std = inception_score(probs, args.splits)
    print(f"IS {mean:.4f} ± {std:.4f} (mean ± std over {args.splits} splits): {len(samples):,} samples from "
          f"{args.samples}")
    print(f"  protocol of {PAPER_PROTOCOL}")
    warn_protocol(len(samples), "IS")
    return mean, std


# ------------------------------------------------------------------------------------------------
# 5. The paper's figures: progressive generation (Fig. 6), shared latents (Fig. 7), interpolation (Fig. 8)
# ------------------------------------------------------------------------------------------------

@torch.inference_mode()
def sample_from(model, diffusion, x_t, t, generator=None, shared_noise=False):
    """A draw from p(x_0 | x_t): Algorithm 2 from x_t at code index t down to 0. x_t: [N, C, H, W].
    shared_noise uses one noise image per step for every row (the paper fixes the noise when interpolating)."""
    img = x_t
    for i in range(t, -1, -1):
        shape = (1, *img.shape[1:]) if shared_noise else img.shape
        z = torch.randn(shape, generator=generator, device=img.device, dtype=img.dtype).expand_as(img)
        img = diffusion.p_sample(model, img, torch.full((len(img),), i, dtype=torch.long, device=img.device),
                                 noise=z)["sample"]
    return img


@torch.inference_mode()
def progressive_generation(model, diffusion, shape, num_frames=10, generator=None, device="cpu"):
    """Figure 6: the x_0 estimates of Algorithm 2 at num_frames code indices from T-1 down to 0 (the last is
    the sample itself, since at index 0 the mean is the clipped x_0 estimate). Returns [N, frames, C, H, W]."""
    T = diffusion.num_timesteps
    keep = {int(round(i)) for i in np.linspace(T - 1, 0, num_frames)}
    frames = [out["pred_xstart"] for out in diffusion.p_sample_loop_progressive(
        model, shape, generator=generator, device=device) if out["t"] in keep]
    return torch.stack(frames, dim=1)


@torch.inference_mode()
def shared_latents(model, diffusion, x_start, ts, num_samples=6, generator=None):
    """Figure 7: for each code index t in ts, x_t ~ q(x_t | x_0) drawn once, then num_samples draws from
    p(x_0 | x_t). x_start: [C, H, W]. Returns one row per t: [x_t, sample_1..num_samples], [len(ts), 1+n, C, H, W]."""
    rows = []
    for t in ts:
        t_b = torch.full((1,), t, dtype=torch.long, device=x_start.device)
        noise = torch.randn((1, *x_start.shape), generator=generator, device=x_start.device)
        x_t = diffusion.q_sample(x_start[None], t_b, noise=noise)
        samples = sample_from(model, diffusion, x_t.expand(num_samples, -1, -1, -1).contiguous(), t, generator)
        rows.append(torch.cat([x_t.clamp(-1, 1), samples]))
    return torch.stack(rows)


@torch.inference_mode()
def interpolate(model, diffusion, x_a, x_b, t, num_steps=11, generator=None):
    """Figure 8: encode x_a, x_b [C, H, W] with q(x_t | x_0), decode (1 - lam) x_t^a + lam x_t^b through
    p(x_0 | x_t) for lam = 0, 0.1, ..., 1 with the same noise for every lam. Returns [num_steps, C, H, W]."""
    t_b = torch.full((2,), t, dtype=torch.long, device=x_a.device)
    noise = torch.randn((2, *x_a.shape), generator=generator, device=x_a.device)
    x_t = diffusion.q_sample(torch.stack([x_a, x_b]), t_b, noise=noise)
    lam = torch.linspace(0, 1, num_steps, device=x_a.device).reshape(-1, 1, 1, 1)
    return sample_from(model, diffusion, (1 - lam) * x_t[0] + lam * x_t[1], t, generator, shared_noise=True)


def image_grid(rows, pad=2):
    """float images [R, K, C, H, W] in [-1, 1] -> one uint8 image [R (H+pad) + pad, K (W+pad) + pad, C],
    white between the images."""
    R, K, C, H, W = rows.shape
    tiles = ddpm.unnormalize_data(rows.reshape(R * K, C, H, W)).reshape(R, K, H, W, C)
    grid = np.full((R * (H + pad) + pad, K * (W + pad) + pad, C), 255, dtype=np.uint8)
    for r in range(R):
        for k in range(K):
            grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + k * (W + pad):pad + k * (W + pad) + W] = tiles[r, k]
    return grid


def save_png(path, image, scale=1):
    """Write a uint8 [H, W, C] image as PNG (Pillow), nearest-neighbour enlarged `scale` times."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("writing figures needs Pillow: pip install pillow") from None
    image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def read_metrics(path):
    """The log lines of a run's metrics.jsonl (one JSON object per line with 'step' and 'loss') as dicts;
    a blank or half-written last line of a running job is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    rows = [r for r in rows if isinstance(r, dict) and "step" in r and isinstance(r.get("loss"), (int, float))]
    if not rows:
        raise ValueError(f"{path} has no line with 'step' and 'loss'; pass the metrics.jsonl of a run")
    return rows


def plot_loss_curve(rows, out_path):
    """The training loss against the step from read_metrics' rows; every other numeric 'loss*' key (the
    per-quarter-of-t losses) is drawn too. Returns False, with a hint, without matplotlib."""
    plt = _pyplot("loss curve")
    if plt is None:
        return False
    keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("loss") and k != "loss"
                              and isinstance(r[k], (int, float))})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot(*zip(*pts), label=k, linewidth=1.5 if k == "loss" else 0.8)
    ax.set(xlabel="step", ylabel="training loss", yscale="log")
    ax.legend(fontsize=7)
    return _save_figure(plt, fig, out_path)


def cmd_figures(args):
    device = torch.device(args.device)
    model, diffusion, config = load_model_from_args(args, device)
    T, C, R = diffusion.num_timesteps, config.model.in_channels, config.model.resolution
    if args.interp_t is not None and not 1 <= args.interp_t <= T:
        raise ValueError(f"--interp-t must be a paper timestep 1..{T}, got {args.interp_t}")
    metrics = args.metrics or (os.path.join(os.path.dirname(args.checkpoint), "metrics.jsonl")
                               if args.checkpoint else None)
    if args.metrics and not os.path.isfile(args.metrics):
        raise FileNotFoundError(f"--metrics {args.metrics!r} does not exist; pass the metrics.jsonl of a run")
    metrics = read_metrics(metrics) if metrics and os.path.isfile(metrics) else None
    # Source images for Figures 7 and 8: data when given (the paper uses test images), else fresh samples.
    sources = None
    if args.data:
        images = load_data_for(config, args.data, args.split)
        if len(images) < 2 * args.n:
            raise ValueError(f"{args.data} {args.split} has {len(images)} images; figures need 2 x --n = {2 * args.n}")
        sources = ddpm.normalize_data(images[:2 * args.n]).to(device)
    out = args.out or os.path.join("runs", "eval", model_name(args))
    os.makedirs(out, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    scale = max(1, 64 // R)  # enlarge tiny images (digits are 8x8) so the PNGs can be looked at
    written = []

    rows = progressive_generation(model, diffusion, (args.n, C, R, R), args.frames, generator, device)
    save_png(os.path.join(out, "fig6-progressive.png"), image_grid(rows), scale)
    written.append("fig6-progressive.png")

    if sources is None:
        sources = diffusion.p_sample_loop(model, (2 * args.n, C, R, R), generator=generator, device=device)

    ts = sorted({max(0, round(f * T) - 1) for f in (1.0, 0.75, 0.5, 0.25)}, reverse=True)  # paper t = 1000,750,500,250
    rows = shared_latents(model, diffusion, sources[0], ts, args.samples_per_latent, generator)
    rows = torch.cat([sources[0].expand(len(ts), 1, -1, -1, -1), rows], dim=1)  # x_0 | x_t | samples
    save_png(os.path.join(out, "fig7-shared-latents.png"), image_grid(rows), scale)
    written.append("fig7-shared-latents.png")

    t = (args.interp_t or max(1, T // 2)) - 1  # the paper interpolates 256x256 images at t = 500 of 1000
    rows = torch.stack([torch.cat([sources[2 * k][None], interpolate(model, diffusion, sources[2 * k],
                                                                     sources[2 * k + 1], t, 11, generator),
                                   sources[2 * k + 1][None]]) for k in range(args.n)])
    save_png(os.path.join(out, "fig8-interpolation.png"), image_grid(rows), scale)
    written.append("fig8-interpolation.png")

    if metrics and plot_loss_curve(metrics, os.path.join(out, "loss.png")):
        written.append("loss.png")
    print(f"wrote {', '.join(written)} to {out} (Fig. 7 rows: x_0, x_t, samples at paper t = "
          f"{', '.join(str(s + 1) for s in ts)}; Fig. 8 at t = {t + 1}, lambda = 0, 0.1, ..., 1)")
    return [os.path.join(out, w) for w in written]


# ------------------------------------------------------------------------------------------------
# 6. Command line
# ------------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(prog="evaluate.py", allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("nll", allow_abbrev=False,
                       help="the bound in bits/dim, rate, distortion and Table 4 (Table 1's NLL column)")
    add_model_args(p)
    p.add_argument("--data", default="cifar10", help="cifar10 | digits | a folder | a .npy/.npz (default: %(default)s)")
    p.add_argument("--split", default="test", choices=("train", "test"), help="'train' gives Table 1's (train) column")
    p.add_argument("--batch-size", type=int, default=256, help="the official evaluation used 256")
    p.add_argument("--max-examples", type=int, help="evaluate the first N images only")
    p.add_argument("--seed", type=int, default=0, help="batch b draws its noise with seed + b")
    p.add_argument("--out", help="output folder (default: runs/eval/<checkpoint name>); a rerun resumes there")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_nll)

    def inception_args(p):
        p.add_argument("--inception", help=f"a local {INCEPTION_FILENAME} (default: download once into the cache)")
        p.add_argument("--batch-size", type=int, default=200)
        p.add_argument("--device", default=default_device())
        p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("fid", allow_abbrev=False, help="FID of samples against reference statistics or a data set")
    p.add_argument("samples", help="a .npz of uint8 NHWC samples (ddpm.py sample) or a folder of PNGs")
    p.add_argument("--ref", required=True, help="a fid-stats .npz (mu, sigma) or a data set: cifar10, a folder, ...")
    p.add_argument("--ref-split", default="train", choices=("train", "test"), help="the paper: train")
    inception_args(p)
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("is", allow_abbrev=False, help="Inception Score of samples (10 splits)")
    p.add_argument("samples", help="a .npz of uint8 NHWC samples (ddpm.py sample) or a folder of PNGs")
    p.add_argument("--splits", type=int, default=10)
    inception_args(p)
    p.set_defaults(func=cmd_is)

    p = sub.add_parser("fid-stats", allow_abbrev=False,
                       help="reference mu/sigma of a data set, in pytorch-fid/TTUR's .npz layout")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--max-examples", type=int)
    p.add_argument("--out", help="default: runs/eval/fid_stats_<data>_<split>.npz")
    inception_args(p)
    p.set_defaults(func=cmd_fid_stats)

    p = sub.add_parser("figures", allow_abbrev=False, help="Figures 6, 7, 8 and the training loss curve as PNGs")
    add_model_args(p)
    p.add_argument("--n", type=int, default=8, help="rows of Figures 6 and 8")
    p.add_argument("--frames", type=int, default=10, help="x0 estimates per row of Figure 6")
    p.add_argument("--samples-per-latent", type=int, default=6, help="draws from p(x0|xt) per row of Figure 7")
    p.add_argument("--interp-t", type=int, help="paper t (1..T) of Figure 8's latents (default: T/2, the paper's "
                   "500; small images keep their identity only at smaller t, the paper's Figure 9)")
    p.add_argument("--data", help="source images for Figures 7-8 (default: fresh samples)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--metrics", help="metrics.jsonl for the loss curve (default: next to --checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: runs/eval/<checkpoint name>)")
    p.set_defaults(func=cmd_figures)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"WARNING: {message}\n"  # one line, no source
    for name in ("batch_size", "max_examples", "n", "frames", "samples_per_latent", "splits"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {value}")
    return ddpm.run_cli(run, args)  # bad input, a full disk, Ctrl-C: one line, no traceback


def run(args):
    """args.func(args), after checking --device and --out: before any work."""
    if getattr(args, "device", None):
        ddpm.parse_device(args.device)
    if getattr(args, "out", None):
        ddpm.check_out(args.out, folder=args.command != "fid-stats")
    return args.func(args)


if __name__ == "__main__":
    main()
