"""Plain classes that own a target shard or a drafter for one device or rank (made Ray actors
at creation time by cluster/, or used in-process), their messages, local process groups, and
the protocol both the scheduler and cluster/ speak to them: Remote calls and repair types.
Imports models/ and spec_decode/; never the engine, scheduler, server, cluster, bench or
train."""
