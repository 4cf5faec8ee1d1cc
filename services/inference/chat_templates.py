"""Adapters' own chat templates, as the adapter store keeps them with each version.

A conversation sent with an adapter that shipped a template (`chat_template.jinja`, or a
`tokenizer_config.json` holding one) is rendered with that template, not the base model's. Versions
are immutable, so a version's template is asked of the store once and kept (a bounded LRU); an
adapter without one costs that one lookup too, then nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

from openlora.v1 import adapter_store_pb2 as store_pb

MAX_KEPT = 4096

Describe = Callable[[str, str], Awaitable[store_pb.AdapterInfo]]


class AdapterTemplates:
    def __init__(self, describe: Describe, max_kept: int = MAX_KEPT) -> None:
        """`describe(id, version)` is the store's `Get` (the adapter cache's fetcher)."""
        self.describe = describe
        self.max_kept = max_kept
        self._kept: OrderedDict[tuple[str, str], str] = OrderedDict()

    async def of(self, adapter_id: str, version: str) -> str:
        """The version's own template; "" when it has none (the base model's then applies)."""
        key = (adapter_id, version)
        template = self._kept.get(key)
        if template is None:
            template = (await self.describe(adapter_id, version)).chat_template
            self._kept[key] = template
            if len(self._kept) > self.max_kept:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(key)
        return template
