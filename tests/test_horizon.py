import math

import pytest

from autobatch.errors import InvalidParameterError
from autobatch.search.horizon import DEFAULT_HORIZON, HORIZON_UNITS, Horizon


@pytest.mark.parametrize(
    "text, amount, unit",
    [
        ("3ep", 3, "epochs"),
        ("3 epochs", 3, "epochs"),
        ("1 epoch", 1, "epochs"),
        ("0.5ep", 0.5, "epochs"),
        ("3 EPOCHS", 3, "epochs"),
        ("200000 samples", 200_000, "samples"),
        ("200_000 samples", 200_000, "samples"),
        ("200,000 samples", 200_000, "samples"),
        ("200k samples", 200_000, "samples"),
        ("1.5M samples", 1_500_000, "samples"),
        ("2B samples", 2e9, "samples"),
        ("1e5 samples", 100_000, "samples"),
        ("5000 steps", 5000, "steps"),
        ("5k steps", 5000, "steps"),
        ("5,000 optimizer steps", 5000, "steps"),
        ("1 step", 1, "steps"),
        ("2h", 7200, "seconds"),
        ("2 hours", 7200, "seconds"),
        ("1.1h", 3960, "seconds"),
        ("15min", 900, "seconds"),
        ("15 minutes", 900, "seconds"),
        ("90s", 90, "seconds"),
        ("90 sec", 90, "seconds"),
        ("1h30min", 5400, "seconds"),
        ("1 h 30 min", 5400, "seconds"),
        ("1d", 86400, "seconds"),
        ("1 day 12 hours", 129_600, "seconds"),
        ("  2 H  ", 7200, "seconds"),
    ],
)
def test_horizon_parses_every_spelling(text, amount, unit):
    horizon = Horizon.parse(text)
    assert (horizon.amount, horizon.unit) == (amount, unit)
    assert horizon.unit in HORIZON_UNITS


@pytest.mark.parametrize(
    "horizon, text",
    [
        (Horizon(3, "epochs"), "3 epochs"),
        (Horizon(1, "epochs"), "1 epoch"),
        (Horizon(0.5, "epochs"), "0.5 epochs"),
        (Horizon(200_000, "samples"), "200,000 samples"),
        (Horizon(5000, "steps"), "5,000 optimizer steps"),
        (Horizon(7200, "seconds"), "2 h"),
        (Horizon(900, "seconds"), "15 min"),
        (Horizon(90, "seconds"), "90 s"),
        (Horizon(60, "seconds"), "1 min"),
        (Horizon(5400, "seconds"), "1 h 30 min"),
        (Horizon(129_600, "seconds"), "1 d 12 h"),
        (Horizon(3600.5, "seconds"), "1 h 0.5 s"),
    ],
)
def test_horizon_str_reads_well_and_round_trips(horizon, text):
    assert str(horizon) == text
    assert Horizon.parse(str(horizon)) == horizon


def test_horizon_dict_round_trip_and_parse_passes_objects_through():
    horizon = Horizon.parse("1h30min")
    assert horizon.to_dict() == {"amount": 5400.0, "unit": "seconds"}
    assert Horizon.from_dict(horizon.to_dict()) == horizon
    assert Horizon.parse(horizon.to_dict()) == horizon
    assert Horizon.parse(horizon) is horizon
    assert DEFAULT_HORIZON == Horizon.parse("1 epoch")


def test_horizon_samples_for_each_unit():
    assert Horizon.parse("3ep").samples(n_train=12_000, effective_batch_size=64) == 36_000
    assert Horizon.parse("200k samples").samples(n_train=12_000, effective_batch_size=64) == 200_000
    assert Horizon.parse("5000 steps").samples(n_train=12_000, effective_batch_size=64) == 320_000
    two_minutes = Horizon.parse("2min")
    assert two_minutes.is_time and not Horizon.parse("3ep").is_time
    assert two_minutes.samples(12_000, 64, samples_per_second=1000.0) == 120_000
    assert two_minutes.samples(12_000, 64) is None


@pytest.mark.parametrize(
    "value, says",
    [
        (3, "bare number"),
        (3.0, "bare number"),
        ("3", "bare number"),
        (math.nan, "bare number"),
        ("3 parsecs", "unknown unit 'parsecs'"),
        ("0ep", "> 0"),
        ("0 s", "> 0"),
        ("-1ep", "> 0"),
        ("-2h", "> 0"),
        ("nan ep", "epochs ('3ep')"),
        ("inf samples", "epochs ('3ep')"),
        ("1e400 samples", "> 0"),
        ("2.5 samples", "must be whole"),
        ("2.5 steps", "must be whole"),
        ("3m", "'min'"),
        ("3 M", "'min'"),
        ("1h30m", "'min'"),
        ("30min 1h", "largest first"),
        ("2h 3ep", "only durations"),
        ("1,5 samples", "epochs ('3ep')"),
        ("", "epochs ('3ep')"),
        (True, "epochs ('3ep')"),
        ([3, "ep"], "epochs ('3ep')"),
        (None, "epochs ('3ep')"),
        ({"amount": 3}, "'amount' and 'unit'"),
        ({"amount": -3, "unit": "epochs"}, "> 0"),
        ({"amount": 3, "unit": "parsecs"}, "one of epochs"),
        ({"amount": 2.5, "unit": "samples"}, "must be whole"),
    ],
)
def test_horizon_refuses_bad_input_in_one_line(value, says):
    with pytest.raises(InvalidParameterError) as caught:
        Horizon.parse(value)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"horizon={value!r} is invalid: ")
    assert says in message


def test_horizon_error_names_the_parameter_it_was_given_as():
    with pytest.raises(InvalidParameterError, match=r"^train_horizon='3' is invalid"):
        Horizon.parse("3", parameter="train_horizon")
