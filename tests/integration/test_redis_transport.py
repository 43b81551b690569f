"""A worker's broker channel keeps one Redis client for its commands (kombu would build
one per publish and per ack), and builds a new one when its pool is replaced."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tierfleet.settings import Settings
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
