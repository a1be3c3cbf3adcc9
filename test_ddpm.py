"""Tests for ddpm.py (this branch holds only its own section; the lead merges it)."""
import numpy as np
import pytest
import torch

import ddpm

# ---- training, data, checkpoints, CLI ----

import dataclasses
import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile

from hypothesis import given, settings, strategies as st

DDPM_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddpm.py")
TINY_FLAGS = ["--preset", "digits", "--model.in-channels", "3", "--model.ch", "32", "--model.ch-mult", "1,2",
              "--model.num-res-blocks", "1", "--diffusion.num-timesteps", "10", "--diffusion.beta-schedule", "cosine",
              "--batch-size", "8", "--warmup", "2", "--sample-every", "0", "--eval-bpd", "0"]


@pytest.fixture
def one_thread():
    """One intra-op thread: these tensors are tiny, and on a shared 2-core machine a second thread waiting at
    OpenMP barriers makes each op 10-50x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images(tmp_path, one_thread):
    """A .npy of 24 random uint8 8x8 RGB images: a dataset that loads in microseconds (and one thread, above)."""
    path = str(tmp_path / "images.npy")
    np.save(path, np.random.default_rng(0).integers(0, 256, (24, 8, 8, 3), dtype=np.uint8))
    return path


def tiny_config(out, data, **train):
    """The tiny model of TINY_FLAGS as a Config (dropout and flips on, so the RNG state matters)."""
    config = ddpm.get_preset("digits")
    config.model = ddpm.ModelConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
                                    in_channels=3, resolution=8)
    config.diffusion = ddpm.DiffusionConfig(beta_schedule="cosine", num_timesteps=10)
    defaults = dict(data=data, lr=1e-3, batch_size=8, warmup=2, randflip=True, steps=4, log_every=2, ckpt_every=2,
                    sample_every=0, eval_bpd=0, out=str(out))
    config.train = dataclasses.replace(config.train, **{**defaults, **train})
    return config


def states_equal(a, b):
    """Exact equality of two nested checkpoint structures (tensors compared bitwise)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def test_train_and_sample_cli_smoke(tmp_path, images, capsys):
    """`train` writes config.json, metrics.jsonl, a grid and a weights_only checkpoint; `sample` the npz and PNGs."""
    out = tmp_path / "run"
    ddpm.main(["train", *TINY_FLAGS, "--data", images, "--out", str(out), "--steps", "2", "--log-every", "1",
               "--sample-every", "2", "--ckpt-every", "2", "--eval-bpd", "3"])
    log = capsys.readouterr().out
    assert "parameters" in log and "step=2 loss=" in log and "loss_q3=" in log and "img/s=" in log
    assert "bits/dim on 3" in log  # the NLL of the EMA after training (the array is its own test split)
    assert sorted(os.listdir(out)) == ["ckpt-0000002.pt", "config.json", "metrics.jsonl", "samples-0000002.png"]
    ckpt = torch.load(out / "ckpt-0000002.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["model"]["ch"] == 32
    assert {"model", "ema", "optimizer", "rng"} <= set(ckpt)
    ddpm.main(["sample", "--checkpoint", str(out / "ckpt-0000002.pt"), "--n", "5", "--batch-size", "2"])
    samples = np.load(out / "ckpt-0000002-samples" / "samples_5x8x8x3.npz")["arr_0"]
    assert samples.shape == (5, 8, 8, 3) and samples.dtype == np.uint8
    assert sorted(os.listdir(out / "ckpt-0000002-samples")) == ["samples.png", "samples_5x8x8x3.npz"]
    ddpm.main(["sample", "--checkpoint", str(out / "ckpt-0000002.pt"), "--n", "2", "--progressive"])
    from PIL import Image
    # min(T, 20) = 10 columns and 2 rows of 8 px images with 1 px gaps, enlarged 4x
    assert Image.open(out / "ckpt-0000002-samples" / "progressive.png").size == (10 * 36 - 4, 2 * 36 - 4)


def test_sample_chunks_resume(tmp_path, images):
    """A sample run that finds chunks from an interrupted run reuses them and gives the same npz as a fresh run."""
    config = tiny_config(tmp_path / "run", images, steps=1, ckpt_every=1)
    ckpt = os.path.join(ddpm.train(config), "ckpt-0000001.pt")
    args = ["sample", "--checkpoint", ckpt, "--n", "3", "--batch-size", "2", "--out"]
    ddpm.main([*args, str(tmp_path / "fresh")])
    model, diffusion, _ = ddpm.load_model(ckpt)
    seed = int(np.random.SeedSequence([0, 0]).generate_state(1)[0])  # chunk 0 of --seed 0
    chunk = ddpm.unnormalize_data(ddpm.sample_images(model, diffusion, 2, seed))
    os.makedirs(tmp_path / "resumed")
    np.savez(tmp_path / "resumed" / "chunk-seed0-batch2-00000.npz", arr_0=chunk, source=np.array(os.path.abspath(ckpt)))
    ddpm.main([*args, str(tmp_path / "resumed")])
    fresh, resumed = (np.load(tmp_path / d / "samples_3x8x8x3.npz")["arr_0"] for d in ("fresh", "resumed"))
    assert np.array_equal(fresh, resumed)


def test_cli_rejects_unknown_flags_and_wrong_types(capsys):
    """Unknown flags, abbreviations, wrong types and out-of-range values stop before any work."""
    for argv in (["train", "--bogus", "1"], ["train", "--batch-size", "abc"], ["train", "--model.ch-mult", "1,x"],
                 ["train", "--precision", "fp16"], ["train", "--step", "5"], ["train", "--preset", "nope"]):
        with pytest.raises(SystemExit) as e:
            ddpm.main(argv)
        assert e.value.code == 2, argv
    with pytest.raises(SystemExit, match="--batch-size must be at least 1"):
        ddpm.main(["train", "--batch-size", "0"])


def test_cli_flags_reach_every_config_field():
    """Every field of every config section has a flag, and flags override the preset with the right types."""
    parser = ddpm.argparse.ArgumentParser()
    ddpm.add_config_flags(parser)
    dests = {a.dest for a in parser._actions} - {"help"}
    fields = {f"{s}.{f.name}" for s in ("model", "diffusion", "train")
              for f in dataclasses.fields(type(getattr(ddpm.Config(), s)))}
    assert dests == fields
    args = parser.parse_args(["--lr", "3e-4", "--model.ch_mult", "1,2", "--no-randflip",
                              "--diffusion.num-timesteps", "7"])
    args.preset = "cifar10"
    config = ddpm.config_from_args(args)
    assert (config.train.lr, config.model.ch_mult, config.train.randflip, config.diffusion.num_timesteps) == \
        (3e-4, (1, 2), False, 7)


def test_resume_is_bit_for_bit(tmp_path, images, capsys):
    """Training 3 steps, then resuming to 6 (past a truncated newer checkpoint) equals 6 uninterrupted steps exactly."""
    whole = torch.load(os.path.join(ddpm.train(tiny_config(tmp_path / "a", images, steps=6, ckpt_every=3)),
                                    "ckpt-0000006.pt"), weights_only=True)
    ddpm.train(tiny_config(tmp_path / "b", images, steps=3, ckpt_every=3))
    with open(tmp_path / "b" / "ckpt-0000005.pt", "wb") as f:  # a half-written file from a crash
        f.write(open(tmp_path / "b" / "ckpt-0000003.pt", "rb").read()[:1000])
    ddpm.train(tiny_config(tmp_path / "b", images, steps=6, ckpt_every=3), resume=True)
    assert "skipping unreadable checkpoint" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "b" / "ckpt-0000006.pt", weights_only=True)
    for key in ("model", "ema", "optimizer", "rng", "step"):
        assert states_equal(whole[key], resumed[key]), key


def test_resume_refuses_other_config_and_unasked_overwrite(tmp_path, images):
    """Resuming with another config names the differing fields; training into a used run directory needs --resume."""
    ddpm.train(tiny_config(tmp_path / "a", images, steps=1, ckpt_every=1))
    with pytest.raises(ValueError, match=r"model\.dropout: 0\.1 -> 0\.0; train\.lr: 0\.001 -> 0\.002"):
        config = tiny_config(tmp_path / "a", images, steps=2, lr=2e-3)
        config.model.dropout = 0.0
        ddpm.train(config, resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        ddpm.train(tiny_config(tmp_path / "a", images, steps=2))


def test_ema_and_warmup_follow_the_official_recipe(tmp_path, images):
    """The EMA is a copy of the weights after the first update, then ema = d*ema + (1-d)*theta; under warmup
    the first update has lr 0 (k = 0) and leaves the weights as initialised."""
    run = ddpm.train(tiny_config(tmp_path / "a", images, steps=3, warmup=0, ckpt_every=1, keep_ckpts=3, ema_decay=0.9))
    c1, c2, c3 = (torch.load(os.path.join(run, f"ckpt-{s:07d}.pt"), weights_only=True) for s in (1, 2, 3))
    for k in c1["ema"]:  # decay 1e-10 leaves 1e-10 of the initial weights, far below float32 resolution here
        torch.testing.assert_close(c1["ema"][k], c1["model"][k], rtol=1e-6, atol=1e-9)
    for prev, cur in ((c1, c2), (c2, c3)):
        for k in cur["ema"]:  # the same lerp up to float32 rounding
            torch.testing.assert_close(cur["ema"][k], 0.9 * prev["ema"][k] + 0.1 * cur["model"][k],
                                       rtol=1e-5, atol=1e-7)
    assert not states_equal(c1["model"], c2["model"])
    torch.manual_seed(0)
    init = ddpm.create_model_and_diffusion(tiny_config(tmp_path, images))[0].state_dict()
    warm = torch.load(os.path.join(ddpm.train(tiny_config(tmp_path / "b", images, steps=1, warmup=2, ckpt_every=1)),
                                   "ckpt-0000001.pt"), weights_only=True)
    assert states_equal(warm["model"], init) and warm["optimizer"]["param_groups"][0]["lr"] == 0.0


def test_nan_guard_keeps_last_good_checkpoint(tmp_path, images):
    """A diverging run stops with a clear error and writes no checkpoint after the last finite one."""
    config = tiny_config(tmp_path / "a", images, steps=20, warmup=0, lr=1e30, log_every=1, ckpt_every=1, keep_ckpts=5)
    with pytest.raises(FloatingPointError, match="non-finite.*last good checkpoint"):
        ddpm.train(config)
    steps = [int(os.path.basename(p)[5:-3]) for p in ddpm.list_checkpoints(str(tmp_path / "a"))]
    assert steps and steps == list(range(1, len(steps) + 1)) and len(steps) < 20
    last = torch.load(ddpm.list_checkpoints(str(tmp_path / "a"))[-1], weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_checkpoint_survives_kill_mid_save(tmp_path):
    """A process killed (SIGKILL) in the middle of save_checkpoint leaves the previous file whole."""
    path = str(tmp_path / "ckpt.pt")
    script = f"""
import os, signal, sys, torch
sys.path.insert(0, {os.path.dirname(DDPM_PY)!r})
import ddpm
ddpm.save_checkpoint({path!r}, {{"step": 1, "w": torch.ones(1000)}})
def dying_save(obj, f):
    f.write(b"x" * 4096); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
ddpm.save_checkpoint({path!r}, {{"step": 2, "w": torch.zeros(1000)}})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    state = ddpm.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert ddpm.list_checkpoints(str(tmp_path)) == []  # a leftover .tmp file is never taken for a checkpoint


def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path, images):
    """SIGTERM during training writes a checkpoint at the current step and exits with status 0."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, DDPM_PY, "train", *TINY_FLAGS, "--data", images, "--out", str(out),
                             "--steps", "100000", "--log-every", "1", "--ckpt-every", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("step="):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    assert "stopped by SIGTERM" in rest
    (ckpt,) = ddpm.list_checkpoints(str(out))
    assert 1 <= torch.load(ckpt, weights_only=True)["step"] < 100000


def test_ddp_two_gloo_processes_equal_one_process(tmp_path, images):
    """torchrun with 2 CPU processes (gloo) and the global batch split in two trains the same weights as one process
    (dropout off: each rank has its own dropout stream, so only with dropout 0 are the two runs the same function)."""
    flags = ["--data", images, "--steps", "3", "--log-every", "3", "--ckpt-every", "3", "--model.dropout", "0",
             "--eval-bpd", "5"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           DDPM_PY, "train", *TINY_FLAGS, *flags, "--out", str(tmp_path / "ddp")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 rank(s)" in proc.stdout and "bits/dim on 5" in proc.stdout  # the NLL is split across the ranks
    ddpm.main(["train", *TINY_FLAGS, *flags, "--out", str(tmp_path / "one")])
    ddp, one = (torch.load(tmp_path / d / "ckpt-0000003.pt", weights_only=True) for d in ("ddp", "one"))
    assert len(ddp["rng"]["torch"]) == 2
    for key in ("model", "ema"):
        for name in one[key]:  # the ranks sum gradients in another order; where a gradient nearly cancels
            # (|g| ~ Adam's eps) Adam turns that float32 rounding into ~1% of an lr step: 3.7e-6 measured at lr 1e-3
            torch.testing.assert_close(ddp[key][name], one[key][name], rtol=1e-4, atol=2e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 50), st.integers(1, 20), st.integers(0, 30))
def test_batch_indices_visit_every_example_once_per_epoch(n, batch_size, steps):
    """The data order is a chain of permutations: each epoch's n consecutive positions hold every index once."""
    order = np.concatenate([ddpm.batch_indices(s, batch_size, n, seed=3) for s in range(steps + n)])
    for epoch in range(len(order) // n):
        assert sorted(order[epoch * n:(epoch + 1) * n]) == list(range(n))


# --- data sources and their errors


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
    monkeypatch.setattr(ddpm, "CIFAR10_MD5", ddpm._md5(path))
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


def test_cifar10_bad_md5_and_offline(tmp_path, monkeypatch):
    """A truncated archive fails its md5 with advice; with no archive and no network the error says where to put it."""
    fake_cifar10(tmp_path / "cache", monkeypatch, corrupt=True)
    with pytest.raises(ValueError, match="wrong md5.*delete it"):
        ddpm.load_data("cifar10")
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")
    monkeypatch.setattr("urllib.request.urlretrieve", offline)
    with pytest.raises(ConnectionError, match="copy cifar-10-python.tar.gz"):
        ddpm.load_data("cifar10")


def test_digits_split_and_scaling():
    """digits: 1,500 train and 297 held-out test images, 0..16 scaled to 0..255, as [N, 8, 8, 1]."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    train, test = ddpm.load_data("digits", "train", resolution=8, in_channels=1), ddpm.load_data("digits", "test")
    assert train.shape == (1500, 8, 8, 1) and test.shape == (297, 8, 8, 1)
    assert np.array_equal(np.concatenate([train, test])[..., 0], np.round(load_digits().images * 255 / 16))


def test_folder_and_arrays(tmp_path):
    """A folder of PNGs, a .npy and a .npz all load as the same uint8 NHWC array; --resize fits other sizes."""
    from PIL import Image
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
    from PIL import Image
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


def test_bf16_training_step_runs_on_cpu(tmp_path, images):
    """--precision bf16 autocasts on CPU and still gives a finite loss near 1 at initialisation."""
    out = ddpm.train(tiny_config(tmp_path / "a", images, steps=2, precision="bf16"))
    loss = float(open(os.path.join(out, "metrics.jsonl")).readline().split('"loss": ')[1].split(",")[0])
    assert 0.5 < loss < 1.5  # L_simple at init is E[eps^2] = 1 (output layer ~0); bf16 keeps ~3 digits




def test_extract_never_serves_a_stale_buffer():
    """_extract of a fresh temporary array returns its own values even when Python reuses a dead array's id()
    (the core once cached by id(), so the fixedlarge variance temporaries could read another array)."""
    diffusion = ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("linear", 1000))
    t, x = torch.tensor([3]), torch.zeros(1, 1, 1, 1)
    for value in range(5):
        assert diffusion._extract(np.full(10, float(value)), t, x).item() == value  # each temporary dies at once
