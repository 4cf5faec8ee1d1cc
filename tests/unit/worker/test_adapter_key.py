"""`AdapterKey`: one value for an adapter from the checked request to the engine's name for it."""

from __future__ import annotations

from services.inference.adapter_cache import AdapterKey


def test_parse_name_and_text() -> None:
    assert AdapterKey.parse("acme/poet") == AdapterKey("acme/poet", "")
    assert AdapterKey.parse("acme/poet@v2") == AdapterKey("acme/poet", "v2")
    assert AdapterKey.parse("hf://org/repo@main") == AdapterKey("hf://org/repo@main")  # the URI keeps its `@`
    key = AdapterKey("acme/poet", "v2")
    assert key.name == "acme/poet@v2" == str(key) and AdapterKey.parse(key.name) == key
    assert str(AdapterKey("acme/poet")) == "acme/poet"  # the latest, not yet resolved
    assert AdapterKey.of(key) is key and AdapterKey.of("acme/poet@v2") == key
    assert len({AdapterKey("a", "1"), AdapterKey.parse("a@1")}) == 1  # hashable, by value
