"""A page that draws as you type: a one-step generator (or any diffusers pipeline) behind a small HTTP server.

    python -m swiftbrush_jax.serve --model runs/shapes --port 8000
    python -m swiftbrush_jax.serve --model swiftbrush_jax/toy/teacher --steps 25

Then open http://127.0.0.1:8000/. The model is what ``sample --model`` takes
(a training workdir, an exported folder, a diffusers folder or Hub id), run
the way ``sample`` runs it, so ``GET /image.png?prompt=P&seed=N`` is the PNG
that ``sample --prompt P --seed N`` writes. ``&steps=&guidance=`` choose a
diffusers model's DDIM; a field absent or empty (as a form sends it) takes the
server's ``--steps/--guidance``, which are ``sample``'s when absent.

Concurrent requests are grouped into one jitted call of a fixed batch size
(``--batch-sizes``, a batch padded to the next), all compiled before
``GET /healthz`` answers 200; each image's noise comes from its own seed, so
its pixels do not depend on the batch it ran in. Past ``--queue`` waiting
requests the server answers 503 at once. It listens on 127.0.0.1 unless
``--host`` says otherwise; it has no authentication.
"""

import collections
import dataclasses
import http.server
import json
import logging
import os
import queue
import sys
import threading
import time
import urllib.parse
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ArgumentParser, UsageError, exit_on_user_error
from . import sample

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_page.html")
MAX_SEED = 2 ** 31 - 1  # the seeds jax.random.PRNGKey takes without 64-bit mode
MAX_STEPS = 200
MAX_SETTINGS = 4  # distinct (steps, guidance) compiled per server: each is one more jitted program
QUERY_FIELDS = ("prompt", "seed", "steps", "guidance")


class BadRequest(ValueError):
    """A request the server cannot act on; its message is the one line the client reads."""


@dataclasses.dataclass
class Request:
    prompt: str
    seed: int
    setting: Tuple[int, float]  # (steps, guidance) as ``sample.sampling_steps`` returns them
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    png: bytes = b""
    error: str = ""
    batch: int = 0  # the padded batch size it ran in
    seconds: float = 0.0  # the batch's generation time


def parse_query(raw: str) -> Dict[str, str]:
    """The query string's fields, each decoded as strict UTF-8; a repeated or unknown field is refused.

    ``raw`` is the request target as http.server hands it over: bytes read as Latin-1, so a client's raw
    non-ASCII bytes come back unchanged before percent-decoding."""
    fields = {}
    for part in filter(None, raw.encode("latin-1").split(b"&")):
        name, _, value = part.partition(b"=")
        try:
            name, value = (urllib.parse.unquote_to_bytes(x.replace(b"+", b" ")).decode("utf-8")
                           for x in (name, value))
        except UnicodeDecodeError:
            raise BadRequest("the query is not UTF-8; percent-encode the prompt's UTF-8 bytes") from None
        if name not in QUERY_FIELDS:
            raise BadRequest(f"unknown parameter {name!r}; the parameters are {', '.join(QUERY_FIELDS)}")
        if name in fields:
            raise BadRequest(f"parameter {name!r} given twice; give it once")
        fields[name] = value
    return fields


def _number(fields: Dict[str, str], name: str, kind, low, high):
    """The field as a number in [low, high], or None where it is absent or empty (the default applies)."""
    if not fields.get(name, "").strip():
        return None
    try:
        value = kind(fields[name])
    except ValueError:
        raise BadRequest(f"{name}={fields[name]!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name}={fields[name]} is out of range; use {low} to {high}")
    return value


class Server:
    """The model, its compiled samplers per (steps, guidance) and the batching queue in front of them."""

    def __init__(self, model: sample.SamplingModel, batch_sizes: Sequence[int], queue_size: int,
                 steps: Optional[int] = None, guidance: Optional[float] = None):
        self.model = model
        self.default = sample.sampling_steps(model, steps, guidance)
        self.batch_sizes = sorted(set(batch_sizes))
        self.shape = sample.latent_shape(model)
        self.samplers: Dict[Tuple[int, float], sample.BatchedSampler] = {}
        self.queue: "queue.Queue[Request]" = queue.Queue(queue_size)
        self.ready = threading.Event()
        self.max_tokens = model.pipe.tokenizer.model_max_length

    def sampler(self, setting: Tuple[int, float]) -> sample.BatchedSampler:
        """The setting's sampler, every batch size compiled on its first use (the default's at start-up)."""
        if setting not in self.samplers:
            run = sample.BatchedSampler(self.model, self.batch_sizes[-1], *setting)
            noise = sample.seeded_noise([0], self.shape)
            for size in self.batch_sizes:
                run(["warm-up"], noise, size)
            self.samplers[setting] = run
        return self.samplers[setting]

    def warm_up(self) -> None:
        start = time.perf_counter()
        self.sampler(self.default)
        self.ready.set()
        logging.info("ready: batch sizes %s compiled in %.1f s", self.batch_sizes, time.perf_counter() - start)

    def request(self, fields: Dict[str, str]) -> Request:
        """A validated request from the query's fields (the fixes named in its errors)."""
        prompt = fields.get("prompt", "")
        if not prompt.strip():
            raise BadRequest("the prompt is empty; pass prompt=TEXT")
        seed = _number(fields, "seed", int, 0, MAX_SEED)
        steps = _number(fields, "steps", int, 1, MAX_STEPS)
        guidance = _number(fields, "guidance", float, 0.0, 100.0)
        if not self.model.is_student:  # a field not given is the server's default, as a flag not given is sample's
            steps = self.default[0] if steps is None else steps
            guidance = self.default[1] if guidance is None and steps > 1 else guidance
        try:
            setting = sample.sampling_steps(self.model, steps, guidance)
        except UsageError as e:
            raise BadRequest(str(e).replace("--steps", "steps").replace("--guidance", "guidance")) from None
        if setting not in self.samplers and len(self.samplers) >= MAX_SETTINGS:
            known = "; ".join(f"steps={s}&guidance={g:g}" for s, g in self.samplers)
            raise BadRequest(f"steps={setting[0]}&guidance={setting[1]:g}: this server compiles at most "
                             f"{MAX_SETTINGS} settings; use one it has ({known})")
        return Request(prompt, 0 if seed is None else seed, setting)

    def tokens(self, prompt: str) -> int:
        """The prompt's token count, start and end tokens included, before the tokenizer's truncation."""
        return len(self.model.pipe.tokenizer(prompt)["input_ids"])

    def submit(self, req: Request) -> None:
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise BadRequest(f"busy: {self.queue.maxsize} requests are waiting; retry shortly") from None

    def run_batches(self) -> None:
        """The worker: the oldest request's setting, with every other waiting request of that setting up to
        the largest batch size, in one call; requests of another setting wait for their own batch."""
        held: "collections.deque[Request]" = collections.deque()
        while True:
            first = held.popleft() if held else self.queue.get()
            batch, others = [first], collections.deque()
            while held and len(batch) < self.batch_sizes[-1]:
                req = held.popleft()
                (batch if req.setting == first.setting else others).append(req)
            while len(batch) < self.batch_sizes[-1]:
                try:
                    req = self.queue.get_nowait()
                except queue.Empty:
                    break
                (batch if req.setting == first.setting else others).append(req)
            held.extendleft(reversed(others))
            self.generate(batch)

    def generate(self, batch: List[Request]) -> None:
        size = next(s for s in self.batch_sizes if s >= len(batch))
        start = time.perf_counter()
        try:
            noise = sample.seeded_noise([r.seed for r in batch], self.shape)
            images = self.sampler(batch[0].setting)([r.prompt for r in batch], noise, size)
            pngs = [sample.png_bytes(image) for image in images]
        except Exception as e:  # the request fails with a 500 line; the server keeps serving
            logging.exception("batch of %d failed", len(batch))
            pngs, error = [b""] * len(batch), f"generation failed: {type(e).__name__}: {e}"
        else:
            error = ""
        seconds = time.perf_counter() - start
        for req, png in zip(batch, pngs):
            req.png, req.error, req.batch, req.seconds = png, error, size, seconds
            req.done.set()


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "swiftbrush-jax"
    # http.server's own refusals (an unsupported method, a malformed or overlong request line) as one line too
    error_message_format = "error: %(message)s\n"
    error_content_type = "text/plain; charset=utf-8"
    app: Server  # set on the subclass ``make_handler`` returns

    def log_message(self, format, *args):
        logging.debug("%s " + format, self.address_string(), *args)

    def reply(self, status: int, body: bytes, kind: str, headers: Sequence[Tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def error_line(self, status: int, message: str) -> None:
        self.reply(status, f"error: {message}\n".encode(), "text/plain; charset=utf-8")

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/":
            with open(PAGE, "rb") as f:
                return self.reply(200, f.read(), "text/html; charset=utf-8")
        if path == "/healthz":
            app = self.app
            body = {"ready": app.ready.is_set(), "model": app.model.description, "student": app.model.is_student,
                    "steps": app.default[0], "guidance": app.default[1], "batch_sizes": app.batch_sizes}
            return self.reply(200 if app.ready.is_set() else 503, json.dumps(body).encode(), "application/json")
        if path == "/image.png":
            return self.image(query)
        self.error_line(404, f"no page {path!r}; the pages are /, /image.png?prompt=TEXT&seed=N and /healthz")

    def image(self, query: str) -> None:
        app = self.app
        try:
            req = app.request(parse_query(query))
        except BadRequest as e:
            return self.error_line(400, str(e))
        if not app.ready.is_set():
            return self.error_line(503, "the model is still compiling; retry when /healthz answers 200")
        try:
            app.submit(req)
        except BadRequest as e:
            return self.error_line(503, str(e))
        req.done.wait()
        if req.error:
            return self.error_line(500, req.error)
        headers = [("X-Generation-Ms", f"{req.seconds * 1000:.1f}"), ("X-Batch-Size", str(req.batch)),
                   ("X-Seed", str(req.seed)), ("X-Steps", str(req.setting[0])),
                   ("X-Guidance", f"{req.setting[1]:g}")]
        tokens = app.tokens(req.prompt)
        if tokens > app.max_tokens:
            headers.append(("X-Prompt-Truncated", f"{tokens} tokens, the first {app.max_tokens} used"))
        self.reply(200, req.png, "image/png", headers)


def make_handler(app: Server):
    return type("BoundHandler", (Handler,), {"app": app})


def parse_args(argv: Sequence[str]):
    parser = ArgumentParser("python -m swiftbrush_jax.serve", __doc__)
    parser.add_argument("--model", required=True, help="training workdir, exported or diffusers folder, Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="the compiled batch sizes; a batch is padded to the next (default 1 2 4 8)")
    parser.add_argument("--queue", type=int, default=64, help="requests waiting past this get a 503 (default 64)")
    parser.add_argument("--step", type=int, help="workdir checkpoint step (default: newest)")
    parser.add_argument("--no-ema", action="store_true", help="workdir: the raw student instead of its EMA")
    sample.add_sampling_flags(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.ERROR)
    if min(args.batch_sizes) < 1 or args.queue < 1:
        raise UsageError("--batch-sizes and --queue must be at least 1")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port}: use 0 (any free port) to 65535")
    model = sample.load_sampling_model(args.model, args.step, not args.no_ema)
    app = Server(model, args.batch_sizes, args.queue, args.steps, args.guidance)
    try:
        httpd = http.server.ThreadingHTTPServer((args.host, args.port), make_handler(app))
    except OSError as e:
        raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror}); "
                         "pick another port") from None
    httpd.daemon_threads = True
    host, port = httpd.server_address[:2]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    logging.info("serving %s on http://%s:%d/ ; compiling batch sizes %s", model.description, host, port,
                 app.batch_sizes)
    try:
        app.warm_up()
        app.run_batches()
    except KeyboardInterrupt:
        httpd.shutdown()


if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
