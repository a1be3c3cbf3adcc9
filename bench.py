"""Speed of ddpm.py's U-Net against diffusers' UNet2DModel on the identical network, side by side.

    make bench                                  # CPU: CIFAR-10 network, batch 16, fp32 and bf16
    python bench.py --small                     # a quick run: the same layout at ch=32, batch 4
    python bench.py --nchw                      # also ours without channels_last: the layout's own gain
    make bench-gpu                              # CUDA: batch 128 (the paper's), plus bf16+compile and
                                                # the paper's TPU v3-8 numbers and 50k-sample times

Both networks are google/ddpm-cifar10-32 (35,746,307 parameters each, asserted, and the same FLOPs,
asserted). Each (implementation, precision) is its own child process; the children run side by side,
driven one step at a time in turn (the order reversed every round), so that a slow spell of a shared
machine hits all of them alike. Ratios ours/diffusers are medians over rounds of the two step times
of the same round; images/s are medians after warm-up steps. Rows:

    train    forward, L_simple, backward, Adam and EMA: images/s
    sample   one ancestral sampling step (p_sample, forward only): images/s
    nll      one term of the bound (vb_terms_bpd, forward only): images/s
    memory   peak training memory above the process before the model was built (CPU: peak RSS; CUDA:
             max_memory_allocated), MiB
    % peak   train and sample FLOP/s as a fraction of this machine's measured matmul/conv throughput

"ours" runs the way ddpm.py trains (channels_last; autocast for bf16; ddpm.adam, fused
where torch supports it; update_ema); "diffusers" runs as a diffusers user does (the model as built, the same
autocast, torch.optim.Adam with its defaults, diffusers' EMAModel). Both use ddpm.py's
GaussianDiffusion for the diffusion math, so only the network and its training step differ.
Prints a table and one JSON line per row. diffusers is needed here only.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import ddpm

PAPER_TRAIN_IMG_S = 21 * 128  # the paper: 21 steps/s at batch 128 on a TPU v3-8 (CIFAR-10)


def unet_config(small):
    """The CIFAR-10 preset's ModelConfig, or the same layout at ch=32 for --small."""
    config = ddpm.get_preset("cifar10").model
    if small:
        config.ch = 32
    return config


def diffusers_unet(config):
    """diffusers' UNet2DModel with the google/ddpm-cifar10-32 configuration, for any ch (block widths ch*mult)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        sys.exit("bench.py compares against diffusers: pip install diffusers==0.42.1 (a bench-only dependency)")
    res = [config.resolution // 2 ** level for level in range(len(config.ch_mult))]
    attn = [r in config.attn_resolutions for r in res]
    return UNet2DModel(
        sample_size=config.resolution, in_channels=config.in_channels, out_channels=config.in_channels,
        block_out_channels=tuple(config.ch * m for m in config.ch_mult), layers_per_block=config.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=None,  # one head over all channels, as google/ddpm-cifar10-32 (the default is 8)
        norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, dropout=config.dropout)


def build(impl, config):
    """(module, forward function (x, t) -> eps) for 'ours' or 'diffusers'."""
    if impl == "ours":
        model, _ = ddpm.create_model_and_diffusion(ddpm.Config(model=config))
        return model, model
    model = diffusers_unet(config)
    return model, lambda x, t: model(x, t, return_dict=False)[0]


# --- FLOPs and the machine's peak ---------------------------------------------------------------

def _flop_counter():
    """FlopCounterMode, taught the CPU flash-attention kernels that it does not count by itself."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu:
               lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
               aten._scaled_dot_product_flash_attention_for_cpu_backward:
               lambda grad_out, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v)}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(impl, config):
    """Forward and forward+backward FLOPs per image (convolutions, matmuls, attention), counted on a real
    batch of 2 on the CPU in fp32."""
    torch.manual_seed(0)
    model, forward = build(impl, config)
    x = torch.randn(2, config.in_channels, config.resolution, config.resolution)
    t = torch.tensor([0, 999])
    with _flop_counter() as counter, torch.no_grad():
        forward(x, t)
    fwd = counter.get_total_flops() / 2
    with _flop_counter() as counter:
        forward(x, t).square().mean().backward()
    return fwd, counter.get_total_flops() / 2


def peak_flops(device, precision):
    """The best FLOP/s of a large matmul and of a large 3x3 convolution (channels_last) in `precision`."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    big = device.type == "cuda"
    n, (N, C, H) = (8192, (128, 256, 32)) if big else (2048, (16, 256, 32))
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    x = torch.randn(N, C, H, H, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, C, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    result = {}
    for name, fn, flops in (("matmul", lambda: a @ b, 2 * n ** 3),
                            ("conv", lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * N * C * C * 9 * H * H)):
        seconds = timed(fn, device, warmup=3, steps=10)  # AMX and GPU clocks need a few calls to ramp up
        result[name] = flops / min(seconds)
    return result


# --- one child: one implementation at one precision --------------------------------------------

def timed(fn, device, warmup, steps):
    """Wall-clock seconds of each of `steps` calls of fn after `warmup` calls (device synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def _rss_mib(field):
    """VmRSS or VmHWM (the peak) of this process from /proc, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def make_runner(spec):
    """Build one (impl, precision, compile) setup; return (steps, peak_memory, n_params): steps maps
    'train', 'sample' and 'nll' to a function that runs one step and returns its wall-clock seconds."""
    device, impl, precision, B = torch.device(spec["device"]), spec["impl"], spec["precision"], spec["batch_size"]
    torch.backends.cudnn.benchmark = True  # both implementations: the fastest cuDNN algorithm per shape
    config = unet_config(spec["small"])
    diffusion = ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("linear", 1000))
    torch.manual_seed(0)
    x0 = torch.randint(0, 256, (B, config.in_channels, config.resolution, config.resolution), device=device) / 127.5 - 1
    xt = torch.randn_like(x0)

    # the memory baseline: this process before the model exists
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:  # writing 5 to clear_refs resets the peak RSS to the current RSS (Linux)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        base = _rss_mib("VmRSS")

    model, forward = build(impl, config)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(device)
    if impl == "ours":
        if spec["channels_last"]:
            model.to(memory_format=torch.channels_last)
        forward = torch.compile(model) if spec["compile"] else model
        opt = ddpm.adam(model.parameters(), lr=2e-4)
        ema = [p.detach().clone() for p in model.parameters()]
        ema_step = lambda: ddpm.update_ema(ema, model.parameters(), 0.9999)
    else:
        from diffusers.training_utils import EMAModel
        opt = torch.optim.Adam(model.parameters(), lr=2e-4)
        ema_model = EMAModel(model.parameters(), decay=0.9999)
        ema_step = lambda: ema_model.step(model.parameters())
    autocast = ddpm.autocast(device, precision)

    def train():
        model.train()
        t = torch.randint(0, diffusion.num_timesteps, (B,), device=device)
        with autocast:
            loss = diffusion.training_losses(forward, x0, t)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_step()

    @torch.inference_mode()
    def sample():
        model.eval()
        t = torch.randint(0, diffusion.num_timesteps, (B,), device=device)
        with autocast:
            diffusion.p_sample(forward, xt, t)

    @torch.inference_mode()
    def nll():
        model.eval()
        t = torch.randint(0, diffusion.num_timesteps, (B,), device=device)
        with autocast:
            diffusion.vb_terms_bpd(forward, x0, xt, t)

    def peak_memory():
        if device.type == "cuda":
            return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        return _rss_mib("VmHWM") - base

    steps = {name: (lambda fn=fn: timed(fn, device, 0, 1)[0]) for name, fn in
             (("train", train), ("sample", sample), ("nll", nll))}
    return steps, peak_memory, n_params


def child_main(spec):
    """A child process: build, say READY, then run one step per command read from stdin."""
    steps, peak_memory, n_params = make_runner(spec)
    reply = lambda value: print("RESULT " + json.dumps(value), flush=True)
    reply({"params": n_params})
    for line in sys.stdin:
        command = line.strip()
        if command == "memory":
            reply(peak_memory())
        elif command in steps:
            reply(steps[command]())
        else:
            break


# --- the parent: run the children, interleave them step by step, pair them, print ----------------

class Child:
    """One benchmark child process, driven one step at a time over its stdin/stdout."""

    def __init__(self, spec, threads):
        self.spec, self.stderr = spec, tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--child", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)
        self.params = self.ask(None)["params"]

    def ask(self, command):
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        self.stderr.seek(0)
        sys.exit(f"bench child {self.spec['impl']} {self.spec['precision']} failed (exit {self.proc.wait()}):\n"
                 f"{self.stderr.read()[-3000:]}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def run_interleaved(specs, warmup, steps, threads):
    """Start one child per spec, then for each row run every child's step in turn (the order reversed
    every round, so a slow spell of the machine hits all of them alike). Returns per child
    {'params', 'first_s', 'memory', row: [seconds per step]}."""
    children = {label: Child(spec, threads) for label, spec in specs.items()}
    results = {label: {"params": c.params, "first_s": {}} for label, c in children.items()}
    for row in ("train", "sample", "nll"):
        for i in range(warmup + steps):
            order = list(children) if i % 2 == 0 else list(reversed(children))
            for label in order:
                seconds = children[label].ask(row)
                if i == 0:
                    results[label]["first_s"][row] = seconds  # builds oneDNN/cuDNN plans, compiles
                if i >= warmup:
                    results[label].setdefault(row, []).append(seconds)
        if row == "train":
            for label, c in children.items():
                results[label]["memory"] = c.ask("memory")
    for c in children.values():
        c.close()
    return results


def pair_ratio(ours, theirs):
    """Speed ratio ours/theirs as the median over rounds of their time / our time in the same round."""
    return statistics.median(b / a for a, b in zip(ours, theirs))


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU, 128 (the paper's) on CUDA, 4 with --small")
    p.add_argument("--precision", default="fp32,bf16", help="fp32, bf16 or both as 'fp32,bf16' (default both); "
                   "diffusers fp32 always runs, as the baseline")
    p.add_argument("--compile", action="store_true", help="also ours with torch.compile (on CUDA: always)")
    p.add_argument("--nchw", action="store_true", help="also ours in the default memory layout instead of "
                   "channels_last, to measure what the layout alone gives")
    p.add_argument("--small", action="store_true", help="a quick run: ch=32 instead of 128, batch 4, 3 timed steps")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5, 3 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each row (default 2, 1 with --small)")
    p.add_argument("--paper", action="store_true", help="also compare with the paper's TPU v3-8 throughput and "
                   "project 50,000-sample times (always on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per child (default: torch's, one per core); "
                   "1 gives steadier ratios on a machine shared with other jobs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_main(json.loads(args.child))

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False; run on a GPU machine or use --device cpu")
    precisions = args.precision.split(",")
    for precision in precisions:
        if precision not in ddpm.PRECISIONS:
            sys.exit(f"unknown precision {precision!r}; use fp32, bf16 or fp32,bf16")
    gpu = device.type == "cuda"
    B = args.batch_size or (4 if args.small else 128 if gpu else 16)
    steps = args.steps or (3 if args.small else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 2)
    config = unet_config(args.small)

    flops = {impl: count_flops(impl, config) for impl in ("ours", "diffusers")}
    assert abs(flops["ours"][0] / flops["diffusers"][0] - 1) < 1e-6, f"the networks differ in FLOPs: {flops}"
    fwd_flops, train_flops = flops["ours"]
    measure_peaks = lambda: {p: peak_flops(device, p) for p in sorted(set(precisions) | {"fp32"})}
    before = measure_peaks()

    # every child runs side by side; diffusers fp32 always, as the baseline of the targets
    base = {"device": args.device, "batch_size": B, "small": args.small}
    specs, pairs = {}, []  # pairs: (our label, diffusers' label at the same precision)
    for precision in sorted(set(precisions) | {"fp32"}, key=list(ddpm.PRECISIONS).index):
        specs[f"diffusers {precision}"] = {**base, "impl": "diffusers", "precision": precision, "compile": False}
        if precision in precisions:
            variants = [(False, True)] + ([(True, True)] if args.compile or (gpu and precision == "bf16") else [])
            for compiled, channels_last in variants + ([(False, False)] if args.nchw else []):
                label = f"ours {precision}{'+compile' if compiled else ''}{'' if channels_last else ' nchw'}"
                specs[label] = {**base, "impl": "ours", "precision": precision, "compile": compiled,
                                "channels_last": channels_last}
                pairs.append((label, f"diffusers {precision}"))
    threads = args.threads or torch.get_num_threads()
    results = run_interleaved(specs, warmup, steps, threads)
    # the machine's peak, measured before and after the children (best of both: a busy spell only lowers it)
    after = measure_peaks()
    peaks = {p: {kind: max(before[p][kind], after[p][kind]) for kind in before[p]} for p in before}
    expected = None if args.small else 35_746_307
    for label, r in results.items():
        assert r["params"] == results["diffusers fp32"]["params"] and expected in (None, r["params"]), \
            f"parameter counts differ: {({k: v['params'] for k, v in results.items()})}"

    print(f"ddpm bench: {machine(device)}, {threads} thread{'s' if threads > 1 else ''}; torch {torch.__version__}; "
          f"{'small network (ch=32)' if args.small else 'CIFAR-10 network'}, {r['params']:,} parameters each; "
          f"batch {B}; {len(specs)} child processes side by side, median of {steps} interleaved steps after "
          f"{warmup} warm-up")
    print(f"FLOPs per image: forward {fwd_flops / 1e9:.2f} G, forward+backward {train_flops / 1e9:.2f} G (the same "
          f"for both). Measured peak: " + "; ".join(
              f"{p} matmul {v['matmul'] / 1e9:.0f}, conv {v['conv'] / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    head = f"{'row':<30}{'ours':>10}{'diffusers':>11}{'ours/diff':>11}{'vs diff fp32':>14}"
    print(head + "\n" + "-" * len(head))
    rows, baseline = [], results["diffusers fp32"]
    img_s = lambda seconds: B / statistics.median(seconds)
    for label, their_label in pairs:
        ours, theirs = results[label], results[their_label]
        name = label[len("ours "):]
        peak = max(peaks[specs[label]["precision"]].values())
        for row, unit in (("train", "img/s"), ("sample", "img/s"), ("nll", "img/s"), ("memory", "MiB"),
                          ("train_util", "% peak"), ("sample_util", "% peak")):
            if row == "memory":
                a, b = ours[row], theirs[row]
                ratio, vs_fp32 = a / b, a / baseline[row]
            elif row.endswith("_util"):  # achieved FLOP/s over the best matmul/conv at this precision
                per_img = train_flops if row == "train_util" else fwd_flops
                a, b = (100 * img_s(r[row[:-5]]) * per_img / peak for r in (ours, theirs))
                ratio, vs_fp32 = a / b, None  # fractions of different peaks: no ratio to fp32
            else:
                a, b = img_s(ours[row]), img_s(theirs[row])
                ratio, vs_fp32 = pair_ratio(ours[row], theirs[row]), pair_ratio(ours[row], baseline[row])
            rows.append({"bench": "ddpm", "row": row, "precision": name, "unit": unit, "device": args.device,
                         "batch_size": B, "small": args.small, "ours": round(a, 3), "diffusers": round(b, 3),
                         "ratio": round(ratio, 3),
                         "ratio_vs_diffusers_fp32": None if vs_fp32 is None else round(vs_fp32, 3)})
            print(f"{row + ' ' + name + ' (' + unit + ')':<30}{a:>10.2f}{b:>11.2f}{ratio:>10.2f}x"
                  + (f"{vs_fp32:>13.2f}x" if vs_fp32 is not None else ""))
    print("first training step (oneDNN/cuDNN plans, compilation): " + ", ".join(
        f"{label} {r['first_s']['train']:.1f} s" for label, r in results.items()))

    if gpu or args.paper:  # the paper's setting: batch 128 on a TPU v3-8
        print(f"\nThe paper: 21 steps/s at batch 128 on a TPU v3-8 = {PAPER_TRAIN_IMG_S} img/s (batch here: {B})")
        for label, _ in pairs:
            train = img_s(results[label]["train"])
            print(f"  {label:<20} train {train:8.0f} img/s = {train / PAPER_TRAIN_IMG_S:.2f}x the paper; "
                  f"800k steps at batch 128 in {800_000 * 128 / train / 3600:.1f} h")
        best = max((label for label, _ in pairs), key=lambda label: img_s(results[label]["sample"]))
        sample = img_s(results[best]["sample"])
        for n_steps in (1000, 100):
            hours = 50_000 * n_steps / sample / 3600
            print(f"  50,000 samples at {n_steps} steps: {hours:.2f} h ({best}, {sample:.0f} img/s per network call)")
            rows.append({"bench": "ddpm", "row": f"50k_samples_{n_steps}_steps", "precision": best[len("ours "):],
                         "unit": "h", "device": args.device, "batch_size": B, "ours": round(hours, 3)})
    for record in rows:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
