"""Seeded fuzz harness for the device path: mutated models, crafted images, odd files.

Every case runs the real command line (``python -m lungedge.cli classify|inspect|evaluate``) in
a child process with a timeout and a memory limit, and is judged by these rules:

- no Python traceback;
- no death by a signal (a native abort) without an ``error:`` line;
- no hang (the timeout);
- exit codes by the rule: 0 all classified, 1 a model or an input could not be used (never 2:
  the command lines built here are always well-formed), every ``error:`` line names its file;
- good files still classified (the unmutated model and images are controls).

Usage::

    python benchmarks/fuzz_device.py                      # CI size (about 60 runs)
    python benchmarks/fuzz_device.py --size 2000          # on demand (or LUNGEDGE_FUZZ_SIZE=2000)
    python benchmarks/fuzz_device.py --code /path/to/old/checkout   # judge another checkout
    python benchmarks/fuzz_device.py --json results.json

Needs ``../shared/models/coral_mobilenet_v2_quant`` (a third-party model to mutate) and
``ai-edge-litert`` (its flatbuffer schema builds the mutated models). Exit code 0 when every
case was clean, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUNGEDGE_SHARED", ROOT.parent / "shared"))
CORAL = SHARED / "models/coral_mobilenet_v2_quant"
BASE_MODEL = "mobilenet_v1_0.25_128_quant.tflite"
CI_SIZE = 60
CLASSES = ("models", "images", "odd")
MEMORY_LIMIT = 4 << 30   # address-space limit of each child: a runaway read ends, it does not swap
RSS_FLAG = 1 << 30        # a case whose child peaked above this is reported under "memory"


@dataclass
class Case:
    cls: str                      # models / images / odd
    kind: str                     # what was done, e.g. "op-output-index"
    argv: List[str]               # arguments after ``lungedge``
    expect_names: List[str]       # files each of which must be reported (result or named error)
    control: bool = False         # a good file: must be classified (exit 0)
    edge_only: bool = False       # run as on a device: TensorFlow and Keras do not import


@dataclass
class Outcome:
    case: Case
    verdict: str                  # clean / traceback / signal / hang / other
    detail: str = ""
    seconds: float = 0.0
    max_rss_mb: float = 0.0
    returncode: Optional[int] = None


# ---- models --------------------------------------------------------------------------------
def _schema():
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    return flatbuffers, schema


def pack(model) -> bytes:
    flatbuffers, _ = _schema()
    b = flatbuffers.Builder(1 << 20)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def unpack(data: bytes):
    _, schema = _schema()
    return schema.ModelT.InitFromPackedBuf(bytearray(data), 0)


def with_raw_metadata(data: bytes, name: str, payload: bytes, copies: int = 1) -> bytes:
    """``data`` with ``copies`` metadata entries ``name`` -> ``payload`` (no validation at all)."""
    _, schema = _schema()
    m = unpack(data)
    buf = schema.BufferT()
    buf.data = np.frombuffer(payload, np.uint8).copy()
    m.buffers.append(buf)
    m.metadata = [x for x in (m.metadata or []) if (x.name.decode() if isinstance(x.name, bytes) else x.name) != name]
    for _ in range(copies):
        e = schema.MetadataT()
        e.name = name
        e.buffer = len(m.buffers) - 1
        m.metadata.append(e)
    return pack(m)


def with_metadata_flood(data: bytes, copies: int) -> bytes:
    """``data`` with ``copies`` metadata entries, each under its own name and all pointing at the
    largest buffer (the weights): a small file that costs a runtime ``copies`` times that buffer
    if it copies each entry's bytes at load."""
    _, schema = _schema()
    m = unpack(data)
    largest = max(range(len(m.buffers)), key=lambda i: 0 if m.buffers[i].data is None else len(m.buffers[i].data))
    m.metadata = list(m.metadata or [])
    for i in range(copies):
        e = schema.MetadataT()
        e.name = f"flood_{i}"
        e.buffer = largest
        m.metadata.append(e)
    return pack(m)


def _graph(m):
    return m.subgraphs[0]


def mutate_model(base: bytes, rng: random.Random):
    """One structural mutation that keeps the file a valid flatbuffer: (kind, bytes)."""
    for _ in range(50):
        try:
            return _mutate_once(base, rng)
        except (TypeError, ValueError, OverflowError, struct.error):  # a value the field cannot hold
            continue
    raise RuntimeError("no packable mutation found")


def _mutate_once(base: bytes, rng: random.Random):
    m = unpack(base)
    g = _graph(m)
    nt, nops, nbuf = len(g.tensors), len(g.operators), len(m.buffers)
    kinds = ["op-input-index", "op-output-index", "graph-io-index", "tensor-buffer-index", "tensor-shape",
             "tensor-type", "quant-scale", "quant-zero-point", "opcode-index", "builtin-code",
             "builtin-option", "buffer-data", "subgraph-count", "bytes-flip", "bytes-truncate"]
    kind = rng.choice(kinds)
    pick_index = lambda n: rng.choice([rng.randrange(n), rng.randrange(n), -1, n, n + rng.randrange(1, 1000), -2])
    if kind == "op-input-index":
        op = g.operators[rng.randrange(nops)]
        op.inputs[rng.randrange(len(op.inputs))] = pick_index(nt)
    elif kind == "op-output-index":
        op = g.operators[rng.randrange(nops)]
        op.outputs[rng.randrange(len(op.outputs))] = pick_index(nt)
    elif kind == "graph-io-index":
        vec = g.inputs if rng.random() < 0.5 else g.outputs
        vec[0] = pick_index(nt)
    elif kind == "tensor-buffer-index":
        g.tensors[rng.randrange(nt)].buffer = rng.choice([rng.randrange(nbuf), rng.randrange(nbuf), 0, nbuf,
                                                          nbuf + rng.randrange(1, 1000), (1 << 32) - 1])
    elif kind == "tensor-shape":
        t = g.tensors[rng.randrange(nt)]
        if t.shape is not None and len(t.shape):
            t.shape[rng.randrange(len(t.shape))] = rng.choice([0, -1, 1, 3, 7, 1 << 20, 1 << 30, -7])
    elif kind == "tensor-type":
        g.tensors[rng.randrange(nt)].type = rng.randrange(0, 20)
    elif kind in ("quant-scale", "quant-zero-point"):
        qs = [t for t in g.tensors if t.quantization is not None and t.quantization.scale is not None]
        t = rng.choice(qs)
        q = t.quantization
        if kind == "quant-scale":
            q.scale = np.asarray(q.scale, np.float32).copy()
            choice = rng.choice(["nan", "inf", "zero", "neg", "drop", "empty"])
            if choice == "drop":
                t.quantization = None
            elif choice == "empty":
                q.scale = np.zeros(0, np.float32)
            else:
                q.scale[rng.randrange(len(q.scale))] = {"nan": np.nan, "inf": np.inf, "zero": 0.0, "neg": -1.0}[choice]
        else:
            q.zeroPoint = np.asarray(q.zeroPoint, np.int64).copy()
            q.zeroPoint[rng.randrange(len(q.zeroPoint))] = rng.choice([1 << 40, -(1 << 40), 300, -300])
    elif kind == "opcode-index":
        g.operators[rng.randrange(nops)].opcodeIndex = rng.choice([len(m.operatorCodes), 1 << 20, rng.randrange(len(m.operatorCodes))])
    elif kind == "builtin-code":
        oc = m.operatorCodes[rng.randrange(len(m.operatorCodes))]
        code = rng.randrange(0, 210)
        oc.builtinCode = code
        oc.deprecatedBuiltinCode = min(code, 127)
    elif kind == "builtin-option":
        op = g.operators[rng.randrange(nops)]
        opts = op.builtinOptions
        if opts is not None:
            ints = [k for k, v in vars(opts).items() if isinstance(v, int) and not isinstance(v, bool)]
            if ints:
                setattr(opts, rng.choice(ints), rng.choice([0, -1, 1 << 20, 3, 127]))
    elif kind == "buffer-data":
        with_data = [i for i, b in enumerate(m.buffers) if b.data is not None and len(b.data) > 8]
        b = m.buffers[rng.choice(with_data)]
        b.data = np.asarray(b.data, np.uint8)[: rng.choice([0, 1, len(b.data) // 2, len(b.data) - 1])].copy()
    elif kind == "subgraph-count":
        m.subgraphs = [] if rng.random() < 0.5 else m.subgraphs + [copy.deepcopy(g)]
    out = pack(m)
    if kind == "bytes-flip":
        arr = bytearray(base)
        for _ in range(rng.randrange(1, 8)):
            i = rng.randrange(len(arr))
            arr[i] ^= 1 << rng.randrange(8)
        out = bytes(arr)
    elif kind == "bytes-truncate":
        out = base[: rng.randrange(8, len(base))]
    return kind, out


METADATA_CASES = {
    "threshold-number": {"threshold": 0.5},
    "threshold-list": {"threshold": [0.5]},
    "threshold-string": {"threshold": "PNEUMONIA"},
    "preprocessing-list": {"preprocessing": [128, 128]},
    "preprocessing-string": {"preprocessing": "rgb"},
    "preprocessing-null": {"preprocessing": None},
    "labels-number": {"labels": 7},
    "labels-nested": {"labels": [["a"], ["b"]]},
    "versions-list": {"versions": [1, 2]},
    "height-bool": {"preprocessing": {"height": True, "width": 128}},
    "mean-string": {"preprocessing": {"height": 128, "width": 128, "mean": "abc"}},
    "threshold-value-nan": {"threshold": {"label": "a", "value": float("nan")}},
}


def metadata_cases(base: bytes, labels: Sequence[str]) -> Dict[str, bytes]:
    good = {"labels": list(labels), "preprocessing": {"height": 128, "width": 128}}
    out = {}
    for name, change in METADATA_CASES.items():
        rec = {**good, **change}
        out["meta-" + name] = with_raw_metadata(base, "lungedge", json.dumps(rec).encode())
    out["meta-deep-nesting"] = with_raw_metadata(base, "lungedge", b"[" * 50000 + b"]" * 50000)
    out["meta-not-object"] = with_raw_metadata(base, "lungedge", b"42")
    out["meta-not-utf8"] = with_raw_metadata(base, "lungedge", b"\xff\xfe{}")
    out["meta-5000-entries"] = with_raw_metadata(base, "junk", os.urandom(1 << 16), copies=5000)
    return out


# ---- images --------------------------------------------------------------------------------
def _gray(rng: np.random.Generator, w=96, h=80) -> np.ndarray:
    x = np.linspace(0, 255, w)[None, :] * np.ones((h, 1))
    return np.clip(x + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)


def good_images(rng: np.random.Generator) -> Dict[str, bytes]:
    """One small good image per allowed format."""
    g = _gray(rng)
    rgb = Image.fromarray(np.stack([g, np.roll(g, 5, 1), 255 - g], -1))
    out = {}
    for ext, fmt, img, kw in (("jpg", "JPEG", rgb, {"quality": 90}), ("png", "PNG", rgb, {}),
                              ("bmp", "BMP", rgb, {}), ("tif", "TIFF", rgb, {}), ("webp", "WEBP", rgb, {}),
                              ("gif", "GIF", rgb.convert("P"), {}), ("ppm", "PPM", rgb, {}),
                              ("pgm", "PPM", Image.fromarray(g), {})):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[ext] = buf.getvalue()
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def big_png(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    """A small file that decodes to width x height pixels (zeros, compressed)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\x00" + b"\x00" * (width * channels * bit_depth // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def crafted_images(rng: np.random.Generator) -> Dict[str, bytes]:
    """Hand-made hard cases: other formats under image names, bombs, multi-frame, odd modes."""
    g = _gray(rng)
    out = {
        "postscript.png": b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n",
        "eps.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "png-16bit-9000.png": big_png(9000, 9000, 16, 0),
        "png-rgba-9000.png": big_png(9000, 9000, 8, 6),
        "png-95mp.png": big_png(10000, 9500, 8, 0),
        "png-12000.png": big_png(12000, 12000, 8, 0),
    }
    for name, fmt in (("animated.gif", "GIF"), ("multipage.tif", "TIFF"), ("animated.webp", "WEBP")):
        frames = [Image.fromarray(np.roll(g, k, 1)).convert("RGB" if fmt != "GIF" else "P") for k in range(3)]
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
        out[name] = buf.getvalue()
    for mode, arr in (("F", g.astype(np.float32) / 7), ("I;16", g.astype(np.uint16) * 200),
                      ("I", g.astype(np.int32) - 100), ("CMYK", None), ("1", None), ("LAB", None)):
        img = Image.fromarray(arr, mode) if arr is not None and mode != "I;16" else (
            Image.fromarray(arr) if arr is not None else Image.fromarray(np.stack([g] * 3, -1)).convert(mode))
        buf = io.BytesIO()
        try:
            img.save(buf, "TIFF")
            out[f"mode-{mode.replace(';', '')}.tif"] = buf.getvalue()
        except Exception:
            pass
    for name, fmt in (("icon.png", "ICO"), ("pcx.bmp", "PCX"), ("tga.jpg", "TGA"), ("sgi.png", "SGI")):
        buf = io.BytesIO()
        Image.fromarray(np.stack([g] * 3, -1)).save(buf, fmt)
        out[name] = buf.getvalue()
    nan_f = np.full((20, 20), np.nan, np.float32)
    buf = io.BytesIO()
    Image.fromarray(nan_f, "F").save(buf, "TIFF")
    out["nan.tif"] = buf.getvalue()
    return out


def mutate_image(data: bytes, rng: random.Random) -> bytes:
    arr = bytearray(data)
    how = rng.choice(["flip", "flip", "header", "truncate", "splice"])
    if how == "flip":
        for _ in range(rng.randrange(1, 16)):
            i = rng.randrange(len(arr))
            arr[i] = rng.randrange(256)
    elif how == "header":
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(min(len(arr), 64))
            arr[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    elif how == "truncate":
        arr = arr[: rng.randrange(1, len(arr))]
    else:
        i, j = sorted(rng.randrange(len(arr)) for _ in range(2))
        arr = arr[:i] + arr[j:] + arr[i:j]
    return bytes(arr)


# ---- building the corpus -------------------------------------------------------------------
def build_labels(path: Path) -> List[str]:
    """ImageNet's label file with repeated names made distinct (as the runtime does)."""
    raw = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    seen, labels = set(), []
    for i, n in enumerate(raw):
        labels.append(n if n not in seen else f"{n} [{i}]")
        seen.add(n)
    return labels


def build_cases(work: Path, size: int, seed: int, classes: Sequence[str]) -> List[Case]:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    base = (CORAL / BASE_MODEL).read_bytes()
    labels_file = CORAL / "imagenet_labels.txt"
    cat = CORAL / "cat.bmp"
    labels = build_labels(labels_file)
    models = work / "models"
    images = work / "images"
    odd = work / "odd"
    for d in (models, images, odd):
        d.mkdir(parents=True, exist_ok=True)
    base_path = models / "base.tflite"
    base_path.write_bytes(base)
    data_dir = work / "data"
    for cls in ("Egyptian cat", "tabby, tabby cat"):
        (data_dir / cls).mkdir(parents=True, exist_ok=True)
    (data_dir / "Egyptian cat" / "a.bmp").write_bytes(cat.read_bytes())
    (data_dir / "tabby, tabby cat" / "b.bmp").write_bytes(cat.read_bytes())
    with_labels = ["--labels", str(labels_file)]
    cases: List[Case] = []
    share = {"models": 0.5, "images": 0.35, "odd": 0.15}
    total = sum(share[c] for c in classes)
    n_of = {c: max(1, int(round(size * share[c] / total))) for c in classes}

    def model_case(kind, path, control=False):
        cmd = rng.choices(["classify", "inspect", "evaluate"], [6, 2, 2])[0]
        if cmd == "classify":
            argv = ["classify", "--model", str(path), *with_labels, "--json", str(cat)]
        elif cmd == "inspect":
            argv = ["inspect", str(path), *with_labels]
        else:
            argv = ["evaluate", "--model", str(path), *with_labels, "--data", str(data_dir)]
        return Case("models", kind, argv, [path.name], control=control)

    if "models" in classes:
        cases.append(model_case("control", base_path, control=True))
        specials = metadata_cases(base, labels)
        special_items = list(specials.items())
        for i in range(n_of["models"] - 1):
            if i % 3 == 0 and i // 3 < len(special_items):
                kind, data = special_items[i // 3]
                p = models / f"m{i:05d}.tflite"
                p.write_bytes(data)
                argv = ["classify", "--model", str(p), "--json", str(cat)]
                cases.append(Case("models", kind, argv, [p.name]))
                continue
            kind, data = mutate_model(base, rng)
            p = models / f"m{i:05d}.tflite"
            p.write_bytes(data)
            cases.append(model_case(kind, p))

    if "images" in classes:
        goods = good_images(nrng)
        crafted = crafted_images(nrng)
        pool = []
        for ext, data in goods.items():
            pool.append((f"good.{ext}", data, True))
        for name, data in crafted.items():
            pool.append((name, data, False))
        n = n_of["images"]
        i = 0
        while len(pool) < n:
            ext, data = rng.choice(sorted(goods.items()))
            pool.append((f"mut{i:05d}.{ext}", mutate_image(data, rng), False))
            i += 1
        pool = pool[:max(n, len(goods) + len(crafted))]
        # batches of files in one command; each file must get exactly one record
        batch = 16
        for start in range(0, len(pool), batch):
            names = []
            for name, data, _ in pool[start:start + batch]:
                p = images / name
                p.write_bytes(data)
                names.append(p.name)
            argv = ["classify", "--model", str(base_path), *with_labels, "--json",
                    *[str(images / nm) for nm in names]]
            control = all(good for _, _, good in pool[start:start + batch])
            cases.append(Case("images", "batch", argv, names, control=control))

    if "odd" in classes:
        fifo = odd / "fifo.tflite"
        os.mkfifo(fifo)
        fifo_img = odd / "fifo.jpg"
        os.mkfifo(fifo_img)
        (odd / "folder.tflite").mkdir()
        loop = odd / "loop.tflite"
        os.symlink(loop, loop)
        (odd / "empty.tflite").write_bytes(b"")
        good_jpg = good_images(nrng)["jpg"]
        newline = odd / "a\nb.jpg"
        newline.write_bytes(good_jpg)
        ansi = odd / "x\x1b[31mred\x1b[0m.jpg"
        ansi.write_bytes(good_jpg)
        forged = odd / "ok.jpg\nfake.jpg  NORMAL        [NORMAL 0.999]  1.0 ms"
        forged.write_bytes(good_jpg)
        non_utf8 = os.fsencode(str(odd)) + b"/bad\xff\xfename.jpg"
        with open(non_utf8, "wb") as fh:
            fh.write(good_jpg)
        odd_cases = [
            ("model-dev-zero", ["classify", "--model", "/dev/zero", *with_labels, str(cat)], ["/dev/zero"]),
            ("model-dev-null", ["classify", "--model", "/dev/null", *with_labels, str(cat)], ["/dev/null"]),
            ("model-fifo", ["classify", "--model", str(fifo), *with_labels, str(cat)], [fifo.name]),
            ("model-folder", ["classify", "--model", str(odd / "folder.tflite"), *with_labels, str(cat)], ["folder.tflite"]),
            ("model-symlink-loop", ["classify", "--model", str(loop), *with_labels, str(cat)], [loop.name]),
            ("model-empty", ["inspect", str(odd / "empty.tflite"), *with_labels], ["empty.tflite"]),
            ("evaluate-folder-not-run", ["evaluate", "--model", str(odd), "--data", str(data_dir)], [odd.name]),
            ("image-fifo", ["classify", "--model", str(base_path), *with_labels, str(fifo_img), str(cat)], [fifo_img.name, cat.name]),
            ("image-dev-zero", ["classify", "--model", str(base_path), *with_labels, "/dev/zero", str(cat)], ["zero", cat.name]),
            ("image-dev-urandom", ["classify", "--model", str(base_path), *with_labels, "/dev/urandom", str(cat)], ["urandom", cat.name]),
            ("name-newline", ["classify", "--model", str(base_path), *with_labels, str(newline)], [newline.name]),
            ("name-ansi", ["classify", "--model", str(base_path), *with_labels, str(ansi)], [ansi.name]),
            ("name-forged-line", ["classify", "--model", str(base_path), *with_labels, str(forged)], [forged.name]),
            ("name-not-utf8", ["classify", "--model", str(base_path), *with_labels, os.fsdecode(non_utf8)], ["name.jpg"]),
            ("labels-missing", ["classify", "--model", str(base_path), "--labels", str(odd / "nolabels.txt"), str(cat)], ["nolabels.txt"]),
            ("data-missing", ["evaluate", "--model", str(base_path), *with_labels, "--data", str(odd / "nodata")], ["nodata"]),
        ]
        for kind, argv, names in odd_cases[: max(n_of["odd"], len(odd_cases))]:
            cases.append(Case("odd", kind, argv, names, control=False, edge_only=kind.startswith("evaluate-")))
    return cases


# ---- running and judging -------------------------------------------------------------------
def _limit_memory():  # runs in the child before exec
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ValueError, OSError):
        pass


def _vm_hwm_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MB, 0 when it cannot be read.

    Not ``ru_maxrss`` from ``wait4``: Linux keeps the larger of the parent's RSS at fork and the
    child's own, so a child of a 2 GB test process (TensorFlow loaded) reports 2 GB whatever it did.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def run_case(case: Case, env: dict, timeout: float) -> Outcome:
    cmd = [sys.executable, "-m", "lungedge.cli", *case.argv]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # cwd: ``python -m`` puts it first on sys.path, so it must be the checkout under test
        if case.edge_only:
            env = dict(env, PYTHONPATH=env["PYTHONPATH"] + os.pathsep + env["LUNGEDGE_FUZZ_NOTF"])
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_limit_memory, start_new_session=True, cwd=env["LUNGEDGE_FUZZ_CODE"])
        rusage = None
        status = None
        hwm = 0.0  # the child's own peak RSS (MB), sampled while it runs (see _vm_hwm_mb)
        deadline = t0 + timeout
        while True:
            hwm = max(hwm, _vm_hwm_mb(proc.pid))
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, rusage = st, ru
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                _, st, ru = os.wait4(proc.pid, 0)
                proc.returncode = -9
                return Outcome(case, "hang", f"no exit within {timeout:.0f} s", time.perf_counter() - t0,
                               ru.ru_maxrss / 1024, None)
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    seconds = time.perf_counter() - t0
    rss = hwm if hwm else (rusage.ru_maxrss / 1024 if rusage else 0.0)
    verdict, detail = judge(case, proc.returncode, stdout, stderr)
    if verdict == "clean" and rss * (1 << 20) > RSS_FLAG:
        verdict, detail = "other", f"peak RSS {rss:.0f} MB"
    return Outcome(case, verdict, detail, seconds, rss, proc.returncode)


def _error_lines(stdout: str, stderr: str) -> List[str]:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    for ln in stdout.splitlines():
        if ln.startswith("{"):
            try:
                rec = json.loads(ln)
            except ValueError:
                continue
            if isinstance(rec, dict) and "error" in rec:
                lines.append("error: " + str(rec["error"]))
    return lines


def _mentions(text: str, name: str) -> bool:
    variants = {name, repr(name)[1:-1], name.encode("unicode_escape").decode("ascii"),
                json.dumps(name)[1:-1], os.path.basename(name)}
    return any(v and v in text for v in variants)


def judge(case: Case, code: int, stdout: str, stderr: str):
    both = stdout + "\n" + stderr
    if "Traceback (most recent call last)" in both:
        last = [ln for ln in stderr.splitlines() if ln.strip()][-1:] or [""]
        return "traceback", last[0][:160]
    errors = _error_lines(stdout, stderr)
    if code < 0:
        return ("signal", f"signal {-code}, no error line") if not errors else ("other", f"signal {-code} after an error line")
    if code >= 128:
        return "signal", f"exit {code}"
    if case.control and code != 0:
        return "other", f"good file not classified (exit {code}): {(errors or [''])[0][:120]}"
    if code not in (0, 1):
        return "other", f"exit code {code} for a well-formed command line: {(errors or [''])[0][:120]}"
    if code == 1 and not errors:
        return "other", "exit 1 without an error line"
    for ln in errors:
        if not any(_mentions(ln, n) for n in case.expect_names):
            if case.cls != "images" and not any(_mentions(ln, n) for n in case.argv):
                return "other", f"error does not name the file: {ln[:140]}"
    if any("\x1b" in ln for ln in both.splitlines()):
        return "other", "raw escape character in the output"
    if case.cls == "images" or case.kind.startswith("name-") or case.kind.startswith("image-"):
        records = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if "--json" in case.argv:
            try:
                parsed = [json.loads(ln, parse_constant=_refuse_constant) for ln in records]
            except ValueError as exc:
                return "other", f"invalid JSON line ({exc})"
            n_inputs = sum(1 for a in case.argv[case.argv.index("--json") + 1:])
            if len(parsed) != n_inputs:
                return "other", f"{len(parsed)} records for {n_inputs} images"
        else:
            result_lines = [ln for ln in stdout.splitlines() if ln and not ln.startswith("model ")
                            and not re.match(r"^\d+ classified, \d+ failed$", ln)]
            n_inputs = len(case.expect_names)
            errors_here = len(errors)
            if len(result_lines) + errors_here != n_inputs:
                return "other", f"{len(result_lines)} result lines + {errors_here} errors for {n_inputs} inputs (forged?)"
    return "clean", ""


def _refuse_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def summarise(outcomes: Sequence[Outcome]) -> Dict[str, Dict[str, int]]:
    table: Dict[str, Dict[str, int]] = {}
    for o in outcomes:
        row = table.setdefault(o.case.cls, {k: 0 for k in ("tried", "clean", "traceback", "signal", "hang", "other")})
        weight = len(o.case.expect_names) if o.case.cls == "images" else 1
        row["tried"] += weight
        row[o.verdict] += weight
    return table


def attribute_images(outcomes: List[Outcome], env: dict, timeout: float) -> List[Outcome]:
    """A failed image batch is re-run one file at a time, so each image gets its own verdict."""
    out: List[Outcome] = []
    for o in outcomes:
        if o.case.cls != "images" or o.verdict == "clean":
            out.append(o)
            continue
        head = o.case.argv[: o.case.argv.index("--json") + 1]
        files = o.case.argv[len(head):]
        for f in files:
            single = Case("images", "single", head + [f], [os.path.basename(f)], control=o.case.control)
            out.append(run_case(single, env, timeout))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=int(os.environ.get("LUNGEDGE_FUZZ_SIZE", CI_SIZE)),
                    help=f"number of generated cases (default {CI_SIZE}, or $LUNGEDGE_FUZZ_SIZE)")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per command before it counts as a hang")
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--code", default=None, help="run the CLI of this checkout instead (PYTHONPATH)")
    ap.add_argument("--json", dest="json_out", default=None, help="write every case's outcome here")
    ap.add_argument("--keep", default=None, help="build the corpus in this folder and keep it")
    args = ap.parse_args(argv)
    if not (CORAL / BASE_MODEL).is_file():
        print(f"error: the base model is missing: {CORAL / BASE_MODEL} (set LUNGEDGE_SHARED)", file=sys.stderr)
        return 2
    classes = [c for c in args.classes.split(",") if c]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    code_dir = Path(args.code).resolve() if args.code else ROOT
    env["PYTHONPATH"] = str(code_dir) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["LUNGEDGE_FUZZ_CODE"] = str(code_dir)
    ctx = tempfile.TemporaryDirectory(prefix="lungedge-fuzz-") if not args.keep else None
    work = Path(args.keep or ctx.name)
    notf = work / "notf"  # modules that refuse to import: an edge-only install
    notf.mkdir(parents=True, exist_ok=True)
    for mod in ("tensorflow", "keras"):
        (notf / f"{mod}.py").write_text(f"raise ImportError(\"No module named '{mod}' (edge-only install)\")\n")
    env["LUNGEDGE_FUZZ_NOTF"] = str(notf)
    try:
        cases = build_cases(work, args.size, args.seed, classes)
        outcomes = [run_case(c, env, args.timeout) for c in cases]
        outcomes = attribute_images(outcomes, env, args.timeout)
    finally:
        if ctx is not None:
            ctx.cleanup()
    table = summarise(outcomes)
    print(f"code: {code_dir}  seed {args.seed}  size {args.size}  commands run {len(outcomes)}")
    print(f"{'class':<8} {'tried':>6} {'clean':>6} {'traceback':>10} {'signal':>7} {'hang':>5} {'other':>6}")
    for cls in classes:
        r = table.get(cls)
        if r:
            print(f"{cls:<8} {r['tried']:>6} {r['clean']:>6} {r['traceback']:>10} {r['signal']:>7} {r['hang']:>5} {r['other']:>6}")
    bad = [o for o in outcomes if o.verdict != "clean"]
    for o in bad[:60]:
        print(f"  {o.case.cls}/{o.case.kind}: {o.verdict}: {o.detail} [{' '.join(a[-40:] for a in o.case.argv[:3])}]")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"table": table, "outcomes": [{"class": o.case.cls, "kind": o.case.kind, "verdict": o.verdict,
                                           "detail": o.detail, "seconds": round(o.seconds, 3),
                                           "max_rss_mb": round(o.max_rss_mb, 1), "returncode": o.returncode,
                                           "argv": o.case.argv} for o in outcomes]}, indent=1))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
