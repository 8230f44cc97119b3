"""The ``pipeline`` pass's options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from effcompile.errors import OptionError


@dataclass(frozen=True)
class PipelineConfig:
    """The ``pipeline`` pass's options (``--set pipeline.<option>=<value>``)."""

    stages: int = field(default=2, metadata={"help": "number of pipeline stages K (>= 1)"})
    balance: Literal["flops", "params", "memory", "time"] = field(
        default="flops", metadata={"help": "stage cost to balance: forward FLOPs, parameters, memory "
                                           "(activations + 4x parameter bytes) or measured time"})
    microbatches: int = field(default=8, metadata={"help": "micro-batches per step (for the runtime and "
                                                          "the bubble estimate)"})
    schedule: Literal["gpipe", "1f1b", "interleaved"] = field(
        default="1f1b", metadata={"help": "torch.distributed.pipelining schedule"})
    stages_per_rank: int = field(default=2, metadata={"help": "interleaved only: stages held by each rank"})
    cut_slack: float = field(default=0.05, metadata={
        "help": "a stage may cost this fraction more than the best balance if the cuts then send fewer bytes"})
    tied: Literal["replicate", "refuse"] = field(default="replicate", metadata={
        "help": "a parameter read by two stages (tied embeddings): keep a copy on each and sum their "
                "gradients, or refuse"})
    split_before: tuple[str, ...] = field(default=(), metadata={
        "help": "manual cuts instead of the solver: K-1 module paths (cut before the first node of that "
                "module, e.g. transformer.h.12) or node names"})

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise OptionError(f"pipeline: stages={self.stages} must be at least 1; set --set pipeline.stages=2")
        if self.microbatches < 1:
            raise OptionError(f"pipeline: microbatches={self.microbatches} must be at least 1; "
                              "set e.g. --set pipeline.microbatches=8")
        if self.cut_slack < 0:
            raise OptionError(f"pipeline: cut_slack={self.cut_slack} must be >= 0; use e.g. 0.05")
        if self.schedule == "interleaved":
            if self.stages_per_rank < 2 or self.stages % self.stages_per_rank:
                raise OptionError(f"pipeline: schedule=interleaved needs stages_per_rank >= 2 dividing "
                                  f"stages={self.stages} (got {self.stages_per_rank}); e.g. stages=4, "
                                  "stages_per_rank=2")
        if self.split_before and len(self.split_before) != self.stages - 1:
            raise OptionError(f"pipeline: split_before names {len(self.split_before)} cuts but stages="
                              f"{self.stages} needs {self.stages - 1}; give one module path per cut")
