"""Every everyday command, run as a user runs it (the installed ``lungedge`` command in a child
process), to exit 0 on tiny generated images, with its output checked; then each with bad input
(missing, empty, wrong type, damaged). No ../shared needed: this is the newcomer's proof that the
whole job works on their machine.

The images: NORMAL frames dark, PNEUMONIA frames bright with a blob (``images.make_images``), so
a from-scratch MobileNetV2 at 32 px learns them in three epochs; the learning floor still judges
every stage, so a model that did not learn fails these tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from images import make_images

pytestmark = pytest.mark.needs_tf

#: The demo's scratch recipe at 32 px on 120 easy images: after the first epoch (graph tracing) each
#: epoch takes well under a second, and validation accuracy reaches 1.0 by epoch 6 (measured); 25
#: epochs at batch 8 with the last epoch kept leave the learning floor a wide margin.
TINY = ["--recipe", "demo-scratch"] + [a for kv in ("image_size=32", "epochs=25", "patience=0", "batch_size=8",
                                                    "seed=1") for a in ("--set", kv)]


def lungedge(*args, timeout=300, env=None, cwd=None) -> subprocess.CompletedProcess:
    """The installed command, as a user types it (falls back to ``python -m lungedge``)."""
    exe = shutil.which("lungedge", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "lungedge"]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, stdin=subprocess.DEVNULL, cwd=cwd)


def assert_clean(r: subprocess.CompletedProcess) -> None:
    """No traceback and no start-up chatter from TensorFlow or LiteRT reaches the user."""
    text = r.stdout + r.stderr
    assert "Traceback" not in text, text[-3000:]
    assert "INFO: Created TensorFlow Lite" not in text, "LiteRT's INFO line reaches the user"
    assert "oneDNN" not in text, "TensorFlow's start-up lines reach the user"


def assert_one_error(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout[-1500:], r.stderr[-1500:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors, r.stderr[-1500:]
    for w in words:
        assert any(w in e for e in errors), (w, errors)
    assert_clean(r)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("cmd") / "data", per_class=60, size=40, seed=3, bad=False)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    """`lungedge train` then `lungedge convert` (a real conversion, gated), both to exit 0. The data
    folder is given relative to where train runs, and convert runs elsewhere, as users do."""
    run = tmp_path_factory.mktemp("cmd-run") / "run"
    t = lungedge("train", *TINY, "--data", data.name, "--out", run, "-q", cwd=data.parent)
    assert t.returncode == 0, t.stderr[-3000:]
    assert_clean(t)
    c = lungedge("convert", run, "--variants", "float32,int8", "--calibration", "16", "--no-bias-correction",
                 "--no-progress")
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-3000:]
    assert_clean(c)
    return {"run": run, "train": t, "convert": c}


def test_train_writes_a_run_that_learned(trained, data):
    run = trained["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    floor = metrics["learning_floor"]
    # the learning floor's own test (p < 0.01 above the majority rate) is the bound; on these
    # easy images the run measures far above it
    assert floor["status"] == "learned", floor["sentence"]
    assert floor["accuracy"] > floor["majority_rate"], floor
    # where the data was, whatever folder train ran in: convert and evaluate find the split's images
    assert Path(metrics["data"]).is_absolute() and Path(metrics["data"]).samefile(data)
    for name in ("model.keras", "spec.json", "recipe.json", "split_manifest.csv", "history.csv", "model_card.md"):
        assert (run / name).is_file(), name


def test_convert_writes_gated_files_and_a_report(trained):
    run = trained["run"]
    report = json.loads((run / "quantization_report.json").read_text())
    assert report["passed"] is True, report["verdict"]
    assert {v["variant"] for v in report["variants"]} >= {"float32", "int8"}
    assert all(v["gate"] == "passed" for v in report["variants"] if v["variant"] != "keras"), report["variants"]
    assert (run / "model_int8.tflite").is_file() and (run / "model_float32.tflite").is_file()
    assert "ship" in trained["convert"].stdout.lower()


def test_inspect_classify_and_evaluate_the_converted_file(trained, data, tmp_path):
    model = trained["run"] / "model_int8.tflite"
    r = lungedge("inspect", "--json", model)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert json.dumps(info).count("PNEUMONIA") >= 1
    images = sorted((data / "PNEUMONIA").iterdir())[:3] + sorted((data / "NORMAL").iterdir())[:3]
    r = lungedge("classify", "--json", "-m", model, *images)
    assert r.returncode == 0, r.stderr
    assert_clean(r)
    rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")] or json.loads(r.stdout)
    labels = [row["label"] for row in rows]
    assert labels.count("PNEUMONIA") >= 2 and labels.count("NORMAL") >= 2, labels
    assert all(row["in_domain"] is True and row["domain_score"] <= row["domain_threshold"] for row in rows), rows
    out = tmp_path / "eval.json"
    r = lungedge("evaluate", "-m", model, "-d", data, "--json", "--out", out)
    assert_clean(r)
    result = json.loads(out.read_text())
    gate = result["domain"]
    # images like the training images: the gate refuses few (its threshold is the validation
    # images' conformal 99th percentile); any refusal makes the exit code 1 (one rule)
    assert gate["gate"] == "on" and gate["coverage"] >= 0.95, {k: gate[k] for k in ("refused", "accepted")}
    assert r.returncode == (1 if gate["refused"] else 0), (gate["refused"], r.stderr[-500:])
    assert result["accuracy"] >= 0.75 and gate["all_images"]["accuracy"] >= 0.75


def test_images_the_model_was_not_built_for_are_refused_in_every_output(trained, data, tmp_path):
    """Frames the checks before the model refuse (blank, saturated, tiny, far too wide), and a real
    image through a copy of the file whose gate threshold is set below every score (the score
    stage): each OUT OF DOMAIN with its reason and no class in text, --json and --report; exit
    code 1; --allow-out-of-domain answers and marks them. (Which real images the score refuses is
    measured on real data: tests/test_domain.py, docs/DOMAIN.md.)"""
    from PIL import Image

    from lungedge.edge_runtime.metadata import embed_spec, read_spec

    model = trained["run"] / "model_int8.tflite"
    white = np.full((128, 128), 255, np.uint8)
    white[60:66, 60:66] = 30  # a failed exposure: all white but a speck
    odd = {"blank.png": (np.zeros((128, 128), np.uint8), "blank or near-constant frame"),
           "white.png": (white, "saturated frame"),
           "tiny.png": (np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8), "too small"),
           "wide.png": (np.tile(np.linspace(0, 255, 1000, dtype=np.uint8), (60, 1)), "aspect ratio")}
    for name, (a, _) in odd.items():
        Image.fromarray(a).save(tmp_path / name)
    real = sorted((data / "NORMAL").iterdir())[0]
    paths = [tmp_path / n for n in odd] + [real]
    r = lungedge("classify", "-m", model, *paths)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = {name: next(ln for ln in r.stdout.splitlines() if f"{name} " in ln) for name in list(odd) + [real.name]}
    for name, (_, reason) in odd.items():
        line = lines[name]
        assert "OUT OF DOMAIN" in line and reason in line and "NORMAL" not in line and "PNEUMONIA" not in line, line
    assert "OUT OF DOMAIN" not in lines[real.name] and "4 refused (out of domain)" in r.stdout + r.stderr
    r = lungedge("classify", "--json", "-m", model, *paths)
    rows = {Path(row["source"]).name: row for row in map(json.loads, r.stdout.splitlines())}
    for name in odd:
        row = rows[name]
        assert row["in_domain"] is False and row["domain_reason"] and "label" not in row, row
        assert row["domain_threshold"] > 0
    assert rows[real.name]["in_domain"] is True and rows[real.name]["label"] in ("NORMAL", "PNEUMONIA")
    r = lungedge("classify", "--json", "--allow-out-of-domain", "-m", model, *paths)
    assert r.returncode == 0, r.stderr
    rows = {Path(row["source"]).name: row for row in map(json.loads, r.stdout.splitlines())}
    assert all(rows[n]["in_domain"] is False and rows[n]["label"] in ("NORMAL", "PNEUMONIA") for n in odd), rows
    r = lungedge("classify", "-m", model, "--report", tmp_path / "report", *paths)
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("OUT OF DOMAIN") == len(odd) and "4 refused" in page
    assert (tmp_path / "report" / "results.csv").read_text().count("OUT OF DOMAIN") == len(odd)
    # the score stage: the same file with its threshold below any score refuses the real image
    raw = model.read_bytes()
    spec = read_spec(raw)
    strict = tmp_path / "strict.tflite"
    strict.write_bytes(embed_spec(raw, spec.replace(domain=type(spec.domain)(**{**spec.domain.__dict__,
                                                                                  "threshold": 1e-9}))))
    r = lungedge("classify", "--json", "-m", strict, real)
    row = json.loads(r.stdout)
    assert r.returncode == 1 and row["in_domain"] is False and "label" not in row, row
    assert row["domain_score"] > row["domain_threshold"] and "unlike the images" in row["domain_reason"], row


def test_bench_measures_both_files(trained, data, tmp_path):
    run = trained["run"]
    r = lungedge("bench", run / "model_float32.tflite", run / "model_int8.tflite", "--images", data / "NORMAL",
                 "--threads", "1", "--runs", "3", "--warmup", "1", "-d", data, "-o", tmp_path / "bench")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert_clean(r)
    report = json.loads((tmp_path / "bench" / "bench_report.json").read_text())
    assert [m["status"] for m in report["models"]] == ["ok", "ok"], report["models"]


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_ships_a_file(data, tmp_path):
    """The whole job in one command (train, convert, bench, evaluate, index): the same stages the
    fast tests above run one command at a time, so this one runs with --full."""
    out = tmp_path / "report"
    r = lungedge("pipeline", *TINY, "--data", data, "--out", out, "--variants",
                 "float32,int8", "--calibration", "16", "--bench-runs", "3", "--bench-threads", "1",
                 "--no-bias-correction")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_clean(r)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["passed"] * len(summary["stages"]), summary["stages"]
    assert summary["ship"] in ("float32", "int8") and (out / "run" / f"model_{summary['ship']}.tflite").is_file()
    assert summary["shipped"]["learning_floor"]["status"] == "learned"
    assert (out / "index.html").is_file()
    # --resume: the complete training run is kept, the later stages run again
    trained_at = (out / "run" / "model.keras").stat().st_mtime_ns
    r = lungedge("pipeline", *TINY, "--data", data, "--out", out, "--variants", "float32,int8",
                 "--calibration", "16", "--bench-runs", "1", "--bench-threads", "1", "--no-bias-correction",
                 "--resume")
    assert r.returncode == 0 and "already complete" in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "run" / "model.keras").stat().st_mtime_ns == trained_at
    assert json.loads((out / "summary.json").read_text())["ship"] == summary["ship"]


def test_serve_answers_an_upload_of_a_generated_image(trained, data):
    pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'lungedge[serve]')")
    import http.client
    import uuid

    exe = shutil.which("lungedge", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "lungedge"]
    proc = subprocess.Popen(cmd + ["serve", "-m", str(trained["run"] / "model_int8.tflite"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0, line = time.monotonic(), ""
        while time.monotonic() - t0 < 60:
            line = proc.stdout.readline()
            if "http://" in line or proc.poll() is not None:
                break
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, (line, proc.poll())
        image = sorted((data / "PNEUMONIA").iterdir())[0]
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{image.name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + image.read_bytes() + \
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"junk.jpeg\"\r\n" \
            f"Content-Type: application/octet-stream\r\n\r\nnot an image\r\n--{boundary}--\r\n".encode()
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=60)
        conn.request("POST", "/api/classify", body=body,
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        resp = conn.getresponse()
        status, payload = resp.status, json.loads(resp.read())
        conn.close()
        assert status == 200, payload
        results = payload["results"]
        ok = [r for r in results if "label" in r]
        bad = [r for r in results if "error" in r]
        assert [r["label"] for r in ok] == ["PNEUMONIA"], results
        assert len(bad) == 1 and "junk.jpeg" in bad[0]["error"], results
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        err = proc.stderr.read()
    assert "Traceback" not in err and "INFO: Created TensorFlow Lite" not in err, err[-2000:]


# ----- bad input: one error line naming what was wrong, the exit code of the one rule -----


def test_missing_run_folder_is_exit_1_for_every_command(tmp_path):
    """A run folder or model that is not there is an input that could not be used: exit 1."""
    missing = tmp_path / "no-such-run"
    for args in (["convert", missing], ["evaluate", "-m", missing, "-d", tmp_path],
                 ["inspect", missing], ["classify", "-m", missing, tmp_path / "x.png"]):
        r = lungedge(*args)
        assert_one_error(r, 1, str(missing.name))


def test_train_and_pipeline_refuse_missing_empty_and_wrong_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_dir = tmp_path / "file.txt"
    not_dir.write_text("not a folder")
    one_class = tmp_path / "one"
    make_images(tmp_path / "two", per_class=4, size=32, bad=False)
    (one_class / "NORMAL").mkdir(parents=True)
    for f in sorted((tmp_path / "two" / "NORMAL").iterdir()):
        shutil.copy(f, one_class / "NORMAL" / f.name)
    # data that cannot be used is an input error (1); a wrong option or name is a usage error (2)
    for i, (folder, words) in enumerate(((tmp_path / "nowhere", "nowhere"), (not_dir, "file.txt"), (empty, "empty"),
                                         (one_class, "one"))):
        assert_one_error(lungedge("train", *TINY, "--data", folder, "--out", tmp_path / f"o{i}"), 1, words)
    r = lungedge("pipeline", "--recipe", "no-such-recipe", "--data", tmp_path / "two", "--out", tmp_path / "o5")
    assert_one_error(r, 2, "no-such-recipe")


def test_convert_refuses_a_damaged_run_folder(trained, tmp_path):
    """In this process (TensorFlow is loaded once for the suite): the command's own code path."""
    from click.testing import CliRunner

    from lungedge.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(trained["run"], broken)
    (broken / "model.keras").write_bytes(b"PK\x03\x04 damaged")
    r = CliRunner().invoke(main, ["convert", str(broken), "--variants", "float32", "--no-progress"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), r.output[-2000:]
    assert "model.keras" in lines[0]
    spec_gone = tmp_path / "nospec"
    shutil.copytree(trained["run"], spec_gone)
    (spec_gone / "spec.json").unlink()
    r = CliRunner().invoke(main, ["convert", str(spec_gone), "--variants", "float32", "--no-progress"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "spec.json" in lines[0], r.output[-2000:]


def test_classify_inspect_bench_on_damaged_models_and_images(trained, tmp_path):
    model = trained["run"] / "model_int8.tflite"
    damaged = tmp_path / "damaged.tflite"
    damaged.write_bytes(model.read_bytes()[: len(model.read_bytes()) // 3])
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(b"")
    text = tmp_path / "model.tflite.txt"
    text.write_text("hello")
    for bad in (damaged, empty, text):
        assert_one_error(lungedge("inspect", bad), 1, bad.name)
        assert_one_error(lungedge("classify", "-m", bad, tmp_path / "x.png"), 1, bad.name)
    r = lungedge("bench", damaged, "--runs", "2", "--warmup", "1", "-o", tmp_path / "b")
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stderr[-2000:]
    junk = tmp_path / "junk.jpeg"
    junk.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    empty_img = tmp_path / "empty.png"
    empty_img.write_bytes(b"")
    r = lungedge("classify", "-m", model, junk, empty_img, tmp_path / "missing.png")
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 3 and all(any(n in e for e in errors) for n in ("junk.jpeg", "empty.png", "missing.png"))
    assert_clean(r)


@pytest.mark.needs_tf
@pytest.mark.slow  # 22-34 s: TFLM on every test image and g++ on a 3 MB source; `convert` itself is in the fast suite
def test_convert_micro_verifies_in_tflm_and_writes_c_sources_that_compile_and_agree(trained, data, tmp_path):
    """`lungedge convert --variants micro`: TFLM runs the file (tflite-micro), its class output
    equals LiteRT's reference kernels' within one step on every test image and its decisions
    LiteRT's, the arena is TFLM's own figure, and the C sources compile with g++ -std=c++17; a
    harness built on model_settings.h gives the Python runtime's model inputs, frame checks and
    decisions exactly."""
    pytest.importorskip("tflite_micro")
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ to compile the generated sources")
    from lungedge.edge_runtime.decision import decide, output_probabilities
    from lungedge.edge_runtime.domain import check_frame
    from lungedge.edge_runtime.metadata import read_spec
    from lungedge.edge_runtime.preprocess import load_pixels, normalize
    from lungedge.edge_runtime.quant import quantize

    from lungedge.train.recipes import get_recipe

    # the run as the micro recipe would have written it: its domain score reads the layers that
    # recipe declares (several, summed in the graph), and TFLM must give LiteRT's score for that graph
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    recipe = json.loads((run / "recipe.json").read_text())
    layers = list(get_recipe("xray-pneumonia-micro").domain_layers)
    assert len(layers) >= 2
    (run / "recipe.json").write_text(json.dumps({**recipe, "domain_layers": layers}))
    out = tmp_path / "micro-run"
    r = lungedge("convert", run, "--variants", "micro", "--calibration", "16", "--no-bias-correction",
                 "--out", out, "--no-progress")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_clean(r)
    assert re.search(r"micro micro: \d+ KiB model, TFLM arena \d+ KiB .* in TFLM on \d+ test images: accuracy", r.stdout), r.stdout
    model = out / "model_micro.tflite"
    micro = out / "micro"
    report = json.loads((micro / "micro_report.json").read_text())
    conv = json.loads((out / "quantization_report.json").read_text())
    row = next(v for v in conv["variants"] if v["variant"] == "micro")
    assert row["gate"] == "passed" and row["micro"]["comparison"] == report["comparison"]
    assert conv["domain_fit"]["layer"] == "+".join(layers), conv["domain_fit"]
    c = report["comparison"]
    # both outputs within one step of LiteRT's reference kernels (the score too: built from SUB, MUL
    # and FULLY_CONNECTED, whose TFLM kernels give LiteRT's numbers)
    assert c["images"] == row["n"] and c["max_steps"]["reference"]["classes"] <= 1, c
    assert c["max_steps"]["reference"].get("domain_score", 0) <= 1, c
    agree = c["agreement_with_xnnpack"]
    assert agree["class"] >= 0.9 and agree["in_domain"] >= 0.9, c
    # TFLM's own answers passed the same gate as LiteRT's
    assert report["tflm_metrics"]["accuracy"] >= row["accuracy"] - 0.1, report["tflm_metrics"]
    data_bytes = model.read_bytes()
    assert report["model_bytes"] == len(data_bytes)
    assert report["arena"]["header_bytes"] >= report["arena"]["measured_total"] > 0
    assert "CONV_2D" in report["operators"] and "AddConv2D" in report["resolver"]
    # the C array holds the file's bytes, the header its length
    cc = (micro / "model_data.cc").read_text()
    body = cc[cc.index("{") + 1 : cc.index("};")]
    assert bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})", body)) == data_bytes
    assert f"g_lungedge_model_len = {len(data_bytes)};" in cc and "alignas(16)" in cc
    ops_h = (micro / "model_ops.h").read_text()
    assert all(f"resolver.{m}()" in ops_h for m in report["resolver"])
    assert f"MicroMutableOpResolver<kNumOperators>" in ops_h and f"kNumOperators = {len(report['resolver'])}" in ops_h
    # compiles: the data file alone, and a harness over model_settings.h (no TFLM headers needed)
    build = tmp_path / "build"
    build.mkdir()
    for args in (["-c", str(micro / "model_data.cc"), "-o", str(build / "model_data.o")],
                 [f"-I{micro}", str(Path(__file__).parent / "micro" / "harness.cc"), "-o", str(build / "harness")]):
        cc_run = subprocess.run([gxx, "-std=c++17", "-Wall", "-Werror", *args], capture_output=True, text=True, timeout=300)
        assert cc_run.returncode == 0, cc_run.stderr[-3000:]
    # the same frames through Python and through the harness
    spec = read_spec(data_bytes)
    pre = spec.preprocessing
    images = sorted(p for p in data.rglob("*.png"))[:12]
    frames = [load_pixels(p, pre) for p in images]
    rng = np.random.default_rng(0)
    frames += [np.full((pre.height, pre.width, pre.channels), 128, np.uint8),
               rng.integers(0, 256, (pre.height, pre.width, pre.channels), dtype=np.uint8),
               np.zeros((pre.height, pre.width, pre.channels), np.uint8)]
    (build / "frames.bin").write_bytes(b"".join(f.tobytes() for f in frames))
    from ai_edge_litert.interpreter import Interpreter

    lite = Interpreter(model_content=data_bytes)
    lite.allocate_tensors()
    inp, outs = lite.get_input_details()[0], lite.get_output_details()
    cls = outs[c["class_output"]]
    scale, zero = inp["quantization"]
    want_inputs, rows = [], []
    for f in frames:
        q = quantize(normalize(f, pre), scale, zero, np.int8)
        want_inputs.append(q)
        lite.set_tensor(inp["index"], q[None])
        lite.invoke()
        rows.append(lite.get_tensor(cls["index"]).reshape(-1).astype(np.int8))
    (build / "rows.bin").write_bytes(b"".join(r.tobytes() for r in rows))
    h = subprocess.run([str(build / "harness"), str(build / "frames.bin"), str(build / "inputs.bin"),
                        str(build / "rows.bin")], capture_output=True, text=True, timeout=120)
    assert h.returncode == 0, h.stderr
    got_inputs = np.frombuffer((build / "inputs.bin").read_bytes(), np.int8).reshape(len(frames), -1)
    np.testing.assert_array_equal(got_inputs, np.stack([q.reshape(-1) for q in want_inputs]))
    lines = dict(((kind, int(k)), int(v)) for kind, k, v in (ln.split() for ln in h.stdout.splitlines() if ln.count(" ") == 2))
    s_cls, z_cls = cls["quantization"]
    for k, row_q in enumerate(rows):
        probs = output_probabilities((row_q.astype(np.float64) - z_cls) * s_cls, spec.output, spec.temperature)
        assert lines[("row", k)] == int(decide(probs[None], spec.labels, spec.threshold)[0]), k
    gate = spec.domain
    assert gate is not None, "the tiny run's file should carry the domain gate"
    for k, f in enumerate(frames):
        reason = check_frame(f, structure_floor=gate.structure_floor, saturation_limit=gate.saturation_limit)
        code = lines[("frame", k)]
        assert (code == 0) == (reason is None), (k, code, reason)
    assert [lines[("frame", k)] for k in range(len(frames) - 3, len(frames))][0] == 1  # the grey frame is blank
    assert lines[("frame", len(frames) - 1)] in (1, 2)  # the black frame: blank (and saturated)
    # the example application names the operators' header, the arena and the example image
    main_cc = (micro / "main.cc").read_text()
    assert "lungedge::kTensorArenaSize" in main_cc and "kExampleImage" in main_cc and "RegisterOps" in main_cc
