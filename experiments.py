"""The paper's findings on 8x8 digits, on a CPU: Table 2 in miniature (the six objectives of the paper plus improved
DDPM's hybrid, each trained, sampled and scored), Table 1's NLL contrast (L against L_simple), and sample quality
against the number of sampling steps. Every number is measured with evaluate.py's digits score (digits-FD/IS and the
test NLL bound, each beside its reference points); docs/evidence.md has the tables these commands printed.

    python experiments.py table2 --out runs/table2            # make table2: 7 rows, 2 tasks at a time, resumable
    python experiments.py steps --checkpoint runs/demo/ckpt-0001000.pt --device cpu   # make steps

It imports ddpm.py and evaluate.py, and writes none of their helpers again.
"""
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import re
import sys
import time

import torch

import ddpm
from evaluate import (DIGITS_SCORE_N, DigitsScore, ResumeFolder, add_bootstrap_arg, add_model_args, atomic_json,
                      check_digits_counts, check_digits_model, cli, command_parser, digits_images,
                      digits_nll_references, digits_samples, digits_samples_folder, digits_score_scale,
                      digits_test_nll, load_for_sampling, pm, print_digits_scale, pyplot, save_figure, score_folder)


# ---- 1. Table 2 in miniature: seven objectives trained, sampled and scored on digits, and Table 1's NLL contrast -----

@dataclasses.dataclass(frozen=True)
class Table2Row:
    key: str                 # the row's folder under --out
    group: str               # the paper's parameterisation heading (no '|': the table is Markdown)
    objective: str           # the paper's objective column
    model_mean_type: str     # how ddpm.py expresses the row (DiffusionConfig)
    model_var_type: str
    loss_type: str
    paper_is: str            # the paper's CIFAR-10 numbers (Table 2); "unstable" where the paper has a blank
    paper_fid: str


# Fixed isotropic Sigma is sigma^2 = beta ('fixedlarge'), the paper's CIFAR-10 choice; 'L' is loss_type 'kl', the
# true bound term L_{t-1} for a uniformly drawn t (the decoder L_0 at t = 1); mu~ prediction is 'xprev'.
TABLE2_ROWS = (
    Table2Row("mu-L-learned", "μ̃ prediction", "L, learned diagonal Σ", "xprev", "learned", "kl",
              "7.28±0.10", "23.69"),
    Table2Row("mu-L-fixed", "μ̃ prediction", "L, fixed isotropic Σ", "xprev", "fixedlarge", "kl",
              "8.06±0.09", "13.22"),
    Table2Row("mu-mse", "μ̃ prediction", "‖μ̃ − μ̃θ‖²", "xprev", "fixedlarge", "mse",
              "unstable", "unstable"),
    Table2Row("eps-L-learned", "ε prediction", "L, learned diagonal Σ", "eps", "learned", "kl",
              "unstable", "unstable"),
    Table2Row("eps-L-fixed", "ε prediction", "L, fixed isotropic Σ", "eps", "fixedlarge", "kl",
              "7.67±0.13", "13.51"),
    Table2Row("eps-Lsimple", "ε prediction", "‖ε − εθ‖² (L_simple)", "eps", "fixedlarge", "mse",
              "9.46±0.11", "3.17"),
    Table2Row("eps-hybrid-range", "beyond the paper", "hybrid, learned range (improved DDPM)", "eps",
              "learned_range", "hybrid", "-", "-"),
)
TABLE2_CONTRAST = ("eps-L-fixed", "eps-Lsimple")  # Table 1: the true bound L against L_simple, both fixed Sigma
TABLE2_TASKS = ("train", "samples", "nll")
# What decides table2's numbers, with the flag that sets it (--jobs only decides how fast).
TABLE2_FLAGS = {"steps": "--steps", "n": "--n", "nll_images": "--nll-images", "timesteps": "--timesteps",
                "seed": "--seed", "bootstrap": "--bootstrap"}


def table2_config(row, settings, out):
    """The digits preset with the row's parameterisation and objective, trained for settings['steps'] steps
    with a checkpoint at half of them (Table 1's NLL contrast reads both)."""
    config = ddpm.get_preset("digits")
    d, tc = config.diffusion, config.train
    d.model_mean_type, d.model_var_type, d.loss_type = row.model_mean_type, row.model_var_type, row.loss_type
    d.num_timesteps = settings["timesteps"]
    tc.steps, tc.seed, tc.out = settings["steps"], settings["seed"], out
    tc.ckpt_every, tc.keep_ckpts = max(1, settings["steps"] // 2), 3  # odd steps: half, 2 x half and the last
    tc.sample_every = 0  # the table measures the samples itself
    return config


def _redirect_output(path):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so tqdm too) to the end of `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)


def table2_task(key, task, settings, out, threads=None, log=False):
    """One unit of table2's work on one row: 'train' it, score its 'samples', or its test 'nll'. Returns the
    result, also written to out/<key>/<task>.json, the cache a rerun reads instead of running the task again.
    A worker process passes log=True (its output goes to out/<key>/<task>.log) and its share of the CPU threads."""
    row, folder = next(r for r in TABLE2_ROWS if r.key == key), os.path.join(out, key)
    pieces = ResumeFolder(out, settings, TABLE2_FLAGS, "rows", lock=False)  # cmd_table2's process holds `out`
    os.makedirs(folder, exist_ok=True)
    if log:
        _redirect_output(os.path.join(folder, f"{task}.log"))
    if threads:
        torch.set_num_threads(threads)
    start, cpu = time.time(), time.process_time()
    result = {"status": "ok"}
    try:
        ckpt = os.path.join(folder, f"ckpt-{settings['steps']:07d}.pt")
        if task == "train":
            ddpm.train(table2_config(row, settings, folder), resume=True)
            if not os.path.isfile(ckpt):  # stopped by a signal: no json, so a rerun resumes the training
                raise RuntimeError(f"training stopped before step {settings['steps']}; rerun to resume it")
        else:
            model, diffusion, _ = ddpm.load_model(ckpt)
            if task == "samples":
                images = digits_samples(model, diffusion, settings["n"], settings["seed"], folder)
                pieces.save(f"{key}/samples.npz", images)  # for the figure
                result["score"] = DigitsScore(settings["seed"], settings["bootstrap"])(images)
            else:
                result["nll"] = digits_test_nll(model, diffusion, settings["nll_images"], settings["seed"])
                half = os.path.join(folder, f"ckpt-{settings['steps'] // 2:07d}.pt")
                if key in TABLE2_CONTRAST and os.path.isfile(half):
                    result["nll_half"] = digits_test_nll(ddpm.load_model(half)[0], diffusion, settings["nll_images"],
                                                         settings["seed"])
    except FloatingPointError as e:  # the NaN guard of training, or non-finite samples or bound
        result = {"status": "unstable", "note": str(e)}
    result.update(wall_s=time.time() - start, cpu_s=time.process_time() - cpu)
    pieces.save(f"{key}/{task}.json", result)
    print(json.dumps(result), flush=True)
    return result


def _table2_todo(results, submitted):
    """The (row, task) pairs that can start now: training first; samples and nll once a row trained stably."""
    todo = []
    for row in TABLE2_ROWS:
        done = results[row.key]
        if "train" not in done:
            tasks = ["train"]
        elif done["train"]["status"] == "ok":
            tasks = [t for t in TABLE2_TASKS[1:] if t not in done]
        else:  # unstable: nothing to sample or evaluate
            tasks = []
        todo += [(row.key, t) for t in tasks if (row.key, t) not in submitted]
    return todo


def run_table2_tasks(settings, out, jobs=2):
    """Every row's tasks, `jobs` at a time in worker processes with cpu_count // jobs threads each (jobs=1: in
    this process, with its threads). Finished tasks are read from their json. In a worker, a task that crashes is
    reported and left for a rerun, and the others go on; with jobs=1 the crash ends the command (one line), and a
    rerun continues. Returns {row key: {task: result}}."""
    pieces = ResumeFolder(out, settings, TABLE2_FLAGS, "rows")
    results = {row.key: {task: result for task in TABLE2_TASKS
                         if (result := pieces.load(f"{row.key}/{task}.json")) is not None} for row in TABLE2_ROWS}
    submitted, threads = set(), max(1, (os.cpu_count() or 1) // jobs)

    def finish(key, task, result):
        results[key][task] = result
        note = f": {result['note']}" if result["status"] != "ok" else ""
        print(f"  {time.strftime('%H:%M:%S')} {key} {task} {result['status']} in {result['wall_s'] / 60:.1f} min"
              + note, flush=True)

    if jobs == 1:
        while todo := _table2_todo(results, submitted):
            submitted.add(todo[0])
            finish(*todo[0], table2_task(*todo[0], settings, out))
        return results
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {}
        while True:
            for key, task in _table2_todo(results, submitted):
                submitted.add((key, task))
                pending[pool.submit(table2_task, key, task, settings, out, threads, True)] = key, task
            if not pending:
                return results
            finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                key, task = pending.pop(future)
                try:
                    finish(key, task, future.result())
                except Exception as e:  # a bug or a killed worker: this task only; a rerun retries it
                    print(f"  {key} {task} failed ({type(e).__name__}: {e}); see {out}/{key}/{task}.log", flush=True)


def _table2_cells(result):
    """(digits-FD, digits-IS, test NLL) cells of a row's results."""
    if not result.get("train"):
        return ("not run",) * 3
    bad = [r for r in result.values() if r["status"] != "ok"]
    if bad:
        return ("unstable",) * 3
    s, nll = result.get("samples", {}).get("score"), result.get("nll", {}).get("nll")
    return (pm(s["fd"], s["fd_std"], 1) if s else "not run", pm(s["is"], s["is_std"]) if s else "not run",
            pm(*nll) if nll else "not run")


def print_table2(results, scale, settings, refs):
    """The paper's Table 2 as Markdown, our digits columns beside the paper's CIFAR-10 IS and FID."""
    print(f"\nTable 2 on 8x8 digits: {settings['steps']} training steps per row (seed {settings['seed']}, T = "
          f"{settings['timesteps']}); {settings['n']} samples of {settings['timesteps']} steps (Algorithm 2) per "
          f"score; test NLL bound on the first {settings['nll_images']} held-out digits; ± = bootstrap std "
          f"(scores) and standard error (NLL)\n")
    print("| objective | paper IS | paper FID | digits-IS | digits-FD | test NLL (bits/dim) |")
    print("|---|---|---|---|---|---|")
    group = None
    for row in TABLE2_ROWS:
        if row.group != group:
            group = row.group
            print(f"| **{group}** | | | | | |")
        fd, inception, nll = _table2_cells(results[row.key])
        print(f"| {row.objective} | {row.paper_is} | {row.paper_fid} | {inception} | {fd} | {nll} |")
    for name, what in (("floor", "real held-out digits (floor)"), ("baseline", "per-pixel categorical (baseline)")):
        s = scale[name]
        nll = (pm(*refs["categorical"]) if name == "baseline" else "-")
        print(f"| {what} | | | {pm(s['is'], s['is_std'])} | {pm(s['fd'], s['fd_std'], 1)} | {nll} |")
    print(f"\nuniform over the {refs['num_levels']} grey levels: {refs['uniform_levels']:.2f} bits/dim; over 256: "
          f"{refs['uniform_256']:.2f}. Row mapping (model_mean_type / model_var_type / loss_type): "
          + "; ".join(f"{r.key} {r.model_mean_type}/{r.model_var_type}/{r.loss_type}" for r in TABLE2_ROWS))


def print_table1_contrast(results, settings):
    """Table 1's NLL contrast, the true bound L against L_simple (both eps, fixed Sigma), at half and all steps."""
    print("\nTable 1's NLL contrast (the paper, CIFAR-10: L <= 3.70, L_simple <= 3.75 bits/dim):")
    first_better = None
    for label, field, step in (("half", "nll_half", settings["steps"] // 2), ("all", "nll", settings["steps"])):
        values = [results[k].get("nll", {}).get(field) for k in TABLE2_CONTRAST]
        if None in values:
            print(f"  step {step}: not measured (a row is unstable or not run)")
            continue
        (l_mean, l_se), (s_mean, s_se) = values
        diff, se = l_mean - s_mean, math.hypot(l_se, s_se)
        better = "L better" if diff < -2 * se else "L_simple better" if diff > 2 * se else "no difference beyond 2 se"
        print(f"  step {step}: L {pm(l_mean, l_se)}, L_simple {pm(s_mean, s_se)}, L - L_simple = "
              f"{diff:+.2f} ± {se:.2f}: {better}")
        if diff < -2 * se and first_better is None:
            first_better = step
    print("  L gives the better NLL: " + (f"yes, from step {first_better}" if first_better else
                                           f"not within {settings['steps']} steps"))


def plot_table2_samples(results, pieces, path, per_row=16):
    """One strip of per_row samples per Table 2 row, labelled, as a PNG (rows without samples are left out)."""
    plt = pyplot("Table 2 sample figure")
    samples = {r.key: pieces.load(f"{r.key}/samples.npz") for r in TABLE2_ROWS
               if results[r.key].get("samples", {}).get("status") == "ok"}
    keys = [r for r in TABLE2_ROWS if samples.get(r.key) is not None]
    if plt is None or not keys:
        return False
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 0.62 * len(keys) + 0.2), squeeze=False)
    for ax, row in zip(axes[:, 0], keys):
        strip = ddpm.image_grid(samples[row.key][:per_row], nrow=per_row, gap=255)  # one row, white gaps
        ax.imshow(strip[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{row.group}: {row.objective}", fontsize=7, loc="left", pad=2)
        ax.axis("off")
    return save_figure(plt, fig, path)


def cmd_table2(args):
    settings = dict(steps=args.steps, n=args.n, nll_images=args.nll_images, timesteps=args.timesteps, seed=args.seed,
                    bootstrap=args.bootstrap)
    check_digits_counts(args.n, args.nll_images)
    ddpm.check_range("--jobs", args.jobs, 1, len(TABLE2_ROWS) * len(TABLE2_TASKS))  # more tasks never exist
    schedule = ddpm.get_preset("digits").diffusion.beta_schedule
    try:
        ddpm.get_beta_schedule(schedule, args.timesteps)
    except ValueError as e:  # in the words of this command's flag
        raise ValueError(f"--timesteps {args.timesteps} ({schedule} schedule): {e}") from None
    for row in TABLE2_ROWS:  # --timesteps and the rows' settings, as training would check them, before any write
        table2_config(row, settings, args.out).check()
    score = DigitsScore(args.seed, args.bootstrap)  # the pinned classifier, refused if changed, before any work
    pieces = ResumeFolder(args.out, settings, TABLE2_FLAGS, "rows")  # refuses other settings before any work
    pieces.claim(["table2-samples.png"])
    start = time.time()
    scale = digits_score_scale(score, args.n, args.seed)
    refs = digits_nll_references(digits_images("test")[:args.nll_images])
    print(f"Table 2 on digits: {len(TABLE2_ROWS)} rows x (train, samples, nll), {args.jobs} at a time, in "
          f"{args.out}; logs in {args.out}/<row>/<task>.log", flush=True)
    results = run_table2_tasks(settings, args.out, args.jobs)
    print_table2(results, scale, settings, refs)
    print_table1_contrast(results, settings)
    figure = os.path.join(args.out, "table2-samples.png")
    if plot_table2_samples(results, pieces, figure):
        print(f"\nwrote {figure}")
    spent = {t: sum(r[t]["wall_s"] for r in results.values() if t in r) for t in TABLE2_TASKS}
    print(f"time: {(time.time() - start) / 60:.1f} min wall for this command; task wall times summed over rows "
          f"(as recorded, including earlier runs): " + ", ".join(f"{t} {v / 60:.1f} min" for t, v in spent.items())
          + f"; {args.jobs} tasks at a time")
    pieces.save("table2.json", {"settings": settings, "results": results, "scale": scale, "nll_references": refs})
    return results


# ---- 2. Sample quality against the number of sampling steps: respaced ancestral sampling and DDIM --------------------

def cmd_steps(args):
    if args.respacing:
        raise ValueError("steps respaces the model itself; drop --respacing and list the step counts in --counts")
    check_digits_counts(args.n)
    score = DigitsScore(args.seed, args.bootstrap)  # the pinned classifier, refused if changed, before any work
    device = torch.device(args.device)
    model, diffusion, config = load_for_sampling(args.checkpoint, args.weights, device, args.respacing)
    source = args.checkpoint or args.weights
    check_digits_model(config, source)
    T = diffusion.num_timesteps
    counts = sorted({int(c) for c in args.counts.split(",") if c.strip()}, reverse=True) if \
        re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", args.counts) else None
    if not counts or counts[-1] < 1 or counts[0] > T:
        raise ValueError(f"--counts must be comma-separated step counts in [1, {T}] (the model's T), "
                         f"got {args.counts!r}")
    chains = [(sampler, count, ddpm.respace(diffusion, f"ddim{count}" if sampler == "ddim" else str(count)))
              for sampler in ("ancestral", "ddim") for count in counts]  # a count DDIM cannot stride fails here
    out, folder = score_folder(args, model, diffusion, "steps", counts=counts)
    samples = digits_samples_folder(out)  # shared with digits-score
    scale = digits_score_scale(score, args.n, args.seed)
    print(f"digits-FD against network evaluations for {source} ({args.n} samples each, seed {args.seed})")
    rows = []
    for sampler, count, spaced in chains:
        start = time.time()
        images = digits_samples(model, spaced, args.n, args.seed, samples, sampler)
        rows.append(dict(sampler=sampler, evaluations=count, seconds=time.time() - start, **score(images)))
        print(f"  {sampler:9s} {count:5d}  digits-FD {pm(rows[-1]['fd'], rows[-1]['fd_std']):>16}  "
              f"digits-IS {pm(rows[-1]['is'], rows[-1]['is_std'])}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    print_digits_scale(scale)
    print_steps_table(rows, counts)
    folder.claim(["steps.json", "steps.png"])
    atomic_json(os.path.join(out, "steps.json"), {"rows": rows, "scale": scale, "source": source, "n": args.n})
    if plot_steps(rows, scale, os.path.join(out, "steps.png")):
        print(f"wrote {os.path.join(out, 'steps.png')} and steps.json")
    return rows


def fewest_steps_within(rows, sampler, reference):
    """The fewest evaluations whose digits-FD is not worse than the reference's by more than two combined
    bootstrap standard deviations, for one sampler; None if none is."""
    ok = [r["evaluations"] for r in rows if r["sampler"] == sampler
          and r["fd"] - reference["fd"] <= 2 * math.hypot(r["fd_std"], reference["fd_std"])]
    return min(ok) if ok else None


def print_steps_table(rows, counts):
    """The steps table as Markdown and the answer: how few evaluations stay within the uncertainty of all T."""
    cell = {(r["sampler"], r["evaluations"]): r for r in rows}
    print("\n| network evaluations | ancestral (respaced) digits-FD | digits-IS | DDIM eta=0 digits-FD | digits-IS |")
    print("|---|---|---|---|---|")
    for count in counts:
        a, d = cell["ancestral", count], cell["ddim", count]
        print(f"| {count} | {pm(a['fd'], a['fd_std'], 1)} | {pm(a['is'], a['is_std'])} | "
              f"{pm(d['fd'], d['fd_std'], 1)} | {pm(d['is'], d['is_std'])} |")
    print()
    for reference in ("ancestral", "ddim"):
        ref = cell[reference, counts[0]]
        answers = {s: fewest_steps_within(rows, s, ref) for s in ("ancestral", "ddim")}
        print(f"Within the uncertainty of {counts[0]} {reference} steps (digits-FD {ref['fd']:.1f}, not worse by more "
              f"than 2 combined bootstrap std): " + "; ".join(f"{s} from {a} evaluations" if a else
                                                             f"{s}: none of the counts" for s, a in answers.items()))


def plot_steps(rows, scale, path):
    """digits-FD (± bootstrap std) against network evaluations for both samplers, with the floor and baseline."""
    plt = pyplot("steps plot")
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for sampler, label in (("ancestral", "ancestral, respaced"), ("ddim", "DDIM, eta = 0")):
        pts = [r for r in rows if r["sampler"] == sampler]
        ax.errorbar([r["evaluations"] for r in pts], [r["fd"] for r in pts], yerr=[r["fd_std"] for r in pts],
                    marker="o", capsize=3, label=label)
    for name, style in (("floor", ":"), ("baseline", "--")):
        ax.axhline(scale[name]["fd"], color="gray", linestyle=style, label=f"{name} ({scale[name]['fd']:.1f})")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample", ylabel="digits-FD (lower is better)")
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)


# ---- 3. Command line -------------------------------------------------------------------------------------------------

def build_parser():
    parser, sub = command_parser("experiments.py", __doc__)

    p = sub.add_parser("table2", allow_abbrev=False,
                       help="the paper's Table 2 (six objectives, plus improved DDPM's hybrid) trained on digits")
    p.add_argument("--steps", type=int, default=ddpm.get_preset("digits").train.steps, help="training steps per row")
    p.add_argument("--n", type=int, default=DIGITS_SCORE_N, help="samples per score (default: %(default)s)")
    p.add_argument("--nll-images", type=int, default=100, help="held-out digits for the NLL (default: %(default)s)")
    p.add_argument("--timesteps", type=int, default=ddpm.DiffusionConfig.num_timesteps,
                   help="T of every row (default: the paper's %(default)s; smaller only for smoke tests)")
    p.add_argument("--jobs", type=int, default=2, help="tasks at a time, one process each (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "table2"), help="a rerun resumes there (default: %(default)s)")
    add_bootstrap_arg(p)
    p.set_defaults(func=cmd_table2)

    p = sub.add_parser("steps", allow_abbrev=False,
                       help="digits-FD against sampling steps: respaced ancestral sampling and DDIM (eta = 0)")
    add_model_args(p)
    p.add_argument("--counts", default="1000,250,100,50,25,10", help="network evaluations (default: %(default)s)")
    p.add_argument("--n", type=int, default=DIGITS_SCORE_N, help="samples per score (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: <checkpoint>-steps/ beside it); a rerun reuses samples")
    add_bootstrap_arg(p)
    p.set_defaults(func=cmd_steps)
    return parser


def main(argv=None):
    return cli(build_parser(), argv)  # evaluate.py's: a count below 1, bad input or Ctrl-C ends in one line


if __name__ == "__main__":
    main()
