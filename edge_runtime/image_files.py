"""Finding images on disk: input expansion for the CLI, class-folder datasets and the patient named in a
Kermany file name. No TensorFlow."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from .errors import ConfigError, InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm",
                              ".dcm", ".dicom"})


def is_image_name(path: Path) -> bool:
    """An image by its name, or a DICOM file without an extension (as modalities write them),
    recognised by its marker. Hidden files are skipped."""
    if path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    return not path.suffix and _is_dicom_file(path)


def _is_dicom_file(path: Path) -> bool:
    from .dicom import DICM_OFFSET, is_dicom

    try:
        with open(path, "rb") as fh:
            return is_dicom(fh.read(DICM_OFFSET + 4))
    except OSError:
        return False


def expand_inputs(paths: Iterable[str]) -> List[Tuple[str, Optional[str]]]:
    """Files stay as given; folders expand (recursively, sorted) to the images inside.

    Returns ``(path, problem)`` pairs: ``problem`` is None, or a one-line reason this input
    cannot be used (missing, empty folder), so a batch can report it and go on.
    """
    out: List[Tuple[str, Optional[str]]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_name(f))
            if not found:
                out.append((str(p), f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder: {str(p)!r}"))
            out.extend((f, None) for f in found)
        elif p.exists():
            out.append((str(p), None))
        else:
            out.append((str(p), f"file not found: {str(p)!r}"))
    return out


@dataclass(frozen=True)
class LabelledFiles:
    """Images of a class-folder tree: ``root/<class>/**/<image>``."""

    paths: Tuple[str, ...]
    labels: Tuple[int, ...]
    class_names: Tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict:
        return {name: sum(1 for y in self.labels if y == i) for i, name in enumerate(self.class_names)}


def list_labelled_folder(root: str, class_names: Optional[Sequence[str]] = None) -> LabelledFiles:
    """List a class-folder dataset. Class names are the sub-folder names, sorted.

    Args:
        root: a folder with one sub-folder per class. The Kaggle chest X-ray layout
            (``train/``, ``val/``, ``test/`` each with class folders) is accepted by pointing
            at one of those split folders.
        class_names: expected classes in model output order. Folders are matched to these
            names case-insensitively and ignoring spaces/underscores (``Bengin cases`` matches
            ``bengin_cases``); a folder with no match is an error.

    Raises:
        InputError: missing root, no class folders or no images. ConfigError: folders that do not match the model.
    """
    r = Path(root)
    if r.is_file():
        raise InputError(f"expected a data folder DIR/<class>/<image>, got a file: {str(r)!r}")
    if not r.is_dir():
        raise InputError(f"data folder not found: {str(r)!r}")
    folders = sorted(d for d in r.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise InputError(f"no class sub-folders in {str(r)!r} (expected {str(r)}/<class>/<image>)")
    if class_names is None:
        names = tuple(d.name for d in folders)
        index = {d.name: i for i, d in enumerate(folders)}
    else:
        names = tuple(class_names)
        wanted = {label_key(n): i for i, n in enumerate(names)}
        index = {}
        for d in folders:
            if label_key(d.name) not in wanted:
                raise ConfigError(f"folder {d.name!r} in {str(r)!r} is not one of the model's classes {list(names)!r}")
            index[d.name] = wanted[label_key(d.name)]
    paths, labels = [], []
    for d in folders:
        for f in sorted(d.rglob("*")):
            if f.is_file() and is_image_name(f):
                paths.append(str(f))
                labels.append(index[d.name])
    if not paths:
        raise InputError(f"no images found under {str(r)!r}")
    return LabelledFiles(tuple(paths), tuple(labels), names)


def label_key(name: str) -> str:
    """How class names are matched (folder names, recipes, labels files): lower case, letters and
    digits only ("Malignant cases" -> "malignantcases")."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


# Kermany chest X-ray: personNNN_bacteria_MMM / personNNN_virus_MMM (pneumonia),
# IM-PPPP-SSSS and NORMAL2-IM-PPPP-SSSS (normal). IM-PPPP and NORMAL2-IM-PPPP share one
# numbering space here on purpose: 211 numbers occur with both prefixes, and whether they are
# the same child is not documented, so they are treated as one patient (merging can only make
# groups bigger, never leak a patient across splits).
_PATIENT_PATTERNS = (
    (re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE), lambda m: m.group(1).lower()),
    (re.compile(r"^(?:NORMAL2-)?IM-(\d+)-\d+", re.IGNORECASE), lambda m: f"im-{int(m.group(1)):04d}"),
)


def patient_id(path: str) -> Optional[str]:
    """The patient named in a Kermany file name, or None if the name carries none."""
    name = Path(path).name
    for pattern, make in _PATIENT_PATTERNS:
        m = pattern.match(name)
        if m:
            return make(m)
    return None
