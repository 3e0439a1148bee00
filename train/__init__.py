"""Training: MobileNetV2 transfer learning on lung images (TensorFlow imported lazily).

Public surface::

    from lungedge.train import get_recipe, train_run, cv_run, evaluate_keras
    run_dir = train_run(get_recipe("ct-lung-cancer"), data_dir, "runs/ct")

Modules: ``recipes`` (named, frozen recipes), ``dataset`` (layouts, patient ids, splits, manifest),
``input_data`` (tf.data), ``model`` (MobileNetV2 + head, fine-tuning), ``checkpoint`` (resumable
training), ``labels`` (matching the disease class), ``intended`` (what a model is for), ``training``
(one run / k-fold), ``runfolder`` (the run-folder contract), ``run_report`` (plots, model card),
``keras_eval`` (Keras model on a labelled folder), ``weights`` (ImageNet weights), ``tfimport``
(quiet TensorFlow import). The command is ``app/train_cli.py`` (``lungedge.train_cli``); research
probes of training choices are in the repository's ``experiments/`` folder.
"""

import importlib

# Imported on first use (PEP 562), so that `lungedge classify` does not pay for them.
_LAZY = {'evaluate_keras': 'keras_eval', 'RECIPES': 'recipes', 'Recipe': 'recipes', 'get_recipe': 'recipes', 'cv_run': 'training', 'train_run': 'training'}

__all__ = ["Recipe", "RECIPES", "get_recipe", "train_run", "cv_run", "evaluate_keras"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
