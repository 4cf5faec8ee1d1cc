"""SQLite inserts go out in power-of-two row counts, so a connection prepares at most ten INSERT texts."""

from __future__ import annotations

from services.attribution.ledger_sql import insert_sizes


def test_sizes_cover_the_rows_in_few_distinct_statements() -> None:
    texts: set[int] = set()
    for count in range(0, 3000):
        sizes = insert_sizes(count)
        assert sum(sizes) == count
        assert sizes == sorted(sizes, reverse=True)
        assert all(size & (size - 1) == 0 and size <= 512 for size in sizes)
        texts.update(sizes)
    assert texts == {1 << i for i in range(10)}
