"""The SwiftBrush training program.

    python -m swiftbrush_jax.train --config configs/sd21.py --workdir runs/sd21 [--config.key=value ...]

A linear loop: set up the mesh, load the frozen teacher, build (or restore)
the train state, then step, log, sample and checkpoint. It resumes from the
newest intact checkpoint in the workdir (a damaged one is moved to
``corrupt_checkpoints/``) at the step its state holds. Before the loop,
SIGTERM/SIGINT end the program at once (nothing is half-written then: a
checkpoint only ever appears complete); in the loop they save and exit. Every
input is checked before anything is compiled; a bad one is a one-line
``error:``.
"""

import io
import logging as std_logging
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from . import setup
from .errors import TrainingDiverged, exit_on_user_error, parse_flags_or_exit
from .files import checkpoint as ckpt
from .files import storage
from .files.student import record_for_run
from .generate import image_grid, one_step_images, to_uint8, upscaled
from .parallel import distributed, sharding
from .setup import log
from .data.stream import Prefetcher
from .vsd import VSD

_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, samples and TensorBoard events go.")
distributed.define_flags()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopRequest:
    """Set by SIGTERM/SIGINT (e.g. preemption) once the first step has returned; the loop saves and exits at
    the next step boundary. Until then the signals keep their default action, which ends the process at once,
    even inside the first compilation, which a Python handler would only see when it returns."""

    def __init__(self):
        self.signal = None
        self.stopping = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    def start(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any process has been signalled: every process stops after the same step, so their
        checkpoints are one consistent save."""
        self.stopping = self.stopping or distributed.any_process(self.signal is not None)
        return self.stopping

    def describe(self) -> str:
        return f"{self.signal} received" if self.signal else "another process was signalled"
























def check_divergence(metrics, step: int, limit: int, mngr) -> int:
    """The run of non-finite (skipped) updates up to ``step``; TrainingDiverged once it reaches ``limit``.

    Read for every step (one scalar from that step's metrics), so a diverged run stops at
    exactly ``limit`` and never saves."""
    streak = int(sharding.host_local(metrics["skip_streak"]))
    if streak >= limit:
        ckpt.finish(mngr)
        last = mngr.latest_step()
        raise TrainingDiverged(f"{streak} consecutive updates had a non-finite loss or gradient (up to step {step}); "
                               f"stopped without saving; the last good checkpoint is "
                               f"{'step ' + str(last) if last is not None else 'none'}; "
                               "lower the learning rate or check the teacher weights")
    return streak


def main(argv):
    del argv
    config, workdir = setup.CONFIG.value, _WORKDIR.value
    if workdir is None:
        raise app.UsageError("--workdir is required")
    logging.set_verbosity(logging.WARNING)
    # When orbax's parallel writes fail together (a full disk), asyncio repeats each at exit as "Task
    # exception was never retrieved", after the one error line that already reports the failure.
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    distributed.initialize(config.peer_timeout_s)
    is_main = jax.process_index() == 0
    stop = _StopRequest()  # until the first step returns: the signals' default action, an immediate end
    t_start = time.time()

    run = setup.set_up(config, workdir)
    state, mngr, stream = run.state, run.mngr, run.stream
    step_fn = run.vsd.jit_train_step(run.state_sh, run.frozen_sh, sharding.batch_sharding(run.mesh),
                                     sharding.replicated(run.mesh))
    sampler = Sampler(config, run.vsd, run.pipe, run.sampler_inputs, run.mesh) if run.sampler_inputs else None
    writer = summary_writer(workdir) if is_main else None
    tokenized = Prefetcher((run.pipe.tokenize(b) for b in stream.batches(run.start)))
    record = {"config": ckpt.config_record(config),
              "student": record_for_run(config, run.vsd, run.teacher_source, workdir).as_dict()}

    def save(step):
        ckpt.ensure_space(mngr, state, step)
        ckpt.save(mngr, step, state, {"prompts": stream.state(step), **record})

    t_first, images = None, 0
    step = start = run.start
    previous = None  # last step's metrics: read once the next step is queued, so the device never waits on us
    with tokenized, progress_bar(start, config.total_steps, is_main) as progress:
        while step < config.total_steps:
            ids = sharding.global_batch_array(next(tokenized), run.mesh)
            if step == start:
                step_fn = compile_everywhere(step_fn, sampler, state, run.frozen, ids)
            state, metrics = step_fn(state, run.frozen, ids)
            step += 1
            if previous is not None:
                check_divergence(previous, step - 1, config.max_consecutive_skips, mngr)
            previous = metrics
            images += config.batch_size
            if t_first is None:
                jax.block_until_ready(state.step)
                t_first = time.time() - t_start
                stop.start()
                log(f"first step done {t_first:.1f} s after start (includes compilation)")
                images, t_loop = 0, time.time()
            if step % config.log_every == 0 or step == config.total_steps:
                m = {k: float(v) for k, v in sharding.host_local(metrics).items()}
                m.update(skipped=int(sharding.host_local(state.skipped)), steps_per_s=(step - start - 1) / max(time.time() - t_loop, 1e-9))
                progress.update(step, m)
                if writer is not None:
                    for k, v in m.items():
                        writer.add_scalar(f"train/{k}", v, step)
            if sampler is not None and (step % config.sample_every == 0 or step == config.total_steps):
                sampler.write(state, run.frozen, step, workdir, writer)
            # While updates are being skipped, periodic saves wait, so that max_to_keep never retires
            # the last good checkpoint for copies of a stalled run.
            periodic = step % config.checkpoint_every == 0
            stopping = stop.agreed()
            if periodic or step == config.total_steps or stopping:
                streak = check_divergence(metrics, step, config.max_consecutive_skips, mngr)
                previous = None  # checked now; the next iteration need not read it again
                if (periodic and not streak) or step == config.total_steps or stopping:
                    save(step)
            if stopping:
                log(f"{stop.describe()}: saved step {step}, exiting")
                break
    ckpt.finish(mngr)
    mngr.close()
    wall = time.time() - t_start
    distributed.finished()
    if is_main:
        done = step - start
        rate = images / max(time.time() - t_loop, 1e-9) if t_first is not None and done > 1 else 0.0
        print(f"done: {done} steps (to step {step}) in {wall:.1f} s, first step after {t_first or 0:.1f} s, "
              f"{rate:.2f} images/s after compilation; workdir {workdir}", flush=True)
        if not stop.stopping:  # a finished run; a stopped one is resumed by the same command
            print(next_commands(config, workdir), flush=True)
    if writer is not None:
        writer.close()
    if stop.stopping:
        sys.exit(0)






def next_commands(config, workdir: str) -> str:
    """What to run on a finished workdir: sample, evaluate and export it, with its own workdir and prompts."""
    import shlex

    w, sub = shlex.quote(workdir), lambda name: shlex.quote(f"{workdir.rstrip('/')}/{name}")
    prompt = shlex.quote(config.validation_prompts[0]) if config.validation_prompts else "'a photo of a cat'"
    if config.prompts == "shapes":  # the shapes world's teacher and vocabulary: its own suite
        evaluate = f"python -m swiftbrush_jax.evaluate --suite shapes --model {w}"
    else:
        evaluate = (f"python -m swiftbrush_jax.evaluate --suite coco2014 --model {w} --out {sub('eval_coco2014')} ...  "
                    "# + COCO captions and images, Inception and CLIP weights: docs/evaluation.md")
    return "\n".join([
        f"next: python -m swiftbrush_jax.sample --model {w} --prompt {prompt} --out {sub('samples_one_step')}",
        f"      {evaluate}",
        f"      python -m swiftbrush_jax.export --workdir {w} --out {sub('exported')}"])


def compile_everywhere(step_fn, sampler, state, frozen, ids):
    """The step compiled ahead of its first call, and every process waiting for the others to finish compiling.

    Processes compile at different speeds; the first cross-process collective
    would otherwise wait on a slow compile and time out (gloo allows 30 s on CPU).
    The compiled step also refuses, rather than recompiles for, any other shape.
    """
    t = time.time()
    compiled = step_fn.lower(state, frozen, ids).compile()
    log(f"compiled the train step in {time.time() - t:.1f} s")
    if sampler is not None:
        t = time.time()
        sampler.compile(state.student, frozen)
        log(f"compiled the sampler in {time.time() - t:.1f} s")
    distributed.barrier("compiled")
    return compiled


class Sampler:
    """One-step samples of the student (and its EMA) for fixed validation prompts and noise."""

    def __init__(self, config, vsd: VSD, pipe, inputs: dict, mesh):
        self.inputs = inputs  # sampler_inputs(): noise, prompt embeddings, VAE weights, on the mesh
        vae = pipe.vae.clone(dtype=jnp.dtype(config.student_compute_dtype))
        images = one_step_images(vsd.student_unet, vae, vsd.schedule, vsd.student_t,
                                 output_is_x0=not vsd.config.student_x0_parameterization)
        self.sample = jax.jit(lambda params, teacher, x: images(vsd.student_variables(params, teacher), x["vae"],
                                                                 x["z"], x["cond"]),
                              out_shardings=sharding.replicated(mesh))
        self.cols = min(len(config.validation_prompts), 8)
        self.min_px = config.sample_grid_min_px  # small models' images enlarged for viewing; 0: raw size

    def compile(self, params, frozen) -> None:
        self.sample = self.sample.lower(params, frozen.teacher, self.inputs).compile()

    def write(self, state, frozen, step, workdir, writer):
        png = storage.join(workdir, "samples", f"step_{step:07d}.png")
        rows = []
        for name, params in (("student", state.student), ("ema", state.ema)):
            images = to_uint8(sharding.host_local(self.sample(params, frozen.teacher, self.inputs)))
            rows.append(image_grid(upscaled(images, self.min_px), self.cols))
        if jax.process_index() != 0:
            return
        grid = np.concatenate(rows, axis=0)
        from PIL import Image

        encoded = io.BytesIO()
        Image.fromarray(grid).save(encoded, format="PNG")
        storage.write_bytes(png, encoded.getvalue())
        if writer is not None:
            writer.add_image("samples/student_then_ema", grid, step, dataformats="HWC")


def summary_writer(workdir):
    return storage.summary_writer(storage.join(workdir, "tensorboard"))


class progress_bar:
    """A tqdm bar on the main process showing step, losses, gradient norms and speed; a context manager,
    so that it is closed before an error line is printed (tqdm redraws an open bar at exit)."""

    def __init__(self, start, total, enabled):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True, file=sys.stderr)
        self.last = start

    def update(self, step, metrics):
        keys = ("loss_student", "loss_lora", "loss_clip", "grad_norm_student", "grad_norm_lora", "steps_per_s",
                "skipped")
        self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in keys if k in metrics}, refresh=False)
        self.bar.update(step - self.last)
        self.last = step

    def close(self):
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(exit_on_user_error(distributed.peer_loss_first(main)), flags_parser=parse_flags_or_exit)
