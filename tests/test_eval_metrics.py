import pytest

from ccq.eval import relaxed_match


@pytest.mark.parametrize(
    "pred, targets, expected",
    [
        ("12", ["12"], True),
        ("12.61", ["12"], False),         # just over 5% relative error
        ("12.59", ["12"], True),
        ("11.41", ["12"], True),
        ("11.39", ["12"], False),
        ("105", ["100"], True),           # exactly on the 5% boundary is correct
        ("105.0001", ["100"], False),
        ("95", ["100"], True),
        ("-95", ["-100"], True),          # relative to |gold|
        ("50%", ["0.5"], True),           # a trailing % divides by 100
        ("0.5", ["50%"], True),
        ("50", ["50%"], False),           # 50 vs 0.5: numeric test fails, no string fallback
        ("0", ["0"], True),               # gold 0 falls back to the string test
        ("0.0", ["0"], False),
        ("0.001", ["0"], False),
        ("Yes", ["yes"], True),           # string test is case-insensitive
        ("yes ", ["yes"], False),         # ...and nothing else is normalised
        ("1,000", ["1000"], False),       # no comma removal
        ("$5", ["5"], False),
        ("Apples", ["Pears", "apples"], True),   # best over gold labels
        ("7", ["seven", "7.2"], True),
        ("7", ["seven", "8"], False),
        ("", ["0"], False),
        ("abc", [], False),
    ],
)
def test_relaxed_match(pred, targets, expected):
    assert relaxed_match(pred, targets) is expected


def test_relaxed_match_rejects_a_bare_string_target():
    with pytest.raises(TypeError):
        relaxed_match("a", "a")
