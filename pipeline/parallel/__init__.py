"""Process groups and the (replicas, shard) layout, rank-local loading, and the backends that shard the models."""
