"""The learning floor (edge_runtime.learning_floor) and the one gate rule (convert.quant_gate)."""

from __future__ import annotations

import pytest

from lungedge.edge_runtime import learning_floor


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.5), (7, 10, 0.5), (59, 60, 0.5), (330, 600, 0.5), (80, 100, 0.74),
                                   (5, 5, 0.9), (300, 1000, 0.27)])
def test_binomial_tail_matches_scipy(k, n, p):
    stats = pytest.importorskip("scipy.stats", reason="scipy (with scikit-learn, the test extra) checks the sum")
    assert learning_floor.binomial_tail(k, n, p) == pytest.approx(float(stats.binom.sf(k - 1, n, p)), rel=1e-9, abs=1e-300)


def test_a_constant_model_did_not_learn_even_on_imbalanced_data():
    y = [1] * 74 + [0] * 26  # 74 % majority
    v = learning_floor.judge(y, [1] * 100, ["NORMAL", "PNEUMONIA"])
    assert v.status == learning_floor.NOT_LEARNED and v.failed and v.accuracy == pytest.approx(0.74)
    assert v.sentence().startswith("the model did not learn:") and "majority-class rate 0.7400" in v.sentence()


def test_a_coin_toss_did_not_learn_and_a_good_model_did():
    y = [0, 1] * 30
    assert learning_floor.judge(y, [0] * 60, ["a", "b"]).failed
    assert learning_floor.judge(y, [1, 1] * 30, ["a", "b"]).failed  # half right
    good = learning_floor.judge(y, y[:-1] + [0], ["a", "b"])  # 59/60
    assert good.learned and good.correct == 59 and good.accuracy_ci95[0] > 0.9
    assert good.sentence().startswith("the model learned:")


def test_too_few_images_is_undetermined_not_failed():
    v = learning_floor.judge([0, 1, 0, 1], [0, 1, 0, 1], ["a", "b"])  # perfect, but 0.5**4 = 0.06
    assert v.status == learning_floor.UNDETERMINED and not v.failed and not v.learned


def test_wilson_interval_is_inside_zero_one_and_contains_the_estimate():
    lo, hi = learning_floor.wilson_interval(59, 60)
    assert 0.0 < lo < 59 / 60 < hi <= 1.0
    assert learning_floor.wilson_interval(0, 0) == (0.0, 0.0)


def _row(name, gate):
    return {"variant": name, "gate": gate}


def test_gate_ships_the_first_passing_integer_variant():
    from lungedge.convert.quant_gate import overall

    v = overall([_row("float32", "passed"), _row("float16", "passed"), _row("int8", "failed"),
                 _row("int8-mixed", "passed")])
    assert v.passed and v.ship == "int8-mixed" and v.failed == ["int8"] and not v.blocking
    assert "int8 failed" in v.message and "ship model_int8-mixed.tflite" in v.message


def test_gate_fails_when_no_integer_variant_passes_but_names_the_best_file():
    from lungedge.convert.quant_gate import overall

    v = overall([_row("float32", "passed"), _row("float16", "passed"), _row("int8", "failed")])
    assert not v.passed and v.ship == "float16" and v.blocking == ["int8"] and v.message.startswith("FAILED")


def test_gate_fails_when_a_float_variant_fails_and_ships_nothing_when_nothing_passes():
    from lungedge.convert.quant_gate import overall

    assert not overall([_row("float32", "failed"), _row("int8", "passed")]).passed
    nothing = overall([_row("float32", "failed"), _row("int8", "failed")])
    assert not nothing.passed and nothing.ship is None and "nothing to ship" in nothing.message


def test_variant_that_did_not_learn_fails_its_gate_even_within_the_accuracy_margin():
    from lungedge.convert.quant_gate import variant_reasons

    m = {"accuracy": 0.5, "per_class": {"a": {"recall": 1.0}, "b": {"recall": 0.0}}}
    keras = {"accuracy": 0.5, "per_class": {"a": {"recall": 1.0}, "b": {"recall": 0.0}}}
    assert variant_reasons(keras, m, None, 1.0, 2.0) == []
    assert variant_reasons(keras, m, None, 1.0, 2.0, learned=False, floor_sentence="the model did not learn: x") == [
        "the model did not learn: x"]


def test_gate_treats_uint8_as_an_integer_variant_shipped_after_int8():
    from lungedge.convert.quant_gate import overall

    v = overall([_row("float32", "passed"), _row("int8", "failed"), _row("uint8", "passed"), _row("int8-mixed", "passed")])
    assert v.passed and v.ship == "uint8" and not v.blocking
    both = overall([_row("float32", "passed"), _row("uint8", "passed"), _row("int8", "passed")])
    assert both.ship == "int8"
    failed = overall([_row("float32", "passed"), _row("uint8", "failed")])
    assert not failed.passed and failed.blocking == ["uint8"]


def test_gate_counts_a_drop_only_when_the_test_set_can_tell_it_from_chance():
    """One flipped image of 60 is 1.7 points (over the 1-point limit) and passes; twelve one-way
    flips of 600 (2 points) fail, with the paired counts in the reason."""
    import numpy as np

    from lungedge.convert.quant_gate import paired_worse, variant_reasons
    from lungedge.edge_runtime.metrics import classification_metrics

    def case(n, flips):
        y = np.array([0, 1] * (n // 2))
        keras_pred = y.copy()
        pred = y.copy()
        pred[np.flatnonzero(y == 0)[:flips]] = 1  # NORMAL images the variant now calls disease
        names = ["NORMAL", "PNEUMONIA"]
        km = classification_metrics(y.tolist(), keras_pred.tolist(), names)
        m = classification_metrics(y.tolist(), pred.tolist(), names)
        return km, m, (y, keras_pred, pred)

    km, m, paired = case(60, 1)
    assert variant_reasons(km, m, None, 1.0, 2.0) != []  # the point rule alone fails it
    assert variant_reasons(km, m, None, 1.0, 2.0, paired=paired) == []
    km, m, paired = case(600, 12)
    reasons = variant_reasons(km, m, None, 1.0, 2.0, paired=paired)
    assert len(reasons) == 2 and "12 images worse, 0 better" in reasons[0], reasons
    assert "NORMAL recall 4.00 points" in reasons[1]
    t = paired_worse(*paired)
    assert t == {"worse": 12, "better": 0, "p": 0.5 ** 12}
