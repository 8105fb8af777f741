"""The Flax CLIP text encoder against transformers' on tiny random SD 2.1- and SD 1.5-shaped models."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from reference import TEXT_CONFIGS, make_text_encoder
from swiftbrush_jax.models import UnsupportedConfigError
from swiftbrush_jax.models.text_encoder import CLIPTextConfig, load_text_encoder
from swiftbrush_jax.files.weights import save_state_dict


@functools.partial(jax.jit, static_argnums=0)
def encode(model, params, ids):
    return model.apply({"params": params}, ids)


def rel_error(ours, theirs) -> tuple:
    """(max abs error, that error relative to max |reference|)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    err = np.abs(ours - theirs).max()
    return err, err / np.abs(theirs).max()


@pytest.fixture(scope="module", params=["sd21", "sd15"])
def saved(request, tmp_path_factory):
    """(kind, torch model, folder written by save_pretrained)."""
    model = make_text_encoder(request.param)
    folder = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(folder, safe_serialization=True)
    return request.param, model, folder


def token_ids(kind: str) -> torch.Tensor:
    vocab = TEXT_CONFIGS[kind]["vocab_size"]
    return torch.randint(0, vocab, (2, 77), generator=torch.Generator().manual_seed(3))


def reference_hidden_state(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.numpy()


def test_text_encoder_parity(saved):
    kind, torch_model, folder = saved
    ids = token_ids(kind)
    model, params = load_text_encoder(folder)
    assert model.config.hidden_act == TEXT_CONFIGS[kind]["hidden_act"]
    ours = encode(model, params, ids.numpy().astype(np.int32))
    assert ours.shape == (2, 77, TEXT_CONFIGS[kind]["hidden_size"]) and ours.dtype == jnp.float32
    err, rel = rel_error(ours, reference_hidden_state(torch_model, ids))
    assert rel <= 1e-4, (kind, err, rel)


def test_hub_layout_with_text_model_prefix_parity(saved, tmp_path):
    """SD checkpoints on the Hub were saved by transformers < 5, whose keys start with ``text_model.``."""
    kind, torch_model, folder = saved
    hub = str(tmp_path / "text_encoder")
    os.makedirs(hub)
    shutil.copy(os.path.join(folder, "config.json"), hub)
    state = load_file(os.path.join(folder, "model.safetensors"))
    assert not any(k.startswith("text_model.") for k in state)
    save_state_dict({f"text_model.{k}": v for k, v in state.items()}, os.path.join(hub, "model.safetensors"))

    ids = token_ids(kind)
    model, params = load_text_encoder(hub)
    err, rel = rel_error(encode(model, params, ids.numpy().astype(np.int32)), reference_hidden_state(torch_model, ids))
    assert rel <= 1e-4, (kind, err, rel)


def test_text_encoder_bf16_compute_stays_close(saved):
    kind, torch_model, folder = saved
    ids = token_ids(kind)
    model, params = load_text_encoder(folder, dtype=jnp.bfloat16)
    ours = encode(model, params, ids.numpy().astype(np.int32))
    assert ours.dtype == jnp.float32
    err, rel = rel_error(ours, reference_hidden_state(torch_model, ids))
    assert rel < 5e-2, (kind, err, rel)


def test_text_config_round_trips_through_transformers(saved):
    from transformers import CLIPTextConfig as TorchCLIPTextConfig

    kind, _, folder = saved
    with open(os.path.join(folder, "config.json")) as f:
        config = CLIPTextConfig.from_transformers(json.load(f))
    assert config.num_hidden_layers == TEXT_CONFIGS[kind]["num_hidden_layers"]
    exported = config.to_transformers()
    assert CLIPTextConfig.from_transformers(exported) == config
    assert CLIPTextConfig.from_transformers(TorchCLIPTextConfig(**exported).to_dict()) == config


def test_unsupported_hidden_act_is_named(saved, tmp_path):
    _, _, folder = saved
    broken = str(tmp_path / "text_encoder")
    shutil.copytree(folder, broken)
    with open(os.path.join(broken, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(broken, "config.json"), "w") as f:
        json.dump(dict(config, hidden_act="gelu_new"), f)
    with pytest.raises(UnsupportedConfigError, match="hidden_act='gelu_new'"):
        load_text_encoder(broken)


@pytest.mark.parametrize("act, eos", [("gelu", 1), ("quick_gelu", 2)])
def test_clip_image_and_text_features_parity(tmp_path, act, eos):
    """Both projected towers of a random transformers CLIPModel (every tensor perturbed), through our loader:
    the image features of NHWC pixels, the text features pooled at end-of-text (the legacy eos id 2 pools at
    the largest id), and their cosine."""
    from transformers import CLIPConfig, CLIPModel

    from reference import randomize
    from swiftbrush_jax.models.clip import cosine, load_clip_model

    text = dict(TEXT_CONFIGS["sd21"], hidden_act=act, eos_token_id=eos)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act=act)
    torch_model = randomize(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)), 1).eval()
    torch_model.save_pretrained(str(tmp_path), safe_serialization=True)
    model, params = load_clip_model(str(tmp_path))

    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(3, 900, (3, 77), generator=g)
    ids[:, 0] = 0
    ids[0, 5:] = eos if eos != 2 else 999  # the legacy pooling takes the largest id
    ids[1, 9] = eos if eos != 2 else 999
    with torch.no_grad():
        features = lambda out: out if torch.is_tensor(out) else out.pooler_output
        image_ref = features(torch_model.get_image_features(pixel_values=pixels)).numpy()
        text_ref = features(torch_model.get_text_features(input_ids=ids)).numpy()
    apply = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    image, text_features = apply(params, pixels.permute(0, 2, 3, 1).numpy(), ids.numpy().astype(np.int32))
    for ours, theirs in ((image, image_ref), (text_features, text_ref)):
        assert ours.shape == theirs.shape
        assert rel_error(ours, theirs)[1] <= 1e-5, rel_error(ours, theirs)
    expected = (image_ref * text_ref).sum(-1) / np.linalg.norm(image_ref, axis=-1) / np.linalg.norm(text_ref, axis=-1)
    np.testing.assert_allclose(np.asarray(cosine(image, text_features)), expected, atol=1e-5)


# SDXL's two text encoders in small: CLIP ViT-L's traits (quick_gelu, a CLIPTextModel) for text_encoder and
# OpenCLIP bigG's (gelu, a CLIPTextModelWithProjection) for text_encoder_2, with SDXL's legacy eos_token_id 2
# (pooled at the largest id) and, for the projection, the current first-eos pooling too.
SDXL_TEXT_CONFIGS = {
    "text_encoder": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=1000, projection_dim=24,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "text_encoder_2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           hidden_act="gelu", max_position_embeddings=77, vocab_size=1000, projection_dim=16,
                           bos_token_id=0, eos_token_id=2, pad_token_id=1),
}


def sdxl_token_ids(eos: int) -> torch.Tensor:
    """Two prompts as a tokenizer pads them: begin, words, end-of-text, then padding; the legacy pooling
    (eos 2) takes the largest id, so end-of-text is the largest id there (999), as 49407 is in CLIP's vocab."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 900, (2, 77), generator=g)
    ids[:, 0] = 0
    end = eos if eos != 2 else 999
    ids[0, 6], ids[0, 7:] = end, 1
    ids[1, 12], ids[1, 13:] = end, end  # padded with end-of-text: the first one is the pooled one
    return ids


def save_sdxl_text_encoder(name: str, tmp_path, **overrides):
    from transformers import CLIPTextConfig as TorchCLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from reference import randomize

    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    torch_model = randomize(cls(TorchCLIPTextConfig(**dict(SDXL_TEXT_CONFIGS[name], **overrides))), 4)
    folder = str(tmp_path / name)
    torch_model.save_pretrained(folder, safe_serialization=True)
    return torch_model, folder


@pytest.mark.parametrize("name, eos", [("text_encoder", 2), ("text_encoder_2", 2), ("text_encoder_2", 1)])
def test_sdxl_text_encoder_penultimate_and_text_embeds_parity(tmp_path, name, eos):
    """SDXL's prompt encoding (diffusers' encode_prompt with clip_skip=None): each encoder's hidden_states[-2]
    (before the final layer norm) and text_encoder_2's projected pooled text_embeds, against transformers'."""
    torch_model, folder = save_sdxl_text_encoder(name, tmp_path, eos_token_id=eos)
    ids = sdxl_token_ids(eos)
    with torch.no_grad():
        out = torch_model(input_ids=ids, output_hidden_states=True)
    model, params = load_text_encoder(folder, penultimate=True)
    ours = encode(model, params, ids.numpy().astype(np.int32))
    hidden = ours[0] if name == "text_encoder_2" else ours
    assert hidden.shape == (2, 77, SDXL_TEXT_CONFIGS[name]["hidden_size"]) and hidden.dtype == jnp.float32
    err, rel = rel_error(hidden, out.hidden_states[-2].numpy())
    assert rel <= 1e-4, (name, "penultimate", err, rel)
    # Not the last hidden state, with or without the final layer norm.
    for other in (out.hidden_states[-1].numpy(), out.last_hidden_state.numpy()):
        assert rel_error(hidden, other)[1] > 1e-2
    if name == "text_encoder_2":
        text_embeds = ours[1]
        assert text_embeds.shape == (2, SDXL_TEXT_CONFIGS[name]["projection_dim"])
        err, rel = rel_error(text_embeds, out.text_embeds.numpy())
        assert rel <= 1e-4, (name, "text_embeds", err, rel)
        # the default (penultimate=False) is last_hidden_state, as for SD 2.x
        last_model, _ = load_text_encoder(folder)
        err, rel = rel_error(encode(last_model, params, ids.numpy().astype(np.int32))[0], out.last_hidden_state.numpy())
        assert rel <= 1e-4, (name, "last", err, rel)


def test_sdxl_architectures_are_read_and_others_refused(tmp_path):
    from swiftbrush_jax.models.text_encoder import CLIPTextModel, CLIPTextModelWithProjection

    _, folder = save_sdxl_text_encoder("text_encoder_2", tmp_path)
    model, params = load_text_encoder(folder)
    assert isinstance(model, CLIPTextModelWithProjection) and "text_projection" in params
    exported = CLIPTextConfig.from_transformers(json.load(open(os.path.join(folder, "config.json"))))
    assert exported.to_transformers("CLIPTextModelWithProjection")["architectures"] == ["CLIPTextModelWithProjection"]
    _, plain = save_sdxl_text_encoder("text_encoder", tmp_path)
    assert isinstance(load_text_encoder(plain)[0], CLIPTextModel)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config, architectures=["T5EncoderModel"]), f)
    with pytest.raises(UnsupportedConfigError, match="architectures=\\['T5EncoderModel'\\]"):
        load_text_encoder(folder)
