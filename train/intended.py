"""What a model is for: modality, view, body part and the population of its training data.

Written into the model's record at training (``ModelSpec.intended``), carried by every converted
file, shown by ``inspect``, the model card and the web page; the domain gate's DICOM checks read
``body_part`` and ``view``. One table, by recipe family and by the dataset's class names.
"""

from __future__ import annotations

from typing import Optional, Sequence

#: recipe family -> modality, view, body part
_FAMILIES = {
    "xray": {"modality": "X-ray (CR/DX)", "view": "frontal (PA/AP) chest radiograph", "body_part": "chest"},
    "ct": {"modality": "CT", "view": "axial slice", "body_part": "chest"},
    "demo": {"modality": "generated images (the offline demo)", "view": "", "body_part": ""},
}

#: datasets recognised by their class names -> population and site
_DATASETS = (
    (("NORMAL", "PNEUMONIA"), {
        "population": "children aged 1 to 5 years (Kermany et al. 2018: retrospective pediatric cohorts)",
        "site": "one hospital: Guangzhou Women and Children's Medical Center, China",
        "note": "not validated on adults: on held-back adult chest X-rays from other hospitals accuracy is lower "
                "(NORMAL recall falls); other sites need `lungedge recalibrate` and their own validation"}),
    (("Bengin cases", "Malignant cases", "Normal cases"), {
        "population": "adults (IQ-OTH/NCCD: 110 patients, 2019)",
        "site": "Iraq-Oncology Teaching Hospital / National Center for Cancer Diseases, Baghdad",
        "note": "consecutive slices of the same patients are alike: see the blocked split in train/README.md"}),
)


def intended_for(recipe: Optional[str], labels: Sequence[str]) -> dict:
    """The ``intended`` record for a model of ``recipe`` trained on classes ``labels`` ({} when unknown)."""
    name = (recipe or "").lower()
    out: dict = {}
    for family, facts in _FAMILIES.items():
        if name.startswith(family):
            out.update(facts)
            break
    for names, facts in _DATASETS:
        if tuple(sorted(labels)) == tuple(sorted(names)) and out.get("modality", "").startswith(("X-ray", "CT")):
            out.update(facts)
            break
    return {k: v for k, v in out.items() if v}
