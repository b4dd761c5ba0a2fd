"""The v2 key layout and the store URL: pure, no Redis needed."""

from __future__ import annotations

import zlib

import pytest
from redis.crc import key_slot

from service.core.model_names import DEFAULT_MODEL
from service.settings import Settings
from service.store.address import RedisAddress, redact
from service.store.keys import DEFAULT_SHARDS, KeyLayout, shard_of


def test_every_key_of_a_user_and_its_shards_queues_share_one_slot() -> None:
    layout = KeyLayout(64)
    for user_id in ("u0", "u42", "a:b@c.d-e_f", "x" * 128):
        shard = layout.shard(user_id)
        keys = [
            layout.feature_key(user_id),
            layout.embedding_key(user_id),
            layout.dirty_key(shard),
            layout.leased_key(shard),
            layout.lease_info_key(shard),
            layout.active_key(shard),
        ]
        assert len({key_slot(k.encode()) for k in keys}) == 1, keys


def test_key_names_are_the_documented_ones() -> None:
    layout = KeyLayout(8)
    shard = zlib.crc32(b"u42") % 8
    assert layout.feature_key("u42") == f"uf:{{{shard}}}:u42"
    assert layout.embedding_key("u42") == f"ue:{{{shard}}}:u42"
    assert layout.dirty_key(3) == "userembed:{3}:dirty"
    assert layout.leased_key(3) == "userembed:{3}:leased"
    assert layout.lease_info_key(3) == "userembed:{3}:lease"
    assert layout.active_key(3) == "userembed:{3}:active"


def test_the_shard_is_crc32_of_the_user_id_like_librdkafkas_key_partitioner() -> None:
    # CRC-32/ISO-HDLC, librdkafka's rd_crc32: its standard check value, then a user
    assert shard_of("123456789", 2**31) == 0xCBF43926 % 2**31
    assert shard_of("u42", 64) == 0xDE86D1DE % 64
    # with shards a multiple of the partitions, a partition's users fall in shards
    # congruent to it: shard % partitions == partition
    for user in (f"u{i}" for i in range(500)):
        assert shard_of(user, 48) % 12 == zlib.crc32(user.encode()) % 12


def test_shards_spread_users_evenly() -> None:
    layout = KeyLayout(16)
    counts = [len(users) for users in layout.by_shard(f"u{i}" for i in range(16_000)).values()]
    assert len(counts) == 16 and max(counts) < 1.1 * 1000 and min(counts) > 0.9 * 1000


def test_by_shard_keeps_input_order_within_a_shard() -> None:
    layout = KeyLayout(4)
    users = [f"u{i}" for i in range(50)]
    for shard, group in layout.by_shard(users).items():
        assert group == [u for u in users if layout.shard(u) == shard]


@pytest.mark.parametrize("shards", [0, 16385])
def test_a_shard_count_out_of_range_is_refused(shards: int) -> None:
    with pytest.raises(ValueError, match=r"shards must be in 1\.\.16384"):
        KeyLayout(shards)


def test_the_settings_default_is_the_layouts_default() -> None:
    assert Settings().redis_shards == DEFAULT_SHARDS


def test_a_cluster_url_names_its_seeds_credentials_and_tls() -> None:
    address = RedisAddress.parse("rediss+cluster://app:s%40cret@r1:7000,r2:7001,[::1]:7002")
    assert address.cluster and address.tls
    assert address.nodes == (("r1", 7000), ("r2", 7001), ("::1", 7002))
    assert (address.username, address.password) == ("app", "s@cret")
    assert "s%40cret" not in address.shown and address.shown.startswith("rediss+cluster://app:***@")
    plain = RedisAddress.parse("redis+cluster://h1:1,h2:2/0?ssl_ca_certs=/ca.pem")
    assert (
        not plain.tls
        and plain.password is None
        and dict(plain.options) == {"ssl_ca_certs": "/ca.pem"}
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://h1:7000/1", "only database 0: drop '/1'"),
        ("redis+cluster://", "names no node"),
        ("redis+cluster://h1", "not host:port"),
        ("redis+cluster://h1:7000?db=2", "unsupported options"),
        ("http://h1:7000", "unsupported redis_url"),
    ],
)
def test_a_bad_cluster_url_says_what_to_change(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisAddress.parse(url)


def test_a_node_url_passes_through_and_passwords_never_show() -> None:
    assert not RedisAddress.parse("redis://h:6379/2").cluster
    assert redact("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"


def test_settings_take_cluster_urls_and_refuse_unknown_schemes() -> None:
    assert Settings(redis_url="redis+cluster://h:1").redis_url == "redis+cluster://h:1"
    with pytest.raises(ValueError, match="unsupported redis_url scheme"):
        Settings(redis_url="memcached://h:1")


def test_misconfiguration_sentences_name_the_fix() -> None:
    node = RedisAddress.parse("redis://:pw@10.0.0.5:7000/0")
    assert node.is_cluster_sentence() == (
        "redis://:***@10.0.0.5:7000/0 is a node of a Redis Cluster (it answers for some "
        "slots only): set USEREMBED_REDIS_URL=redis+cluster://10.0.0.5:7000[,host:port...]"
    )
    cluster = RedisAddress.parse("redis+cluster://10.0.0.5:7000")
    assert cluster.not_cluster_sentence().endswith(
        "set USEREMBED_REDIS_URL=redis://10.0.0.5:7000/0"
    )


def test_bulk_read_keys_are_the_embedding_keys_as_bytes() -> None:
    layout = KeyLayout(64)
    users = ["u1", "user:42", "é", "x" * 128]
    for model in (DEFAULT_MODEL, "clicks"):
        assert layout.embedding_keys(users, model) == [
            layout.embedding_key(u, model).encode() for u in users
        ]
    assert layout.embedding_keys(iter(users)) == [layout.embedding_key(u).encode() for u in users]
    assert layout.embedding_keys([]) == []
