"""The painter's server: a static page plus a small JSON API over one `SCDMPipeline`.

Why a plain page on the standard library's HTTP server rather than gradio: painting a label map
needs exact pixels (one class per pixel, no antialiasing, flood fill, a [MASK] eraser), which a
hand-written canvas over an id array gives directly and gradio's sketch widgets (antialiased
RGB strokes) do not; and it adds no dependency to the package. One worker thread samples one job
at a time; the rest wait in a short queue. Every bad request gets a 4xx and a JSON
`{"error": "..."}`; nothing a client sends can stop the server.
"""
import io
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
from PIL import Image

from ..data.corruptions import corrupt, resize_nearest
from ..data.dataset_layouts import LAYOUTS, get_layout, list_files, read_ids, remap_labels, resize_ids
from ..runtime.errors import UserError
from ..data.palettes import MASK_COLOR, TOY, palette_name, to_hex
from ..pipeline import (DEFAULT_EXTRAPOLATION, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_THRESHOLD,
                        MASK_ID)
from ..diffusion.sampling import MAX_GUIDANCE, SAMPLERS
from ..toy import toy_label_map
from ..flags import APP_FLAGS, defaults

STATIC = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png"}
MAX_BODY = 8 << 20          # bytes of one request (an uploaded PNG or a JSON map)
MAX_SAMPLES = 8
MAX_SEED = 2 ** 31 - 1
QUEUE_SIZE = defaults(APP_FLAGS)["queue"]  # jobs waiting behind the running one
KEEP_FINISHED = 16          # finished jobs kept for their results
NOISES = {"ds": "downsample", "edge": "edge", "random": "random", "painter": "painter"}
EXAMPLES = 4


class BadRequest(Exception):
    def __init__(self, message, status=HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


class Cancelled(Exception):
    """Raised from the sampling callback when a running job is cancelled."""


@dataclass
class Job:
    id: str
    ids: np.ndarray
    params: dict
    status: str = "queued"             # queued, running, done, failed, cancelled
    done: int = 0
    total: int = 1
    error: str = ""
    images: list = field(default_factory=list)   # PNG bytes
    label_png: bytes = b""
    cancel: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.time)
    seconds: Optional[float] = None

    def describe(self, position=None):
        out = dict(id=self.id, status=self.status, progress=dict(done=self.done, total=self.total),
                   params=self.params, error=self.error or None, seconds=self.seconds,
                   label=f"/api/jobs/{self.id}/label.png",
                   images=[f"/api/jobs/{self.id}/images/{k}.png" for k in range(len(self.images))])
        if position is not None:
            out["position"] = position
        return out


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class PainterApp:
    """The state behind the page: the pipeline, the job queue and its one worker thread."""

    def __init__(self, pipe, queue_size=QUEUE_SIZE, max_steps=None):
        self.pipe = pipe
        self.max_steps = max_steps or int(pipe.loaded.flags["diffusion_steps"])
        self.jobs = {}
        self.order = []             # finished job ids, oldest first
        self.waiting = queue.Queue(maxsize=queue_size)
        self.lock = threading.Lock()
        self.examples = example_maps(pipe)
        self.stopping = threading.Event()
        self.worker = threading.Thread(target=self.work, name="scdm-app-worker", daemon=True)
        self.worker.start()

    # ---------------------------------------------------------------------------- facts
    def info(self):
        pipe = self.pipe
        colors = to_hex(pipe.colors)
        return dict(
            image_size=pipe.image_size, num_classes=pipe.num_classes, unlabeled_id=pipe.unlabeled_id,
            mask_id=MASK_ID if pipe.is_scdm else None, mask_color=to_hex([MASK_COLOR])[0], is_scdm=pipe.is_scdm,
            classes=[dict(id=k, name=n, color=colors[k]) for k, n in enumerate(pipe.class_names)],
            samplers=list(SAMPLERS), noises=list(NOISES), examples=list(self.examples),
            limits=dict(num_samples=MAX_SAMPLES, steps=self.max_steps, guidance_scale=MAX_GUIDANCE, seed=MAX_SEED,
                        body_bytes=MAX_BODY, queue=self.waiting.maxsize),
            defaults=dict(num_samples=1, steps=min(DEFAULT_STEPS, self.max_steps), guidance_scale=DEFAULT_GUIDANCE,
                          seed=0, unlabeled_to_zero=pipe.is_scdm, extrapolation=DEFAULT_EXTRAPOLATION,
                          dynamic_threshold=DEFAULT_THRESHOLD, sampler=DEFAULT_SAMPLER),
            model=dict(path=str(pipe.loaded.model_path), source=pipe.loaded.source, dataset_mode=pipe.dataset_mode))

    # ---------------------------------------------------------------------------- checks
    def check_ids(self, value, name="ids"):
        """A JSON map (S rows of S ints, or S*S ints) -> (S, S) int64 ids, or BadRequest."""
        size = self.pipe.image_size
        if not isinstance(value, list):
            raise BadRequest(f"{name} must be a list of {size} rows of {size} class ids")
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):
            raise BadRequest(f"{name} must be a rectangular list of class ids") from None
        if arr.dtype == object or arr.dtype.kind not in "iu":
            raise BadRequest(f"{name} must hold integers only (class ids)")
        if arr.ndim == 1 and arr.size == size * size:
            arr = arr.reshape(size, size)
        if arr.shape != (size, size):
            raise BadRequest(f"{name} has shape {list(arr.shape)}; expected {size}x{size} (the model's size)")
        arr = arr.astype(np.int64)
        allowed = (arr >= 0) & (arr < self.pipe.num_classes)
        if self.pipe.is_scdm:
            allowed |= arr == MASK_ID
        if not allowed.all():
            bad = np.unique(arr[~allowed])[:10].tolist()
            extra = f" or {MASK_ID} ([MASK])" if self.pipe.is_scdm else ""
            raise BadRequest(f"{name} holds ids {bad} outside 0..{self.pipe.num_classes - 1}{extra}")
        return arr

    @staticmethod
    def number(body, key, default, lo, hi, kind=int):
        value = body.get(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind is int:
            ok = float(value).is_integer()
        if not ok or not lo <= value <= hi:
            what = "an integer" if kind is int else "a number"
            raise BadRequest(f"{key} must be {what} in {lo}..{hi}, got {json.dumps(value)}")
        return kind(value)

    def job_params(self, body):
        known = {"ids", "num_samples", "steps", "guidance_scale", "seed", "unlabeled_to_zero", "sampler"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise BadRequest(f"unknown fields {unknown}; expected some of {sorted(known)}")
        if "ids" not in body:
            raise BadRequest("ids is required: the label map as rows of class ids")
        utz = body.get("unlabeled_to_zero", self.pipe.is_scdm)
        if not isinstance(utz, bool):
            raise BadRequest("unlabeled_to_zero must be true or false")
        sampler = body.get("sampler", DEFAULT_SAMPLER)
        if sampler not in SAMPLERS:
            raise BadRequest(f"sampler must be one of {list(SAMPLERS)}, got {json.dumps(sampler)}")
        params = dict(
            num_samples=self.number(body, "num_samples", 1, 1, MAX_SAMPLES),
            steps=self.number(body, "steps", min(DEFAULT_STEPS, self.max_steps), 1, self.max_steps),
            guidance_scale=self.number(body, "guidance_scale", DEFAULT_GUIDANCE, 0.0, MAX_GUIDANCE, float),
            seed=self.number(body, "seed", 0, 0, MAX_SEED), unlabeled_to_zero=utz, sampler=sampler)
        return self.check_ids(body["ids"]), params

    # ---------------------------------------------------------------------------- jobs
    def submit(self, body):
        ids, params = self.job_params(body)
        job = Job(uuid.uuid4().hex[:12], ids, params)
        with self.lock:
            try:
                self.waiting.put_nowait(job)
            except queue.Full:
                raise BadRequest(f"the queue is full ({self.waiting.maxsize} jobs wait); try again when one is done",
                                 HTTPStatus.TOO_MANY_REQUESTS) from None
            self.jobs[job.id] = job
        return job

    def position(self, job):
        if job.status != "queued":
            return None
        with self.waiting.mutex:
            waiting = list(self.waiting.queue)
        return next((i + 1 for i, j in enumerate(waiting) if j is job), 0)

    def get(self, job_id):
        job = self.jobs.get(job_id)
        if job is None:
            raise BadRequest(f"no job {job_id!r} (finished jobs are kept for the last {KEEP_FINISHED})",
                             HTTPStatus.NOT_FOUND)
        return job

    def cancel(self, job_id):
        job = self.get(job_id)
        job.cancel.set()
        if job.status == "queued":
            job.status = "cancelled"
        return job

    def finish(self, job, status, error=""):
        job.status, job.error = status, error
        job.seconds = round(time.time() - job.created, 3)
        with self.lock:
            self.order.append(job.id)
            while len(self.order) > KEEP_FINISHED:
                self.jobs.pop(self.order.pop(0), None)

    def close(self, timeout=30.0):
        """Cancels the running and waiting jobs and ends the worker thread: a process must not exit
        while the thread is inside torch (its native threads then abort the interpreter)."""
        self.stopping.set()
        with self.lock:
            for job in self.jobs.values():
                job.cancel.set()
        self.worker.join(timeout)
        return not self.worker.is_alive()

    def work(self):
        while not self.stopping.is_set():
            try:
                job = self.waiting.get(timeout=0.2)
            except queue.Empty:
                continue
            if job.cancel.is_set():
                self.finish(job, "cancelled")
                continue
            job.status = "running"
            try:
                self.run(job)
            except Cancelled:
                self.finish(job, "cancelled")
            except UserError as e:
                self.finish(job, "failed", str(e))
            except Exception as e:  # the worker must outlive any job
                self.finish(job, "failed", f"{type(e).__name__}: {e}")
            else:
                self.finish(job, "done")

    def run(self, job):
        def progress(done, total):
            job.done, job.total = done, total
            if job.cancel.is_set():
                raise Cancelled()

        p = job.params
        job.label_png = png_bytes(self.pipe.colorize(job.ids))
        images = self.pipe(job.ids, num_samples=p["num_samples"], steps=p["steps"], guidance_scale=p["guidance_scale"],
                           seed=p["seed"], sampler=p["sampler"], unlabeled_to_zero=p["unlabeled_to_zero"],
                           batch_size=min(4, p["num_samples"]), names=["app"], callback=progress)
        job.images = [png_bytes(im) for im in images]

    # ---------------------------------------------------------------------------- map tools
    def decode(self, data, raw_ids=False):
        """An uploaded PNG (ids or palette colours) -> ids at the model's size, and notes."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                if max(img.size) > 4096:
                    raise BadRequest(f"the upload is {img.size[0]}x{img.size[1]}; expected at most 4096 px a side")
                img.load()
                img = img.copy()
        except BadRequest:
            raise
        except Exception as e:
            raise BadRequest(f"the upload is not a readable image ({e}); expected a PNG of class ids or palette "
                             "colours") from None
        try:
            ids = self.pipe.read_label_map(img, raw_ids=raw_ids, what="the upload", resize=False)
        except UserError as e:
            raise BadRequest(str(e)) from None
        notes = []
        size = self.pipe.image_size
        if ids.shape != (size, size):
            notes.append(f"the upload is {ids.shape[1]}x{ids.shape[0]}; resized to {size}x{size} with nearest "
                         "neighbour")
            ids = resize_ids(ids, (size, size))
        if not self.pipe.is_scdm and (ids == MASK_ID).any():
            ids = np.where(ids == MASK_ID, self.fill_id(), ids)
        return ids, notes

    def fill_id(self):
        """What holes become: the unlabeled class where the model has one, else [MASK] (SCDM) or 0."""
        if self.pipe.unlabeled_id is not None:
            return self.pipe.unlabeled_id
        return MASK_ID if self.pipe.is_scdm else 0

    def noise(self, body):
        if not isinstance(body, dict) or set(body) - {"ids", "noise", "seed"} or "ids" not in body:
            raise BadRequest('expected {"ids": [...], "noise": "ds|edge|random|painter", "seed": 0}')
        name = body.get("noise")
        if name not in NOISES:
            raise BadRequest(f"noise must be one of {list(NOISES)}, got {json.dumps(name)}")
        ids = self.check_ids(body["ids"])
        seed = self.number(body, "seed", 0, 0, MAX_SEED)
        size = self.pipe.image_size
        temp = self.pipe.num_classes  # [MASK] as a plain id while the noise runs
        work = np.where(ids == MASK_ID, temp, ids)
        fill = self.fill_id()
        rng = np.random.default_rng(seed)
        if name == "ds":
            out = resize_nearest(resize_nearest(work, max(2, size // 4)), size)
        else:
            params = dict(radius=max(1, size // 32)) if name == "edge" else {}
            out, _ = corrupt(NOISES[name], work, fill=temp + 1, rng=rng, **params)
            out = np.where(out == temp + 1, fill, out)
        return np.where(out == temp, MASK_ID, out).astype(np.int64)


def example_maps(pipe, limit=EXAMPLES):
    """Start maps by name: a blank map, the first test maps of the run's dataset (when it is still
    there) and, for toy models, a few maps drawn by `scdm.toy`."""
    size = pipe.image_size
    fill = pipe.unlabeled_id if pipe.unlabeled_id is not None else 0
    maps = {"blank": np.full((size, size), fill, dtype=np.int64)}
    data_dir = pipe.loaded.data_dir
    if data_dir and Path(data_dir).is_dir() and pipe.dataset_mode in LAYOUTS:
        layout = get_layout(pipe.dataset_mode)
        folder = Path(data_dir) / layout.label_dir.format(split=layout.test_split)
        try:
            files = sorted(list_files(folder, layout.label_suffix).items())[:limit] if folder.is_dir() else []
            for name, path in files:
                ids = remap_labels(read_ids(path), pipe.dataset_mode, pipe.unlabeled_id)
                if ((ids >= 0) & (ids < pipe.num_classes)).all():
                    maps[f"dataset: {name}"] = resize_ids(ids.astype(np.int64), (size, size))
        except UserError:
            pass  # an unreadable dataset only costs the examples
    if palette_name(pipe.dataset_mode, data_dir if data_dir and Path(data_dir).is_dir() else None) == TOY:
        for i in range(limit - 1):
            maps[f"toy {i}"] = toy_label_map(np.random.default_rng(1000 + i), size).astype(np.int64)
    return maps


class PainterHandler(BaseHTTPRequestHandler):
    """One HTTP request: the static page or the JSON API, answered from the `PainterApp` that the
    server holds (`self.server.app`). A `BadRequest` becomes its 4xx and `{"error": ...}`; any other
    exception a 500 with its type and message, so nothing a client sends stops the server."""
    server_version = "scdm-app"
    protocol_version = "HTTP/1.1"

    @property
    def app(self):
        return self.server.app

    def log_message(self, format, *args):  # quiet: one line per error only
        pass

    def send_body(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, obj, status=HTTPStatus.OK):
        self.send_body(status, json.dumps(obj).encode(), "application/json")

    def read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("a Content-Length header is required", HTTPStatus.LENGTH_REQUIRED)
        try:
            n = int(length)
        except ValueError:
            raise BadRequest("Content-Length must be an integer") from None
        if n < 0:
            raise BadRequest("Content-Length must be >= 0")
        if n > MAX_BODY:
            self.close_connection = True  # the unread body would be taken for the next request
            raise BadRequest(f"the request body is {n} bytes; at most {MAX_BODY} are accepted",
                             HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(n)

    def read_json(self):
        data = self.read_body()
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def handle_any(self, method):
        try:
            self.route(method)
        except BadRequest as e:
            self.send_json({"error": str(e)}, e.status)
        except Exception as e:  # a bug must not take the server down; say what happened
            self.send_json({"error": f"internal error: {type(e).__name__}: {e}"},
                           HTTPStatus.INTERNAL_SERVER_ERROR)

    def do_GET(self):
        self.handle_any("GET")

    def do_HEAD(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    def do_DELETE(self):
        self.handle_any("DELETE")

    def do_PUT(self):
        self.handle_any("PUT")

    def route(self, method):
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = parse_qs(url.query)
        if method == "GET" and (not parts or parts[0] == "static"):
            return self.static(parts[1:] if parts else ["index.html"])
        if parts[:1] != ["api"]:
            raise BadRequest(f"no page {url.path}", HTTPStatus.NOT_FOUND)
        parts = parts[1:]
        routes = {
            ("GET", "info"): lambda: self.send_json(self.app.info()),
            ("GET", "examples"): lambda: self.example(parts[1:]),
            ("POST", "decode"): lambda: self.decode(query),
            ("POST", "noise"): lambda: self.send_json({"ids": self.app.noise(self.read_json()).tolist()}),
            ("POST", "jobs"): lambda: self.jobs(parts[1:], method),
            ("GET", "jobs"): lambda: self.jobs(parts[1:], method),
            ("DELETE", "jobs"): lambda: self.jobs(parts[1:], method),
        }
        key = (method, parts[0] if parts else "")
        if key not in routes:
            if any(k[1] == key[1] for k in routes):
                raise BadRequest(f"{method} is not allowed on {url.path}", HTTPStatus.METHOD_NOT_ALLOWED)
            raise BadRequest(f"no API endpoint {url.path}", HTTPStatus.NOT_FOUND)
        routes[key]()

    def static(self, parts):
        name = "/".join(parts)
        path = (STATIC / name).resolve()
        if STATIC not in path.parents or not path.is_file() or path.suffix not in STATIC_TYPES:
            raise BadRequest(f"no page /{name}", HTTPStatus.NOT_FOUND)
        self.send_body(HTTPStatus.OK, path.read_bytes(), STATIC_TYPES[path.suffix])

    def example(self, rest):
        if not rest:
            return self.send_json({"examples": list(self.app.examples)})
        name = unquote("/".join(rest))
        if name not in self.app.examples:
            raise BadRequest(f"no example {name!r}; there are {list(self.app.examples)}", HTTPStatus.NOT_FOUND)
        self.send_json({"name": name, "ids": self.app.examples[name].tolist()})

    def decode(self, query):
        raw = query.get("raw_ids", ["0"])[0] in ("1", "true", "True")
        ids, notes = self.app.decode(self.read_body(), raw)
        self.send_json({"ids": ids.tolist(), "notes": notes})

    def jobs(self, rest, method):
        if method == "POST" and not rest:
            job = self.app.submit(self.read_json())
            return self.send_json(job.describe(self.app.position(job)), HTTPStatus.ACCEPTED)
        if not rest:
            raise BadRequest("GET /api/jobs/<id>; POST /api/jobs submits", HTTPStatus.METHOD_NOT_ALLOWED)
        job = self.app.get(rest[0])
        tail = rest[1:]
        if method == "DELETE" and not tail or method == "POST" and tail == ["cancel"]:
            return self.send_json(self.app.cancel(job.id).describe())
        if method == "GET" and not tail:
            return self.send_json(job.describe(self.app.position(job)))
        if method == "GET" and tail == ["label.png"] and job.label_png:
            return self.send_body(HTTPStatus.OK, job.label_png, "image/png")
        if method == "GET" and len(tail) == 2 and tail[0] == "images":
            stem = tail[1][:-4] if tail[1].endswith(".png") else ""
            if stem.isdigit() and int(stem) < len(job.images):
                return self.send_body(HTTPStatus.OK, job.images[int(stem)], "image/png")
        raise BadRequest(f"no {'/'.join(tail)} for job {job.id} (status {job.status})", HTTPStatus.NOT_FOUND)


class PainterServer(ThreadingHTTPServer):
    """The HTTP server of one `PainterApp` (`.app`), each request answered by a `PainterHandler`."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, app):
        self.app = app
        super().__init__(address, PainterHandler)


def make_server(pipe, host="127.0.0.1", port=7860, queue_size=QUEUE_SIZE, max_steps=None):
    """The app's HTTP server (not yet serving: call `serve_forever`); port 0 picks a free port."""
    app = PainterApp(pipe, queue_size=queue_size, max_steps=max_steps)
    return PainterServer((host, port), app)
