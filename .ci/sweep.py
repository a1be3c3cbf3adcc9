"""The bad-input sweep: every numeric flag of every command at 0, below 0, not a number and a huge value.

    python .ci/sweep.py            # a few minutes on 2 cores; prints one line per case and the counts

Each case runs in this process on a tiny digits checkpoint, with a fresh --out, for at most ALARM seconds. Outcomes:
  refused   exit 1 with one line 'error: ... <the flag> ...', no traceback, and nothing written in --out
  argparse  exit 2: argparse's own 'invalid int value' (a non-number)
  ran       exit 0: the value is valid (0 seeds, 0 warmup, ...); printed so a person can judge the result
  working   still working after ALARM seconds: the value is valid and asks for long work (--steps 0: until stopped)
  offline   fid, is, fid-stats: the value passed, and the command stopped at downloading the Inception network
  BAD       anything else: a traceback, a refusal that does not name the flag, a refusal that wrote into --out
It is not part of `make test`; it is the check behind the closing notes' sweep counts.
"""
import contextlib
import io
import os
import signal
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import ddpm  # noqa: E402
import evaluate  # noqa: E402
import experiments  # noqa: E402

ALARM = 6
VALUES = ("0", "-1", "x", "1000000000000", "100000000000000000000")  # the last is past int64


class Alarm(BaseException):
    """Raised by SIGALRM: not an Exception, so no command's error handling turns it into a refusal."""


def tiny_checkpoint(path):
    config = ddpm.get_preset("digits")
    config.model.ch, config.model.ch_mult, config.diffusion.num_timesteps = 32, (1, 2), 25
    torch.manual_seed(0)
    model, _ = ddpm.create_model_and_diffusion(config)
    ddpm.save_checkpoint(path, {"config": config.to_dict(), "step": 0, "model": model.state_dict(),
                                "ema": model.state_dict()})


def commands(ckpt):
    """(main, argv before the flag, the numeric flags) of every command."""
    model = ["--checkpoint", ckpt, "--device", "cpu"]
    train = ["train", "--preset", "digits", "--model.ch", "32", "--model.ch-mult", "1,2", "--steps", "2",
             "--diffusion.num-timesteps", "25", "--batch-size", "16", "--log-every", "1", "--sample-every", "0"]
    return [
        (ddpm.main, train, ["--lr", "--batch-size", "--warmup", "--grad-clip", "--ema-decay", "--steps", "--seed",
                            "--log-every", "--sample-every", "--ckpt-every", "--keep-ckpts", "--model.ch",
                            "--model.num-res-blocks", "--model.dropout", "--model.in-channels", "--model.resolution",
                            "--diffusion.num-timesteps"]),
        (ddpm.main, ["sample", *model, "--n", "2"], ["--n", "--batch-size", "--seed", "--ddim-eta"]),
        (evaluate.main, ["sample", *model, "--n", "2"], ["--n", "--batch-size", "--seed", "--ddim-eta"]),
        (evaluate.main, ["nll", *model, "--data", "digits", "--max-examples", "2"],
         ["--batch-size", "--max-examples", "--seed"]),
        (evaluate.main, ["is", "SAMPLES"], ["--splits", "--batch-size"]),
        (evaluate.main, ["fid", "SAMPLES", "--ref", "digits"], ["--batch-size"]),
        (evaluate.main, ["fid-stats", "--data", "digits"], ["--max-examples", "--batch-size"]),
        (evaluate.main, ["figures", *model, "--n", "1", "--frames", "2"],
         ["--n", "--frames", "--samples-per-latent", "--interp-t", "--seed"]),
        (evaluate.main, ["digits-score", *model, "--n", "4", "--nll-images", "2", "--bootstrap", "2"],
         ["--n", "--nll-images", "--seed", "--bootstrap"]),
        (experiments.main, ["table2", "--steps", "2", "--timesteps", "25", "--n", "4", "--nll-images", "2",
                            "--jobs", "1", "--bootstrap", "2"],
         ["--steps", "--n", "--nll-images", "--timesteps", "--jobs", "--seed", "--bootstrap"]),
        (experiments.main, ["steps", *model, "--n", "4", "--counts", "25,5", "--bootstrap", "2"],
         ["--n", "--seed", "--bootstrap", "--counts"]),
    ]


def run_case(main, argv, flag, out):
    """(outcome, last line) of main(argv) within ALARM seconds."""
    err = io.StringIO()
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(Alarm()))
    signal.alarm(ALARM)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    except Alarm:
        return "working", f"still working after {ALARM} s"
    except BaseException:  # a traceback
        return "BAD", traceback.format_exc().strip().splitlines()[-1]
    finally:
        signal.alarm(0)
        ddpm.release_locks()
    if code in (0, None):
        return "ran", "exit 0"
    text = str(code) if isinstance(code, str) else err.getvalue().strip().splitlines()[-1]
    if code == 2 or (isinstance(code, int) and "invalid" in text):
        return "argparse", text
    if "cannot download" in text:  # fid, is and fid-stats need the Inception network, which needs the network
        return "offline", text
    written = ([f for f in os.listdir(out) if f != ".lock"] if os.path.isdir(out) else
               [out] if os.path.exists(out) else [])
    # the flag by name; a U-Net too big names what to lower; table2's --n and --nll-images are bounded by the digits
    named = (flag in text or (flag.startswith("--model.") and "U-Net of" in text) or
             (flag in ("--n", "--nll-images") and "held-out digits" in text))
    if text.startswith("error: ") and "Traceback" not in err.getvalue() and named and not written:
        return "refused", text
    return "BAD", f"{text} (written: {written})"


def main():
    root = tempfile.mkdtemp(prefix="ddpm-sweep-")
    os.environ["DDPM_CACHE"] = os.path.join(root, "cache")
    ckpt = os.path.join(root, "ckpt.pt")
    tiny_checkpoint(ckpt)
    samples = os.path.join(root, "samples.npz")
    ddpm.atomic_savez(samples, arr_0=ddpm.load_digits("test")[:20].repeat(3, axis=-1))
    counts, k = {}, 0
    for main_, base, flags in commands(ckpt):
        for flag in flags:
            for value in VALUES:
                k += 1
                out = os.path.join(root, f"case{k}")
                argv = [samples if a == "SAMPLES" else a for a in base] + [flag, value]
                command = argv[0]
                out += ".npz" if command == "fid-stats" else ""
                argv += [] if command in ("is", "fid") else ["--out", out]
                outcome, line = run_case(main_, argv, flag, out)
                counts[outcome] = counts.get(outcome, 0) + 1
                print(f"{outcome:8s} {main_.__module__:11s} {command:12s} {flag} {value}: {line[:150]}", flush=True)
    print("counts:", ", ".join(f"{name} {n}" for name, n in sorted(counts.items())), f"(of {k} cases)")
    return 1 if counts.get("BAD") else 0


if __name__ == "__main__":
    sys.exit(main())
