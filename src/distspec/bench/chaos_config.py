"""bench-chaos's settings and its fault schedule (apart from the harness, so the CLI parser
stays light)."""

from __future__ import annotations

from dataclasses import dataclass, field

# what each fault does (the harness holds the runtime, so it can kill its actors)
FAULT_KINDS = {
    "kill-target-rank": "ray.kill a non-leader rank of the target group (it is rebuilt)",
    "kill-target-leader": "ray.kill the target group's leader, rank 0 (it is rebuilt)",
    "kill-drafter": "ray.kill the drafter actor (prompt lookup stands in until it is back)",
    "drop-edge": "cut every connection of the edge clients' relay (they resume)",
    "stall-reader": "a client opens a streaming Generate and stops reading",
    "hostile-chunks": "a Speculate client sends malformed draft chunks",
}
DEFAULT_FAULTS = ["kill-target-rank", "kill-drafter", "drop-edge", "stall-reader", "hostile-chunks"]


@dataclass
class ChaosConfig:
    clients: int = 8  # streaming clients held against the server, the edge ones included
    edge_clients: int = 2  # of them: draft locally, stream drafts over Speculate via a relay
    duration_s: float = 300.0
    # faults at fault_interval_s, 2 * fault_interval_s, ... (the first interval is the
    # fault-free baseline), round-robin over `faults`, while one fits before the end
    fault_interval_s: float = 40.0
    faults: list[str] = field(default_factory=lambda: list(DEFAULT_FAULTS))
    # a fault is never injected before the previous one has recovered (it waits)
    settle_s: float = 5.0  # a fault's window: until it recovered, and this much more
    # a fault still waiting at its slot moves the rest of the schedule, and the end, back
    # by as long as it waits, up to this much in all (slow repairs on a busy machine)
    max_slip_s: float = 60.0
    warmup_s: float | None = None  # left out of the baseline; None: min(10, interval / 4)
    max_new_tokens: int = 64
    prompts_file: str | None = None  # None: the built-in benchmark prompts
    num_prompts: int | None = None  # None: all of them
    # the server (run in this process, on a local Ray cluster)
    target: str = "demo"
    target_tp: int = 2  # >= 2 for kill-target-rank: a rank that is not the leader
    drafter: str = "demo"
    edge_drafter: str | None = None  # the edge clients' drafter; None: `drafter`
    mode: str = "pearl"  # pearl | sd (kill-drafter needs a drafter in use)
    gamma: int = 4
    num_slots: int = 16
    max_waiting: int = 16
    max_len: int = 1024
    cpus_per_rank: float = 1.0
    stall_timeout_s: float = 5.0  # the server's: ends the stalled reader's call
    resume_timeout_s: float = 30.0  # the server's: a broken Speculate stream's session waits
    edge_rtt_ms: float = 10.0  # the relay adds half of it each way
    # the clients' deadline: a request that has not ended by then hung (LOST)
    request_timeout_s: float = 240.0
    stall_tokens: int = 200  # the stalled reader's request: more than its window holds
    out_dir: str = "bench-results"

    def __post_init__(self) -> None:
        unknown = [f for f in self.faults if f not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind {unknown[0]!r}; known: {', '.join(FAULT_KINDS)}")
        if not self.faults:
            raise ValueError(f"faults: name at least one of {', '.join(FAULT_KINDS)}")
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if not 0 <= self.edge_clients <= self.clients:
            raise ValueError(f"edge_clients must be in [0, clients], got {self.edge_clients}")
        for name in ("duration_s", "fault_interval_s", "request_timeout_s", "stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("settle_s", "edge_rtt_ms", "resume_timeout_s", "max_slip_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_new_tokens < 1 or self.stall_tokens < 1:
            raise ValueError("max_new_tokens and stall_tokens must be >= 1")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.mode not in ("sd", "pearl"):
            raise ValueError(f"mode must be sd or pearl (a drafter in use), got {self.mode!r}")
        if self.drafter in ("", "none", "ngram"):
            raise ValueError(f"drafter must be a model (demo or a path), got {self.drafter!r}")
        if self.target_tp < 1 or self.num_slots < 1 or self.max_waiting < 0 or self.gamma < 1:
            raise ValueError("target_tp, num_slots and gamma must be >= 1, max_waiting >= 0")
        if "kill-target-rank" in self.faults and self.target_tp < 2:
            raise ValueError("kill-target-rank needs target_tp >= 2 (a rank besides the leader)")
        if "drop-edge" in self.faults and self.edge_clients < 1:
            raise ValueError("drop-edge needs edge_clients >= 1")
        if self.warmup_s is None:
            self.warmup_s = min(10.0, self.fault_interval_s / 4)
        if not 0 <= self.warmup_s < self.fault_interval_s:
            raise ValueError(f"warmup_s must be in [0, fault_interval_s), got {self.warmup_s}")
        if not self.schedule():
            raise ValueError(
                f"no fault fits: the first comes at fault_interval_s ({self.fault_interval_s:g} s) "
                f"and needs max(settle_s, half an interval) after it before duration_s "
                f"({self.duration_s:g} s) ends"
            )

    def schedule(self) -> list[tuple[float, str]]:
        """(offset s, kind) of every fault: at k * fault_interval_s (k >= 1) while the fault
        and the time to recover after it (settle_s, and at least half an interval) fit
        before the end."""
        out: list[tuple[float, str]] = []
        t = self.fault_interval_s
        while t + max(self.settle_s, self.fault_interval_s / 2) <= self.duration_s:
            out.append((t, self.faults[len(out) % len(self.faults)]))
            t += self.fault_interval_s
        return out
