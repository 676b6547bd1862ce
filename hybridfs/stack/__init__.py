"""The local stack (Kafka + MinIO on loopback) that development, tests and benchmarks run against.

``stack_env()`` gives the environment that points clients at it; ``hybridfs stack up`` starts it.
"""

from hybridfs.stack.config import BUCKET, KAFKA_BOOTSTRAP, S3_ENDPOINT, StackPaths, stack_env

__all__ = ["BUCKET", "KAFKA_BOOTSTRAP", "S3_ENDPOINT", "StackPaths", "stack_env"]
