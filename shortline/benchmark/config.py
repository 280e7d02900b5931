"""``shortline bench`` settings (flags and SHORTLINE_BENCH_* variables)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

DEFAULT_RHO = "0.5,0.7,0.9,1.1"
DEFAULT_BATCHING = "none,dynamic,continuous"
QUICK_RHO = "0.9"
QUICK_BATCHING = "none,continuous"
# The live scheduler's semantic cache holds one prompt: a cell draws its 1,000 requests
# from the 173 test prompts, so a full cache would hand ssjf the true length of nearly
# every request and measure the cache, not the predictor (the sensitivity study does that).
# The live cells, their simulation and their jittered replays all use it.
LIVE_CACHE_SIZE = 1


@dataclass(frozen=True)
class BenchConfig:
    address: str = field(
        default="", metadata={"help": "scheduler HOST:PORT of a running stack (default: start one)"}
    )
    tls: bool = field(
        default=False,
        metadata={
            "help": "the stack it starts runs with TLS, mutual TLS and a token (`up --tls`); "
            "with --address: reach it over TLS"
        },
    )
    ca: str = field(default="", metadata={"help": "with --address: PEM CA of its scheduler"})
    token_file: str = field(
        default="",
        metadata={"help": "with --address: file holding a bearer token (or SHORTLINE_TOKEN)"},
    )
    target_model: str = field(
        default="Meta-Llama-3-8B-Instruct",
        metadata={"help": "alpaca_eval model whose prompts and true lengths are replayed"},
    )
    trace: str = field(default="conv", metadata={"help": "Azure arrival trace: conv or code"})
    rho: str = field(
        default="",
        metadata={
            "help": f"loads, as fractions of capacity (empty: {DEFAULT_RHO}; --quick: {QUICK_RHO})"
        },
    )
    policies: str = field(
        default="fcfs,ssjf,ssjf-aging,ssjf+preempt,sjf-oracle",
        metadata={"help": "comma list of scheduler policies"},
    )
    batching: str = field(
        default="",
        metadata={
            "help": f"comma list of modes (empty: {DEFAULT_BATCHING}; --quick: {QUICK_BATCHING})"
        },
    )
    requests: int = field(default=1000, metadata={"help": "requests per live cell"})
    quick: bool = field(
        default=False,
        metadata={"help": "CI size: 40 requests, rho 0.9, none+continuous, small simulations"},
    )
    live: bool = field(
        default=True, metadata={"help": "run the live cells (--no-live: simulator only)"}
    )
    workers: int = field(default=1, metadata={"help": "live workers (one Triton engine is shared)"})
    slots: int = field(default=8, metadata={"help": "slots per worker (continuous K, dynamic B)"})
    batch_wait_ms: float = field(default=50.0, metadata={"help": "dynamic batching wait T"})
    step_a_ms: float = field(default=10.0, metadata={"help": "replay step: a + b * batch (ms)"})
    step_b_ms: float = field(default=1.5, metadata={"help": "replay step: a + b * batch (ms)"})
    length_scale: float = field(
        default=10.0, metadata={"help": "live true lengths are divided by this (same for all)"}
    )
    slo_factor: float = field(
        default=5.0,
        metadata={"help": "goodput SLO: JCT <= factor * tokens * (a + b) (isolated time)"},
    )
    sim_workers: str = field(default="64,256", metadata={"help": "simulated cluster sizes"})
    sim_requests: int = field(default=100_000, metadata={"help": "requests per simulated cell"})
    sensitivity_requests: int = field(
        default=20_000, metadata={"help": "requests per sensitivity point"}
    )
    spread_replays: int = field(
        default=8,
        metadata={
            "help": "jittered simulator replays of the live cells, for the run-to-run spread "
            "(0: none)"
        },
    )
    seed: int = field(default=1, metadata={"help": "random seed of the request sequence"})
    out: str = field(default="", metadata={"help": "output folder (default .run/bench/<time>)"})

    def effective(self) -> BenchConfig:
        """Fills loads and modes left empty; --quick also caps the sizes.

        Empty, not a default value, marks "not given", so an explicit
        ``--batching none,dynamic,continuous`` is honoured in quick mode too.
        """
        if not self.quick:
            return replace(
                self, rho=self.rho or DEFAULT_RHO, batching=self.batching or DEFAULT_BATCHING
            )
        return replace(
            self,
            requests=min(self.requests, 40),
            rho=self.rho or QUICK_RHO,
            batching=self.batching or QUICK_BATCHING,
            sim_requests=min(self.sim_requests, 10_000),
            sensitivity_requests=min(self.sensitivity_requests, 4_000),
            spread_replays=min(self.spread_replays, 3),
        )

    def rhos(self) -> list[float]:
        return [float(x) for x in self.rho.split(",") if x.strip()]

    def modes(self) -> list[str]:
        return [x.strip() for x in self.batching.split(",") if x.strip()]

    def policy_list(self) -> list[str]:
        return [x.strip() for x in self.policies.split(",") if x.strip()]
