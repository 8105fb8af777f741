"""A PyTorch SwiftBrush train step written the way a PyTorch trainer would run it, as the speed baseline.

Same algorithm as ``swiftbrush_jax.vsd`` and ``tests/vsd_reference.py`` (docs/method.md §3):
student forward and backward, teacher and LoRA teacher each with batched CFG,
the LoRA teacher's denoising loss, two clipped Adam optimizers, the EMA.
Unlike the test reference it keeps optimizer state between steps and never
copies gradients to numpy, so it times what training costs.
"""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from vsd_reference import add_lora  # noqa: E402  (the test reference's plain LoRA on to_q / to_v)


def _per_sample(values, t):
    return values[t].reshape(-1, 1, 1, 1)


class TorchVSDStep:
    """Callable on a (B, L) token-id tensor; one full update of student, LoRA and EMA per call."""

    def __init__(self, unet, text_encoder, alphas_cumprod, *, latent_shape, rank, alpha, vsd, student_lr, lora_lr,
                 device, compute_dtype=torch.float32, compile_modules=False):
        self.device, self.compute_dtype = device, compute_dtype
        self.vsd = vsd
        self.latent_shape = tuple(latent_shape)  # (C, H, W)
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.student = copy.deepcopy(unet).to(device).train().requires_grad_(True)
        teacher = copy.deepcopy(unet).to(device, compute_dtype).eval().requires_grad_(False)
        self.lora_teacher, loras = add_lora(teacher, rank, alpha)
        for lora in loras.values():
            lora.down.to(device, torch.float32).requires_grad_(True)
            lora.up.to(device, torch.float32).requires_grad_(True)
        self.teacher = teacher
        self.lora_params = [p for lora in loras.values() for p in (lora.down.weight, lora.up.weight)]
        self.student_params = list(self.student.parameters())
        self.ema = [p.detach().clone() for p in self.student_params]
        adam = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.student_opt = torch.optim.Adam(self.student_params, lr=student_lr, **adam)
        self.lora_opt = torch.optim.Adam(self.lora_params, lr=lora_lr, **adam)
        self.abar = torch.as_tensor(alphas_cumprod, dtype=torch.float32, device=device)
        self.k = 0
        nets = (self.student, self.teacher, self.lora_teacher)
        self.nets = tuple(torch.compile(n) for n in nets) if compile_modules else nets
        self.uncond = None

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32)

    def encode(self, ids):
        with torch.no_grad(), self._autocast():
            return self.text_encoder(ids.to(self.device))[0].float()

    def _cfg(self, net, x, t, cond, uncond, scale):
        b = x.shape[0]
        with self._autocast():
            out = net(torch.cat([x, x]), torch.cat([t, t]),
                      encoder_hidden_states=torch.cat([uncond.expand(b, -1, -1), cond])).sample.float()
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    def __call__(self, ids, uncond_ids):
        c, dev = self.vsd, self.device
        student, teacher, lora_teacher = self.nets
        if self.uncond is None:
            self.uncond = self.encode(uncond_ids)
        cond = self.encode(ids)
        b = ids.shape[0]
        shape = (b,) + self.latent_shape
        z, eps, eps_lora = (torch.randn(shape, device=dev) for _ in range(3))
        t_vsd = torch.randint(c.t_min, c.t_max + 1, (b,), device=dev)
        t_lora = torch.randint(c.lora_t_min, c.lora_t_max + 1, (b,), device=dev)
        drop = torch.rand(b, device=dev) < c.uncond_prob
        student_t = len(self.abar) - 1

        with self._autocast():
            out = student(z, torch.full((b,), student_t, device=dev), encoder_hidden_states=cond).sample.float()
        x0 = (z - (1 - self.abar[student_t]).sqrt() * out) / self.abar[student_t].sqrt()

        with torch.no_grad():
            a_t, s_t = _per_sample(self.abar, t_vsd).sqrt(), _per_sample(1 - self.abar, t_vsd).sqrt()
            x_t = a_t * x0 + s_t * eps
            e_teacher = self._cfg(teacher, x_t, t_vsd, cond, self.uncond, c.guidance_scale)
            e_lora = self._cfg(lora_teacher, x_t, t_vsd, cond, self.uncond, c.lora_guidance_scale)
            grad = torch.nan_to_num(s_t**2 * (e_teacher - e_lora), nan=0.0, posinf=0.0, neginf=0.0)
        loss_student = 0.5 * torch.mean((x0 - (x0 - grad).detach()) ** 2)
        loss_student.backward()

        x0d = x0.detach()
        abar_l = _per_sample(self.abar, t_lora)
        x_tl = abar_l.sqrt() * x0d + (1 - abar_l).sqrt() * eps_lora
        ctx = torch.where(drop.reshape(-1, 1, 1), self.uncond.expand_as(cond), cond)
        with self._autocast():
            out_lora = lora_teacher(x_tl, t_lora, encoder_hidden_states=ctx).sample.float()
        loss_lora = torch.mean(abar_l * (out_lora - eps_lora) ** 2)
        loss_lora.backward()

        torch.nn.utils.clip_grad_norm_(self.student_params, 1.0)
        torch.nn.utils.clip_grad_norm_(self.lora_params, 1.0)
        self.student_opt.step()
        self.lora_opt.step()
        self.student_opt.zero_grad(set_to_none=True)
        self.lora_opt.zero_grad(set_to_none=True)
        decay = min(c.ema_decay, (1 + self.k) / (10 + self.k))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.student_params], 1.0 - decay)
        self.k += 1
        return loss_student.detach(), loss_lora.detach()
