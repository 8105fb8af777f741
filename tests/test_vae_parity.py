"""The Flax AutoencoderKL against diffusers' on a tiny random VAE saved as safetensors."""

import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from reference import make_vae
from swiftbrush_jax.models import UnsupportedConfigError
from swiftbrush_jax.models.vae import VAEConfig, load_vae
from swiftbrush_jax.files.weights import save_state_dict

LEGACY_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def rel_error(ours, theirs) -> tuple:
    """(max abs error, that error relative to max |reference|)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    err = np.abs(ours - theirs).max()
    return err, err / np.abs(theirs).max()


@pytest.fixture(scope="module")
def torch_vae():
    return make_vae()


@pytest.fixture(scope="module")
def vae_dir(torch_vae, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("vae"))
    torch_vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def loaded(vae_dir):
    return load_vae(vae_dir)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))


@functools.partial(jax.jit, static_argnums=(0, 1))
def apply(model, method: str, params, x):
    """Jitted per (model, method) so tests loading equal models share one compile."""
    return model.apply({"params": params}, x, method=method)


def encode(model, params, x: torch.Tensor):
    return apply(model, "encode", params, nhwc(x))


def decode(model, params, z: torch.Tensor):
    return apply(model, "decode", params, nhwc(z))


def test_vae_encode_parity(torch_vae, loaded, images):
    with torch.no_grad():
        dist = torch_vae.encode(images).latent_dist
    mean, logvar = encode(*loaded, images)
    assert mean.shape == logvar.shape == (2, 16, 16, 4)
    for ours, theirs in ((mean, dist.mean), (logvar, dist.logvar)):
        err, rel = rel_error(ours, nhwc(theirs))
        assert rel <= 1e-4, (err, rel)


def test_vae_decode_parity(torch_vae, loaded, latents):
    with torch.no_grad():
        image = torch_vae.decode(latents).sample
    ours = decode(*loaded, latents)
    assert ours.shape == (2, 16, 16, 3)
    err, rel = rel_error(ours, nhwc(image))
    assert rel <= 1e-4, (err, rel)


def write_legacy_vae(src: str, dst: str) -> None:
    """Rewrite a diffusers VAE the way old checkpoints store it: LDM names, 1x1-conv projections."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    state = {}
    for key, value in load_file(os.path.join(src, "diffusion_pytorch_model.safetensors")).items():
        for new, old in LEGACY_NAMES.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        state[key] = value
    save_state_dict(state, os.path.join(dst, "diffusion_pytorch_model.safetensors"))


def test_vae_legacy_attention_names_parity(torch_vae, vae_dir, loaded, latents, tmp_path):
    legacy_dir = str(tmp_path / "legacy")
    write_legacy_vae(vae_dir, legacy_dir)
    names = load_file(os.path.join(legacy_dir, "diffusion_pytorch_model.safetensors"))
    assert names["encoder.mid_block.attentions.0.query.weight"].ndim == 4

    model, params = load_vae(legacy_dir)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), params, loaded[1]))
    with torch.no_grad():
        image = torch_vae.decode(latents).sample
    err, rel = rel_error(decode(model, params, latents), nhwc(image))
    assert rel <= 1e-4, (err, rel)


def test_vae_bf16_compute_stays_close(torch_vae, vae_dir, latents):
    model, params = load_vae(vae_dir, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(params))
    with torch.no_grad():
        image_ref = torch_vae.decode(latents).sample
    image = decode(model, params, latents)
    assert image.dtype == jnp.float32
    assert rel_error(image, nhwc(image_ref))[1] < 5e-2


def test_vae_config_round_trips_through_diffusers(vae_dir):
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    with open(os.path.join(vae_dir, "config.json")) as f:
        config = VAEConfig.from_diffusers(json.load(f))
    assert config.block_out_channels == (32, 64) and config.scaling_factor == 0.18215
    exported = config.to_diffusers()
    assert VAEConfig.from_diffusers(exported) == config
    rebuilt = TorchAutoencoderKL.from_config(exported)
    assert VAEConfig.from_diffusers(dict(rebuilt.config)) == config


@pytest.mark.parametrize(
    "key, value",
    [("act_fn", "relu"), ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
     ("shift_factor", 0.1159), ("use_quant_conv", False)],
)
def test_vae_unsupported_option_is_named(key, value):
    config = dict(VAEConfig(block_out_channels=(32, 64)).to_diffusers(), **{key: value})
    with pytest.raises(UnsupportedConfigError, match=re.escape(f"{key}={value!r}")):
        VAEConfig.from_diffusers(config)


@pytest.mark.parametrize("blocks", [((1, 2), (2, 1)), ((1, 1, 1), (1, 1, 1))])
def test_taesd_parity(tmp_path, blocks):
    """Our TAESD against diffusers' AutoencoderTiny with random weights (every tensor perturbed): decode of
    latents past the soft clamp's knee, encode of images in [-1, 1], and the round trip."""
    from diffusers import AutoencoderTiny

    from reference import randomize
    from swiftbrush_jax.models.taesd import load_taesd

    encoder_blocks, decoder_blocks = blocks
    channels = (8,) * len(encoder_blocks)
    torch_model = randomize(AutoencoderTiny(encoder_block_out_channels=channels, decoder_block_out_channels=channels,
                                            num_encoder_blocks=encoder_blocks, num_decoder_blocks=decoder_blocks), 3)
    torch_model.eval().save_pretrained(str(tmp_path), safe_serialization=True)
    model, params = load_taesd(str(tmp_path))
    g = torch.Generator().manual_seed(4)
    latents = 3.0 * torch.randn(2, 4, 8, 8, generator=g)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        decoded = torch_model.decode(latents).sample.numpy()
        encoded = torch_model.encode(images).latents.numpy()
    nhwc = lambda x: x.permute(0, 2, 3, 1).numpy()
    ours_decoded = model.apply({"params": params}, nhwc(latents), method=model.decode)
    ours_encoded = model.apply({"params": params}, nhwc(images), method=model.encode)
    factor = 2 ** (len(decoder_blocks) - 1)
    assert ours_decoded.shape == (2, 8 * factor, 8 * factor, 3)
    for ours, theirs in ((ours_decoded, decoded), (ours_encoded, encoded)):
        theirs = theirs.transpose(0, 2, 3, 1)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5 * np.abs(theirs).max())
