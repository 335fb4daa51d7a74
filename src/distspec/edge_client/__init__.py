"""The on-device side: a local drafter + a gRPC stream to the server (no Ray needed)."""

from distspec.edge_client.client import EdgeClient, EdgeStats, EdgeStep

__all__ = ["EdgeClient", "EdgeStats", "EdgeStep"]
