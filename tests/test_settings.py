"""Runtime and bench settings: one object per set of defaults, shared by the Classifier, the
command line's model options and bench; the loader returns what it found instead of setting it."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from lungedge.edge_runtime.bench import BenchSettings
from lungedge.edge_runtime.errors import ConfigError
from lungedge.edge_runtime.settings import BACKEND_CHOICES, RuntimeSettings


@pytest.mark.parametrize("changes, message", [
    ({"threads": 0}, "threads must be a positive integer, got 0"),
    ({"threads": True}, "threads must be a positive integer, got True"),
    ({"max_results": 0}, "max_results must be a positive integer or None, got 0"),
    ({"score_threshold": 1.5}, "score_threshold must be a number from 0 to 1 or None, got 1.5"),
    ({"mean": 3.0}, "mean must be a sequence of numbers"),
])
def test_runtime_settings_refuse_values_out_of_range(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RuntimeSettings(**changes)


def test_runtime_settings_normalise_sequences_and_refuse_unknown_names():
    s = RuntimeSettings(labels=["a", "b"], mean=[], std=[127.5], score_threshold=1)
    assert s.labels == ("a", "b") and s.mean is None and s.std == (127.5,) and s.score_threshold == 1.0
    assert hash(s) == hash(RuntimeSettings(labels=("a", "b"), std=(127.5,), score_threshold=1.0))
    with pytest.raises(TypeError, match="unexpected keyword argument 'thread'"):
        s.replace(thread=2)


def test_every_model_option_takes_its_default_and_help_from_the_settings():
    from lungedge.cli import main
    from lungedge.model_options import MODEL_FIELDS

    for command in ("classify", "evaluate", "inspect"):
        params = {p.name: p for p in main.get_command(None, command).params}
        for field in MODEL_FIELDS:
            p = params[f"runtime_{field}"]
            assert p.help == RuntimeSettings.help(field), (command, field)
            if not p.is_flag and not p.multiple:
                assert p.default == RuntimeSettings.default(field), (command, field)
    backend = {p.name: p for p in main.get_command(None, "classify").params}["runtime_backend"]
    assert tuple(backend.type.choices) == BACKEND_CHOICES


def test_model_options_become_one_runtime_settings_object():
    import click

    from lungedge.model_options import model_options, runtime_option

    seen = []

    @click.command()
    @model_options
    @runtime_option("allow_out_of_domain")
    def cmd(runtime):
        seen.append(runtime)

    r = CliRunner().invoke(cmd, ["--threads", "3", "--mean", "1", "--mean", "2", "--no-threshold",
                                 "--allow-out-of-domain", "--backend", "litert"])
    assert r.exit_code == 0, r.output
    assert seen == [RuntimeSettings(threads=3, backend="litert", mean=(1.0, 2.0), use_threshold=False,
                                    allow_out_of_domain=True)]
    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 0 and seen[-1] == RuntimeSettings()


def test_bench_settings_route_runtime_options_and_survive_the_trip_to_a_worker():
    s = BenchSettings.of(images=["imgs"], threads=[1, 4], runs=3, warmup=0, backend="litert", labels=["a", "b"])
    assert s.threads == (1, 4) and s.runtime.backend == "litert" and s.runtime.labels == ("a", "b")
    assert s.runtime.threads is None  # bench's threads are its own list, one measurement each
    assert BenchSettings.from_dict(s.to_dict()) == s
    assert s.report() == {"images": ["imgs"], "threads": [1, 4], "runs": 3, "warmup": 0, "backend": "litert",
                          "data_dir": None}
    with pytest.raises(ConfigError, match="threads must be positive integers"):
        BenchSettings(threads=())
    with pytest.raises(ConfigError, match="runs must be a positive integer"):
        BenchSettings.of(runs=0)


@pytest.mark.needs_shared
def test_classifier_takes_settings_or_keywords_alike_and_reports_where_labels_came_from(coral_dir):
    from lungedge import Classifier
    from lungedge.edge_runtime.loader import load_model

    model = coral_dir / "mobilenet_v1_0.25_128_quant.tflite"
    labels = str(coral_dir / "imagenet_labels.txt")
    settings = RuntimeSettings(labels=labels, max_results=2, guard=False)
    with Classifier(model, settings) as a, Classifier(model, labels=labels, max_results=2, guard=False) as b:
        assert a.settings == b.settings == settings
        ra, rb = a.classify(coral_dir / "cat.bmp"), b.classify(coral_dir / "cat.bmp")
        assert ra.probabilities == rb.probabilities and len(ra.categories) == 2
        assert a.describe()["metadata_source"] == a.metadata_source == "TFLITE_METADATA"
    with pytest.raises(TypeError, match="unexpected keyword argument 'thread'"):
        Classifier(model, thread=2)
    loaded, interpreter = load_model(model, settings)
    assert loaded.metadata_source == "TFLITE_METADATA" and loaded.spec.num_classes == 1001
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.metadata_source = None
    assert interpreter.get_input_details()[0]["index"] == loaded.input["index"]
