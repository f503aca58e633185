"""verdicts/finite_rows: labels and confidences from probabilities or logits, non-finite rows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from edgewise.serving.verdict import finite_rows, verdicts


def _softmax_reference(x: np.ndarray) -> np.ndarray:
    """The textbook formula (fine for moderate logits only)."""
    e = np.exp(x.astype(np.float64))
    return e / e.sum(axis=1, keepdims=True)


def test_probabilities_give_argmax_and_its_probability() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25], [0.0, 0.0, 1.0]], dtype=np.float32)
    labels, conf = verdicts(scores, "probabilities")
    assert labels.dtype == np.int64
    assert conf.dtype == np.float64
    assert labels.tolist() == [1, 0, 2]
    np.testing.assert_allclose(conf, [0.7, 0.5, 1.0], rtol=1e-6)


def test_probabilities_are_clipped_into_unit_interval() -> None:
    scores = np.array([[1.0000002, 0.0, -1e-7]], dtype=np.float64)
    labels, conf = verdicts(scores, "probabilities")
    assert labels.tolist() == [0]
    assert conf.tolist() == [1.0]


def test_ties_go_to_the_lowest_class() -> None:
    labels, conf = verdicts(np.array([[0.0, 3.0, 3.0, 1.0]]), "logits")
    assert labels.tolist() == [1]
    np.testing.assert_allclose(conf, _softmax_reference(np.array([[0.0, 3.0, 3.0, 1.0]]))[0, 1])


def test_logits_match_the_softmax_maximum() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=4.0, size=(200, 10)).astype(np.float32)
    labels, conf = verdicts(logits, "logits")
    reference = _softmax_reference(logits)
    assert labels.tolist() == reference.argmax(axis=1).tolist()
    np.testing.assert_allclose(conf, reference.max(axis=1), rtol=1e-12)
    assert np.all((conf > 0.1) & (conf <= 1.0))  # 10 classes: the top one has at least 1/10


def test_huge_logits_are_stable_and_warning_free() -> None:
    logits = np.array(
        [[1000.0, 999.0, 0.0], [-1000.0, -1001.0, -5000.0], [3e38, 0.0, -3e38]], dtype=np.float32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow would warn; the test fails on any warning
        labels, conf = verdicts(logits, "logits")
    assert labels.tolist() == [0, 0, 0]
    top_two = 1.0 / (1.0 + np.exp(-1.0))
    np.testing.assert_allclose(conf, [top_two, top_two, 1.0], rtol=1e-12)
    assert finite_rows(logits).tolist() == [True, True, True]


def test_log_probabilities_as_logits_give_the_same_confidences() -> None:
    probs = np.array([[0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    p_labels, p_conf = verdicts(probs, "probabilities")
    l_labels, l_conf = verdicts(np.log(probs), "logits")
    assert p_labels.tolist() == l_labels.tolist() == [2, 0]
    np.testing.assert_allclose(l_conf, p_conf, rtol=1e-12)


def test_non_finite_rows_are_flagged_and_do_not_spoil_the_others() -> None:
    scores = np.array(
        [
            [0.1, 2.0, 0.3],
            [np.nan, 0.0, 0.0],
            [np.inf, 0.0, 0.0],
            [-np.inf, -np.inf, -np.inf],
            [3.0, 0.0, -np.inf],  # one -inf logit is still a non-finite output
            [0.0, 0.0, 5.0],
        ],
        dtype=np.float32,
    )
    assert finite_rows(scores).tolist() == [True, False, False, False, False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels, conf = verdicts(scores, "logits")
    reference = _softmax_reference(scores[[0, 5]])
    assert labels[[0, 5]].tolist() == [1, 2]
    np.testing.assert_allclose(conf[[0, 5]], reference.max(axis=1), rtol=1e-6)
    assert np.isnan(conf[1])
    assert np.isnan(conf[2])


def test_empty_batch() -> None:
    labels, conf = verdicts(np.zeros((0, 10), dtype=np.float32), "probabilities")
    assert labels.shape == (0,)
    assert conf.shape == (0,)
    assert finite_rows(np.zeros((0, 10), dtype=np.float32)).shape == (0,)


@pytest.mark.parametrize("shape", [(10,), (2, 0), (2, 3, 4)])
def test_scores_must_be_n_by_c(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"scores must be \[N, C\]"):
        verdicts(np.zeros(shape, dtype=np.float32), "logits")


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind must be"):
        verdicts(np.zeros((1, 3)), "scores")  # type: ignore[arg-type]


def test_finite_rows_needs_n_by_c() -> None:
    with pytest.raises(ValueError, match=r"scores must be \[N, C\]"):
        finite_rows(np.zeros(4))
