"""An independent PyTorch reference of one SwiftBrush VSD training step (docs/method.md §3).

The JAX train step is tested against this module, so it follows the spec
literally, one line of math per line of code, with diffusers'
``UNet2DConditionModel`` as the network. Torch is a test-only dependency.

Tensors here are NCHW, like diffusers. LoRA weights are exchanged with the JAX
side as a flat dict in the JAX layout (see ``get_lora_weights``).
"""

import copy

import numpy as np
import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` or 1x1 ``nn.Conv2d`` plus a trainable low-rank update: base(x) + scale * up(down(x)),
    ``down`` and ``up`` applied to each pixel's channels when the base is a convolution."""

    def __init__(self, base, rank: int, scale: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.conv = isinstance(base, nn.Conv2d)
        fan_in, fan_out = (base.in_channels, base.out_channels) if self.conv else (base.in_features, base.out_features)
        self.down = nn.Linear(fan_in, rank, bias=False)
        self.up = nn.Linear(rank, fan_out, bias=False)
        self.scale = scale

    def forward(self, x):
        if self.conv:
            update = self.up(self.down(x.movedim(1, -1))).movedim(-1, 1)
        else:
            update = self.up(self.down(x))
        return self.base(x) + self.scale * update


def add_lora(unet, rank, alpha, targets=("to_q", "to_v"), seed=0):
    """Return a frozen deep copy of ``unet`` whose ``targets`` (linear layers, 1x1 convolutions) carry LoRA adapters.

    down ~ N(0, (1/rank)^2) and up = 0, so the copy starts equal to ``unet``.
    Also returns ``{module_path: LoRALinear}`` with diffusers module paths, e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``.
    """
    lora_unet = copy.deepcopy(unet).requires_grad_(False)
    paths = sorted(
        name for name, module in lora_unet.named_modules()
        if any(("." + name).endswith("." + target) for target in targets)
        and (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)))
    )
    generator = torch.Generator().manual_seed(seed)
    loras = {}
    for path in paths:
        parent_path, child_name = path.rsplit(".", 1)
        parent = lora_unet.get_submodule(parent_path)
        lora = LoRALinear(getattr(parent, child_name), rank, alpha / rank)
        with torch.no_grad():
            lora.down.weight.copy_(torch.randn(lora.down.weight.shape, generator=generator) / rank)
            lora.up.weight.zero_()
        setattr(parent, child_name, lora)
        loras[path] = lora
    return lora_unet, loras


def get_lora_weights(loras):
    """LoRA weights as ``{f"{path}.down": [in, r], f"{path}.up": [r, out]}`` numpy arrays.

    This is the JAX layout (y = x @ down @ up), i.e. the transpose of torch's
    ``nn.Linear.weight``.
    """
    flat = {}
    for path, lora in loras.items():
        flat[f"{path}.down"] = lora.down.weight.detach().T.numpy().copy()
        flat[f"{path}.up"] = lora.up.weight.detach().T.numpy().copy()
    return flat


def set_lora_weights(loras, flat):
    """Load weights given in the JAX layout of ``get_lora_weights`` (transposed into torch's)."""
    with torch.no_grad():
        for path, lora in loras.items():
            lora.down.weight.copy_(torch.as_tensor(np.asarray(flat[f"{path}.down"])).T)
            lora.up.weight.copy_(torch.as_tensor(np.asarray(flat[f"{path}.up"])).T)


def _lora_params(loras):
    """The trainable LoRA tensors with their flat names, JAX-side keys."""
    params = {}
    for path, lora in loras.items():
        params[f"{path}.down"] = lora.down.weight
        params[f"{path}.up"] = lora.up.weight
    return params


def _per_sample(values, t):
    """values[t] shaped (B, 1, 1, 1) so it broadcasts over NCHW latents."""
    return values[t].reshape(-1, 1, 1, 1)


def _cfg(net, x, t, cond, uncond, guidance):
    """Classifier-free guidance: net(x, t, uncond) + g * (net(x, t, cond) - net(x, t, uncond))."""
    out_uncond = net(x, t, encoder_hidden_states=uncond).sample
    out_cond = net(x, t, encoder_hidden_states=cond).sample
    return out_uncond + guidance * (out_cond - out_uncond)


def vsd_step_reference(student, teacher, lora_teacher, cond, uncond, z, t_vsd, eps_vsd, t_lora, eps_lora,
                       drop_mask, alphas_cumprod, *, guidance=4.5, lora_guidance=None, student_t=999,
                       prediction_type="epsilon", sds=False, x0_parameterization=True, student_loras=None,
                       clip=None):
    """Losses and gradients of one SwiftBrush step, exactly as docs/method.md §3 writes them.

    ``lora_guidance`` is the LoRA teacher's CFG scale (default: ``guidance``); the paper's ablations:
    ``sds`` replaces the LoRA teacher's score by the injected noise, ``x0_parameterization=False`` takes
    the student's output as its sample. ``student_loras`` (from ``add_lora``): the student is a LoRA over a
    frozen copy of the teacher, and its gradients are those of its adapters, in the JAX layout.
    ``clip`` = (transformers CLIPModel, decode: x0 -> images in [-1, 1], CLIP token ids, w, tau) adds
    SwiftBrush v2's clamped CLIP loss w mean(max(0, tau - cos)) to the student's loss (``loss_clip``).

    Student gradients come from ``loss_student`` only, LoRA gradients from
    ``loss_lora`` only. Returns a dict with ``loss_student``, ``loss_lora``
    (floats), ``x0`` and ``vsd_grad`` (NCHW tensors), ``student_grads``
    (``{diffusers param name: numpy}``, torch layout) and ``lora_grads``
    (``{f"{path}.down"|".up": numpy}``, JAX layout).
    """
    v_pred = prediction_type == "v_prediction"
    if not v_pred and prediction_type != "epsilon":
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    batch = z.shape[0]
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    uncond = uncond.expand(batch, -1, -1)
    loras = {name: m for name, m in lora_teacher.named_modules() if isinstance(m, LoRALinear)}

    # Step 2: the one-step student, x0 parameterisation at t = student_t.
    a_T = abar[student_t].sqrt()
    s_T = (1 - abar[student_t]).sqrt()
    student_out = student(z, torch.full((batch,), student_t, dtype=torch.long), encoder_hidden_states=cond).sample
    if not x0_parameterization:
        x0 = student_out
    elif v_pred:
        x0 = a_T * z - s_T * student_out
    else:
        x0 = (z - s_T * student_out) / a_T

    # Step 3: VSD gradient from the teacher and the LoRA teacher, both with CFG.
    a_t = _per_sample(abar, t_vsd).sqrt()
    s_t = _per_sample(1 - abar, t_vsd).sqrt()
    with torch.no_grad():
        x_t = a_t * x0 + s_t * eps_vsd
        e_teacher = _cfg(teacher, x_t, t_vsd, cond, uncond, guidance)
        e_lora = _cfg(lora_teacher, x_t, t_vsd, cond, uncond, guidance if lora_guidance is None else lora_guidance)
        if v_pred:
            e_teacher = a_t * e_teacher + s_t * x_t
            e_lora = a_t * e_lora + s_t * x_t
        if sds:
            e_lora = eps_vsd
        grad = s_t**2 * (e_teacher - e_lora)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    loss_student = 0.5 * torch.mean((x0 - (x0 - grad).detach()) ** 2)

    # Step 4: denoising loss of the LoRA teacher on the student's (detached) samples.
    x0d = x0.detach()
    a_tl = _per_sample(abar, t_lora).sqrt()
    s_tl = _per_sample(1 - abar, t_lora).sqrt()
    x_tl = a_tl * x0d + s_tl * eps_lora
    prompts = torch.where(drop_mask.reshape(-1, 1, 1), uncond, cond)
    out = lora_teacher(x_tl, t_lora, encoder_hidden_states=prompts).sample
    target = a_tl * eps_lora - s_tl * x0d if v_pred else eps_lora
    loss_lora = torch.mean(_per_sample(abar, t_lora) * (out - target) ** 2)

    loss_clip = None
    if clip is not None:
        clip_model, decode, ids, weight, tau = clip
        images = (decode(x0) + 1) / 2
        size = clip_model.config.vision_config.image_size
        if images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                                     align_corners=False)
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(1, 3, 1, 1)
        image_features = _features(clip_model.get_image_features(pixel_values=(images - mean) / std))
        text_features = _features(clip_model.get_text_features(input_ids=ids)).detach()
        cos = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
        loss_clip = weight * torch.relu(tau - cos).mean()

    # Each loss is differentiated with respect to its own parameter tree only.
    student_params = _lora_params(student_loras) if student_loras else dict(student.named_parameters())
    student_loss = loss_student if loss_clip is None else loss_student + loss_clip
    student_grads = torch.autograd.grad(student_loss, list(student_params.values()), allow_unused=True)
    if student_loras:
        student_grads = [g.T for g in student_grads]
    lora_params = _lora_params(loras)
    lora_grads = torch.autograd.grad(loss_lora, list(lora_params.values()))

    return {
        "loss_student": loss_student.item(),
        "loss_lora": loss_lora.item(),
        "loss_clip": None if loss_clip is None else loss_clip.item(),
        "x0": x0.detach(),
        "vsd_grad": grad,
        "student_grads": {
            name: (torch.zeros_like(p) if g is None else g).numpy().copy()
            for (name, p), g in zip(student_params.items(), student_grads)
        },
        "lora_grads": {name: g.T.numpy().copy() for name, g in zip(lora_params, lora_grads)},
    }


def _features(output):
    """Projected CLIP embeddings, whether transformers returns a tensor or a model output."""
    return output if torch.is_tensor(output) else output.pooler_output


def _clipped_adam_step(params, grads, lr, b1, b2, eps, clip):
    """Global-norm clip then one Adam step from a fresh state (no weight decay)."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, clip)
    torch.optim.Adam(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0).step()
    for p in params:
        p.grad = None


def reference_update(student, loras, result, *, student_lr=1e-6, lora_lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
                     clip=1.0, ema=None, step=0):
    """Apply ``result``'s gradients: one clipped Adam step per tree, then the EMA update.

    ``loras`` is the ``{path: LoRALinear}`` dict of ``add_lora``; ``ema`` a state
    dict copy of the student, updated in place with decay_k = min(0.9999, (1+k)/(10+k)), k = ``step``.
    """
    student_params = dict(student.named_parameters())
    _clipped_adam_step(
        list(student_params.values()),
        [torch.as_tensor(result["student_grads"][name]) for name in student_params],
        student_lr, b1, b2, eps, clip,
    )
    lora_params = _lora_params(loras)
    _clipped_adam_step(
        list(lora_params.values()),
        [torch.as_tensor(result["lora_grads"][name]).T for name in lora_params],
        lora_lr, b1, b2, eps, clip,
    )
    if ema is not None:
        decay = min(0.9999, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, value in student.state_dict().items():
                ema[name].mul_(decay).add_(value, alpha=1 - decay)
