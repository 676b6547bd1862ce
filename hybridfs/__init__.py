"""hybridfs: one directory tree over an S3 bucket and a bounded local cache, with Kafka events between them."""

__version__ = "0.1.0"
