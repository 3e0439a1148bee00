"""``lungedge serve``: a real server process on 127.0.0.1, a real browser, a load test, bad uploads.

The server runs the device path only (no TensorFlow is imported: checked). The model is the
third-party Coral file from ../shared with its labels. Every request goes to 127.0.0.1, bounded
in count and time.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import re
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import page_at
from memory import PeakRSS

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'lungedge[serve]')")
pytest.importorskip("multipart", reason="the serve extra is not installed (pip install 'lungedge[serve]')")

pytestmark = [pytest.mark.needs_shared, pytest.mark.slow]

LOAD_REQUESTS = 200
#: the server's resident memory may grow by at most this much over the load test (measured: 78 MiB)
MAX_RSS_GROWTH = 200 * 2**20


@pytest.fixture(scope="module")
def server(coral_dir, tmp_path_factory):
    model = coral_dir / "mobilenet_v2_1.0_224_quant.tflite"
    proc = subprocess.Popen([sys.executable, "-m", "lungedge.cli", "serve", "-m", str(model), "--labels",
                             str(coral_dir / "imagenet_labels.txt"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    line = ""
    while time.monotonic() - t0 < 60:
        line = proc.stdout.readline()
        if "http://" in line or proc.poll() is not None:
            break
    started = time.monotonic() - t0
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not m:
        proc.kill()
        pytest.fail(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    yield {"port": int(m.group(1)), "proc": proc, "started_s": started, "cat": coral_dir / "cat.bmp"}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _multipart(files):
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append((f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                      f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post(port, files, path="/api/classify", timeout=120):
    body, ctype = _multipart(files)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def get(port, path, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def alive(server) -> bool:
    status, body = get(server["port"], "/health")
    health = json.loads(body)
    assert health["tensorflow_loaded"] is False  # the device path only
    return status == 200 and health["ok"] is True


def test_upload_classifies_and_csv_downloads(server):
    assert alive(server)
    status, body = post(server["port"], [("cat.bmp", server["cat"].read_bytes())])
    assert status == 200, body
    out = json.loads(body)
    assert "cat" in out["results"][0]["label"]
    status, csv_text = get(server["port"], out["csv"])
    assert status == 200 and b"cat.bmp" in csv_text and b"model_sha256" in csv_text


def _files_near_the_server() -> set:
    import tempfile

    places = [Path.cwd(), Path(tempfile.gettempdir()), Path("/etc")]
    return {str(p) for d in places for p in d.iterdir()}


def test_bad_uploads_each_get_a_clear_error_and_the_server_stays_up(server, tmp_path):
    from images import huge_png_header

    port = server["port"]
    before = _files_near_the_server()
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * (100 * 2**20))  # 100 MB of zeros in about 100 kB
    cases = [("notes.jpg", b"this is not an image\n", "not an image"),
             ("bomb.zip", zbuf.getvalue(), "zip archive"),
             ("bomb.png", huge_png_header(), "too large"),
             ("../../etc/passwd", server["cat"].read_bytes(), "file name holds a path"),
             ("..\\..\\win.ini", server["cat"].read_bytes(), "file name holds a path")]
    status, body = post(port, [(n, d) for n, d, _ in cases] + [("cat.bmp", server["cat"].read_bytes())])
    assert status == 200, body
    results = json.loads(body)["results"]
    for (name, _, words), r in zip(cases, results):
        assert words in r.get("error", ""), (name, r)
        assert "\n" not in r["error"]
    assert "cat" in results[-1]["label"]  # the good file of the batch is still classified
    # 200 MB: refused from its declared length, before the body is read
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/api/classify")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(200 * 2**20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and b"upload too large" in r.read()
    conn.close()
    # 200 MB actually sent, without a declared length (chunked): cut off once over the limit
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    chunk = b"\0" * 2**20

    sent = [0]

    def chunks():
        yield b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.dcm\"\r\n\r\n"
        for _ in range(200):
            sent[0] += len(chunk)
            yield chunk

    try:
        conn.request("POST", "/api/classify", body=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"},
                     encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and b"upload too large" in r.read()
    except (BrokenPipeError, ConnectionResetError):
        # the server answered 413 and closed while the client was still sending: the refusal came
        # before the body did (a server that read it all would have let every byte through)
        assert sent[0] < 200 * len(chunk), f"the whole {sent[0]} bytes went through before the connection broke"
    finally:
        conn.close()
    # no path from the upload was used: nothing named like the uploads appeared where the server
    # runs or in the temporary folder
    after = _files_near_the_server()
    assert not [f for f in after - before if "passwd" in f or "win.ini" in f], sorted(after - before)
    assert alive(server)


def test_token_is_required_when_set(coral_dir):
    from starlette.testclient import TestClient

    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.serve import build_app

    clf = Classifier(coral_dir / "mobilenet_v2_1.0_224_quant.tflite", labels=str(coral_dir / "imagenet_labels.txt"))
    client = TestClient(build_app(clf, token="s3cret"), base_url="http://127.0.0.1")
    assert client.get("/").status_code == 403
    cat = (coral_dir / "cat.bmp").read_bytes()
    assert client.post("/api/classify", files={"files": ("cat.bmp", cat)}).status_code == 403
    r = client.post("/api/classify", files={"files": ("cat.bmp", cat)}, headers={"X-Lungedge-Token": "s3cret"})
    assert r.status_code == 200 and "cat" in r.json()["results"][0]["label"]
    r = client.get("/?token=s3cret", follow_redirects=False)
    assert r.status_code == 303 and "lungedge_token" in r.headers["set-cookie"]


def test_200_concurrent_uploads_all_answered_with_bounded_memory(server, fullres_dir):
    port = server["port"]
    images = [p.read_bytes() for p in sorted(fullres_dir.rglob("*.jpeg"))[:8]] + [server["cat"].read_bytes()]
    post(port, [("warm.bmp", images[-1])])
    latencies = []

    def one(i):
        t = time.perf_counter()
        status, body = post(port, [(f"img{i}.jpeg", images[i % len(images)])], timeout=300)
        latencies.append(time.perf_counter() - t)
        return i, status, body

    with PeakRSS(server["proc"].pid, every_s=0.05) as rss, concurrent.futures.ThreadPoolExecutor(LOAD_REQUESTS) as pool:
        answers = list(pool.map(one, range(LOAD_REQUESTS)))
    expected = {}
    for i, status, body in answers:
        assert status == 200, (i, status, body[:200])
        r = json.loads(body)["results"][0]
        assert r["file"] == f"img{i}.jpeg" and "label" in r, r
        expected.setdefault(i % len(images), r["label"])
        assert r["label"] == expected[i % len(images)]  # the same image gets the same answer under load
    growth = rss.peak - rss.start
    lat = np.sort(latencies) * 1e3
    print(f"\nload: {LOAD_REQUESTS} concurrent uploads, p50 {np.percentile(lat, 50):.0f} ms, "
          f"p99 {np.percentile(lat, 99):.0f} ms, server RSS {rss.start / 2**20:.0f} -> peak {rss.peak / 2**20:.0f} MiB; "
          f"started in {server['started_s']:.2f} s")
    assert growth < MAX_RSS_GROWTH, f"server memory grew by {growth / 2**20:.0f} MiB"
    assert alive(server)


@pytest.mark.browser
def test_web_page_in_headless_chromium(server, tmp_path):
    good = tmp_path / "cat.bmp"
    good.write_bytes(server["cat"].read_bytes())
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with page_at(f"http://127.0.0.1:{server['port']}/") as page:
        assert "Not a medical device" in page.inner_text("#not-a-device")
        page.set_input_files("#files", [str(good), str(bad)])
        page.click("#send")
        page.wait_for_selector("#summary", timeout=60_000)
        assert "1 classified, 1 failed" in page.inner_text("#summary")
        rows = page.locator("table.results tbody tr")
        assert rows.count() == 2
        assert "cat" in rows.nth(0).locator("td.label").inner_text()
        assert rows.nth(0).locator("img").count() >= 1  # the thumbnail
        assert "not an image" in rows.nth(1).inner_text()
        page.screenshot(path=str(tmp_path / "results.png"), full_page=True)
        href = page.get_attribute("#csv", "href")
        csv_text = page.request.get(f"http://127.0.0.1:{server['port']}{href}").text()
        assert "cat.bmp" in csv_text and "notes.png" in csv_text
