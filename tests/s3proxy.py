"""The S3 fault-injection proxy lives in hybridfs/bench/s3proxy.py (``bench availability`` ships it); tests import
it from here as before."""

from hybridfs.bench.s3proxy import ACTIONS, CHUNK, Rule, S3FaultProxy

__all__ = ["ACTIONS", "CHUNK", "Rule", "S3FaultProxy"]
