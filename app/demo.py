"""The built-in demo: which recipe it can train here, and the generated data set to train it on.

With ImageNet weights (found locally, or fetched the standard Keras way) the demo fine-tunes the
``demo`` recipe; without them (a fresh machine offline) it says so in one line and trains the
``demo-scratch`` recipe, whose whole network learns from random initialisation on a larger
generated set (from scratch, data variety is what decides accuracy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

#: Images per class, by recipe: the scratch recipe needs more variety, and smaller images suffice.
IMAGES_PER_CLASS = {"demo": 200, "demo-scratch": 2000}
IMAGE_SIZE = {"demo": 224, "demo-scratch": 128}
#: Calibration images for the demo's integer variants: fewer than `lungedge convert`'s default
#: because the demo is the quick start, and its tests' bounds were measured with this count.
CALIBRATION_COUNT = 100

_LOG = logging.getLogger(__name__)


@dataclass
class DemoPlan:
    recipe: object
    data_dir: Path
    notes: List[str]
    facts: dict


def plan_demo(out: Path, images_per_class: Optional[int], epochs: Optional[int], seed: int) -> DemoPlan:
    """Choose the recipe (ImageNet or scratch), generate the data, and say what was chosen."""
    from lungedge.train.recipes import get_recipe
    from lungedge.train.weights import WeightsUnavailable, obtain_imagenet_weights

    from .demo_data import make_demo_dataset

    try:
        path = obtain_imagenet_weights(1.0, 224)
        recipe = get_recipe("demo", weights=str(path))
        weights = f"MobileNetV2 ImageNet weights from {path} (frozen base, new head)."
        facts = {"imagenet_weights": True, "weights_file": str(path)}
    except WeightsUnavailable as exc:
        _LOG.warning(f"note: {exc}")
        recipe = get_recipe("demo-scratch")
        scratch = (f"so a small MobileNetV2 (alpha {recipe.alpha}, {recipe.image_size} px) was trained whole from "
                   "random initialisation.")
        weights = f"none: ImageNet weights were not available (see the note above), {scratch}"
        # the report has no note above it: it says why, and how to provide the file, itself
        facts = {"imagenet_weights": False, "weights_report": f"none: {exc}; {scratch}"}
    _LOG.info(f"weights: {weights}")
    recipe = recipe.replace(seed=seed, **({"epochs": epochs} if epochs else {}))
    per_class = images_per_class or IMAGES_PER_CLASS[recipe.name]
    size = IMAGE_SIZE[recipe.name]
    data = make_demo_dataset(out / "data", per_class=per_class, size=size, seed=seed)
    facts.update({"weights_sentence": facts.pop("weights_report", weights), "images_per_class": per_class,
                  "image_size": size})
    notes = [f"Data: {2 * per_class} procedurally generated {size}x{size} radiograph-like images (seed {seed}) in "
             f"`{data}`; they show that the pipeline works and say nothing about real radiographs.",
             f"Recipe `{recipe.name}`: {recipe.description}"]
    return DemoPlan(recipe, data, notes, facts)
