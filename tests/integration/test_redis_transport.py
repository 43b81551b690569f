"""A worker's broker channel keeps one Redis client for its commands (kombu would build
one per publish and per ack), and builds a new one when its pool is replaced; its worker
says, on a beat that expires with it, which messages it holds unacknowledged."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tests.conftest import wait_until
from tierfleet import constants as C
from tierfleet.settings import Settings
from workers import holding
from workers.app import create_app
from workers.redis_transport import Channel

pytestmark = pytest.mark.integration


def test_publishes_and_reads_share_one_client_until_the_pool_changes(
    settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Any] = []
    init = redis.Redis.__init__

    def counted(self: redis.Redis, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        init(self, *args, **kwargs)

    app = create_app(settings)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        monkeypatch.setattr(redis.Redis, "__init__", counted)
        with conn.Producer() as producer:
            for i in range(50):
                producer.publish({"n": i}, routing_key="tierfleet.test", declare=[])
        assert len(built) == 1  # one client for 50 publishes
        assert redis.Redis.from_url(redis_url).llen("tierfleet.test") == 50
        del built[1:]  # that one was the test's

        channel._pool = None  # what kombu does after a lost connection
        with channel.conn_or_acquire() as client:
            assert client.connection_pool is channel.pool
        assert len(built) == 2


def test_a_worker_says_which_messages_it_holds_until_it_acks_them(
    settings: Settings, redis_url: str
) -> None:
    app = create_app(settings)
    r = redis.Redis.from_url(redis_url)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        with conn.Producer() as producer:
            producer.publish({"n": 1}, routing_key="tierfleet.test", declare=[])
        message = channel.basic_get("tierfleet.test", no_ack=False)
        tag = message.delivery_tag
        assert r.hexists(C.REDIS_UNACKED, tag)  # kombu's record: no word of who took it
        wait_until(lambda: tag in holding.live_tags(r), timeout_s=10, what="the tag listed")
        (key,) = r.smembers(C.REDIS_CONSUMERS)
        assert 0 < r.ttl(key) <= holding.ALIVE_TTL_S  # gone with the worker, unless renewed
        message.ack()
        wait_until(lambda: tag not in holding.live_tags(r), timeout_s=10, what="the tag dropped")
    r.close()
