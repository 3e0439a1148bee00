"""Training: MobileNetV2 transfer learning on lung images (TensorFlow imported lazily).

Public surface::

    from train import get_recipe, train_run, cv_run, evaluate_keras
    run_dir = train_run(get_recipe("ct-lung-cancer"), data_dir, "runs/ct")

Modules: ``recipes`` (named, frozen recipes), ``data`` (layouts, patient ids, splits, manifest),
``pipeline`` (tf.data), ``model`` (MobileNetV2 + head, fine-tuning), ``checkpoint`` (resumable
training), ``threshold`` (operating point), ``run`` (one run / k-fold), ``report`` (plots, model
card), ``evaluate`` (Keras model on a labelled folder), ``weights`` (offline ImageNet weights),
``throughput`` (input pipeline measurement), ``cli`` (``lungedge train``).
"""

from .evaluate import evaluate_keras
from .recipes import RECIPES, Recipe, get_recipe
from .run import cv_run, train_run

__all__ = ["Recipe", "RECIPES", "get_recipe", "train_run", "cv_run", "evaluate_keras"]
