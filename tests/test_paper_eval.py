"""The papers' evaluation (python -m swiftbrush_jax.evaluate --suite coco2014|hps) end to end on the shapes teacher, offline, random weights.

Each metric runs through the command line's own code path with randomly
initialised stand-ins: a small TorchScript network with the interface of
clean-fid's Inception, and a small OpenCLIP-layout ViT checkpoint (the real
ViT-g-14 / ViT-H-14 are too large for CI). References: the closed-form
Frechet distance, clean-fid's and OpenCLIP's own code (tests/field_tools.py),
and transformers' CLIPModel and CLIP image processor run directly on the same model.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import field_tools
from swiftbrush_jax import toy
from swiftbrush_jax.errors import UsageError
from swiftbrush_jax.evaluators import clip_scorers, fid, generation, prompt_sets
from swiftbrush_jax.evaluate import main

NUM_IMAGES = 6
SMALL_VIT = {"projection_dim": 16,
             "vision": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 64, "patch_size": 14, "image_size": 224},
             "text": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "intermediate_size": 64, "max_position_embeddings": 77}}


def write_captions(path, entries):
    with open(path, "w") as f:
        json.dump(entries, f)
    return str(path)


def coco_like(num_ids=8):
    """A captions_val2014.json-shaped file: two captions per image id."""
    vocab = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    annotations = [{"image_id": 100 + i, "id": 2 * i + k, "caption": vocab[(i + k) % len(vocab)]}
                   for i in range(num_ids) for k in range(2)]
    return {"images": [{"id": 100 + i} for i in range(num_ids)], "annotations": annotations}


SMALL_FEATURES = 64  # the real Inception's 2048 make each covariance square root take a minute on two cores


class FakeInception(torch.nn.Module):
    """clean-fid's Inception interface (a ``layers`` module: (n, 3, 299, 299) in [-1, 1] -> (n, C, 1, 1))."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, SMALL_FEATURES, 8, stride=8), torch.nn.Tanh(),
                                          torch.nn.AdaptiveAvgPool2d(1))

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def to_openclip_layout(model):
    """A transformers CLIPModel's tensors under OpenCLIP's names: the inverse of the converter, written apart."""
    state, out = model.state_dict(), {}
    for tower_src, tower_dst, layers in (("text_model.", "", model.config.text_config.num_hidden_layers),
                                         ("vision_model.", "visual.", model.config.vision_config.num_hidden_layers)):
        for i in range(layers):
            src, dst = f"{tower_src}encoder.layers.{i}.", f"{tower_dst}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}.{kind}"]
                                                               for p in ("q_proj", "k_proj", "v_proj")])
                for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[f"{dst}{a}.{kind}"] = state[f"{src}{b}.{kind}"]
    out.update({
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T, "logit_scale": state["logit_scale"],
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
        "visual.proj": state["visual_projection.weight"].T,
    })
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random clean-fid-style Inception (TorchScript) and a small random OpenCLIP ViT (safetensors)."""
    from safetensors.torch import save_file
    from transformers import CLIPModel

    from swiftbrush_jax.files.pipeline import load_tokenizer

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    inception = str(folder / fid.INCEPTION_FILE)
    torch.jit.save(torch.jit.script(FakeInception().eval()), inception)
    tokenizer_dir = os.path.join(toy.teacher_path(), "tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    arch = dict(SMALL_VIT, text=dict(SMALL_VIT["text"], vocab_size=len(tokenizer)))
    clip = CLIPModel(clip_scorers.clip_config(arch, tokenizer)).eval()
    clip_file = str(folder / "small_vit.safetensors")
    save_file(to_openclip_layout(clip), clip_file)
    return {"inception": inception, "clip_file": clip_file, "clip": clip, "arch": arch, "tokenizer": tokenizer,
            "tokenizer_dir": tokenizer_dir}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Six COCO-suite images of the shapes teacher (one step), generated twice: the second run must skip all."""
    root = tmp_path_factory.mktemp("coco")
    captions = write_captions(root / "captions.json", coco_like())
    out = str(root / "eval" / "teacher")
    argv = ["--suite", "coco2014", "--model", toy.teacher_path(), "--out", out, "--captions", captions,
            "--num-images", str(NUM_IMAGES), "--batch-size", "4", "--steps", "1", "--generate-only"]
    main(argv)
    first = {f: os.path.getmtime(os.path.join(out, "images", f)) for f in os.listdir(os.path.join(out, "images"))}
    main(argv)
    second = {f: os.path.getmtime(os.path.join(out, "images", f)) for f in os.listdir(os.path.join(out, "images"))}
    return {"root": root, "out": out, "captions": captions, "argv": argv, "first": first, "second": second}


def test_generation_is_complete_and_resumable(generated):
    out = generated["out"]
    assert generated["first"] == generated["second"]  # the rerun wrote nothing
    assert sorted(generated["first"]) == [f"{i:05d}.png" for i in range(NUM_IMAGES)]
    with open(os.path.join(out, "manifest.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(out, "prompts.jsonl")) as f:
        sampled = [json.loads(line) for line in f]
    assert [r["index"] for r in rows] == list(range(NUM_IMAGES))  # each image once, none twice
    assert [r["prompt"] for r in rows] == [s["prompt"] for s in sampled]
    assert [r["seed"] for r in rows] == list(range(NUM_IMAGES))
    assert len({s["image_id"] for s in sampled}) == NUM_IMAGES  # one caption per image, without replacement
    image = generation.read_image(out, rows[0])
    assert image.dtype == np.uint8 and image.shape[2] == 3 and image.std() > 0


def test_a_lost_image_is_regenerated_alone(generated, tmp_path):
    out = generated["out"]
    victim = os.path.join(out, "images", "00003.png")
    kept = os.path.getmtime(os.path.join(out, "images", "00002.png"))
    before = np.asarray(generation.read_image(out, {"file": "images/00003.png"}))
    os.remove(victim)
    main(generated["argv"])
    assert os.path.getmtime(os.path.join(out, "images", "00002.png")) == kept
    np.testing.assert_array_equal(generation.read_image(out, {"file": "images/00003.png"}), before)  # same seed
    assert len(generation.complete_set(out, [r["prompt"] for r in
                                             map(json.loads, open(os.path.join(out, "prompts.jsonl")))])) == NUM_IMAGES


def test_caption_sample_is_fixed_by_seed_and_one_per_image():
    captions = {i: [f"caption {i} a", f"caption {i} b"] for i in range(50)}
    first, again = prompt_sets.sample_coco(captions, 20, seed=1), prompt_sets.sample_coco(captions, 20, seed=1)
    assert first == again and first != prompt_sets.sample_coco(captions, 20, seed=2)
    assert len({r["image_id"] for r in first}) == 20
    assert all(r["prompt"] in captions[r["image_id"]] for r in first)


def test_frechet_distance_matches_the_closed_form():
    """Against tr-form FID computed by symmetric eigendecompositions, a different algorithm from sqrtm of S1 S2."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.5
    (mu1, s1), (mu2, s2) = fid.statistics(a), fid.statistics(b)

    def sym_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root = sym_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sym_sqrt(root @ s2 @ root))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6
    np.testing.assert_allclose(s1, np.cov(a.T), rtol=1e-12)


def test_frechet_distance_and_clean_resize_match_clean_fid():
    """clean-fid's own frechet_distance and "clean" resizer (clean-fid 0.1.35's code, tests/field_tools.py)."""
    clean_fid, clean_resize = field_tools.clean_fid()
    build_resizer = clean_resize.build_resizer

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 5)), rng.normal(size=(300, 5)) * 1.3 + 0.2
    (mu1, s1), (mu2, s2) = fid.statistics(a), fid.statistics(b)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(clean_fid.frechet_distance(mu1, s1, mu2, s2),
                                                                   rel=1e-9)
    image = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fid.clean_resize(image), build_resizer("clean")(image))


def test_fid_of_generated_images(generated, weights):
    """Our FID path on the teacher's images: features equal the Inception applied by hand; a set against itself ~0."""
    from PIL import Image

    out = generated["out"]
    paths = fid.image_files(os.path.join(out, "images"), "test")
    extractor = fid.InceptionFeatures(weights["inception"])
    features = fid.file_features(paths, extractor, batch_size=4, workers=0, desc="test")
    assert features.shape == (NUM_IMAGES, SMALL_FEATURES)

    module = torch.jit.load(weights["inception"])
    by_hand = []
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"))  # small images: Lanczos to 256, then clean 299
        big = np.asarray(Image.fromarray(pixels).resize((256, 256), Image.LANCZOS))
        chans = [np.asarray(Image.fromarray(big[..., c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
                 for c in range(3)]
        x = torch.from_numpy(np.stack(chans).clip(0, 255)[None])
        by_hand.append(module.layers((x - 128) / 128).reshape(-1).detach().numpy())
    np.testing.assert_allclose(features, np.stack(by_hand), rtol=1e-5, atol=1e-6)

    mu, sigma = fid.statistics(features)
    # 6 images in 64 dimensions: a rank-5 covariance, whose square root is exact only to ~1e-6 of its trace.
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-5 * np.trace(sigma)
    other = fid.statistics(features[::-1][:NUM_IMAGES - 1])
    assert fid.frechet_distance(mu, sigma, *other) > 0


def test_openclip_attention_layout(weights):
    """The fused in_proj split matches torch.nn.MultiheadAttention, which is what OpenCLIP's blocks run."""
    from safetensors.torch import load_file
    from transformers import CLIPModel

    state = load_file(weights["clip_file"])
    model = CLIPModel(clip_scorers.clip_config(weights["arch"], weights["tokenizer"])).eval()
    model.load_state_dict(clip_scorers.openclip_to_transformers(state, 2, 2), strict=False)
    width = weights["arch"]["vision"]["hidden_size"]
    mha = torch.nn.MultiheadAttention(width, weights["arch"]["vision"]["num_attention_heads"], batch_first=True)
    prefix = "visual.transformer.resblocks.1.attn."
    names = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    mha.load_state_dict({name: state[prefix + name] for name in names})
    x = torch.randn(2, 5, width)
    with torch.no_grad():
        ours = model.vision_model.encoder.layers[1].self_attn(x)[0]
        openclip = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(ours, openclip, rtol=1e-5, atol=1e-5)


def test_clip_score_equals_direct_cosine(generated, weights):
    """Our CLIP score (checkpoint converted, our preprocessing, the prefix) against transformers run by hand."""
    from transformers import CLIPImageProcessor

    out = generated["out"]
    rows = generation.complete_set(out, [json.loads(l)["prompt"] for l in open(os.path.join(out, "prompts.jsonl"))])
    scorer = clip_scorers.load_clip(weights["arch"], weights["clip_file"], weights["tokenizer_dir"], "test")
    ours = clip_scorers.clip_score(scorer, ((generation.read_image(out, r), r["prompt"]) for r in rows), batch_size=4)

    images = [generation.read_image(out, r) for r in rows]
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   image_mean=clip_scorers.CLIP_MEAN.tolist(), image_std=clip_scorers.CLIP_STD.tolist())
    pixels = processor(images=images, return_tensors="pt").pixel_values
    ids = weights["tokenizer"](["A photo depicts " + r["prompt"] for r in rows], padding="max_length", max_length=77,
                               truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        img = clip_scorers._features(weights["clip"].get_image_features(pixel_values=pixels))
        txt = clip_scorers._features(weights["clip"].get_text_features(input_ids=ids))
    direct = torch.nn.functional.cosine_similarity(img, txt).mean().item()
    assert ours == pytest.approx(direct, abs=1e-5)
    assert -1 <= ours <= 1


def test_coco_suite_record_and_table(generated, weights, capsys):
    """The whole --suite coco2014 scoring run writes a record that --table prints beside the paper's rows."""
    from PIL import Image

    reference = generated["root"] / "val2014"
    reference.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(reference / f"COCO_val2014_{i:012d}.jpg")
    argv = [a for a in generated["argv"] if a != "--generate-only"] + [
        "--score-only", "--coco-images", str(reference), "--inception", weights["inception"],
        "--clip-weights", weights["clip_file"], "--tokenizer", weights["tokenizer_dir"], "--workers", "0"]
    # The real ViT-g-14 is too large for CI: the same code path with the small architecture.
    vit_g = clip_scorers.VIT_G_14
    clip_scorers.VIT_G_14 = weights["arch"]
    try:
        main(argv)
    finally:
        clip_scorers.VIT_G_14 = vit_g
    record = json.load(open(os.path.join(generated["out"], "record.json")))
    assert record["suite"] == "coco2014" and record["num_images"] == NUM_IMAGES
    assert record["fid"] > 0 and -1 <= record["clip_score"] <= 1 and record["fid_reference_images"] == 4
    assert os.path.isfile(os.path.join(generated["root"], "eval", "coco2014_val_fid_stats.npz"))  # cached
    capsys.readouterr()
    main(["--table", os.path.join(generated["out"], "record.json")])
    table_text = capsys.readouterr().out
    assert f"| {record['fid']:.2f} |" in table_text and "| SwiftBrush [paper] | 1 | 16.67 | 0.29 |" in table_text


def run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "swiftbrush_jax.evaluate", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_one_error_line(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_weights_is_one_error_line(tmp_path):
    captions = write_captions(tmp_path / "c.json", coco_like())
    proc = run_cli("--suite", "coco2014", "--model", toy.teacher_path(), "--out", str(tmp_path / "o"),
                   "--captions", captions)
    assert_one_error_line(proc, "--inception")
    hps = ["--suite", "hps", "--model", toy.teacher_path(), "--out", str(tmp_path / "o"),
           "--hps-weights", str(tmp_path / "HPS_v2_compressed.safetensors"), "--tokenizer", str(tmp_path)]
    with pytest.raises(UsageError, match="HPS_v2_compressed.safetensors: no such file"):
        main(hps)


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "HPS_v2_compressed.pt"
    path.write_bytes(b"not read")
    with pytest.raises(UsageError, match="never read here: pass the weights as safetensors"):
        clip_scorers.read_safetensors(str(path), "HPSv2")


def test_empty_image_folder_is_one_error_line(tmp_path, weights):
    captions = write_captions(tmp_path / "c.json", coco_like())
    (tmp_path / "val2014").mkdir()
    proc = run_cli("--suite", "coco2014", "--model", toy.teacher_path(), "--out", str(tmp_path / "o"),
                   "--captions", captions, "--coco-images", str(tmp_path / "val2014"),
                   "--inception", weights["inception"], "--clip-weights", weights["clip_file"],
                   "--tokenizer", weights["tokenizer_dir"])
    assert_one_error_line(proc, "holds no")


def test_wrong_shape_captions_is_one_error_line(tmp_path):
    captions = write_captions(tmp_path / "c.json", [{"image_id": 1, "caption": "a"}])
    proc = run_cli("--suite", "coco2014", "--model", toy.teacher_path(), "--out", str(tmp_path / "o"),
                   "--captions", captions, "--generate-only")
    assert_one_error_line(proc, "captions_val2014.json")


@pytest.mark.parametrize("content", [{"annotations": [{"image_id": "1", "caption": "a"}]}, {"images": []},
                                     {"annotations": [{"image_id": 1}]}])
def test_other_wrong_captions_shapes_are_refused(tmp_path, content):
    with pytest.raises(UsageError, match="captions_val2014.json"):
        prompt_sets.coco_captions(write_captions(tmp_path / "c.json", content))


def test_hps_suite_scores_each_style(tmp_path, weights):
    """--suite hps end to end: one image per prompt, HPSv2 = 100 x cosine, averaged per style."""
    folder = tmp_path / "benchmark"
    folder.mkdir()
    for k, style in enumerate(prompt_sets.HPS_STYLES):
        shapes = [f"a red {s}" for s in ("circle", "square", "triangle")][k % 3:]
        (folder / f"{style}.json").write_text(json.dumps(shapes))
    out = str(tmp_path / "hps")
    argv = ["--suite", "hps", "--model", toy.teacher_path(), "--out", out, "--hps-prompts", str(folder),
            "--num-images", "1", "--steps", "1", "--batch-size", "4", "--hps-weights", weights["clip_file"],
            "--tokenizer", weights["tokenizer_dir"]]
    vit_h = clip_scorers.VIT_H_14
    clip_scorers.VIT_H_14 = weights["arch"]  # the real ViT-H-14 is too large for CI
    try:
        main(argv)
    finally:
        clip_scorers.VIT_H_14 = vit_h
    record = json.load(open(os.path.join(out, "record.json")))
    rows = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    assert [r["prompt"] for r in rows] == ["a red circle", "a red square", "a red triangle", "a red circle"]
    scorer = clip_scorers.load_clip(weights["arch"], weights["clip_file"], weights["tokenizer_dir"], "test")
    direct = 100 * scorer.cosine([generation.read_image(out, r) for r in rows], [r["prompt"] for r in rows])
    assert [record["hpsv2"][s] for s in prompt_sets.HPS_STYLES] == pytest.approx(direct.tolist(), abs=1e-4)
    assert record["hpsv2_mean"] == pytest.approx(direct.mean(), abs=1e-4)


def test_conversion_matches_openclip(tmp_path):
    """OpenCLIP's own CLIP model (open-clip-torch 3.3.0, tests/field_tools.py) with random weights, every tensor
    perturbed, and ours after renaming give the same cosines through the same preprocessing."""
    open_clip_model = field_tools.open_clip_model()
    CLIP, CLIPTextCfg, CLIPVisionCfg = open_clip_model.CLIP, open_clip_model.CLIPTextCfg, open_clip_model.CLIPVisionCfg
    from safetensors.torch import save_file

    from swiftbrush_jax.files.diffusers_writer import write_clip_tokenizer
    from swiftbrush_jax.files.pipeline import load_tokenizer

    texts = ["a red circle", "a blue square on a table", "a green triangle"]
    # Specials last: end-of-text is the largest id, as in OpenCLIP's vocabulary, whose text pooling is an argmax.
    vocab = write_clip_tokenizer(str(tmp_path / "tokenizer"), texts)
    torch.manual_seed(0)
    vision, text = SMALL_VIT["vision"], SMALL_VIT["text"]
    openclip = CLIP(embed_dim=SMALL_VIT["projection_dim"],
                    vision_cfg=CLIPVisionCfg(layers=vision["num_hidden_layers"], width=vision["hidden_size"],
                                             head_width=vision["hidden_size"] // vision["num_attention_heads"],
                                             patch_size=vision["patch_size"], image_size=vision["image_size"],
                                             mlp_ratio=vision["intermediate_size"] / vision["hidden_size"]),
                    text_cfg=CLIPTextCfg(context_length=77, vocab_size=vocab, width=text["hidden_size"],
                                         heads=text["num_attention_heads"], layers=text["num_hidden_layers"],
                                         mlp_ratio=text["intermediate_size"] / text["hidden_size"])).eval()
    with torch.no_grad():  # LayerNorms of ones and biases of zeros would hide a mix-up
        for p in openclip.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in openclip.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    arch = dict(SMALL_VIT, text=dict(text, vocab_size=vocab))
    scorer = clip_scorers.load_clip(arch, str(tmp_path / "vit.safetensors"), str(tmp_path / "tokenizer"), "test")

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (300, 260, 3), dtype=np.uint8) for _ in texts]
    ids = load_tokenizer(str(tmp_path / "tokenizer"))(texts, padding="max_length", max_length=77, truncation=True,
                                                      return_tensors="pt").input_ids
    with torch.no_grad():
        image_emb = openclip.encode_image(torch.from_numpy(clip_scorers.preprocess(images, 224)), normalize=True)
        text_emb = openclip.encode_text(ids, normalize=True)
    np.testing.assert_allclose(scorer.cosine(images, texts), (image_emb * text_emb).sum(-1).numpy(), atol=1e-6)


def test_a_folder_of_another_prompt_set_is_refused(tmp_path):
    path = str(tmp_path / "prompts.jsonl")
    prompt_sets.write_prompt_list(path, [{"prompt": "a red circle"}])
    prompt_sets.write_prompt_list(path, [{"prompt": "a red circle"}])  # the same set: accepted
    with pytest.raises(UsageError, match="another prompt set"):
        prompt_sets.write_prompt_list(path, [{"prompt": "a blue square"}])
