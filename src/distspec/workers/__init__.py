"""Plain classes that own a model shard or a drafter; made Ray actors at creation (cluster/)."""
