"""``identity``: the pass that changes nothing, proving the road (capture → passes → verify → emit).

1. Leave the graph as it is.
2. Report ``changed=False`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from effcompile.pass_manager import Pass, PassRecord, register
from effcompile.program import Program


@register
class Identity(Pass):
    """Change nothing; useful to capture, verify and export a model untouched."""

    name = "identity"
    summary = "change nothing (capture, verify and export the model as it is)"
    exact = True

    @dataclass(frozen=True)
    class Config:
        pass

    def call(self, program: Program, config: Config) -> PassRecord:
        return PassRecord(self.name, changed=False, reason="identity never rewrites")
