import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.httprange import ByteRange, Unsatisfiable, parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-", 10, ByteRange(0, 10)),
        ("bytes=3-", 10, ByteRange(3, 10)),
        ("bytes=0-4", 10, ByteRange(0, 5)),
        ("bytes=5-100", 10, ByteRange(5, 10)),
        ("bytes=-3", 10, ByteRange(7, 10)),
        ("bytes=-30", 10, ByteRange(0, 10)),
        ("bytes=0-1,4-5", 10, None),  # several ranges: a full 200
        ("items=0-1", 10, None),
        ("bytes=5-2", 10, None),
        ("bytes=abc", 10, None),
    ],
)
def test_parse(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=10-", 10), ("bytes=-0", 10), ("bytes=0-", 0), ("bytes=-5", 0)]
)
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


def test_content_range() -> None:
    assert ByteRange(3, 10).content_range(10) == "bytes 3-9/10"


@given(st.text(max_size=40), st.integers(min_value=0, max_value=1 << 40))
def test_any_header_gives_a_range_inside_the_body_or_none(header: str, size: int) -> None:
    try:
        rng = parse_range(header, size)
    except Unsatisfiable:
        return
    if rng is not None:
        assert 0 <= rng.start < rng.end <= size
