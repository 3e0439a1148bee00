"""The device path on aarch64 (Raspberry Pi class), emulated with qemu-user on this x86 machine
through ``../shared/tools/arm`` (an aarch64 CPython 3.11 with aarch64 LiteRT, numpy and Pillow
wheels; Cortex-A72 CPU model). The package is installed for aarch64 with ``pip --target`` and
``python -m lungedge classify`` / ``inspect`` must give what they give on x86.

What this proves: the pure-Python package, its metadata reader and preprocessing, and LiteRT's
aarch64 kernels (XNNPACK's NEON paths) compute the same labels and probabilities as on x86. What
it does not: speed. Emulated invoke times are qemu's, tens of times slower than a real Pi and not
proportional to it; they are printed for reference only.

CI cost: setup about 35 s the first time (apt-get needs root; CI runs as root), then about
10 s per command under emulation: 3 images x 7 variants plus inspect, 2-3 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ALL_VARIANTS, REQUIRE_SHARED

ROOT = Path(__file__).resolve().parents[1]
#: aarch64 vs x86, per probability. Float kernels differ in summation order and FMA use (measured
#: on float32 MobileNetV2 1.0/224: within 3e-7); integer outputs must be identical (XNNPACK's int8
#: is exact), one output step (1/256) allowed for the float-in/float-out files that requantise.
FLOAT_TOLERANCE = 1e-4
QUANTISED_TOLERANCE = 1.0 / 256 + 1e-6
TOLERANCE = {"float32": FLOAT_TOLERANCE, "float16": FLOAT_TOLERANCE, "int8": 0.0, "uint8": 0.0}
IMAGES = 3


def _arm_tools(shared_dir: Path) -> tuple:
    tools = shared_dir / "tools" / "arm"
    if not (tools / "setup.sh").is_file():
        pytest.fail(f"aarch64 tools not found at {tools}") if REQUIRE_SHARED else pytest.skip(f"no {tools}")
    arm_root = Path(os.environ.get("ARM_ROOT", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "arm64-emu"))
    ready = (arm_root / "sysroot/usr/bin/python3.11").exists() and shutil.which("qemu-aarch64-static")
    if not ready:
        if os.geteuid() != 0 and not REQUIRE_SHARED:
            pytest.skip("aarch64 emulation is not set up and setup.sh needs root (apt-get qemu-user-static)")
        subprocess.run(["bash", str(tools / "setup.sh"), str(arm_root)], check=True, capture_output=True, timeout=900)
    return tools / "run.sh", arm_root


def _classify(cmd: list, model: Path, images: list, cwd: Path, env=None) -> list:
    # the domain gate's verdicts are compared too, so an image it refuses is answered anyway (marked)
    out = subprocess.run(cmd + ["-m", "lungedge", "classify", "--json", "--allow-out-of-domain", "-m", str(model),
                                *map(str, images)],
                         capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    assert out.returncode == 0, (model.name, out.stderr[-2000:])
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.emulated
@pytest.mark.slow
@pytest.mark.needs_tf
@pytest.mark.needs_shared
def test_aarch64_gives_the_x86_results(interop_run, shared_dir, fullres_dir, coral_dir, tmp_path):
    run_sh, arm_root = _arm_tools(shared_dir)
    pkg = tmp_path / "aarch64-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(pkg), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "ARM_ROOT": str(arm_root), "ARM_SITE": f"{arm_root / 'site'}:{pkg}"}
    # run from outside the checkout, or `python -m` would import the source tree (sys.path[0] is the cwd)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    arch = subprocess.run(["bash", str(run_sh), "-c", "import platform, lungedge; print(platform.machine(), lungedge.__file__)"],
                          capture_output=True, text=True, env=env, cwd=elsewhere, timeout=600)
    assert arch.returncode == 0 and arch.stdout.startswith("aarch64 ") and str(pkg) in arch.stdout, arch.stderr[-2000:]

    images = sorted(fullres_dir.rglob("*.jpeg"))[:: 24 // IMAGES][:IMAGES]
    models = [(v, interop_run / f"model_{v}.tflite") for v in ALL_VARIANTS]
    models.append(("coral-uint8", coral_dir / "mobilenet_v2_1.0_224_quant.tflite"))
    summary = {}
    for variant, model in models:
        files = [coral_dir / "cat.bmp"] if variant == "coral-uint8" else images
        x86 = _classify([sys.executable], model, files, elsewhere)
        arm = _classify(["bash", str(run_sh)], model, files, elsewhere, env)
        tol = TOLERANCE.get(variant, 0.0 if variant == "coral-uint8" else QUANTISED_TOLERANCE)
        worst = 0.0
        for a, b in zip(x86, arm):
            assert a["label"] == b["label"], (variant, a["source"], a["label"], b["label"])
            assert a.get("in_domain") == b.get("in_domain"), (variant, a["source"], a.get("domain_reason"), b.get("domain_reason"))
            if a.get("domain_score") is not None:
                # the same arithmetic: within 1e-3; a file whose activations are quantised at run time
                # (dynamic) or requantised (float in/out) by other kernels on Arm: within 1 % of the threshold
                # it is judged against (measured: dynamic 1.3995 vs 1.3965 under 1.94)
                slack = 1e-3 * max(1.0, abs(a["domain_score"])) if variant in TOLERANCE or variant == "coral-uint8" \
                    else 0.01 * a["domain_threshold"]
                assert abs(b["domain_score"] - a["domain_score"]) <= slack, (variant, a["source"], a["domain_score"], b["domain_score"])
            worst = max(worst, max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]))
        assert len(arm) == len(files) and worst <= tol, (variant, worst, tol)
        summary[variant] = (worst, statistics.median(r["timing_ms"]["invoke"] for r in arm),
                            statistics.median(r["timing_ms"]["invoke"] for r in x86))
    print("\naarch64 (qemu cortex-a72) vs x86: max |dp|, median invoke ms emulated / x86")
    for v, (worst, arm_ms, x86_ms) in summary.items():
        print(f"  {v:<14} {worst:.2e}  {arm_ms:9.1f} / {x86_ms:6.2f}")

    model = interop_run / "model_uint8.tflite"
    got = {}
    for name, cmd, e in (("x86", [sys.executable], None), ("arm", ["bash", str(run_sh)], env)):
        out = subprocess.run(cmd + ["-m", "lungedge", "inspect", "--json", str(model)], capture_output=True,
                             text=True, env=e, cwd=elsewhere, timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
        got[name] = json.loads(out.stdout)
    for key in ("labels", "input", "output", "lungedge_metadata", "integrity", "sha256"):
        assert got["arm"][key] == got["x86"][key], key
    # the same graph; which nodes XNNPACK takes may differ between its x86 and ARM builds
    assert [(r["op"], r["count"]) for r in got["arm"]["operators"]] == [(r["op"], r["count"]) for r in got["x86"]["operators"]]
    assert got["arm"]["standard_metadata"]["labels"] == ["NORMAL", "PNEUMONIA"]
