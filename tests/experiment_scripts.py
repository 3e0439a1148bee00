"""The scripts in experiments/ (not installed: the wheel holds only ``lungedge``), imported by file
name for their tests."""

import importlib
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def experiment(name: str):
    """The module ``experiments/<name>.py``."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    return importlib.import_module(name)
