"""Parameter constraints declared as data: the messages name the parameter, the value and what is allowed."""

import pytest

from autobatch._validation import Interval, Options, StrOptions, check_param, validate_params
from autobatch.errors import InvalidParameterError


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (Interval(int, 1, None, closed="left"), "must be an integer >= 1"),
        (Interval(float, 0, None, closed="neither", unit="seconds"), "must be a number of seconds > 0"),
        (Interval(float, 0, 0.5, closed="left", hint="0.05 means 5%"), "must lie in [0, 0.5) (0.05 means 5%)"),
        (Interval(float, 0, None, closed="left", hint="0.02 means 2%"), "must be a number >= 0 (0.02 means 2%)"),
        (StrOptions(["tpe", "random"]), "must be one of ['tpe', 'random']"),
    ],
)
def test_constraints_say_what_is_allowed(constraint, message):
    assert str(constraint) == message


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "2", None, float("nan")])
def test_an_integer_interval_refuses_what_is_not_a_whole_number_in_range(value):
    with pytest.raises(InvalidParameterError, match=r"n_trials=.* is invalid: must be an integer >= 1") as caught:
        check_param("n_trials", value, Interval(int, 1, None, closed="left"))
    assert caught.value.parameter == "n_trials"


def test_ends_belong_to_the_interval_as_declared():
    half_open = Interval(float, 0, 0.5, closed="left")
    assert half_open.is_satisfied_by(0) and half_open.is_satisfied_by(0.49)
    assert not half_open.is_satisfied_by(0.5) and not half_open.is_satisfied_by(-0.01)
    assert not half_open.is_satisfied_by(float("inf"))


def test_none_passes_only_where_it_is_listed():
    check_param("timeout", None, [Interval(float, 0, None, closed="neither", unit="seconds"), None])
    with pytest.raises(InvalidParameterError, match=r"must be a number of seconds > 0, or None"):
        check_param("timeout", -1, [Interval(float, 0, None, closed="neither", unit="seconds"), None])
    with pytest.raises(InvalidParameterError):
        check_param("timeout", None, Interval(float, 0, None, closed="neither"))


def test_options_compare_type_as_well_as_value():
    assert not Options([1, 2]).is_satisfied_by(True)
    assert Options([1, 2]).is_satisfied_by(2)


def test_the_decorator_checks_defaults_and_keywords_before_the_body_runs():
    calls = []

    @validate_params({"size": Interval(int, 1, None, closed="left"), "mode": StrOptions(["fast", "exact"])})
    def run(size, mode="fast"):
        calls.append((size, mode))

    run(3)
    run(size=4, mode="exact")
    with pytest.raises(InvalidParameterError, match=r"mode='slow' is invalid: must be one of \['fast', 'exact'\]"):
        run(5, mode="slow")
    with pytest.raises(InvalidParameterError, match=r"size=0"):
        run(0)
    assert calls == [(3, "fast"), (4, "exact")]


def test_a_constraint_on_a_parameter_the_function_lacks_is_a_programming_error():
    with pytest.raises(TypeError, match="no parameters"):
        validate_params({"missing": Interval(int, 1, None)})(lambda present: None)
