"""Classification, backoff, next step and breaker transitions, without a database."""

import random

import pytest

from pipeline_console.delivery.policy import (
    Breaker,
    CircuitEvent,
    CircuitState,
    Classification,
    Failure,
    SendResult,
    Step,
    TransitionRefused,
    backoff_s,
    breaker_event,
    classify,
    next_step,
    transition,
)

CLOSED, OPEN, HALF = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class TestClassification:
    @pytest.mark.parametrize(("result", "expected", "rule"), [
        (SendResult(status=200), Classification.SUCCESS, "2xx"),
        (SendResult(status=204), Classification.SUCCESS, "2xx"),
        (SendResult(failure=Failure.NOT_SENT), Classification.TRANSIENT, "not_sent"),
        (SendResult(status=408), Classification.TRANSIENT, "transient:408"),
        (SendResult(status=425), Classification.TRANSIENT, "transient:425"),
        (SendResult(status=429), Classification.TRANSIENT, "transient:429"),
        (SendResult(status=500), Classification.TRANSIENT, "transient:500"),
        (SendResult(status=502), Classification.TRANSIENT, "transient:502"),
        (SendResult(status=503), Classification.TRANSIENT, "transient:503"),
        (SendResult(status=504), Classification.TRANSIENT, "transient:504"),
        (SendResult(status=400), Classification.PERMANENT, "4xx"),
        (SendResult(status=404), Classification.PERMANENT, "4xx"),
        (SendResult(status=409), Classification.PERMANENT, "4xx"),
        (SendResult(status=422), Classification.PERMANENT, "4xx"),
        (SendResult(status=501), Classification.PERMANENT, "other:501"),
        (SendResult(status=505), Classification.PERMANENT, "other:505"),
        (SendResult(status=520), Classification.TRANSIENT, "transient:5xx"),
        (SendResult(status=599), Classification.TRANSIENT, "transient:5xx"),
        (SendResult(status=302), Classification.PERMANENT, "other:302"),
        (SendResult(failure=Failure.MAYBE_SENT), Classification.AMBIGUOUS, "maybe_sent"),
        (SendResult(failure=Failure.CERTIFICATE), Classification.PERMANENT, "tls_certificate"),
        (SendResult(failure=Failure.TOKEN_UNAVAILABLE), Classification.TRANSIENT,
         "token_endpoint_unavailable"),
        (SendResult(failure=Failure.TOKEN_REFUSED), Classification.PERMANENT,
         "token_endpoint_refused"),
    ])
    def test_the_default_rules(self, result, expected, rule):
        assert classify(result, []) == (expected, rule)

    def test_a_system_override_wins_and_is_named(self):
        overrides = [{"status": 409, "classification": "success"}]
        assert classify(SendResult(status=409), overrides) == (Classification.SUCCESS,
                                                                "override:409")
        assert classify(SendResult(status=400), overrides)[0] is Classification.PERMANENT

    def test_an_override_never_applies_to_a_send_without_an_answer(self):
        overrides = [{"status": 409, "classification": "success"}]
        assert classify(SendResult(failure=Failure.MAYBE_SENT), overrides)[0] is (
            Classification.AMBIGUOUS)


class TestBackoff:
    def test_doubles_within_jitter_and_stops_at_the_maximum(self):
        rng = random.Random(1)
        for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (10, 30)]:
            delay = backoff_s(attempt, 1.0, 30.0, rng)
            assert ceiling / 2 <= delay <= ceiling

    def test_honours_retry_after_even_beyond_the_backoff_maximum_up_to_a_day(self):
        rng = random.Random(1)
        assert backoff_s(1, 1.0, 30.0, rng, retry_after_s=12) == 12
        assert backoff_s(1, 1.0, 30.0, rng, retry_after_s=3600) == 3600
        assert backoff_s(1, 1.0, 30.0, rng, retry_after_s=10**9) == 86_400


class TestNextStep:
    @pytest.mark.parametrize(("classification", "made", "expected"), [
        (Classification.SUCCESS, 1, Step.DELIVERED),
        (Classification.TRANSIENT, 1, Step.RETRY),
        (Classification.TRANSIENT, 4, Step.RETRY),
        (Classification.TRANSIENT, 5, Step.DEAD_LETTER),
        (Classification.PERMANENT, 1, Step.DEAD_LETTER),
        (Classification.AMBIGUOUS, 1, Step.AMBIGUOUS),
        (Classification.AMBIGUOUS, 5, Step.AMBIGUOUS),
    ])
    def test_each_outcome(self, classification, made, expected):
        assert next_step(classification, made, max_attempts=5) is expected


class TestBreakerTransitions:
    @pytest.mark.parametrize(("before", "event", "after"), [
        (Breaker(CLOSED, 0), CircuitEvent.HEALTHY, Breaker(CLOSED, 0)),
        (Breaker(CLOSED, 2), CircuitEvent.HEALTHY, Breaker(CLOSED, 0)),
        (Breaker(CLOSED, 0), CircuitEvent.FAILURE, Breaker(CLOSED, 1)),
        (Breaker(CLOSED, 2), CircuitEvent.FAILURE, Breaker(OPEN, 3)),
        (Breaker(CLOSED, 1), CircuitEvent.FORCE_OPEN, Breaker(OPEN, 1)),
        (Breaker(OPEN, 3), CircuitEvent.HEALTHY, Breaker(OPEN, 3)),
        (Breaker(OPEN, 3), CircuitEvent.FAILURE, Breaker(OPEN, 3)),
        (Breaker(OPEN, 3), CircuitEvent.RESET, Breaker(HALF, 3)),
        (Breaker(HALF, 3), CircuitEvent.HEALTHY, Breaker(CLOSED, 0)),
        (Breaker(HALF, 3), CircuitEvent.FAILURE, Breaker(OPEN, 4)),
        (Breaker(HALF, 3), CircuitEvent.FORCE_OPEN, Breaker(OPEN, 3)),
    ], ids=lambda value: getattr(value, "value", None) or str(value))
    def test_every_edge(self, before, event, after):
        assert transition(before, event, threshold=3) == after

    @pytest.mark.parametrize(("before", "event"), [
        (Breaker(CLOSED), CircuitEvent.RESET), (Breaker(HALF), CircuitEvent.RESET),
        (Breaker(OPEN), CircuitEvent.FORCE_OPEN),
    ])
    def test_meaningless_operator_actions_are_refused(self, before, event):
        with pytest.raises(TransitionRefused):
            transition(before, event, threshold=3)

    def test_permanent_answers_count_as_healthy_and_ambiguous_as_failure(self):
        assert breaker_event(Classification.PERMANENT) is CircuitEvent.HEALTHY
        assert breaker_event(Classification.SUCCESS) is CircuitEvent.HEALTHY
        assert breaker_event(Classification.AMBIGUOUS) is CircuitEvent.FAILURE
        assert breaker_event(Classification.TRANSIENT) is CircuitEvent.FAILURE
