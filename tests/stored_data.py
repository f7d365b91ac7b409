"""Every byte a run left stored, as it is stored: the SQLite file with its WAL and
shared-memory files, or every key and value on the redis-server behind the KV endpoint."""

from __future__ import annotations

from pathlib import Path

import redis

from tests.upstash_rest import kv_redis_url


def stored_sqlite_bytes(db_path: Path) -> bytes:
    """The SQLite file and its WAL and shared-memory files, as they are on disk."""
    files = [db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")]
    assert db_path.exists()
    return b"".join(f.read_bytes() for f in files if f.exists())


def stored_kv_bytes() -> bytes:
    """Every key on the real redis-server behind the KV endpoint, with its value, whatever its
    type (other tests' keys too: they must not hold this driver either)."""
    client = redis.Redis.from_url(kv_redis_url())
    chunks: list[bytes] = []
    with client:
        for key in client.scan_iter(count=1000):
            chunks.append(key)
            kind = client.type(key).decode()
            if kind == "string":
                chunks.append(client.get(key) or b"")
            elif kind == "list":
                chunks.extend(client.lrange(key, 0, -1))
            elif kind == "hash":
                for field, value in client.hgetall(key).items():
                    chunks += [field, value]
            elif kind == "set":
                chunks.extend(client.smembers(key))
            elif kind == "zset":
                chunks.extend(member for member, _ in client.zrange(key, 0, -1, withscores=True))
            elif kind == "stream":
                for _, fields in client.xrange(key):
                    chunks.extend(b"%s=%s" % item for item in fields.items())
            elif kind != "none":  # expired between SCAN and TYPE
                raise AssertionError(f"unexpected Redis type {kind} at {key!r}")
    return b"\n".join(chunks)


def stored_bytes(store_kind: str, tmp_path: Path) -> bytes:
    if store_kind == "kv":
        return stored_kv_bytes()
    return stored_sqlite_bytes(tmp_path / "quotes.sqlite3")
