"""The math check for ddpm.py, then everything else (this branch holds only its own section; the lead merges it)."""
import pytest
import torch

import ddpm

# ---- released weights ----
# diffusers and safetensors are dev requirements (requirements-dev.txt), imported inside the tests so that their
# absence fails these tests loudly, never skips them, and leaves the rest of the file running.


def ddpm_unet2d(block_out_channels, attn_level, sample_size, dropout):
    """diffusers' UNet2DModel with the google/ddpm-* settings and random weights, GroupNorm affines included
    (at their init of 1 and 0 a swapped norm1/norm2 or a lost bias would go unnoticed)."""
    import diffusers
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
    model, diffusion, config = ddpm.load_pretrained(tmp_path / "safetensors")
    assert not model.training and sum(p.numel() for p in model.parameters()) == 35_746_307
    assert config.preset == "cifar10" and config.model == ddpm.get_preset("cifar10").model
    assert (diffusion.model_mean_type, diffusion.model_var_type) == ("eps", "fixedlarge")
    assert_same_function(model, unet)
    assert_same_weights(ddpm.load_pretrained(tmp_path / "bin")[0], model)


def test_256_layout_at_reduced_width_loads_exactly_and_samples_with_fixedsmall(tmp_path):
    """The 256x256 family's layout (ch_mult 1,1,2,2,4,4, attention at level 4), at width 32 and 32x32, loads as the
    same function from a snapshot's unet/ folder, from 2022-era attention key names, and gets the dataset's preset."""
    torch.manual_seed(0)
    unet = ddpm_unet2d((32, 32, 64, 64, 128, 128), attn_level=4, sample_size=32, dropout=0.0)
    snapshot = tmp_path / "models--google--ddpm-ema-church-256" / "snapshots" / "5a1118b"
    unet.save_pretrained(snapshot / "unet")
    model, diffusion, config = ddpm.load_pretrained(snapshot)
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
    plain, diffusion, config = ddpm.load_pretrained(tmp_path / "plain")  # no dataset in the path: the 256 recipe
    assert config.preset == "256x256" and diffusion.model_var_type == "fixedsmall"
    assert_same_weights(plain, model)


def test_official_layout_state_dict_round_trips(tmp_path):
    """A state dict in the official/pesser layout, made from our own UNet, loads back identically."""
    torch.manual_seed(0)
    model = ddpm.UNet(ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                      in_channels=1, resolution=8)
    torch.save(model.state_dict(), tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="preset="):  # ch_mult (1, 2) is no released model: say how it samples
        ddpm.load_pretrained(tmp_path / "model.ckpt")
    loaded, diffusion, config = ddpm.load_pretrained(tmp_path / "model.ckpt", preset="digits")
    assert config.model == ddpm.ModelConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                                            dropout=0.1, in_channels=1, resolution=8)
    assert_same_weights(loaded, model)

    # pesser's file names say the dataset; without config.json the resolution is the preset's (256).
    big = ddpm.UNet(ch=32, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,), dropout=0.0, resolution=256)
    (tmp_path / "ema_diffusion_lsun_cat_model").mkdir()
    torch.save(big.state_dict(), tmp_path / "ema_diffusion_lsun_cat_model" / "model-1761000.ckpt")
    loaded, diffusion, config = ddpm.load_pretrained(tmp_path / "ema_diffusion_lsun_cat_model" / "model-1761000.ckpt")
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
        ddpm.load_pretrained(tmp_path / "truncated.pt")
    from safetensors.torch import save_file
    save_file(state, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        ddpm.load_pretrained(tmp_path / "truncated.safetensors")

    torch.save({"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match="neither the official layout"):
        ddpm.load_pretrained(tmp_path / "resnet.pt")
    misfit = {k: v for k, v in state.items() if k != "mid.attn_1.q.bias"}
    misfit["conv_out.weight"], misfit["extra.weight"] = torch.zeros(6, 32, 3, 3), torch.zeros(1)
    torch.save(misfit, tmp_path / "misfit.pt")
    with pytest.raises(ValueError, match="does not fit the DDPM U-Net") as error:
        ddpm.load_pretrained(tmp_path / "misfit.pt")
    assert all(name in str(error.value) for name in ("mid.attn_1.q.bias", "extra.weight", "conv_out.weight"))
    del state["conv_in.weight"]
    torch.save(state, tmp_path / "no_conv_in.pt")
    with pytest.raises(ValueError, match="conv_in.weight"):
        ddpm.load_pretrained(tmp_path / "no_conv_in.pt")

    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="holds no config.json"):
        ddpm.load_pretrained(tmp_path / "snapshot")
    with pytest.raises(FileNotFoundError):
        ddpm.load_pretrained(tmp_path / "nowhere")
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .ckpt/.pt/.bin/.safetensors weights file"):
        ddpm.load_pretrained(tmp_path / "weights.h5")


def test_a_diffusers_snapshot_that_computes_differently_is_refused(tmp_path):
    """A UNet2DModel whose config changes the function but not the keys (cos-first embedding) is not taken as DDPM."""
    torch.manual_seed(0)
    unet = ddpm_unet2d((32, 64), attn_level=1, sample_size=8, dropout=0.0)
    unet.register_to_config(flip_sin_to_cos=True)
    unet.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="flip_sin_to_cos=True"):
        ddpm.load_pretrained(tmp_path / "other")


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
def test_p_sample_equals_diffusers_ddpm_scheduler_at_every_t(variance_type):
    """With the same model output and noise, p_sample gives DDPMScheduler.step's x_{t-1} and x0 at all 1000 t."""
    import diffusers
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


def test_extract_cache_never_serves_another_array_at_the_same_address():
    """_extract keys its cache on content, so an array with a reused id() but new values gets its own values."""
    # Regression: the cache keyed on id(arr). predict_start_from_prev frees 1/coef1 before coef2/coef1 is made, often
    # at the same address, and then read 1/coef1 for both (x_0 -> mu~ -> x_0 came back off by ~1 at t=1). Mutating one
    # array in place gives the same id with new values deterministically, whatever the allocator does.
    d = ddpm.GaussianDiffusion(betas=ddpm.get_beta_schedule("linear", 1000))
    arr, t, x = d.betas.copy(), torch.tensor([0, 999]), torch.zeros(2, 3)
    assert torch.equal(d._extract(arr, t, x).flatten(), torch.tensor([1e-4, 0.02], dtype=torch.float32))
    arr[:] = d.alphas_cumprod
    assert torch.equal(d._extract(arr, t, x).flatten(), torch.from_numpy(d.alphas_cumprod[[0, 999]]).float())
