"""``python -m lungedge``: the same command line as ``lungedge``."""

from lungedge.cli import main

if __name__ == "__main__":  # pragma: no cover - exercised by tests through a subprocess
    main(prog_name="lungedge")
