"""Ray bring-up: placement groups, tensor-parallel groups of workers (torch.distributed),
drafter groups, health checks and rebuilding broken groups.
Imports workers/ and below; never the scheduler, server, bench or CLI."""
