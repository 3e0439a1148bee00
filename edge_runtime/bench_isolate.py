"""Run one benchmark in a fresh Python process: its own peak RSS, and a crash becomes an error row.

``python -m lungedge.edge_runtime.bench_isolate REQUEST.json`` is the child; ``bench_isolated`` the parent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .bench import BenchSettings, bench_model


def bench_isolated(model: str, settings: dict, timeout_s: float) -> dict:
    """``bench_model(model, BenchSettings.from_dict(settings))`` in a fresh Python process."""
    with tempfile.TemporaryDirectory(prefix="lungedge-bench-") as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps({"model": model, "settings": settings, "out": str(out)}))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.run([sys.executable, "-m", "lungedge.edge_runtime.bench_isolate", str(req)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return _error_result(model, f"timed out after {timeout_s:.0f} s")
        if out.is_file():
            return json.loads(out.read_text())
        tail = [ln for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return _error_result(model, f"benchmark process crashed ({how})" + (f": {tail[-1][:200]}" if tail else ""))


def _error_result(model: str, error: str) -> dict:
    return {"model": model, "name": Path(model).name, "status": "error", "error": error, "runs": []}


def _worker(request_path: str) -> int:
    """Entry point of an isolated run: read the request, write the result JSON."""
    req = json.loads(Path(request_path).read_text())
    res = bench_model(req["model"], BenchSettings.from_dict(req["settings"]))
    Path(req["out"]).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":  # isolated worker: python -m lungedge.edge_runtime.bench REQUEST.json
    sys.exit(_worker(sys.argv[1]))
