"""Refuses adapters the store registered for another base model, by the base model's name.

Shapes catch most foreign adapters (see `AdapterResolver.check`), but two base models can share every
shape (a base and its fine-tune, two sizes of a family with equal widths): only the name the adapter
was registered with tells them apart. The store is asked once per adapter version (versions are
immutable), so only an adapter's first request on this worker pays for the `Get`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from services.common.errors import InvalidArgument
from services.inference.adapter_cache.key import AdapterKey
from services.inference.adapter_cache.store import StoreFetcher

MAX_REMEMBERED = 65536  # adapter versions whose base model is remembered; least recent forgotten


class BaseModelGuard:
    def __init__(self, fetcher: StoreFetcher, base_model: str) -> None:
        self.fetcher = fetcher
        self.base_model = base_model
        self._known: OrderedDict[str, str] = OrderedDict()  # "id@version" -> its base model

    async def check(self, components: Iterable[tuple[str, str, float]], field: str) -> None:
        """Raise InvalidArgument naming `field` if any component is for another base model."""
        for adapter_id, version, _ in components:
            key = AdapterKey(adapter_id, version).name
            base = self._known.get(key)
            if base is None:
                base = (await self.fetcher.info(adapter_id, version)).base_model
                self._known[key] = base
                while len(self._known) > MAX_REMEMBERED:
                    self._known.popitem(last=False)
            else:
                self._known.move_to_end(key)
            if base != self.base_model:
                raise InvalidArgument(
                    field,
                    f"adapter {key} was trained for base model {base!r}; "
                    f"this worker serves {self.base_model!r}",
                )
