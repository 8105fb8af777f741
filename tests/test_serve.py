"""The server (python -m swiftbrush_jax.serve) started on 127.0.0.1: its PNGs are sample's, batched or not; bad
input is one 4xx line; a real headless Chromium types into its page and sees the image redrawn.

The student is the shipped shapes teacher's UNet with perturbed weights, saved as train.py saves a
checkpoint (no training: compiling the VSD step costs minutes on a small CPU).
"""

import base64
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import jax
import numpy as np
import pytest
from PIL import Image

from swiftbrush_jax.files import checkpoint as ckpt
from swiftbrush_jax import sample, toy
from swiftbrush_jax.models.unet import load_unet
from swiftbrush_jax.files.student import StudentRecord, teacher_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 2 / 255
PROMPTS = ["a red circle", "a small blue square on the left"]
CHROMIUM = "/usr/bin/chromium"


class Served:
    """A server subprocess on 127.0.0.1 and a free port, ready once /healthz answered 200."""

    def __init__(self, *args: str, timeout: float = 600):
        self.proc = subprocess.Popen([sys.executable, "-m", "swiftbrush_jax.serve", "--port", "0", *args],
                                     cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
        self.log = []
        found = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.append(line)
                match = re.search(r"on http://127\.0\.0\.1:(\d+)/", line)
                if match:
                    self.port = int(match.group(1))
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.2):
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.log)[-3000:]
        self.health_before_ready = []
        while True:
            status, body, _ = self.get("/healthz")
            if status == 200:
                self.health = json.loads(body)
                break
            self.health_before_ready.append(status)
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.log)[-3000:]
            time.sleep(0.1)

    def get(self, target: str):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.request("GET", target)
        response = conn.getresponse()
        out = response.status, response.read(), dict(response.getheaders())
        conn.close()
        return out

    def image(self, prompt: str, seed: int, **extra):
        return self.get("/image.png?" + urllib.parse.urlencode({"prompt": prompt, "seed": seed, **extra}))

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


def pixels(png: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32) / 255


def sampled(model: str, out, prompts, seed: int, num_images: int, *flags: str) -> dict:
    """{(prompt, seed): pixels} as ``sample`` writes them."""
    argv = ["--model", model, "--out", str(out), "--seed", str(seed), "--num-images", str(num_images), *flags]
    sample.main([a for p in prompts for a in ("--prompt", p)] + argv)
    return {(p, seed + k): pixels((out / f"prompt{i:05d}_seed{seed + k}.png").read_bytes())
            for i, p in enumerate(prompts) for k in range(num_images)}


def concurrently(calls):
    """Run every (function, args) at once, each in its own thread; their results in order."""
    results = [None] * len(calls)

    def one(i, fn, args):
        results[i] = fn(*args)

    threads = [threading.Thread(target=one, args=(i, fn, args)) for i, (fn, args) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return results


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir whose student and EMA are the shapes teacher's UNet plus noise, laid out as train.py saves."""
    work = tmp_path_factory.mktemp("serve") / "work"
    teacher = toy.teacher_path()
    _, params = load_unet(os.path.join(teacher, "unet"))
    rng = np.random.RandomState(0)
    noisy = jax.tree_util.tree_map(lambda x: x + np.float32(0.02) * rng.standard_normal(x.shape).astype(np.float32),
                                   params)
    mngr = ckpt.manager(str(work), keep=2, async_save=False)
    record = StudentRecord(teacher=teacher_reference(teacher, str(work)), t=999, output_is_x0=False,
                           prediction_type="epsilon", latent_size=16)
    ckpt.save(mngr, 3, {"student": noisy, "ema": noisy, "step": np.int32(3)},
              {"student": record.as_dict(), "config": {"prompts": "shapes"}})
    mngr.wait_until_finished()
    mngr.close()
    return str(work)


@pytest.fixture(scope="module")
def server(workdir):
    served = Served("--model", workdir)
    yield served
    served.close()


def test_healthz_is_503_until_compiled_then_200(server):
    assert server.health_before_ready and set(server.health_before_ready) == {503}
    assert server.health["ready"] and server.health["student"] and server.health["batch_sizes"] == [1, 2, 4, 8]
    assert server.health["model"].startswith("EMA student of ") and server.health["steps"] == 1, server.health


def test_images_equal_samples_whatever_the_batch(server, workdir, tmp_path):
    expected = sampled(workdir, tmp_path, PROMPTS, 5, 3)
    keys = sorted(expected)
    alone = {key: server.image(*key) for key in keys[:2]}
    together = dict(zip(keys, concurrently([(server.image, key) for key in keys])))
    batches = {int(headers["X-Batch-Size"]) for _, _, headers in together.values()}
    assert max(batches) > 1, batches  # some requests did run together
    for answers in (alone, together):
        for key, (status, body, headers) in answers.items():
            assert status == 200 and headers["Content-Type"] == "image/png", body
            diff = np.abs(pixels(body) - expected[key]).max()
            assert diff <= TOLERANCE, (key, headers["X-Batch-Size"], diff)
    assert np.abs(expected[keys[0]] - expected[keys[1]]).max() > 0.05  # seeds differ, so must images


def test_bad_input_is_one_4xx_line(server):
    cases = {
        "/image.png?prompt=&seed=1": "the prompt is empty",
        "/image.png?seed=1": "the prompt is empty",
        "/image.png?prompt=cat&seed=one": "seed='one' is not an integer",
        "/image.png?prompt=cat&seed=-1": "seed=-1 is out of range",
        "/image.png?prompt=cat&colour=red": "unknown parameter 'colour'",
        "/image.png?prompt=cat&prompt=dog": "parameter 'prompt' given twice",
        "/image.png?prompt=%FF%FEcat": "the query is not UTF-8",
        "/image.png?prompt=cat&steps=4": "samples in one step",
        "/image.png?prompt=cat&steps=&guidance=2": "samples in one step",
        "/nowhere": "no page '/nowhere'",
    }
    for target, message in cases.items():
        status, body, _ = server.get(target)
        lines = body.decode().splitlines()
        assert 400 <= status < 500 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            (target, status, body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:  # raw bytes, not percent-encoded
        s.sendall(b"GET /image.png?prompt=caf\xe9 HTTP/1.0\r\n\r\n")
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.0 400") and b"error: the query is not UTF-8" in answer, answer
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/image.png", body=b"prompt=cat")
    response = conn.getresponse()
    assert response.status == 501 and response.read().decode().splitlines() == \
        ["error: Unsupported method ('POST')"]
    conn.close()
    assert server.image("a red circle", 1, steps="")[0] == 200  # an empty field is the default, as forms send it
    assert server.image("a red circle", 1)[0] == 200  # and it still serves


def test_a_long_prompt_is_truncated_and_says_so(server):
    """(The shapes teacher's tokenizer keeps 16 tokens where SD 2.1's keeps 77.)"""
    with open(os.path.join(toy.teacher_path(), "tokenizer", "tokenizer_config.json")) as f:
        kept = json.load(f)["model_max_length"]
    status, body, headers = server.image("a red circle " * 40, 2)
    assert status == 200 and f"the first {kept} used" in headers["X-Prompt-Truncated"], headers
    assert server.image("a red circle " * 20, 2)[1] == body  # the same first tokens, the same image
    status, _, headers = server.image("a red circle", 2)
    assert status == 200 and "X-Prompt-Truncated" not in headers


def test_a_diffusers_folder_is_served_as_sample_runs_it_and_a_full_queue_is_a_quick_503(tmp_path):
    teacher = toy.teacher_path()
    expected = sampled(teacher, tmp_path, PROMPTS[:1], 7, 1, "--steps", "2", "--guidance", "3")
    served = Served("--model", teacher, "--steps", "2", "--guidance", "3", "--batch-sizes", "1", "--queue", "1")
    try:
        assert not served.health["student"] and (served.health["steps"], served.health["guidance"]) == (2, 3)
        assert served.health["model"].startswith("UNet of "), served.health
        status, body, headers = served.image(PROMPTS[0], 7)
        assert status == 200 and headers["X-Steps"] == "2", body
        assert np.abs(pixels(body) - expected[(PROMPTS[0], 7)]).max() <= TOLERANCE
        # a field absent or empty is the server's default: the same compiled setting, the same image
        for extra in ({"steps": 2}, {"guidance": 3}, {"steps": "", "guidance": ""}):
            again = served.image(PROMPTS[0], 7, **extra)
            assert again[0] == 200 and (again[2]["X-Steps"], again[2]["X-Guidance"]) == ("2", "3"), (extra, again)
            assert again[1] == body, extra
        answers = concurrently([(served.image, (PROMPTS[0], seed)) for seed in range(12)])
        statuses = [status for status, _, _ in answers]
        assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
        busy = [body.decode() for status, body, _ in answers if status == 503]
        assert all(b.startswith("error: busy: 1 requests are waiting") for b in busy), busy
    finally:
        served.close()


class Chromium:
    """Headless Chromium driven over its DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
    ended by NUL, commands on fd 3, answers and events on fd 4), so no websocket client is needed."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", "--window-size=700,700"]

    def __init__(self, url: str, profile: str):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        # bash puts the pipe ends on fds 3 and 4 (a preexec_fn would fork this multithreaded process), taking
        # them from fds numbered 10 up so that neither is already 3 or 4.
        to_chrome_r, from_chrome_w = (self._above_9(fd) for fd in (to_chrome_r, from_chrome_w))
        wired = f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self.proc = subprocess.Popen(["bash", "-c", wired, "bash", CHROMIUM, *self.FLAGS, f"--user-data-dir={profile}",
                                      url], pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buffer, self.next_id, self.session = b"", 0, None

    @staticmethod
    def _above_9(fd: int) -> int:
        import fcntl

        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return high

    def send(self, method: str, timeout: float = 60, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buffer:
                assert time.monotonic() < deadline, f"no answer to {method}"
                chunk = os.read(self.from_chrome, 1 << 20)
                assert chunk, "Chromium closed its DevTools pipe"
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.next_id:
                assert "error" not in answer, (method, answer["error"])
                return answer["result"]

    def attach_to_page(self):
        pages = [t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page"]
        self.session = self.send("Target.attachToTarget", targetId=pages[0]["targetId"], flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=640, height=640, deviceScaleFactor=1, mobile=False)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self):
        self.proc.kill()
        self.proc.wait(30)
        os.close(self.to_chrome)
        os.close(self.from_chrome)


def open_page(port: int, profile: str) -> Chromium:
    """Headless Chromium on the page at 127.0.0.1:port once it has shown its model line; skipped with the reason
    where Chromium is missing or cannot start, except in CI (CI=true), where that is a failure."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing in CI; .ci/run installs Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    browser = Chromium(f"http://127.0.0.1:{port}/", profile)
    try:
        browser.attach_to_page()
    except AssertionError as e:
        browser.close()
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"Chromium cannot start here: {e}")
    deadline = time.monotonic() + 60
    while "loading" in (browser.evaluate("document.getElementById('model').textContent") or "loading"):
        assert time.monotonic() < deadline, "the page never loaded its model line"
        time.sleep(0.2)
    return browser


def test_chromium_types_a_prompt_and_the_image_is_redrawn(server, tmp_path):
    browser = open_page(server.port, str(tmp_path / "profile"))
    try:
        deadline = time.monotonic() + 60
        before = pixels(browser.screenshot())
        browser.evaluate("document.getElementById('prompt').focus()")
        for typed in ("a red ", "circle"):  # two bursts: the first answer is replaced by the second
            for char in typed:
                browser.send("Input.insertText", text=char)
                time.sleep(0.03)
            time.sleep(0.05)
        shown = "document.getElementById('image').dataset.prompt || ''"
        while browser.evaluate(shown) != "a red circle":
            assert time.monotonic() < deadline, f"image shows {browser.evaluate(shown)!r}, status " + \
                str(browser.evaluate("document.getElementById('status').textContent"))
            time.sleep(0.2)
        width = pixels(server.image("a red circle", 0)[1]).shape[1]
        assert browser.evaluate("document.getElementById('image').naturalWidth") == width
        status = browser.evaluate("document.getElementById('status').textContent")
        assert re.match(r"[\d.]+ ms to generate \(batch of \d\)", status), status
        shot = browser.screenshot()
        (tmp_path / "page.png").write_bytes(shot)
        if os.environ.get("SERVE_SCREENSHOT"):  # where docs/serving.md's screenshot is taken
            shutil.copy(tmp_path / "page.png", os.environ["SERVE_SCREENSHOT"])
        after = pixels(shot)
        assert after.shape == before.shape == (640, 640, 3)
        assert (np.abs(after - before).max(axis=2) > 0.2).sum() > 5000  # the drawn image, not a caret or text
    finally:
        browser.close()


class Reordering(http.server.ThreadingHTTPServer):
    """A proxy in front of the server that answers out of order: the answer to ``slow`` (an image request for
    that prompt) is held back until the answer to ``fast`` has been passed on, as a request waiting for a batch
    or a compilation is answered after a later one."""

    def __init__(self, upstream: int, slow: str, fast: str):
        self.upstream, self.slow, self.fast = upstream, slow, fast
        self.slow_asked, self.fast_answered, self.slow_answered = (threading.Event() for _ in range(3))
        self.answered = []  # the prompts of the image requests passed on, in order
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                prompt = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("prompt", [None])[0]
                conn = http.client.HTTPConnection("127.0.0.1", outer.upstream, timeout=300)
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read()
                conn.close()
                if prompt == outer.slow:
                    outer.slow_asked.set()
                    assert outer.fast_answered.wait(120), "the page never asked for the newer prompt"
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("server", "date", "connection"):
                        self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                if prompt is not None:
                    outer.answered.append(prompt)
                if prompt == outer.fast:
                    outer.fast_answered.set()
                if prompt == outer.slow:
                    outer.slow_answered.set()

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_chromium_shows_only_the_newest_answer_when_an_older_one_comes_later(server, tmp_path):
    slow, fast = PROMPTS
    proxy = Reordering(server.port, slow, fast)
    browser = open_page(proxy.server_address[1], str(tmp_path / "profile"))
    try:
        shown = "document.getElementById('image').dataset.prompt || ''"
        # Count the answers whose body has arrived, by a copy of each response read aside from the page's code.
        browser.evaluate("window.bodies = 0; const pageFetch = window.fetch; window.fetch = (...args) => "
                         "pageFetch(...args).then((r) => { r.clone().blob().then(() => window.bodies++); return r; })")
        browser.evaluate("document.getElementById('prompt').focus()")
        browser.send("Input.insertText", text=slow)
        assert proxy.slow_asked.wait(60), "the page never asked for the first prompt"
        browser.evaluate("document.getElementById('prompt').select()")
        browser.send("Input.insertText", text=fast)  # replaces the selection: the prompt is now `fast`
        assert proxy.slow_answered.wait(60) and proxy.answered == [fast, slow], proxy.answered
        # The older answer has been passed on after the newer one. Once the browser holds its body, the page's
        # own code (which would read that body, unless it drops the answer first) is given time to act on it.
        deadline = time.monotonic() + 30
        while browser.evaluate("window.bodies") < 2:
            assert time.monotonic() < deadline, "the browser never received both answers"
            time.sleep(0.1)
        time.sleep(0.5)
        assert browser.evaluate(shown) == fast, browser.evaluate(shown)
        assert browser.evaluate("document.getElementById('prompt').value") == fast
        status = browser.evaluate("document.getElementById('status').textContent")
        assert re.match(r"[\d.]+ ms to generate", status), status
    finally:
        browser.close()
        proxy.shutdown()
        proxy.server_close()
