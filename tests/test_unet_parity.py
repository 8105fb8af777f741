"""The Flax UNet against diffusers' PyTorch UNet2DConditionModel, plus its loader's error paths."""

import json
import os
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from reference import UNET_CONFIGS, make_unet, randomize
from swiftbrush_jax.files import weights
from swiftbrush_jax.models import UnsupportedConfigError
from swiftbrush_jax.models.layers import AttentionOptions, attention
from swiftbrush_jax.models.unet import UNetConfig, load_unet, unet_config_to_diffusers, unet_param_shapes

# XLA's CPU optimisations cost more compile time than these tiny forwards ever take.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

SD21_BASE_CONFIG = {  # unet/config.json of stable-diffusion-2-1-base
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False, "use_linear_projection": True,
}


# SDXL's traits in small: no attention in the first down block, transformer_layers_per_block per block (the mid
# block takes the last, the up blocks the reverse), uneven layers_per_block, addition_embed_type="text_time" with
# 6 time ids of addition_time_embed_dim 8 after a pooled text embedding of 16.
SDXL_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=(1, 2, 1),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), cross_attention_dim=40,
    use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8, upcast_attention=None,
)
SDXL_TEXT_EMBEDS = 16

SDXL_BASE_CONFIG = {  # unet/config.json of stable-diffusion-xl-base-1.0
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}


def compile_forward(model, variables, inputs):
    """``model.apply`` compiled for exactly these variables' and inputs' shapes."""
    return jax.jit(model.apply).lower(variables, *inputs).compile(FAST_COMPILE)


def run(model, variables, inputs):
    return np.asarray(compile_forward(model, variables, inputs)(variables, *inputs))


def build_case(kind, tmp_path_factory):
    """A saved random reference UNet, shared inputs, its PyTorch output and our float32 output (NHWC)."""
    torch_unet = make_unet(kind)
    folder = str(tmp_path_factory.mktemp(kind))
    torch_unet.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([3, 761])
    context = rng.standard_normal((2, 7, UNET_CONFIGS[kind]["cross_attention_dim"])).astype(np.float32)
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(context))
    model, params = load_unet(folder)
    inputs = (jnp.asarray(x), jnp.asarray(t), jnp.asarray(context))
    return SimpleNamespace(
        folder=folder, torch_unet=torch_unet, model=model, params=params, inputs=inputs,
        expected=ref.sample.numpy().transpose(0, 2, 3, 1), ours=run(model, {"params": params}, inputs))


def sdxl_conditioning(seed):
    """(text_embeds, time_ids): a pooled embedding and SDXL's micro-conditioning (original size, crop top-left,
    target size), different per row."""
    text_embeds = np.random.default_rng(seed).standard_normal((2, SDXL_TEXT_EMBEDS)).astype(np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 512, 512]], np.float32) + 8 * seed
    return text_embeds, time_ids


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The tiny SDXL-shaped UNet: diffusers' outputs for three conditionings (base, other text_embeds, other
    time_ids) and ours, compiled once."""
    from diffusers import UNet2DConditionModel as TorchUNet

    torch_unet = randomize(TorchUNet(**SDXL_TINY), 0)
    folder = str(tmp_path_factory.mktemp("sdxl"))
    torch_unet.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([3, 761])
    context = rng.standard_normal((2, 7, SDXL_TINY["cross_attention_dim"])).astype(np.float32)
    base_text, base_ids = sdxl_conditioning(0)
    other_text, other_ids = sdxl_conditioning(1)
    conditionings = {"base": (base_text, base_ids), "text_embeds": (other_text, base_ids),
                     "time_ids": (base_text, other_ids)}
    model, params = load_unet(folder)
    forward = jax.jit(lambda p, x, t, c, te, ti: model.apply({"params": p}, x, t, c, text_embeds=te, time_ids=ti))
    expected, ours = {}, {}
    for name, (text_embeds, time_ids) in conditionings.items():
        with torch.no_grad():
            ref = torch_unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(context),
                             added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds),
                                                "time_ids": torch.from_numpy(time_ids)})
        expected[name] = ref.sample.numpy().transpose(0, 2, 3, 1)
        ours[name] = np.asarray(forward(params, x, t, context, text_embeds, time_ids))
    return SimpleNamespace(folder=folder, torch_unet=torch_unet, model=model, params=params,
                           inputs=(jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)),
                           conditionings=conditionings, expected=expected, ours=ours)


@pytest.fixture(scope="module")
def sd21(tmp_path_factory):
    return build_case("sd21", tmp_path_factory)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return build_case("sd15", tmp_path_factory)


def relative_error(ours, expected):
    return np.abs(ours - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("kind", ["sd21", "sd15"])
def test_unet_parity_float32(kind, request):
    case = request.getfixturevalue(kind)
    assert case.ours.shape == case.expected.shape == (2, 16, 16, 4)
    assert relative_error(case.ours, case.expected) <= 1e-4


def test_sdxl_unet_parity_float32(sdxl):
    """Equal to diffusers for each conditioning, and each of text_embeds and time_ids moves the output (a port
    that dropped either, or the whole add_embedding, would match at most one of them)."""
    for name in sdxl.conditionings:
        assert sdxl.ours[name].shape == (2, 16, 16, 4)
        assert relative_error(sdxl.ours[name], sdxl.expected[name]) <= 1e-4, name
    for name in ("text_embeds", "time_ids"):
        assert relative_error(sdxl.expected[name], sdxl.expected["base"]) > 1e-2, name


def test_sdxl_unet_config_reads_sdxl_fields(sdxl):
    config = sdxl.model.config
    assert config.addition_embed_type == "text_time" and config.addition_time_embed_dim == 8
    assert config.projection_class_embeddings_input_dim == 64 and config.transformer_layers_per_block == (1, 1, 2)
    assert config.down_block_types[0] == "DownBlock2D" and not config.upcast_attention
    assert "add_embedding.linear_1" in sdxl.params and "add_time_proj" not in sdxl.params  # the sinusoid has none
    # the mid block's transformer takes the last block's depth, the up blocks the reverse order
    mid = sdxl.params["mid_block"]["attentions.0"]
    assert sorted(k for k in mid if k.startswith("transformer_blocks")) == ["transformer_blocks.0", "transformer_blocks.1"]
    assert "transformer_blocks.1" in sdxl.params["up_blocks.0"]["attentions.0"]
    assert "transformer_blocks.1" not in sdxl.params["up_blocks.1"]["attentions.0"]


def test_sdxl_unet_needs_its_added_conditioning(sdxl, sd15):
    x, t, context = sdxl.inputs
    text_embeds, time_ids = sdxl.conditionings["base"]
    with pytest.raises(ValueError, match="pass text_embeds and time_ids"):
        sdxl.model.apply({"params": sdxl.params}, x, t, context)
    with pytest.raises(ValueError, match="pass time_ids"):
        sdxl.model.apply({"params": sdxl.params}, x, t, context, text_embeds=text_embeds)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim is 64"):
        sdxl.model.apply({"params": sdxl.params}, x, t, context, text_embeds=text_embeds, time_ids=time_ids[:, :5])
    with pytest.raises(ValueError, match="without addition_embed_type='text_time'"):
        sd15.model.apply({"params": sd15.params}, *sd15.inputs, text_embeds=text_embeds, time_ids=time_ids)


def test_sdxl_base_config_builds_diffusers_tensors():
    """The full-size SDXL UNet's parameter tree (abstract here, on torch's meta device there: nothing allocated)
    has exactly diffusers' tensors: (1, 2, 10) transformer layers, 10 in the mid block, (10, 2, 1) up, width 2048."""
    from diffusers import UNet2DConditionModel as TorchUNet

    config = UNetConfig.from_diffusers(SDXL_BASE_CONFIG)
    assert config.transformer_layers_per_block == (1, 2, 10) and config.num_attention_heads == (5, 10, 20)
    assert config.cross_attention_dim == 2048 and config.projection_class_embeddings_input_dim == 2816
    with torch.device("meta"):
        torch_unet = TorchUNet.from_config(SDXL_BASE_CONFIG)
    expected = {k: tuple(v.shape) for k, v in torch_unet.state_dict().items()}
    # broadcast views and their transposes: shapes in torch's layout, no memory
    ours = {weights.torch_name(path): weights.to_torch_layout(path[-1], np.broadcast_to(np.int8(0), v.shape)).shape
            for path, v in traverse_util.flatten_dict(unet_param_shapes(config)).items()}
    assert ours == expected
    assert sum(np.prod(s) for s in expected.values()) > 2.5e9


def test_unet_remat_full_parity(sd15):
    out = run(sd15.model.clone(remat="full"), {"params": sd15.params}, sd15.inputs)
    np.testing.assert_allclose(out, sd15.ours, rtol=0, atol=1e-6)


def test_unet_attention_in_query_blocks_parity(sd21):
    """256 tokens in blocks of 100 (the last one padded) give diffusers' output too."""
    out = run(sd21.model.clone(attention_query_block=100), {"params": sd21.params}, sd21.inputs)
    assert relative_error(out, sd21.expected) <= 1e-4
    np.testing.assert_allclose(out, sd21.ours, rtol=0, atol=1e-5)


def test_attention_in_query_blocks_has_the_same_gradients():
    q, k, v = (jax.random.normal(key, (2, 70, 3, 8)) for key in jax.random.split(jax.random.PRNGKey(0), 3))
    loss = lambda block: lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, AttentionOptions(block))))
    whole = jax.grad(loss(0), argnums=(0, 1, 2))(q, k, v)
    blocked = jax.grad(loss(32), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(whole, blocked):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_unet_bfloat16_compute_parity(sd15):
    model, params = load_unet(sd15.folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(params))
    out = run(model, {"params": params}, sd15.inputs)
    assert out.dtype == np.float32
    assert relative_error(out, sd15.expected) <= 5e-2


def test_unet_lora_adapters_on_q_and_v(sd15):
    kernels = {p[:-1]: v.shape for p, v in traverse_util.flatten_dict(sd15.params).items()
               if p[-2] in ("to_q", "to_v") and p[-1] == "kernel"}
    assert len(kernels) == 16  # 4 transformer blocks (down, mid, 2 up) x (attn1, attn2) x (to_q, to_v)

    def lora(up_std, rank=4):
        keys = iter(jax.random.split(jax.random.PRNGKey(0), 2 * len(kernels)))
        flat = {}
        for path, (fan_in, fan_out) in kernels.items():
            flat[path + ("down",)] = 0.1 * jax.random.normal(next(keys), (fan_in, rank))
            flat[path + ("up",)] = up_std * jax.random.normal(next(keys), (rank, fan_out))
        return traverse_util.unflatten_dict(flat)

    forward = compile_forward(sd15.model, {"params": sd15.params, "lora": lora(0.0)}, sd15.inputs)
    zero_up = forward({"params": sd15.params, "lora": lora(0.0)}, *sd15.inputs)
    np.testing.assert_array_equal(np.asarray(zero_up), sd15.ours)
    nonzero_up = forward({"params": sd15.params, "lora": lora(0.05)}, *sd15.inputs)
    assert np.abs(np.asarray(nonzero_up) - sd15.ours).max() > 1e-3


def test_config_round_trip_and_diffusers_builds_the_same_tensors(sd21, sd15, sdxl):
    for case in (sd21, sd15, sdxl):
        config = UNetConfig.from_diffusers(dict(case.torch_unet.config))
        exported = unet_config_to_diffusers(config)
        assert UNetConfig.from_diffusers(json.loads(json.dumps(exported))) == config
        rebuilt = type(case.torch_unet).from_config(exported)
        shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
        assert shapes(rebuilt) == shapes(case.torch_unet)


def test_sd21_base_config_reads_head_counts():
    config = UNetConfig.from_diffusers(SD21_BASE_CONFIG)
    assert config.num_attention_heads == (5, 10, 20, 20)  # legacy key: heads, so head size 64
    assert config.layers_per_block == (2, 2, 2, 2) and config.cross_attention_dim == 1024
    assert config.use_linear_projection and not config.upcast_attention
    explicit = dict(SD21_BASE_CONFIG, attention_head_dim=64, num_attention_heads=[5, 10, 20, 20])
    assert UNetConfig.from_diffusers(explicit) == config


@pytest.mark.parametrize("key, value, named", [
    ("addition_embed_type", "text_image", "addition_embed_type='text_image'"),
    ("addition_embed_type", "text_time", "addition_time_embed_dim=None"),  # SDXL's without its dims
    ("addition_time_embed_dim", 256, "addition_time_embed_dim=256"),  # without addition_embed_type
    ("reverse_transformer_layers_per_block", [[1, 1, 1]] * 4, "reverse_transformer_layers_per_block"),
    ("time_cond_proj_dim", 256, "time_cond_proj_dim=256"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift='scale_shift'"),
    ("conv_in_kernel", 1, "conv_in_kernel=1"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D"] + SD21_BASE_CONFIG["down_block_types"][1:],
     "down_block_types='SimpleCrossAttnDownBlock2D'"),
])
def test_unsupported_config_option_is_named(key, value, named):
    with pytest.raises(UnsupportedConfigError, match="unet/config.json") as err:
        UNetConfig.from_diffusers(dict(SD21_BASE_CONFIG, **{key: value}))
    assert named in str(err.value) and isinstance(err.value, ValueError)


def test_mismatched_weights_name_every_bad_tensor(sd15, tmp_path):
    state = weights.read_state_dict(sd15.folder)
    del state["conv_in.bias"]
    state["mid_block.attentions.0.proj_in.weightt"] = state.pop("mid_block.attentions.0.proj_in.weight")
    state["time_embedding.linear_1.weight"] = state["time_embedding.linear_1.weight"].reshape(1, -1)
    shutil.copy(os.path.join(sd15.folder, "config.json"), tmp_path)
    weights.save_state_dict(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(weights.WeightsError) as err:
        load_unet(str(tmp_path))
    for name in ("conv_in.bias", "mid_block.attentions.0.proj_in.weight", "mid_block.attentions.0.proj_in.weightt",
                 "time_embedding.linear_1.weight"):
        assert name in str(err.value)


def test_pickle_only_folder_is_refused(sd15, tmp_path):
    shutil.copy(os.path.join(sd15.folder, "config.json"), tmp_path)
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(weights.WeightsError, match="pickle") as err:
        load_unet(str(tmp_path))
    assert "safe_serialization=True" in str(err.value)


def test_attention_implementation_option(sd21):
    """``attention_implementation`` reaches every attention: XLA's own kernel gives the default's output, and an
    unknown kernel name is refused at the first attention."""
    out = run(sd21.model.clone(attention_implementation="xla"), {"params": sd21.params}, sd21.inputs)
    np.testing.assert_allclose(out, sd21.ours, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no_such_kernel"):
        run(sd21.model.clone(attention_implementation="no_such_kernel"), {"params": sd21.params}, sd21.inputs)
