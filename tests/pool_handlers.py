"""Handlers that pool tests run inside real worker processes (imported by name)."""

import os
import time

import redis

from minard.formats import wire


class Counting:
    """Adds the records of each batch to Redis at flush; optionally slow."""

    def __init__(self, cfg):
        self.redis = redis.Redis.from_url(cfg["redis_url"])
        self.delay = float(cfg.get("test_delay", 0))
        self.pending = 0
        self.redis.sadd("pooltest:pids", os.getpid())

    def process(self, frames):
        batch = wire.decode(frames)
        if self.delay:
            time.sleep(self.delay)
        self.pending += len(batch)
        self.redis.rpush("pooltest:seqs", batch.meta["seq"])

    def flush(self, now):
        if self.pending:
            self.redis.incrby("pooltest:records", self.pending)
            self.pending = 0

    def close(self):
        self.flush(time.time())
