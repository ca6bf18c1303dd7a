"""The painter's JSON API without a browser: a job end to end, and every kind of bad request gets a
4xx with a clear message while the server keeps answering."""
import http.client
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from scdm.app.server import MAX_BODY, PainterHandler, PainterServer, make_server
from scdm.pipeline import MASK_ID, SCDMPipeline
from tiny_run import make_tiny_run

SIZE = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pipe = SCDMPipeline.from_checkpoint(make_tiny_run(tmp_path_factory.mktemp("run")))
    srv = make_server(pipe, "127.0.0.1", 0, queue_size=1)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(server, method, path, body=None, headers=None, raw=False):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    res = conn.getresponse()
    payload = res.read()
    conn.close()
    return res.status, payload if raw else json.loads(payload)


def a_map():
    ids = np.full((SIZE, SIZE), 3)
    ids[2:10, 2:10] = 1
    ids[10:, :] = 2
    ids[0, 0] = MASK_ID
    return ids


def wait(server, job_id, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        status, job = request(server, "GET", f"/api/jobs/{job_id}")
        assert status == 200
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']}")


def test_the_server_holds_the_app_its_module_level_handler_answers_from(server):
    assert isinstance(server, PainterServer) and server.RequestHandlerClass is PainterHandler
    assert request(server, "GET", "/api/info")[1]["image_size"] == server.app.pipe.image_size


def test_page_info_and_a_job(server):
    status, page = request(server, "GET", "/", raw=True)
    assert status == 200 and b"<canvas" in page
    status, info = request(server, "GET", "/api/info")
    assert info["image_size"] == SIZE and info["is_scdm"] and info["mask_id"] == MASK_ID
    assert [c["name"] for c in info["classes"]] == ["class 0", "class 1", "class 2", "unlabeled"]
    assert info["classes"][3]["color"] == "#000000"
    ids = a_map()
    status, job = request(server, "POST", "/api/jobs", dict(ids=ids.tolist(), num_samples=2, steps=2,
                                                            guidance_scale=1.5, seed=4))
    assert status == 202 and job["status"] in ("queued", "running")
    job = wait(server, job["id"])
    assert job["status"] == "done" and job["progress"]["done"] == job["progress"]["total"] == 4
    want = server.app.pipe(ids, num_samples=2, steps=2, guidance_scale=1.5, seed=4, names=["app"],
                           unlabeled_to_zero=True)
    for k, url in enumerate(job["images"]):
        status, png = request(server, "GET", url, raw=True)
        assert status == 200 and (np.asarray(Image.open(io.BytesIO(png))) == np.asarray(want[k])).all()
    status, png = request(server, "GET", job["label"], raw=True)
    assert (np.asarray(Image.open(io.BytesIO(png))) == np.asarray(server.app.pipe.colorize(ids))).all()


def test_decode_examples_and_noise(server):
    buf = io.BytesIO()
    Image.fromarray(np.kron(a_map().clip(0)[:8, :8], np.ones((4, 4), int)).astype(np.uint8)).save(buf, "PNG")
    status, out = request(server, "POST", "/api/decode", buf.getvalue())
    assert status == 200 and np.asarray(out["ids"]).shape == (SIZE, SIZE) and "32x32; resized" in out["notes"][0]
    colour = io.BytesIO()
    server.app.pipe.colorize(a_map()).save(colour, "PNG")
    status, out = request(server, "POST", "/api/decode", colour.getvalue())
    assert status == 200 and (np.asarray(out["ids"]) == a_map()).all()
    status, ex = request(server, "GET", "/api/examples")
    assert "blank" in ex["examples"]
    status, blank = request(server, "GET", "/api/examples/blank")
    assert (np.asarray(blank["ids"]) == 3).all()
    ids = a_map()
    for noise in ("ds", "edge", "random", "painter"):
        status, out = request(server, "POST", "/api/noise", dict(ids=ids.tolist(), noise=noise, seed=1))
        got = np.asarray(out["ids"])
        assert status == 200 and got.shape == (SIZE, SIZE)
        assert set(np.unique(got)) <= {MASK_ID, 0, 1, 2, 3}
    status, out = request(server, "POST", "/api/noise", dict(ids=ids.tolist(), noise="edge", seed=1))
    changed = np.asarray(out["ids"]) != ids
    assert changed.any() and (np.asarray(out["ids"])[changed] == 3).all()  # holes are the unlabeled class


GOOD = dict(ids=np.zeros((SIZE, SIZE), int).tolist(), steps=2)


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/api/jobs", b"{not json", 400, "not valid JSON"),
    ("POST", "/api/jobs", [1, 2], 400, "must be a JSON object"),
    ("POST", "/api/jobs", dict(ids=[[0] * 8] * 8), 400, "shape [8, 8]; expected 16x16"),
    ("POST", "/api/jobs", dict(ids=[[9] * SIZE] * SIZE), 400, "ids [9] outside 0..3"),
    ("POST", "/api/jobs", dict(ids=[["a"] * SIZE] * SIZE), 400, "integers only"),
    ("POST", "/api/jobs", dict(ids=[[0] * SIZE, [0]]), 400, "rectangular"),
    ("POST", "/api/jobs", dict(GOOD, num_samples=0), 400, "num_samples must be an integer in 1..8"),
    ("POST", "/api/jobs", dict(GOOD, steps=10 ** 6), 400, "steps must be an integer in 1..50"),
    ("POST", "/api/jobs", dict(GOOD, guidance_scale="x"), 400, "guidance_scale must be a number"),
    ("POST", "/api/jobs", dict(GOOD, colour=1), 400, "unknown fields ['colour']"),
    ("POST", "/api/jobs", dict(steps=2), 400, "ids is required"),
    ("POST", "/api/noise", dict(ids=GOOD["ids"], noise="blur"), 400, "noise must be one of"),
    ("POST", "/api/decode", b"GIF89a garbage", 400, "not a readable image"),
    ("GET", "/api/jobs/nope", None, 404, "no job 'nope'"),
    ("GET", "/api/examples/nope", None, 404, "no example 'nope'"),
    ("GET", "/api/nothing", None, 404, "no API endpoint"),
    ("GET", "/static/../../setup.py", None, 404, "no page"),
    ("PUT", "/api/jobs", b"{}", 405, "not allowed"),
])
def test_bad_requests_get_4xx(server, method, path, body, status, message):
    got, out = request(server, method, path, body)
    assert got == status and message in out["error"]
    assert request(server, "GET", "/api/info")[0] == 200  # still serving


def test_huge_upload_and_missing_length(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/api/decode")
    conn.putheader("Content-Length", str(MAX_BODY + 1))
    conn.endheaders()
    res = conn.getresponse()
    assert res.status == 413 and "at most" in json.loads(res.read())["error"]
    conn.close()
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/api/jobs")
    conn.endheaders()
    res = conn.getresponse()
    assert res.status == 411
    conn.close()
    assert request(server, "GET", "/api/info")[0] == 200


def test_queue_full_and_cancel(server, monkeypatch):
    app = server.app
    running, release = threading.Event(), threading.Event()
    real_run = app.run

    def held_run(job):  # the first job holds the worker until the test lets go: no race with its speed
        running.set()
        release.wait(60)
        return real_run(job)

    monkeypatch.setattr(app, "run", held_run)
    jobs = [request(server, "POST", "/api/jobs", dict(GOOD, steps=50, num_samples=8))[1]["id"]]
    assert running.wait(60)
    status, out = request(server, "POST", "/api/jobs", dict(GOOD, steps=50, num_samples=8))  # waits (queue_size=1)
    assert status == 202
    jobs.append(out["id"])
    status, refused = request(server, "POST", "/api/jobs", GOOD)
    assert status == 429 and "queue is full" in refused["error"]
    monkeypatch.setattr(app, "run", real_run)
    for job_id in reversed(jobs):
        status, out = request(server, "POST", f"/api/jobs/{job_id}/cancel")
        assert status == 200
    release.set()
    for job_id in jobs:
        job = wait(server, job_id)
        assert job["status"] == "cancelled" and job["images"] == []
    status, out = request(server, "POST", "/api/jobs", GOOD)  # the queue works again
    assert status == 202 and wait(server, out["id"])["status"] == "done"


@pytest.mark.parametrize("args, last_line", [
    (["--model_path", "/nonexistent/model000001.pt"],
     "error: --model_path /nonexistent/model000001.pt does not exist"),
    # a range is the flag table's: refused while parsing, before any checkpoint is read
    (["--model_path", "x.pt", "--port", "70000"],
     "python -m scdm.app: error: argument --port: an integer in 0..65535 expected, got '70000'"),
])
def test_cli_errors_are_one_line(args, last_line):
    from conftest import run_in_process
    p = run_in_process("scdm.app", args)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == last_line
    assert "Traceback" not in p.stderr
