"""Evaluation of one ddpm checkpoint: the paper's Table 1 (NLL in bits/dim with rate, distortion and Table 4; FID
and IS with the standard TF-compatible Inception), the paper's figures, and the digits score that measures a model
of the digits preset offline. The experiments that train and compare many digits models are in experiments.py.

    python evaluate.py sample --checkpoint runs/cifar10/ckpt-0800000.pt --n 50000 --batch-size 1000   # resumable
    python evaluate.py nll --checkpoint runs/cifar10/ckpt-0800000.pt --data cifar10 --split test
    python evaluate.py fid-stats --data cifar10 --split train          # reference mu/sigma, once
    python evaluate.py fid samples.npz --ref runs/eval/fid_stats_cifar10_train.npz
    python evaluate.py is samples.npz
    python evaluate.py figures --checkpoint runs/cifar10/ckpt-0800000.pt
    python evaluate.py digits-score --checkpoint runs/demo/ckpt-0001000.pt   # test NLL and digits-FD/IS
    python evaluate.py digits-classifier      # retrain the digits score's pinned classifier and compare

`--weights PATH` replaces `--checkpoint PATH` for the authors' released models (load_pretrained, below).
Every output that a rerun continues (sample's chunks, nll's batches, the digits samples) goes through ResumeFolder.
It imports ddpm.py, torch, numpy and scipy; matplotlib (plots) and Pillow (PNGs) only where used.

Timestep convention, as in ddpm.py: code index t = 0..T-1 is the paper's t = 1..T.
"""
import argparse
import csv
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import warnings
import zipfile

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpm

# The paper's sample-quality protocol (Section 4, Appendix B): printed next to every FID and IS.
PAPER_NUM_SAMPLES = 50_000
PAPER_PROTOCOL = ("the paper: 50,000 samples from the EMA model, 1000 steps, sigma^2 = beta, "
                  "FID against the training set")


def atomic_json(path, value):
    """`value` as indented JSON, written atomically (ddpm.atomic_write)."""
    ddpm.atomic_write(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


# ---- 1. Released weights: the paper's checkpoints as ported by pesser/pytorch_diffusion and by diffusers -------------

# diffusers UNet2DModel settings that change the function but not the keys, as (DDPM's value, diffusers' default
# for a config.json that omits it); the rest (Fourier embedding, scale-shift norm, ...) changes keys or shapes.
DIFFUSERS_DDPM_SETTINGS = {"flip_sin_to_cos": (False, True), "freq_shift": (1, 0), "norm_eps": (1e-6, 1e-5),
                           "norm_num_groups": (32, 32), "downsample_padding": (0, 1), "act_fn": ("silu", "silu"),
                           "attention_head_dim": (None, 8), "center_input_sample": (False, False),
                           "mid_block_scale_factor": (1, 1)}


def diffusers_to_official(state_dict):
    """Rename a diffusers UNet2DModel state dict to the official (pesser) layout that `UNet` uses.

    diffusers numbers up_blocks from the deepest level (up_blocks.0 is the official up[L-1]), calls the 1x1 skip
    conv conv_shortcut, and keeps attention q, k, v and output as Linear [C, C] weights, the official 1x1 convs.
    Files saved before diffusers renamed its attention layers (diffusers still converts them on load) say
    query/key/value/proj_attn for to_q/to_k/to_v/to_out.0; both are read.
    """
    levels = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("down_blocks.")), default=0)
    rules = [(r"^time_embedding\.linear_([12])\.", lambda m: f"temb.dense.{int(m[1]) - 1}."),
             (r"^mid_block\.resnets\.([01])\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
             (r"^up_blocks\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m[1])}."), (r"^down_blocks\.", "down."),
             (r"^mid_block\.attentions\.0\.", "mid.attn_1."), (r"^conv_norm_out\.", "norm_out."),
             (r"\.resnets\.", ".block."), (r"\.attentions\.", ".attn."), (r"\.downsamplers\.0\.", ".downsample."),
             (r"\.upsamplers\.0\.", ".upsample."), (r"\.time_emb_proj\.", ".temb_proj."),
             (r"\.conv_shortcut\.", ".nin_shortcut."), (r"\.group_norm\.", ".norm."), (r"\.(to_q|query)\.", ".q."),
             (r"\.(to_k|key)\.", ".k."), (r"\.(to_v|value)\.", ".v."), (r"\.(to_out\.0|proj_attn)\.", ".proj_out.")]
    official = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        if re.search(r"\.(q|k|v|proj_out)\.weight$", key) and value.dim() == 2:
            value = value[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        official[key] = value
    return official


def _read_weights(path):
    """A state dict from .safetensors (the safetensors package) or .bin/.ckpt/.pt (torch.load, weights_only)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        state_dict = ddpm.torch_load(path)
    except ImportError:
        raise ImportError(f"reading {path!r} needs the safetensors package: pip install safetensors") from None
    except Exception:  # torch's message would advise weights_only=False, which runs the file's code: never say it
        raise ValueError(f"cannot read {path!r}: it is not a .ckpt/.pt/.bin/.safetensors weights file or it is "
                         f"damaged (truncated), so download it again") from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path!r} holds a {type(state_dict).__name__}, not a state dict of tensors")
    return state_dict


def _config_from_weights(state_dict, resolution, hint, preset):
    """The Config of an official-layout state dict: architecture from keys and shapes, the rest from its preset."""
    ch, in_channels = state_dict["conv_in.weight"].shape[:2]
    levels = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("down.")), default=0)
    ch_mult = tuple(state_dict[f"down.{level}.block.0.conv1.weight"].shape[0] // ch for level in range(levels))
    num_res_blocks = len({k.split(".")[3] for k in state_dict if k.startswith("down.0.block.")})
    attn_levels = [level for level in range(levels) if f"down.{level}.attn.0.norm.weight" in state_dict]
    if preset is None and ch_mult == (1, 2, 2, 2):
        preset = "cifar10"
    elif preset is None and ch_mult == (1, 1, 2, 2, 4, 4):  # one U-Net for all 256x256 runs: the path names the data
        names = re.findall(r"(?<![a-z])(celeba|church|bedroom|cat)(?:hq)?(?![a-z])", hint.lower())
        preset = {"celeba": "celebahq256"}.get(names[-1], f"lsun_{names[-1]}256") if names else None
    elif preset is None:
        raise ValueError(f"the weights have ch_mult {ch_mult}, neither the CIFAR-10 (1, 2, 2, 2) nor the 256x256 "
                         f"(1, 1, 2, 2, 4, 4) U-Net of the released models; a checkpoint of ddpm.py train goes with "
                         f"--checkpoint (in Python, load_pretrained(path, preset=NAME) reads other official-layout "
                         f"weights with a preset's sampling settings)")
    # Without a dataset name the 256x256 recipe still samples right (eps, fixedsmall): the dataset is only a label.
    config = ddpm.get_preset(preset or "celebahq256")
    if not preset:
        config.preset, config.train.data = "256x256", "unknown"
    resolution = resolution or config.model.resolution  # config.json's sample_size, else the preset's
    config.model = dataclasses.replace(config.model, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                                       attn_resolutions=tuple(resolution >> level for level in attn_levels),
                                       in_channels=in_channels, resolution=resolution)
    return config


def load_pretrained(path, device="cpu", preset=None):
    """(model, diffusion, config) from released weights, the model in eval mode and channels_last, like `load_model`.

    path: a pesser/pytorch_diffusion .ckpt (or any .pt/.bin state dict in the official layout), a diffusers
    UNet2DModel weights file, or a diffusers snapshot folder (config.json and diffusion_pytorch_model.safetensors
    or .bin, at its top as in google/ddpm-* or under unet/). The layout comes from the keys, the architecture
    from the shapes, the resolution from config.json's sample_size (else the preset), and the sampling settings
    from the preset: CIFAR-10 eps/fixedlarge, CelebA-HQ and LSUN eps/fixedsmall, all clipping x_0. The 256x256
    dataset is read from the path or config.json's _name_or_path; `preset` overrides it. Loading is strict.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist; pass a weights file or a diffusers snapshot folder")
    if os.path.isdir(path):
        exts = ("safetensors", "bin") if importlib.util.find_spec("safetensors") else ("bin", "safetensors")
        found = [w for d in (path, os.path.join(path, "unet")) if os.path.isfile(os.path.join(d, "config.json"))
                 for w in (os.path.join(d, f"diffusion_pytorch_model.{ext}") for ext in exts) if os.path.isfile(w)]
        if not found:
            raise ValueError(f"folder {path!r} holds no config.json with a diffusion_pytorch_model.safetensors or .bin "
                             f"(at its top or in unet/); pass a complete diffusers snapshot or the weights file")
        path = found[0]
    state_dict, settings, config_json = _read_weights(path), {}, os.path.join(os.path.dirname(path), "config.json")
    if "conv_norm_out.weight" in state_dict:  # diffusers' UNet2DModel
        if os.path.isfile(config_json):
            with open(config_json) as f:
                settings = json.load(f)
        for key, (value, default) in DIFFUSERS_DDPM_SETTINGS.items():
            if settings and settings.get(key, default) != value:
                raise ValueError(f"{config_json} sets {key}={settings.get(key, default)!r} where the DDPM U-Net has "
                                 f"{value!r}: it is another model, which this U-Net cannot reproduce")
        state_dict = diffusers_to_official(state_dict)
    elif {"config", "model", "ema"} <= state_dict.keys():
        raise ValueError(f"{path!r} is a checkpoint of ddpm.py train, not released weights; pass it with --checkpoint")
    elif "temb.dense.0.weight" not in state_dict:
        raise ValueError(f"{path!r} is neither the official layout (temb.dense.0.weight, ...) nor diffusers' "
                         f"UNet2DModel (conv_norm_out.weight, ...); its first keys are {list(state_dict)[:4]}")
    try:
        config = _config_from_weights(state_dict, settings.get("sample_size"),
                                      f"{os.path.abspath(path)} {settings.get('_name_or_path', '')}", preset)
        with torch.device("meta"):  # shapes only: the weights come from the file, so skip the initialisation
            model, diffusion = ddpm.create_model_and_diffusion(config)
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, assign=True)  # strict
    except (KeyError, RuntimeError) as e:  # a key the architecture is read from, or torch's list of misfits
        raise ValueError(f"{path!r} does not fit the DDPM U-Net its shapes describe; it is damaged or another "
                         f"model: {type(e).__name__}: {e}") from None
    return model.to(device, memory_format=torch.channels_last).eval(), diffusion, config


# ---- 2. Models: every command loads through one function -------------------------------------------------------------

def add_model_args(parser):
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", help="a ckpt-*.pt written by `ddpm.py train` (its EMA weights are used)")
    group.add_argument("--weights", help="the authors' released weights (a diffusers folder or a converted file)")
    parser.add_argument("--device", default=ddpm.default_device(), help="cuda, cuda:1, cpu ... (default: %(default)s)")
    parser.add_argument("--respacing", default="", help="fewer steps: '100', '50,25,10' or 'ddim50' (default: all T)")


def load_for_sampling(checkpoint=None, weights=None, device="cpu", respacing=""):
    """(model, diffusion, config) in eval mode (dropout off): a training checkpoint's EMA weights (ddpm.load_model)
    or released weights (load_pretrained), the diffusion respaced to `respacing` when given (ddpm.respace)."""
    model, diffusion, config = load_pretrained(weights, device) if weights else ddpm.load_model(checkpoint, device)
    if respacing:  # fewer steps; the bound of the shorter chain is still a valid bound
        diffusion = ddpm.respace(diffusion, respacing)
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


# ---- 3. Resumable outputs: one folder, one fingerprint, whole pieces -------------------------------------------------

class ResumeFolder:
    """A folder in which one result is built piece by piece, so that a rerun continues where a run stopped.

    settings: {name: value}, everything that decides the result (weights' sha256, seed, batch size, ...), in
    JSON types. The first piece written records them in folder/settings.json (with `info`, which is shown but
    never compared: paths, names); a later run with other settings is refused before any work, in one sentence
    naming the first differing setting and `flags[name]`, the flag that sets it. A piece is a numpy array or a dict
    of them (name *.npz; one array is stored as 'arr_0') or a JSON value (name *.json), written atomically
    (ddpm.atomic_write), so a killed run leaves whole pieces; one that cannot be read (a disk that filled up, a
    copy cut short) is renamed *.unreadable and made again, with one printed line; so is an unreadable
    settings.json, and then every piece made before it, whose settings are unknown. A piece in a folder without
    settings.json is refused, not taken or replaced. The folder is made and held by this process
    (ddpm.lock_folder) from the start, so a second process is refused at once; lock=False is for a worker whose
    parent process holds it.
    """

    def __init__(self, folder, settings, flags=None, what="results", info=None, lock=True):
        self.folder, self.what, self.flags, self.info = os.fspath(folder), what, flags or {}, info or {}
        if lock:
            ddpm.lock_folder(self.folder)
        self.settings = json.loads(json.dumps(settings))  # as a rerun reads them back: tuples become lists
        self.recorded, self.lost, self.written = os.path.isfile(self.path("settings.json")), None, set()
        if self.recorded:
            try:
                with open(self.path("settings.json")) as f:
                    old = json.load(f)
            except (OSError, ValueError) as e:  # what was made before now has unknown settings: set aside when met
                ddpm.set_aside(self.path("settings.json"), f"cannot be read ({type(e).__name__})",
                               "setting aside what was made with it as it is met")
                # files made before now: a second less, for coarse file times (the run that made them has ended)
                self.recorded, self.lost, old = False, time.time() - 1, self.settings
            self.lost = old.get("lost", self.lost)  # kept in the new record, for every later run
            differ = [key for key, value in self.settings.items() if old.get(key) != value]
            if differ:
                key = differ[0]
                was, now = _shown(key, old, old.get("info", {})), _shown(key, self.settings, self.info)
                raise ValueError(f"{self.folder} holds {what} made with other {self.flags.get(key, key)} ({was}, now "
                                 f"{now}); rerun with those settings to continue, or use another --out")
        self.had_record = self.recorded

    def path(self, name):
        return os.path.join(self.folder, name)

    def record(self):
        """Write settings.json, once: from then on the folder's pieces are known to be made with these settings."""
        if not self.recorded:
            os.makedirs(self.folder, exist_ok=True)
            lost = {} if self.lost is None else {"lost": self.lost}
            atomic_json(self.path("settings.json"), dict(self.settings, info=self.info, **lost))
            self.recorded = True

    def claim(self, names):
        """record(), before this run writes the result files `names` (not pieces) into the folder. One already
        there is made again when the folder recorded these settings; it is refused when the folder recorded none,
        and set aside when it was made before a settings.json that could not be read: nothing is written over
        unasked."""
        for name in names:
            path = self.path(name)
            if not os.path.exists(path) or name in self.written:
                continue
            if self._before_loss(name):
                ddpm.set_aside(path, "was made before its folder's settings.json was lost")
            elif not self.had_record:
                raise ValueError(f"{path} exists but {self.folder} holds no record of the settings it was made with "
                                 f"(no settings.json); delete it, or use another --out")
        self.record()

    def _before_loss(self, name):
        """Whether file `name` was made before this folder's settings.json was found unreadable (its settings are
        unknown), by an earlier run: not one this object wrote."""
        return (self.lost is not None and name not in self.written
                and os.path.getmtime(self.path(name)) <= self.lost)

    def save(self, name, value):
        """Write piece `name` (an array or a dict of arrays for *.npz, else JSON) atomically; returns its path."""
        self.record()
        path = self.path(name)
        self.written.add(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if name.endswith(".npz"):
            ddpm.atomic_savez(path, **(value if isinstance(value, dict) else {"arr_0": value}))
        else:
            atomic_json(path, value)
        return path

    def load(self, name):
        """Piece `name` as saved (an array, or {key: array}, for *.npz), or None when it is missing or unreadable
        (then renamed *.unreadable, with a printed line, so it is made again)."""
        path = self.path(name)
        if not os.path.exists(path):
            return None
        if not self.recorded and self.lost is None:
            raise ValueError(f"{path} exists but {self.folder} holds no record of the settings it was made with "
                             f"(no settings.json); delete it, or use another --out")
        try:
            if self._before_loss(name):
                raise ValueError("made before its folder's settings.json was lost")
            if not name.endswith(".npz"):
                with open(path) as f:
                    return json.load(f)
            with np.load(path) as f:
                return f["arr_0"] if f.files == ["arr_0"] else {key: f[key] for key in f.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # truncated, empty, not a file
            ddpm.set_aside(path, f"cannot be read ({type(e).__name__}: {str(e)[:80]})")
            return None

    def pieces(self, names):
        """{key: piece} of the readable pieces among names ({key: name}); setting a key saves that piece first.
        The `done` dict of ddpm.dataset_bpd and ddpm.sample_batches."""
        return _Pieces(self, names)


def _shown(key, settings, info):
    """A setting as a refusal shows it: a sha256 as what it is the digest of (`info[key]`, a path) and 12 digits."""
    value = settings.get(key)
    return f"{info.get(key, '?')} sha256 {value[:12]}" if re.fullmatch(r"[0-9a-f]{64}", str(value)) else repr(value)


class _Pieces(dict):
    def __init__(self, folder, names):
        super().__init__((key, piece) for key, name in names.items() if (piece := folder.load(name)) is not None)
        self.folder, self.names = folder, names

    def __setitem__(self, key, value):
        self.folder.save(self.names[key], value)
        super().__setitem__(key, value)


# ---- 4. Samples for FID and IS: ddpm.sample_batch's images in chunks that a rerun skips ------------------------------

def chain_sha256(diffusion):
    """sha256 of the chain a diffusion runs: its betas (float64) and, when respaced, the original indices it keeps.
    Two respacings with the same number of steps ('100' and 'ddim100') are two chains."""
    kept = np.asarray(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)), dtype=np.int64)
    return hashlib.sha256(np.asarray(diffusion.betas, dtype=np.float64).tobytes() + kept.tobytes()).hexdigest()


def cmd_sample(args):
    """`evaluate.py sample`: --n samples (50,000 for Table 1) from a checkpoint or released weights, the same images
    as `ddpm.py sample` with the same flags: ddpm.sample_command, its batches kept as chunk files in a ResumeFolder
    as they are drawn (a rerun skips them; Ctrl-C says how many are kept), and the record of their settings in the
    final file."""
    source = os.path.abspath(args.checkpoint or args.weights)
    out = args.out or (os.path.splitext(args.checkpoint)[0] + "-samples" if args.checkpoint
                       else os.path.join("samples", os.path.basename(os.path.normpath(args.weights))))
    ddpm.check_out(out)
    model, diffusion, config = load_for_sampling(args.checkpoint, args.weights, torch.device(args.device),
                                                 args.respacing)
    ddpm.check_sample_request(model, args.n, args.ddim_eta)  # before the chunk names: --n may be huge
    settings = ddpm.sample_settings(model, config, args.respacing, args.ddim_eta, args.seed, args.batch_size)
    record = dict(settings, n=args.n, source=source)
    if args.progressive:
        return ddpm.sample_command(model, diffusion, out, args.n, args.batch_size, args.seed, True, args.ddim_eta,
                                   record)
    folder = ResumeFolder(out, settings, ddpm.SAMPLE_FLAGS, "samples", info={"weights_sha256": source})
    names = {i: f"chunk-seed{args.seed}-batch{args.batch_size}-{i:05d}.npz"
             for i in range(-(-args.n // args.batch_size))}
    done = folder.pieces(names)  # refuses pieces of unknown settings before any work
    try:
        path = ddpm.sample_command(model, diffusion, out, args.n, args.batch_size, args.seed, False, args.ddim_eta,
                                   record, done)
    except KeyboardInterrupt:
        kept = sum(os.path.exists(folder.path(name)) for name in names.values())
        raise KeyboardInterrupt(f"{kept} of {len(names)} chunks are kept in {out}; rerun the same command to "
                                f"continue") from None
    for chunk in names.values():
        if os.path.exists(folder.path(chunk)):
            os.remove(folder.path(chunk))
    return path


# ---- 5. NLL: the bound in bits/dim, its rate and distortion (Section 4.3) and the paper's Table 4 --------------------

NLL_KEYS = ddpm.NLL_KEYS


# What decides evaluate_nll's numbers, with the flag of `evaluate.py nll` that sets it. The device type too: CPU
# and CUDA generators draw different noise from the same seed.
NLL_FLAGS = {"num_examples": "--max-examples", "batch_size": "--batch-size", "seed": "--seed",
             "chain_sha256": "--respacing (the chain's betas and timesteps)", "device": "--device",
             "clip_denoised": "x0 clipping",
             "weights_sha256": "weights (--checkpoint/--weights)", "data_sha256": "--data/--split"}


def evaluate_nll(model, diffusion, x_start, *, batch_size=256, seed=0, clip_denoised=True, out_dir=None,
                 run_info=None, progress=True):
    """ddpm.dataset_bpd over a whole data set, resumable.

    x_start: float [N, C, H, W] in [-1, 1] (CPU; each batch moves to the model's device). Returns its numpy float32
    arrays {'total_bpd' [N], 'prior_bpd' [N], 'vb' [N, T], 'xstart_mse' [N, T], 'mse' [N, T]}; batch b draws its
    noise with seed + b. With `out_dir`, a ResumeFolder: each finished batch is written atomically to
    out_dir/batch-00000.npz and a rerun loads it instead of recomputing it, so an interrupted evaluation continues
    where it stopped and gives the same numbers; a rerun with another model, data, batch size, seed or device type
    is refused (NLL_FLAGS). run_info: what the sha256 settings are of ({'weights_sha256': path, 'data_sha256':
    name}), recorded and shown, never compared.
    """
    N = x_start.shape[0]
    if N == 0:
        raise ValueError("no images to evaluate; check --data/--split/--max-examples")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    done = None
    if out_dir is not None:
        settings = dict(num_examples=N, batch_size=batch_size, seed=seed, chain_sha256=chain_sha256(diffusion),
                        device=ddpm._model_device(model).type, clip_denoised=clip_denoised,
                        weights_sha256=ddpm.weights_sha256(model),
                        data_sha256=hashlib.sha256(x_start.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
        folder = ResumeFolder(out_dir, settings, NLL_FLAGS, "batches", run_info)
        done = folder.pieces({b: f"batch-{b:05d}.npz" for b in range(math.ceil(N / batch_size))})
    return ddpm.dataset_bpd(model, diffusion, x_start, batch_size, seed, clip_denoised, done=done, progress=progress)


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


def pyplot(what):
    """matplotlib.pyplot on the file-only Agg backend, or None after a hint that `what` needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no {what}: pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def save_figure(plt, fig, path):
    """Write fig as a PNG at 120 dpi, free it, and return True (what the plot functions report)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_rate_distortion(path, rate, rmse):
    """The paper's Figure 5 (distortion and rate against reverse time, and distortion against rate) as a PNG.
    Returns False, with a hint, when matplotlib is not installed."""
    plt = pyplot("rate-distortion plot")
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
    return save_figure(plt, fig, path)


def cmd_nll(args):
    device = torch.device(args.device)
    model, diffusion, config = load_for_sampling(args.checkpoint, args.weights, device, args.respacing)
    images = load_data_for(config, args.data, args.split)
    if args.max_examples is not None:
        images = images[:args.max_examples]
    x_start = ddpm.normalize_data(images)
    out = args.out or os.path.join("runs", "eval", model_name(args))
    ddpm.lock_folder(out)
    T = diffusion.num_timesteps
    print(f"NLL of {args.checkpoint or args.weights} on {args.data} {args.split} ({len(x_start)} images, "
          f"T={T}, EMA weights, x0 clipped, batch {args.batch_size}, seed {args.seed}, {device})", flush=True)
    results = evaluate_nll(model, diffusion, x_start, batch_size=args.batch_size, seed=args.seed,
                           out_dir=os.path.join(out, f"nll-{args.split}-batches"),
                           run_info={"weights_sha256": args.checkpoint or args.weights,
                                     "data_sha256": f"{args.data} {args.split}"},
                           progress=not args.no_progress)
    summary = nll_summary(results)
    rate, rmse = rate_distortion(results["vb"], results["prior_bpd"], results["xstart_mse"])
    stem = os.path.join(out, f"nll-{args.split}")
    ddpm.atomic_savez(stem + ".npz", **results, rate=rate, rmse=rmse)
    with open(stem + "-table4.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["reverse_time", "t", "rate_bits_per_dim", "distortion_rmse_0_255"])
        for row in table4_rows(rate, rmse):
            writer.writerow([row[0], row[1], f"{row[2]:.5f}", f"{row[3]:.5f}"])
    atomic_json(stem + ".json", dict(summary, data=args.data, split=args.split, num_timesteps=T, seed=args.seed,
                                     model=args.checkpoint or args.weights))
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


# ---- 6. The Inception network of StyleGAN2-ADA, clean-fid and EDM (a TorchScript port of TF's 2015 graph) ------------

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"


def download_inception(url=INCEPTION_URL, cache=None, sha256=INCEPTION_SHA256):
    """The path of the Inception network in the cache folder (ddpm.cache_dir()), downloaded once and checked
    against `sha256` each time, so a corrupt or substituted file is refused before it produces a number."""
    path = os.path.join(cache or ddpm.cache_dir(), INCEPTION_FILENAME)
    return ddpm.download(url, path, "sha256", sha256, f"on a machine with internet access fetch {url} and pass "
                                                      f"--inception PATH, or copy it to {path}")


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
    digest = ddpm.file_digest(path)
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
    for s in ddpm.progress_bar(range(0, len(images), batch_size), None, f"inception {what}", progress):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).to(device).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        outputs.append(network(x, **kwargs).float().cpu().numpy())
    return np.concatenate(outputs)


# ---- 7. FID and IS ---------------------------------------------------------------------------------------------------

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
    ddpm.atomic_savez(path, mu=mu, sigma=sigma, num_images=num_images, source=np.array(source),
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
    images = ddpm.load_data(args.data, args.split)
    if args.max_examples is not None:
        images = images[:args.max_examples]
    check_count(images, 2, args.data, "the statistics (a covariance)")
    name = os.path.splitext(os.path.basename(args.data.rstrip("/\\")))[0]
    out = args.out or os.path.join("runs", "eval", f"fid_stats_{name}_{args.split}.npz")
    old = None
    if os.path.exists(out):  # the same statistics are made again; others are not written over them
        try:
            old = load_fid_stats(out)[2]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            ddpm.set_aside(out, f"cannot be read ({type(e).__name__})")
        if old is not None and (old.get("source"), old.get("num_images")) != (f"{args.data} {args.split}",
                                                                               len(images)):
            raise ValueError(f"{out} holds other statistics ({old.get('num_images', '?')} images of "
                             f"{old.get('source', '?')}); pass another --out, or delete it to replace it")
    network, digest = load_inception(args.inception, args.device)
    if old is not None and old.get("inception_sha256") != digest:
        raise ValueError(f"{out} holds statistics from another Inception network (sha256 "
                         f"{str(old.get('inception_sha256'))[:12]}, now {digest[:12]}); pass another --out, or delete "
                         f"it to replace it")
    features = inception_outputs(network, images, batch_size=args.batch_size, device=args.device,
                                 progress=not args.no_progress)
    mu, sigma = feature_statistics(features)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    save_fid_stats(out, mu, sigma, num_images=len(images), source=f"{args.data} {args.split}", inception_sha256=digest)
    print(f"wrote {out}: mu {mu.shape}, sigma {sigma.shape} of {len(images):,} images ({args.data} {args.split})")
    return out


def cmd_fid(args):
    # Read and check every input before the long Inception passes.
    samples = check_count(ddpm.load_data(args.samples), 2, args.samples, "FID (a covariance)")
    if is_stats_file(args.ref):
        mu_ref, sigma_ref, info = load_fid_stats(args.ref)
        ref, ref_desc = None, args.ref + (f" ({info['num_images']:,} images of {info.get('source', '?')})"
                                          if "num_images" in info else "")
    else:
        ref, info = check_count(ddpm.load_data(args.ref, args.ref_split), 2, args.ref, "FID (a covariance)"), {}
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
    samples = check_count(ddpm.load_data(args.samples), args.splits, args.samples, f"--splits {args.splits}",
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


# ---- 8. The paper's figures: progressive generation (Fig. 6), shared latents (Fig. 7), interpolation (Fig. 8) --------

def sample_from(model, diffusion, x_t, t, generator=None, shared_noise=False):
    """A draw from p(x_0 | x_t): Algorithm 2 from x_t at code index t down to 0. x_t: [N, C, H, W].
    shared_noise uses one noise image per step for every row (the paper fixes the noise when interpolating)."""
    return diffusion.p_sample_loop(model, x_t.shape, noise=x_t, generator=generator, t_start=t,
                                   shared_noise=shared_noise)


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


def save_rows(rows, path):
    """Write float images [R, K, C, H, W] in [-1, 1] as one PNG of R rows and K columns (ddpm.save_image_grid)."""
    ddpm.save_image_grid(ddpm.unnormalize_data(rows.flatten(0, 1)), path, nrow=rows.shape[1])


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
    plt = pyplot("loss curve")
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
    return save_figure(plt, fig, out_path)


def cmd_figures(args):
    device = torch.device(args.device)
    model, diffusion, config = load_for_sampling(args.checkpoint, args.weights, device, args.respacing)
    T, C, R = diffusion.num_timesteps, config.model.in_channels, config.model.resolution
    if args.interp_t is not None and not 1 <= args.interp_t <= T:
        raise ValueError(f"--interp-t must be a paper timestep 1..{T}, got {args.interp_t}")
    ddpm.check_range("--frames", args.frames, 1, T)  # Figure 6 shows at most every step
    images = 2 * args.n + args.n * args.frames + 4 * (2 + args.samples_per_latent) + 13 * args.n  # in the figures
    ddpm.check_fits(4 * C * R * R * images, f"figures of {images:,} float images ({args.n} rows, {args.frames} frames, "
                    f"{args.samples_per_latent} samples per latent)", "lower --n, --frames or --samples-per-latent")
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
    settings = {"weights_sha256": ddpm.weights_sha256(model), "chain_sha256": chain_sha256(diffusion),
                **{k: getattr(args, k) for k in ("seed", "n", "frames", "samples_per_latent", "interp_t", "data",
                                                 "split", "device")}}
    folder = ResumeFolder(out, settings, {**{k: "--" + k.replace("_", "-") for k in settings}, **SCORE_FLAGS},
                          "figures", info={"weights_sha256": args.checkpoint or args.weights})
    # batch 0's seed, so Figure 6's last column is the images of `sample --n N --seed S` with a --batch-size >= N
    generator = torch.Generator(device=device).manual_seed(ddpm.batch_seed(args.seed, 0))
    figures = {"fig6-progressive.png": ddpm.sample_images(model, diffusion, args.n, generator=generator,
                                                          frames=ddpm.progressive_frames(T, args.frames))}
    if sources is None:
        sources = diffusion.p_sample_loop(model, (2 * args.n, C, R, R), generator=generator, device=device)

    ts = sorted({max(0, round(f * T) - 1) for f in (1.0, 0.75, 0.5, 0.25)}, reverse=True)  # paper t = 1000,750,500,250
    rows = shared_latents(model, diffusion, sources[0], ts, args.samples_per_latent, generator)
    figures["fig7-shared-latents.png"] = torch.cat([sources[0].expand(len(ts), 1, -1, -1, -1), rows], dim=1)
    t = (args.interp_t or max(1, T // 2)) - 1  # the paper interpolates 256x256 images at t = 500 of 1000
    figures["fig8-interpolation.png"] = torch.stack([torch.cat([sources[2 * k][None], interpolate(
        model, diffusion, sources[2 * k], sources[2 * k + 1], t, 11, generator), sources[2 * k + 1][None]])
        for k in range(args.n)])
    folder.claim([*figures, "loss.png"])  # all drawn: written together, so a failure leaves no figure of a half run
    for name, rows in figures.items():
        save_rows(rows, os.path.join(out, name))
    written = list(figures)
    if metrics and plot_loss_curve(metrics, os.path.join(out, "loss.png")):
        written.append("loss.png")
    print(f"wrote {', '.join(written)} to {out} (Fig. 7 rows: x_0, x_t, samples at paper t = "
          f"{', '.join(str(s + 1) for s in ts)}; Fig. 8 at t = {t + 1}, lambda = 0, 0.1, ..., 1)")
    return [os.path.join(out, w) for w in written]


# ---- 9. The digits score: an 8x8 digits model's test NLL and digits-FD/IS, each beside its reference points -------
# digits-FD is not FID. It is the same Frechet distance (frechet_distance above), taken in the 64-d feature space
# of a small classifier trained on the digits train split instead of Inception's, between N samples and the 1,500
# train images (the paper measures FID against the training set). Its values mean nothing outside this project:
# every score is printed beside its floor (real held-out digits) and a bad baseline (independent pixels).

DIGITS_SCORE_N = 256            # images per score in every table; the floor is 256 of the 297 held-out digits
DIGITS_SAMPLE_BATCH = 128      # samples drawn at once: at 8x8 on a CPU, 256 at once took 11-14 % longer than 2 x 128
DIGITS_BOOTSTRAP = 100          # resamples of the N images behind each +- (the bootstrap standard deviation)
DIGITS_CLASSIFIER_EPOCHS = 20
# The scoring network is a fixed file, as FID's Inception is: training it again on another CPU gives other weights
# (oneDNN and BLAS pick other kernels and 20 epochs amplify the last bits), so every score reads this file, refused
# unless its bytes have this sha256. `evaluate.py digits-classifier` retrains a copy elsewhere and compares.
DIGITS_CLASSIFIER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits-classifier.pt")
DIGITS_CLASSIFIER_SHA256 = "2111cc26fe51a2c817e69b2781a04bdc3fc2fa2b7c1e0126e7eb8216dfca5137"


@functools.lru_cache(maxsize=2)
def digits_images(split):
    """ddpm.load_digits(split), read-only and read once per process (scikit-learn parses a CSV on every call)."""
    images = ddpm.load_digits(split)
    images.setflags(write=False)
    return images


@functools.lru_cache(maxsize=2)
def digits_labels(split):
    """The classes 0..9 of ddpm.load_digits(split)'s images, in the same order: int64 numpy [N], read-only."""
    y = ddpm.load_digits(split, labels=True)[1]
    y.setflags(write=False)
    return y


class DigitsClassifier(nn.Module):
    """A small CNN for digits [N, 1, 8, 8] in [-1, 1]: two conv-BN-ReLU blocks at 8x8, max-pool, one at 4x4,
    max-pool, then a linear layer to 64 features, the score's feature space (taken before the ReLU, so no
    feature is constant), and ReLU -> dropout -> 10 logits."""

    def __init__(self, width=32, num_features=64):
        super().__init__()
        block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.conv = nn.Sequential(*block(1, width), *block(width, width), nn.MaxPool2d(2),
                                  *block(width, 2 * width), nn.MaxPool2d(2))           # [N, 2 width, 2, 2]
        self.fc = nn.Linear(8 * width, num_features)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(num_features, 10))

    def features(self, x):
        return self.fc(self.conv(x).flatten(1))                                         # [N, num_features]

    def forward(self, x):
        return self.head(self.features(x))                                              # logits [N, 10]


def _augment_digits(x, generator):
    """A random small affine distortion of each digit [N, 1, 8, 8] in [-1, 1] (rotation up to 15 degrees, scale
    0.9..1.1, shift up to one pixel), the background -1 filling in: how the held-out writers differ."""
    u = lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1                 # U(-1, 1)
    angle, scale, shift = u(len(x)) * math.pi / 12, 1 + 0.1 * u(len(x)), 0.25 * u(len(x), 2)  # 0.25: 1 of 8 px
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # grid_sample pads with 0, i.e. -1 after the shift


def train_digits_classifier(seed=0, epochs=DIGITS_CLASSIFIER_EPOCHS, batch_size=50, lr=2e-3):
    """DigitsClassifier trained on the digits train split with Adam (cosine lr, weight decay 1e-4) and
    _augment_digits, in eval mode. One CPU thread and RNGs of its own: the weights are a function of the seed."""
    x, y = ddpm.normalize_data(digits_images("train")), torch.tensor(digits_labels("train"))
    generator, threads = torch.Generator().manual_seed(seed), torch.get_num_threads()
    total = epochs * math.ceil(len(x) / batch_size)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # the initial weights and dropout, without touching the caller's RNG
            torch.manual_seed(seed)
            model = DigitsClassifier().train()
            opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
            for step in range(total):
                if step % math.ceil(len(x) / batch_size) == 0:
                    order = torch.randperm(len(x), generator=generator)
                idx = order[step % math.ceil(len(x) / batch_size) * batch_size:][:batch_size]
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(model(_augment_digits(x[idx], generator)), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


_DIGITS_CLASSIFIERS = {}  # path -> (classifier, held-out accuracy): read once per process


def digits_accuracy(classifier):
    """The classifier's accuracy on the 297 held-out digits."""
    probs = digits_classifier_outputs(classifier, digits_images("test"))[1]
    return float((probs.argmax(1) == digits_labels("test")).mean())


def load_digits_classifier(path=None):
    """(DigitsClassifier in eval mode, its held-out accuracy) from the pinned file (DIGITS_CLASSIFIER_FILE), read
    once per process and refused unless its sha256 is DIGITS_CLASSIFIER_SHA256. Prints the accuracy."""
    path = path or DIGITS_CLASSIFIER_FILE
    if path in _DIGITS_CLASSIFIERS:
        return _DIGITS_CLASSIFIERS[path]
    restore = (f"restore the pinned file with `git checkout -- {os.path.basename(path)}` in the ddpm repository "
               f"(evaluate.py digits-classifier retrains a copy elsewhere, never over it)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the digits classifier {path} is missing; {restore}")
    digest = ddpm.file_digest(path)
    if digest != DIGITS_CLASSIFIER_SHA256:
        raise ValueError(f"the digits classifier {path} is not the pinned file (sha256 {digest[:12]}, pinned "
                         f"{DIGITS_CLASSIFIER_SHA256[:12]}), so its scores would not be comparable; {restore}")
    model = DigitsClassifier()
    model.load_state_dict(ddpm.load_checkpoint(path))
    model.eval()
    accuracy = digits_accuracy(model)
    print(f"digits classifier ({os.path.basename(path)}, sha256 {digest[:12]}): test accuracy {100 * accuracy:.1f} % "
          f"on the {len(digits_images('test'))} held-out digits", flush=True)
    _DIGITS_CLASSIFIERS[path] = model, accuracy
    return model, accuracy


def cmd_digits_classifier(args):
    """`evaluate.py digits-classifier`: train the scoring network again from the digits train split with the pinned
    file's recipe (train_digits_classifier, seed 0), write it to --out, never over the pinned file, and say
    whether it reproduces the pinned file bit for bit on this machine."""
    out = os.path.abspath(args.out)
    if os.path.exists(out) and os.path.exists(DIGITS_CLASSIFIER_FILE) and os.path.samefile(out, DIGITS_CLASSIFIER_FILE):
        raise ValueError(f"--out {args.out} is the pinned classifier, which scores must keep reading; pass another "
                         f"--out (to adopt a new file, copy it there and pin its sha256 in evaluate.py)")
    start = time.time()
    model = train_digits_classifier(seed=0)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    ddpm.save_checkpoint(out, model.state_dict())
    digest = ddpm.file_digest(out)
    print(f"trained in {time.time() - start:.0f} s: test accuracy {100 * digits_accuracy(model):.1f} % on the "
          f"{len(digits_images('test'))} held-out digits; wrote {args.out} (sha256 {digest[:12]})")
    if digest == DIGITS_CLASSIFIER_SHA256:
        print(f"it reproduces the pinned {os.path.basename(DIGITS_CLASSIFIER_FILE)} bit for bit on this machine")
        return True
    pinned = load_digits_classifier()[0].state_dict()
    largest = max(float((v - pinned[k]).abs().max()) for k, v in model.state_dict().items() if v.is_floating_point())
    print(f"it differs from the pinned {os.path.basename(DIGITS_CLASSIFIER_FILE)} (largest weight difference "
          f"{largest:.3g}): this CPU's kernels round differently; scores keep reading the pinned file")
    return False


@torch.inference_mode()
def digits_classifier_outputs(classifier, images, batch_size=1000):
    """(features float64 [N, 64], class probabilities float64 [N, 10]) of uint8 digits [N, 8, 8, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (8, 8, 1):
        raise ValueError(f"the digits score takes uint8 images [N, 8, 8, 1], got {images.dtype} {images.shape}; "
                         f"it measures models of the digits preset only")
    features = torch.cat([classifier.features(ddpm.normalize_data(images[s:s + batch_size]))
                          for s in range(0, len(images), batch_size)])
    return features.double().numpy(), classifier.head(features).softmax(1).double().numpy()


class DigitsScore:
    """digits-FD and digits-IS of uint8 digits [N, 8, 8, 1], each with a bootstrap uncertainty.

    digits-FD = frechet_distance between the Gaussians fitted to the images' classifier features and to the
    1,500 train images' features: 0 for the train split itself, lower is better, and biased upward for small N
    (so every table uses one N). digits-IS = the Inception Score formula (inception_score, one split) on the
    classifier's 10 classes: 1 to 10, higher is better. The +- is the standard deviation over num_bootstrap
    resamples, with replacement, of the N images.
    """

    def __init__(self, seed=0, num_bootstrap=DIGITS_BOOTSTRAP):
        self.classifier, self.accuracy = load_digits_classifier()
        train_features = digits_classifier_outputs(self.classifier, digits_images("train"))[0]
        self.reference = feature_statistics(train_features)
        self.seed, self.num_bootstrap = seed, num_bootstrap

    def __call__(self, images):
        """{'fd', 'fd_std', 'is', 'is_std', 'n'} of the images."""
        features, probs = digits_classifier_outputs(self.classifier, images)
        fd = lambda idx: frechet_distance(*feature_statistics(features[idx]), *self.reference)
        inception = lambda idx: inception_score(probs[idx], num_splits=1)[0]
        rng = np.random.default_rng(self.seed)
        resamples = [rng.integers(0, len(images), len(images)) for _ in range(self.num_bootstrap)]
        with warnings.catch_warnings(record=True) as caught:  # a few images: one warning, not one per resample
            warnings.simplefilter("always")
            everything = np.arange(len(images))
            result = {"fd": fd(everything), "is": inception(everything), "n": len(images)}
            fds, iss = [fd(idx) for idx in resamples], [inception(idx) for idx in resamples]
        for message in sorted({str(w.message) for w in caught}):
            warnings.warn(message)
        std = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        return dict(result, fd_std=std(fds), is_std=std(iss))


class PixelCategorical:
    """The bad baseline: an independent categorical distribution per pixel over the grey levels of the train
    images (uint8 [N, H, W, C]), fitted with add-one smoothing. A proper distribution over images, so its NLL in
    bits/dim is comparable with a diffusion model's bound."""

    def __init__(self, train):
        self.levels, self.shape = np.unique(train), train.shape[1:]
        index = np.searchsorted(self.levels, train.reshape(len(train), -1))                  # [N, D]
        counts = np.stack([(index == k).sum(axis=0) for k in range(len(self.levels))], 1)     # [D, K]
        self.probs = (counts + 1) / (len(train) + len(self.levels))                           # [D, K]

    def nll_bpd(self, images):
        """-log2 p(image) / D for each uint8 image: float64 [N] bits/dim."""
        flat = np.asarray(images).reshape(len(images), -1)
        index = np.searchsorted(self.levels, flat).clip(max=len(self.levels) - 1)
        if (self.levels[index] != flat).any():
            raise ValueError("the images hold grey levels the train split never uses; the categorical model "
                             "gives them probability 0")
        return -np.log2(self.probs[np.arange(flat.shape[1]), index]).mean(axis=1)

    def sample(self, n, seed=0):
        """n independent draws, uint8 [n, H, W, C]."""
        u = np.random.default_rng(seed).random((n, self.probs.shape[0], 1))
        index = (u > self.probs.cumsum(axis=1)).sum(axis=2).clip(max=len(self.levels) - 1)  # inverse CDF
        return self.levels[index].reshape(n, *self.shape).astype(np.uint8)


def digits_nll_references(test_images):
    """The reference points of a digits NLL in bits/dim, computed from the data: the per-pixel categorical
    model's NLL of `test_images` (mean, standard error), uniform over the grey levels the train split uses
    (log2 of their number) and uniform over 256 levels."""
    categorical = PixelCategorical(digits_images("train"))
    return {"categorical": mean_and_stderr(categorical.nll_bpd(test_images)), "num_levels": len(categorical.levels),
            "uniform_levels": math.log2(len(categorical.levels)), "uniform_256": math.log2(256)}


def check_digits_counts(n, nll_images=1):
    """Refuse, before any work, an --n or --nll-images the held-out digits cannot serve: the floor is n of them."""
    held_out = len(digits_images("test"))
    if not 2 <= n <= held_out:
        raise ValueError(f"--n {n} must be in [2, {held_out}]: the floor is n of the {held_out} held-out digits")
    if not 1 <= nll_images <= held_out:
        raise ValueError(f"--nll-images must be in [1, {held_out}], the held-out digits, got {nll_images}")


def digits_score_scale(score, n=DIGITS_SCORE_N, seed=0):
    """The scale printed with every digits score, at the same n: 'floor' = the first n held-out real digits,
    'baseline' = n samples of the per-pixel categorical model."""
    check_digits_counts(n)
    test = digits_images("test")
    return {"floor": score(test[:n]), "baseline": score(PixelCategorical(digits_images("train")).sample(n, seed))}


def pm(mean, std, digits=2):
    """'mean ± std' to `digits` decimals."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def check_digits_model(config, source):
    """Refuse, in one sentence, a model that is not 8x8 grayscale: the digits score measures digits models only."""
    if (config.model.resolution, config.model.in_channels) != (8, 1):
        raise ValueError(f"{source} is a {config.model.resolution}x{config.model.resolution} model with "
                         f"{config.model.in_channels} channel(s); the digits score needs an 8x8 grayscale model "
                         f"(ddpm.py train --preset digits)")


def digits_samples(model, diffusion, n, seed, folder, sampler="ancestral"):
    """n uint8 samples [n, 8, 8, 1] by ddpm.sample_batches (Algorithm 2, or DDIM with eta = 0 for sampler='ddim')
    in batches of DIGITS_SAMPLE_BATCH, each kept as it is drawn, so they are the images of `ddpm.py sample --n n
    --batch-size 128 --seed seed` on the same device. Kept in a ResumeFolder under `folder` named by a hash of what
    decides them (the weights' sha256, the chain, n, seed, the device), so digits-score and steps share them, a
    rerun on the same model reads them, and samples of other models or settings are never replaced.
    Raises FloatingPointError for non-finite samples (a diverged learned variance)."""
    T = diffusion.num_timesteps
    settings = {"weights_sha256": ddpm.weights_sha256(model), "sampler": sampler, "n": n, "seed": seed,
                "chain_sha256": chain_sha256(diffusion), "batch_size": DIGITS_SAMPLE_BATCH,
                "device": ddpm._model_device(model).type}  # CPU and CUDA generators draw other noise
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    resume = ResumeFolder(os.path.join(folder, f"{sampler}-{T}-n{n}-seed{seed}-{key}"), settings, what="samples")
    eta = 0.0 if sampler == "ddim" else None
    done = resume.pieces({i: f"batch-{i:05d}.npz" for i in range(-(-n // DIGITS_SAMPLE_BATCH))})
    return ddpm.sample_batches(model, diffusion, n, DIGITS_SAMPLE_BATCH, seed, eta, done)


def digits_samples_folder(out):
    """Where digits_samples keeps a model's samples: digits-samples/ beside the command's output folder, shared by
    digits-score and steps on one checkpoint."""
    return os.path.join(os.path.dirname(os.path.abspath(out)), "digits-samples")


# What decides a digits score's numbers (digits-score, steps), with the flag that sets it.
SCORE_FLAGS = {"weights_sha256": "weights (--checkpoint/--weights)", "chain_sha256": "--respacing", "n": "--n",
               "nll_images": "--nll-images", "seed": "--seed", "bootstrap": "--bootstrap", "device": "--device",
               "counts": "--counts"}


def score_folder(args, model, diffusion, what, **settings):
    """(the output folder of digits-score or steps (`what`): --out, else <checkpoint or weights>-<what> beside it,
    its ResumeFolder of SCORE_FLAGS with `settings`): one folder holds one model's score at one set of settings, so
    a rerun with others is refused before any work, rather than replacing it. The caller claims its result files
    (ResumeFolder.claim) when it writes them."""
    source = args.checkpoint or args.weights
    out = args.out or os.path.splitext(os.path.normpath(source))[0] + f"-{what}"
    settings = dict(weights_sha256=ddpm.weights_sha256(model), chain_sha256=chain_sha256(diffusion), n=args.n,
                    seed=args.seed, bootstrap=args.bootstrap, device=ddpm._model_device(model).type, **settings)
    return out, ResumeFolder(out, settings, SCORE_FLAGS, f"a {what} result", info={"weights_sha256": source})


def digits_test_nll(model, diffusion, num_images, seed=0):
    """The bound in bits/dim on the first num_images held-out digits (ddpm.dataset_bpd: calc_bpd_loop, x0
    clipped) as (mean, standard error). Raises FloatingPointError when it is not finite."""
    x_start = ddpm.normalize_data(digits_images("test")[:num_images])
    bpd = ddpm.dataset_bpd(model, diffusion, x_start, seed=seed)["total_bpd"]
    if not np.isfinite(bpd).all():
        raise FloatingPointError(f"the bound is not finite for {int((~np.isfinite(bpd)).sum())} test images")
    return mean_and_stderr(bpd)


def print_digits_scale(scale):
    for name, what in (("floor", "floor: real held-out digits"), ("baseline", "baseline: per-pixel categorical")):
        s = scale[name]
        print(f"    {what:<34} digits-FD {pm(s['fd'], s['fd_std']):>16}   digits-IS {pm(s['is'], s['is_std'])}")


DIGITS_HOW_TO_READ = ("How to read: lower is better for bits/dim and digits-FD, higher for digits-IS (at most 10). "
                      "digits-FD is a Frechet distance in a digits classifier's features, not FID: near the floor, "
                      "samples are as close to the training digits as unseen real ones; near the baseline, they "
                      "have no more structure than independent pixels. The NLL is an upper bound.")


def cmd_digits_score(args):
    check_digits_counts(args.n, args.nll_images)
    score = DigitsScore(args.seed, args.bootstrap)  # the pinned classifier, refused if changed, before any work
    device = torch.device(args.device)
    model, diffusion, config = load_for_sampling(args.checkpoint, args.weights, device, args.respacing)
    source = args.checkpoint or args.weights
    check_digits_model(config, source)
    out, folder = score_folder(args, model, diffusion, "digits-score", nll_images=args.nll_images)
    d = config.diffusion
    print(f"digits evidence for {source}: {d.model_mean_type} / {d.model_var_type} / {d.loss_type}, "
          f"{diffusion.num_timesteps} sampling steps, EMA weights", flush=True)
    start = time.time()
    nll = digits_test_nll(model, diffusion, args.nll_images, args.seed)
    refs = digits_nll_references(digits_images("test")[:args.nll_images])
    print(f"  test NLL bound {pm(*nll)} bits/dim on the first {args.nll_images} held-out digits "
          f"({time.time() - start:.0f} s)")
    print(f"    per-pixel categorical model {pm(*refs['categorical'])}   (independent pixels, add-one smoothing)")
    print(f"    uniform over the {refs['num_levels']} grey levels {refs['uniform_levels']:.2f}")
    print(f"    uniform over 256 levels {refs['uniform_256']:.2f}")
    start = time.time()
    images = digits_samples(model, diffusion, args.n, args.seed, digits_samples_folder(out))
    folder.claim(["samples.png", "digits-score.json"])
    ddpm.save_image_grid(images[:64], os.path.join(out, "samples.png"))
    s, scale = score(images), digits_score_scale(score, args.n, args.seed)
    print(f"  samples ({args.n}, {time.time() - start:.0f} s)        digits-FD {pm(s['fd'], s['fd_std']):>16}   "
          f"digits-IS {pm(s['is'], s['is_std'])}   (± = bootstrap std; {os.path.join(out, 'samples.png')})")
    print_digits_scale(scale)
    print(DIGITS_HOW_TO_READ)
    result = {"nll": nll, "nll_references": refs, "score": s, "scale": scale, "source": source}
    atomic_json(os.path.join(out, "digits-score.json"), result)
    return result


# ---- 10. Command line ------------------------------------------------------------------------------------------------

def command_parser(prog, doc):
    """(parser, its subcommands) for a script whose module docstring `doc` lists its commands."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser, parser.add_subparsers(dest="command", required=True)


def build_parser():
    parser, sub = command_parser("evaluate.py", __doc__)

    p = sub.add_parser("sample", allow_abbrev=False,
                       help="samples for FID/IS (Table 1) in resumable chunks, or Figure 6")
    add_model_args(p)
    p.add_argument("--n", type=int, default=64, help="number of samples (50000 for FID)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per chunk; a rerun skips finished chunks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="output folder; default: next to the checkpoint, or samples/NAME")
    p.add_argument("--progressive", action="store_true", help="Figure 6: x0 at 21 steps, t = T to 1, a row per sample")
    p.add_argument("--ddim-eta", type=float, default=None, help="sample with DDIM at this eta (0: deterministic)")
    p.set_defaults(func=cmd_sample)

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
        p.add_argument("--device", default=ddpm.default_device())
        p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("fid", allow_abbrev=False, help="FID of samples against reference statistics or a data set")
    p.add_argument("samples", help="a .npz of uint8 NHWC samples (evaluate.py sample) or a folder of PNGs")
    p.add_argument("--ref", required=True, help="a fid-stats .npz (mu, sigma) or a data set: cifar10, a folder, ...")
    p.add_argument("--ref-split", default="train", choices=("train", "test"), help="the paper: train")
    inception_args(p)
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("is", allow_abbrev=False, help="Inception Score of samples (10 splits)")
    p.add_argument("samples", help="a .npz of uint8 NHWC samples (evaluate.py sample) or a folder of PNGs")
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

    p = sub.add_parser("digits-score", allow_abbrev=False,
                       help="a digits model's test NLL and digits-FD/IS, each beside its reference points")
    add_model_args(p)
    p.add_argument("--n", type=int, default=DIGITS_SCORE_N, help="samples to score (default: %(default)s)")
    p.add_argument("--nll-images", type=int, default=100, help="held-out digits for the NLL (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="samples, bound noise and bootstrap")
    p.add_argument("--out", help="output folder (default: <checkpoint>-digits-score/ beside it)")
    add_bootstrap_arg(p)
    p.set_defaults(func=cmd_digits_score)

    p = sub.add_parser("digits-classifier", allow_abbrev=False,
                       help="train the digits score's classifier again and compare it with the pinned file")
    p.add_argument("--out", default=os.path.join("runs", "digits-classifier.pt"),
                   help="where to write it; never the pinned file (default: %(default)s)")
    p.set_defaults(func=cmd_digits_classifier)
    return parser


def add_bootstrap_arg(parser):
    parser.add_argument("--bootstrap", type=int, default=DIGITS_BOOTSTRAP,
                        help="resamples behind each ± of a score (default: %(default)s)")


def main(argv=None):
    return cli(build_parser(), argv)


def cli(parser, argv=None):
    """Parse argv and run the command (evaluate.py's and experiments.py's): a count below 1, bad input, a full
    disk or Ctrl-C ends in one line, never a traceback."""
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"WARNING: {message}\n"  # one line, no source
    return ddpm.run_cli(run, args)  # bad input, a full disk, Ctrl-C: one line, no traceback


def run(args):
    """args.func(args), after checking every numeric flag's range (ddpm.check_flags), --device and --out: before
    any work."""
    ddpm.check_flags(args)
    if getattr(args, "device", None):
        ddpm.parse_device(args.device)
    if getattr(args, "out", None):
        ddpm.check_out(args.out, folder=args.command not in ("fid-stats", "digits-classifier"))
    return args.func(args)


if __name__ == "__main__":
    main()
