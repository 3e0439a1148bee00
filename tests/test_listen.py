"""``lungedge listen``: a real listener process on 127.0.0.1 receives DICOM images from
pynetdicom's storescu equivalent; results reach the audit log and the page (headless
Chromium); a burst, refusals and TLS. The model is the third-party Coral MobileNet v1 0.25
(128 px, fast) from ../shared, given a lungedge record that says it is for X-ray (CR/DX).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import page_at
from dicom_files import FAKE_PATIENT, make_dicom
from memory import PeakRSS

pytest.importorskip("pynetdicom", reason="the dicom extra is not installed (pip install 'lungedge[dicom]')")
pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'lungedge[serve]')")

pytestmark = [pytest.mark.needs_shared, pytest.mark.slow]

CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
BURST = 100
#: the listener's resident memory may grow by at most this much over the burst
MAX_RSS_GROWTH = 150 * 2**20


@pytest.fixture(scope="module")
def xray_model(coral_dir, tmp_path_factory) -> Path:
    from lungedge.edge_runtime.metadata import embed_spec
    from lungedge.edge_runtime.spec import ModelSpec, Preprocessing

    raw = [x.strip() for x in (coral_dir / "imagenet_labels.txt").read_text().splitlines() if x.strip()]
    labels = tuple(f"{x} {i}" if raw.count(x) > 1 else x for i, x in enumerate(raw))
    spec = ModelSpec(labels=labels, preprocessing=Preprocessing(128, 128), recipe="xray-appliance-test",
                     variant="int8", intended={"modality": "X-ray"})
    out = tmp_path_factory.mktemp("listen") / "xray.tflite"
    out.write_bytes(embed_spec((coral_dir / "mobilenet_v1_0.25_128_quant.tflite").read_bytes(), spec))
    return out


@pytest.fixture(scope="module")
def grey(coral_dir) -> np.ndarray:
    return np.asarray(Image.open(coral_dir / "cat.bmp").convert("L"))


def cr_image(grey, folder: Path, n: int, sop_class: str = CR, modality: str = "CR"):
    """A 12-bit CR dataset with its own SOP Instance UID."""
    from pydicom import dcmread

    ds = dcmread(make_dicom(grey, folder / f"img{n}.dcm", bits=12, modality=modality, uid_suffix=f"9.{n}"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    return ds


def start(model: Path, tmp: Path, *extra: str) -> dict:
    """A ``lungedge listen`` process; its DICOM and web ports."""
    audit = tmp / "audit.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "lungedge.cli", "listen", "-m", str(model), "--port", "0",
                             "--http-port", "0", "--audit-log", str(audit), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, t0 = [], time.monotonic()
    while time.monotonic() - t0 < 60 and proc.poll() is None:
        lines.append(proc.stdout.readline())
        if "lungedge serve:" in lines[-1]:
            break
    text = "".join(lines)
    dicom, web = re.search(r"DICOM \S+@127\.0\.0\.1:(\d+)", text), re.search(r"(https?)://127\.0\.0\.1:(\d+)/", text)
    if not (dicom and web):
        proc.kill()
        pytest.fail(f"listener did not start: {text!r} {proc.stderr.read()[-2000:]}")
    return {"proc": proc, "dicom": int(dicom.group(1)), "scheme": web.group(1), "web": int(web.group(2)),
            "audit": audit}


def stop(listener: dict) -> None:
    listener["proc"].terminate()
    try:
        listener["proc"].wait(timeout=15)
    except subprocess.TimeoutExpired:
        listener["proc"].kill()
        pytest.fail("the listener did not stop within 15 s of SIGTERM")


@pytest.fixture(scope="module")
def listener(xray_model, tmp_path_factory):
    running = start(xray_model, tmp_path_factory.mktemp("listener"), "--allow-ae", "SCU", "--allow-ae", "SCU2",
                    "--queue", "2")
    yield running
    stop(running)


def store(port: int, datasets, aet: str = "SCU", contexts=(CR, CT), retry_full: bool = False):
    """C-STORE ``datasets`` over one association; their statuses (None: rejected association).
    With ``retry_full``, an image answered 0xA700 (queue full) is sent again, as a modality does."""
    from pynetdicom import AE
    from pydicom.uid import ExplicitVRLittleEndian

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for c in contexts:
        ae.add_requested_context(c, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGEDGE")
    if not assoc.is_established:
        return None
    out = []
    try:
        for ds in datasets:
            tries = []
            while True:
                status = assoc.send_c_store(ds)
                tries.append(int(status.Status))
                if not (retry_full and tries[-1] == 0xA700 and len(tries) < 200):
                    break
                time.sleep(0.05)
            out.append((tries, str(status.get("ErrorComment", ""))))
    finally:
        assoc.release()
    return out


def audit_lines(listener) -> list:
    return [json.loads(x) for x in listener["audit"].read_text().splitlines()]


def test_unknown_ae_unsupported_class_and_corrupt_dataset_each_get_their_status_and_one_line(listener, grey,
                                                                                              tmp_path):
    before = len(audit_lines(listener))
    assert store(listener["dicom"], [cr_image(grey, tmp_path, 1)], aet="STRANGER") is None
    new = audit_lines(listener)[before:]
    assert len(new) == 1 and new[0]["result"] == "refused" and "'STRANGER' is not on the allow list" in new[0]["reason"]

    ct = cr_image(grey, tmp_path, 2, sop_class=CT, modality="CT")
    corrupt = cr_image(grey, tmp_path, 3)
    corrupt.PixelData = b"\0" * 10  # far fewer bytes than Rows x Columns
    good = cr_image(grey, tmp_path, 4)
    answers = store(listener["dicom"], [ct, corrupt, good])
    (ct_status, ct_why), (bad_status, bad_why), (ok_status, _) = answers
    assert ct_status == [0x0122] and "model is for CR/DX" in ct_why
    assert bad_status == [0xC000] and "cannot decode" in bad_why
    assert ok_status == [0x0000]  # the listener stays up and goes on
    new = audit_lines(listener)[before + 1:]
    assert [r["sop_instance_uid"] for r in new] == [ct.SOPInstanceUID, corrupt.SOPInstanceUID, good.SOPInstanceUID]
    assert new[0]["status"] == "0x0122" and new[1]["result"] == "error" and new[2]["result"] not in ("error", "refused")
    assert not any(v in listener["audit"].read_text() for v in FAKE_PATIENT.values())  # PHI-free by default


def test_a_burst_of_100_images_is_all_classified_and_logged(listener, grey, tmp_path):
    images = [cr_image(grey, tmp_path, 1000 + i) for i in range(BURST)]
    before = len(audit_lines(listener))
    t0 = time.perf_counter()
    with PeakRSS(listener["proc"].pid) as rss, concurrent.futures.ThreadPoolExecutor(5) as pool:
        # 5 modalities at once, against a queue of 2
        parts = list(pool.map(lambda k: store(listener["dicom"], images[k::5], aet=("SCU", "SCU2")[k % 2],
                                              retry_full=True), range(5)))
    took = time.perf_counter() - t0
    tries = [t for part in parts for t, _ in part]
    assert len(tries) == BURST and all(t[-1] == 0 for t in tries), [t for t in tries if t[-1] != 0][:5]
    full = sum(t.count(0xA700) for t in tries)
    new = audit_lines(listener)[before:]
    classified = [r["sop_instance_uid"] for r in new if r["result"] not in ("refused", "error")]
    assert sorted(classified) == sorted(ds.SOPInstanceUID for ds in images)  # each exactly once
    assert len(new) == BURST + full  # and each "queue full" answer is one line too
    print(f"\nburst: {BURST} images from 5 associations in {took:.1f} s, {full} answered 0xA700 and sent again; "
          f"listener RSS {rss.start / 2**20:.0f} -> peak {rss.peak / 2**20:.0f} MiB")
    assert rss.peak - rss.start < MAX_RSS_GROWTH


@pytest.mark.browser
def test_received_images_appear_on_the_page_without_a_reload(listener, grey, tmp_path):
    first, second = cr_image(grey, tmp_path, 201), cr_image(grey, tmp_path, 202)
    with page_at(f"http://127.0.0.1:{listener['web']}/") as page:
        assert "Not a medical device" in page.inner_text("#not-a-device")
        page.evaluate("window.notReloaded = true")
        assert [s for s, _ in store(listener["dicom"], [first, second])] == [[0], [0]]
        page.wait_for_selector(f"#worklist tr:has-text('{second.SOPInstanceUID}')", timeout=10_000)
        assert page.evaluate("window.notReloaded") is True
        rows = page.locator("#worklist table.results tbody tr")
        assert second.SOPInstanceUID in rows.nth(0).inner_text()  # newest first
        assert first.SOPInstanceUID in rows.nth(1).inner_text()
        shown = rows.nth(0).locator("td.label").inner_text().strip()  # the class, as an upload's row shows it
        assert rows.nth(0).locator("img").count() >= 1  # the thumbnail
    logged = {r.get("sop_instance_uid"): r for r in audit_lines(listener)}
    assert logged[second.SOPInstanceUID]["source"] == "listen" and logged[second.SOPInstanceUID]["result"] == shown


def test_results_go_back_as_a_basic_text_sr_referencing_the_image(xray_model, grey, tmp_path):
    from pynetdicom import AE, evt

    received = []

    def on_store(event):
        received.append(event.dataset)
        return 0x0000

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context("1.2.840.10008.5.1.4.1.1.88.11")
    server = pacs.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    running = start(xray_model, tmp_path, "--send-to", f"PACS@127.0.0.1:{server.server_address[1]}")
    try:
        image = cr_image(grey, tmp_path, 301)
        assert [s for s, _ in store(running["dicom"], [image])] == [[0]]
        t0 = time.monotonic()
        while not received and time.monotonic() - t0 < 20:
            time.sleep(0.05)
    finally:
        stop(running)
        server.shutdown()
    assert len(received) == 1, "no report reached the PACS"
    sr = received[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11" and sr.SOPInstanceUID != image.SOPInstanceUID
    assert sr.StudyInstanceUID == image.StudyInstanceUID and sr.PatientID == image.PatientID  # filed with the image
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == image.SOPInstanceUID
    text = sr.ContentSequence[0].TextValue
    logged = [r for r in audit_lines(running) if r.get("sop_instance_uid") == image.SOPInstanceUID]
    assert f"lungedge result: {logged[0]['result']} (p = " in text and "Not a medical device" in text


def _https(port: int, cafile, method: str, path: str, body=None, headers=None):
    ctx = ssl.create_default_context(cafile=str(cafile)) if cafile else ssl.create_default_context()
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read(), r.headers
    finally:
        conn.close()


def test_page_upload_and_worklist_over_https_with_the_self_signed_certificate(xray_model, coral_dir, tmp_path):
    from test_serve import _multipart

    tls = tmp_path / "tls"
    running = start(xray_model, tmp_path, "--self-signed", str(tls), "--token", "s3cret")
    try:
        assert running["scheme"] == "https" and (tls / "lungedge.crt").exists()
        assert (tls / "lungedge.key").stat().st_mode & 0o077 == 0  # the key is the service user's only
        port, token = running["web"], {"X-Lungedge-Token": "s3cret"}
        status, body, _ = _https(port, tls / "lungedge.crt", "GET", "/", headers=token)
        assert status == 200 and b"Not a medical device" in body and b'id="worklist"' in body
        status, _, headers = _https(port, tls / "lungedge.crt", "GET", "/?token=s3cret")
        assert status == 303 and "lungedge_token" in headers["set-cookie"]
        assert _https(port, tls / "lungedge.crt", "GET", "/")[0] == 403  # no token
        form, ctype = _multipart([("cat.bmp", (coral_dir / "cat.bmp").read_bytes())])
        status, body, _ = _https(port, tls / "lungedge.crt", "POST", "/api/classify", form,
                                 {"Content-Type": ctype, **token})
        assert status == 200 and "cat" in json.loads(body)["results"][0]["label"]
        upload = audit_lines(running)[-1]
        assert upload["source"] == "upload" and upload["name"] == "cat.bmp" and "cat" in upload["result"]
        status, body, _ = _https(port, tls / "lungedge.crt", "GET", "/worklist?after=0", headers=token)
        assert status == 200 and json.loads(body)["seq"] == 0
        with pytest.raises(ssl.SSLCertVerificationError):  # it is real TLS: a client that does not trust it stops
            _https(port, None, "GET", "/health")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # plain http to the https port: no page
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/health")
            conn.getresponse().read()
        conn.close()
    finally:
        stop(running)


@pytest.mark.parametrize("command", ["serve", "listen"])
def test_a_token_over_plain_http_beyond_localhost_is_refused(xray_model, command):
    base = [sys.executable, "-m", "lungedge.cli", command, "-m", str(xray_model), "--port", "0", "--host", "0.0.0.0",
            "--token", "s3cret"] + (["--http-port", "0"] if command == "listen" else [])
    run = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.startswith("error: --token over plain HTTP on 0.0.0.0"), run.stderr
    assert run.stdout == ""  # nothing was started
    proc = subprocess.Popen(base + ["--insecure"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # --insecure: the user accepted it, the page starts
        t0, line = time.monotonic(), ""
        while time.monotonic() - t0 < 60 and "lungedge serve:" not in line and proc.poll() is None:
            line = proc.stdout.readline()
        assert "http://0.0.0.0:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_classify_writes_the_audit_log_without_phi_unless_asked(xray_model, grey, tmp_path):
    image = make_dicom(grey, tmp_path / "cr.dcm", bits=12, modality="CR", uid_suffix="9.401")
    log = tmp_path / "audit.jsonl"
    base = [sys.executable, "-m", "lungedge.cli", "classify", "-m", str(xray_model), "--audit-log", str(log),
            str(image), str(tmp_path / "missing.png")]
    for extra, shown in (([], False), (["--keep-phi"], True)):
        run = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and "error: file not found" in run.stderr, run.stderr  # the missing one
        lines = [json.loads(x) for x in log.read_text().splitlines()][-2:]
        assert [r["source"] for r in lines] == ["classify", "classify"]
        assert lines[0]["sop_instance_uid"] == "1.2.826.0.1.3680043.10.1234.9.401" and lines[0]["in_domain"] is None
        assert lines[1]["result"] == "error" and "missing.png" in lines[1]["name"]
        assert all((v in json.dumps(lines)) == shown for v in FAKE_PATIENT.values()), extra
