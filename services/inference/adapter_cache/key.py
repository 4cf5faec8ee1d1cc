"""`AdapterKey`: an adapter as the worker names it, from the checked request to the engine."""

from __future__ import annotations

from dataclasses import dataclass


def is_source_uri(adapter_id: str) -> bool:
    return "://" in adapter_id


@dataclass(frozen=True, slots=True)
class AdapterKey:
    """An adapter id and a version; an empty version means the latest, until the cache resolves it.

    `name` (`id@version`) is how the cache's tiers, the engine process and the handoff files know one
    resolved version: `@` occurs in neither part of a stored adapter's key."""

    id: str
    version: str = ""

    @classmethod
    def parse(cls, text: str) -> AdapterKey:
        """`id` or `id@version`; a source URI (`hf://org/repo@rev`) is an id whose `@` is its own."""
        if is_source_uri(text):
            return cls(text)
        adapter_id, _, version = text.partition("@")
        return cls(adapter_id, version)

    @classmethod
    def of(cls, key: AdapterKey | str) -> AdapterKey:
        return key if isinstance(key, AdapterKey) else cls.parse(key)

    @property
    def name(self) -> str:
        return f"{self.id}@{self.version}"

    def __str__(self) -> str:
        return self.name if self.version else self.id
