"""`hf://org/repo[@revision]`: the two PEFT files of a Hugging Face Hub repository.

huggingface_hub does the fetching, so HF_ENDPOINT (a mirror or an in-house hub), HF_TOKEN and the
shared HF cache apply as everywhere else. Only the two files are fetched, never pickles, and each
only after the Hub's metadata said it fits the store's size limit.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from services.adapter_store.safetensors_file import FIELD as WEIGHTS
from services.adapter_store.sources import FetchedAdapter, SourceContext, suggest_id
from services.adapter_store.validation import CONFIG
from services.common.errors import InvalidArgument, Unavailable

_REPO = re.compile(
    r"^hf://(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[A-Za-z0-9._/-]+))?/?$"
)


class HuggingFaceSource:
    def fetch(self, uri: str, dest: Path, context: SourceContext) -> FetchedAdapter:
        from huggingface_hub import hf_hub_download, hf_hub_url
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        match = _REPO.match(uri)
        if match is None:
            raise InvalidArgument("source_uri", "expected hf://org/repo or hf://org/repo@revision")
        repo, revision = match["repo"], match["rev"]
        files = {}
        endpoint = os.environ.get("HF_ENDPOINT")  # read at call time: huggingface_hub snapshots it on import
        for name in (CONFIG, WEIGHTS):
            try:
                size = _size_on_hub(hf_hub_url(repo, name, revision=revision, endpoint=endpoint), context)
                if size is not None and size > context.policy.max_bytes:
                    raise InvalidArgument(
                        "source_uri",
                        f"{name} is {size} bytes on the Hub, over the {context.policy.max_bytes}-byte limit",
                    )
                cached = Path(
                    hf_hub_download(
                        repo,
                        name,
                        revision=revision,
                        etag_timeout=context.policy.timeout_s,
                        endpoint=endpoint,
                        cache_dir=os.environ.get("HF_HUB_CACHE"),
                    )
                )
            except LocalEntryNotFoundError as exc:  # the hub could not be reached and nothing is cached
                raise Unavailable(
                    f"fetching {repo} failed: {exc.__cause__ or exc}", retry_after_s=5
                ) from None
            except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
                raise InvalidArgument(
                    "source_uri", f"{repo}@{revision or 'main'}: {type(exc).__name__}"
                ) from None
            except (HfHubHTTPError, OSError) as exc:
                raise Unavailable(f"fetching {repo} failed: {exc}", retry_after_s=5) from None
            if cached.stat().st_size > context.policy.max_bytes:
                raise InvalidArgument(
                    "source_uri", f"{name} exceeds the {context.policy.max_bytes}-byte limit"
                )
            files[name] = dest / name
            shutil.copyfile(cached, files[name])
        return FetchedAdapter(files, suggest_id(repo), {"revision": revision or "main"})


def _size_on_hub(url: str, context: SourceContext) -> int | None:
    """The file's size as the Hub states it (HEAD request), before anything is downloaded."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return get_hf_file_metadata(url, timeout=context.policy.timeout_s).size
    except HfHubHTTPError:
        raise  # the Hub's answer (no such repo, file, revision): the caller says which
    except Exception as exc:  # the HTTP client's own errors: the Hub could not be reached
        raise Unavailable(f"asking the Hub about {url} failed: {exc}", retry_after_s=5) from None
