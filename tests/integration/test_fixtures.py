"""The shared fixtures work against the real servers they promise."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
import sqlalchemy as sa


def test_s3_put_get_round_trip(s3_bucket: tuple[Any, str]) -> None:
    client, bucket = s3_bucket
    body = os.urandom(3 * 1024 * 1024 + 17)  # spans more than one internal chunk
    client.put_object(Bucket=bucket, Key="adapters/a/model.safetensors", Body=body)
    fetched = client.get_object(Bucket=bucket, Key="adapters/a/model.safetensors")["Body"].read()
    assert hashlib.sha256(fetched).hexdigest() == hashlib.sha256(body).hexdigest()
    listed = client.list_objects_v2(Bucket=bucket, Prefix="adapters/")
    assert [o["Key"] for o in listed["Contents"]] == ["adapters/a/model.safetensors"]
    client.delete_object(Bucket=bucket, Key="adapters/a/model.safetensors")
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_postgres_table_created_and_dropped(pg_database_url: str) -> None:
    engine = sa.create_engine(pg_database_url)
    try:
        with engine.begin() as conn:
            assert (
                conn.execute(sa.text("SELECT current_database()")).scalar()
                == pg_database_url.rsplit("/", 1)[1]
            )
            conn.execute(sa.text("CREATE TABLE probe (id serial PRIMARY KEY, note text NOT NULL)"))
            conn.execute(sa.text("INSERT INTO probe (note) VALUES ('a'), ('b')"))
            assert conn.execute(sa.text("SELECT count(*) FROM probe")).scalar() == 2
            conn.execute(sa.text("DROP TABLE probe"))
        with engine.connect() as conn:
            assert not sa.inspect(conn).has_table("probe")
    finally:
        engine.dispose()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_tiny_model_loads_and_generates(tiny_model_factory: Any, family: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_factory(family)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == family
    text = "Hello café 東京 😀 adapters"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == text  # byte-level BPE round-trips any UTF-8
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert len(new) == 16
    assert len(set(new)) > 2, "random weights should not collapse onto one token"
