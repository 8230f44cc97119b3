"""Write the conformance table (``docs/conformance.md``) and its summary in the README from the zoo's
results: one row per architecture, one column per check, the counts per check and per modality, the
refusal and failure messages grouped, and the commands that made the results."""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any

from .build import DEFAULT_BREAKS
from .checks import CHECKS, OPTIONS, OUTCOMES
from .runner import latest, load_results

SYMBOL = {"verified": "✓", "noop": "·", "refused": "R", "failed": "✗", "wrong": "‼"}
README_BEGIN, README_END = "<!-- zoo-summary:begin -->", "<!-- zoo-summary:end -->"


def summarise(checks: dict[tuple[str, str], dict]) -> dict[str, collections.Counter]:
    """Outcome counts per check."""
    counts: dict[str, collections.Counter] = {}
    for (_, check), row in checks.items():
        counts.setdefault(check, collections.Counter())[row["outcome"]] += 1
    return counts


def _ordered_checks(checks: dict[tuple[str, str], dict]) -> list[str]:
    present = {check for _, check in checks}
    return [c for c in CHECKS if c in present]


def summary_markdown(builds: dict[str, dict], checks: dict[tuple[str, str], dict]) -> str:
    """The counts per check and per modality as Markdown tables."""
    lines = ["| check | verified | no-op | clear refusal | failure | silently wrong | verified or refused |",
             "|---|---|---|---|---|---|---|"]
    counts = summarise(checks)
    for check in _ordered_checks(checks):
        c = counts[check]
        total = sum(c.values())
        good = c["verified"] + c["noop"] + c["refused"]
        lines.append(f"| `{check}` | {c['verified']} | {c['noop']} | {c['refused']} | {c['failed']} | {c['wrong']} | "
                     f"{good}/{total} ({100 * good / max(total, 1):.0f}%) |")
    lines += ["", "| modality | architectures | transformers builds its default config | built tiny | identity verified "
              "| identity rate (of all / of those transformers builds / of built) |", "|---|---|---|---|---|---|"]
    by_modality: dict[str, list[str]] = collections.defaultdict(list)
    for arch, row in builds.items():
        by_modality[row.get("modality", "?")].append(arch)
    for modality in sorted(by_modality):
        archs = by_modality[modality]
        buildable = [a for a in archs if not default_config_broken(builds[a])]
        built = [a for a in archs if "error" not in builds[a]]
        verified = [a for a in built if checks.get((a, "identity"), {}).get("outcome") in ("verified", "noop")]
        lines.append(f"| {modality} | {len(archs)} | {len(buildable)} | {len(built)} | {len(verified)} | "
                     f"{_percent(verified, archs)} / {_percent(verified, buildable)} / {_percent(verified, built)} |")
    return "\n".join(lines)


def default_config_broken(build: dict) -> bool:
    """Whether ``transformers`` itself fails to build the architecture from its unmodified default config
    (the zoo's build error says so): such an architecture is outside "what transformers can build"."""
    return DEFAULT_BREAKS in build.get("error", "")


def _percent(part: list, whole: list) -> str:
    return f"{100 * len(part) / max(len(whole), 1):.0f}%"


def _cell(row: dict | None) -> str:
    return SYMBOL.get(row["outcome"], "?") if row else ""


def _short(message: str, limit: int = 220) -> str:
    text = re.sub(r"\s+", " ", message).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + "…"


def grouped_messages(checks: dict[tuple[str, str], dict], outcome: str) -> list[str]:
    """One bullet per (check, message with numbers and names masked) listing the architectures."""
    groups: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    examples: dict[tuple[str, str], str] = {}
    for (arch, check), row in checks.items():
        if row["outcome"] != outcome:
            continue
        shape = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", re.sub(r"hf:[\w:.-]+|/tmp/\S+", "X", row["message"]))[:120]
        groups[(check, shape)].append(arch)
        examples.setdefault((check, shape), row["message"])
    bullets = []
    for (check, shape), archs in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        bullets.append(f"- `{check}` ({len(archs)}): {_short(examples[(check, shape)])} — "
                       f"{', '.join(sorted(archs)[:12])}{' …' if len(archs) > 12 else ''}")
    return bullets


def conformance_markdown(rows: list[dict[str, Any]]) -> str:
    """The whole ``docs/conformance.md``."""
    builds, checks = latest(rows)
    runs = [r for r in rows if r.get("kind") == "run"]
    names = _ordered_checks(checks)
    out = ["# Conformance over `transformers` and vendored model files", "",
           "Made by `tools/zoo` (see its `__init__.py`). Each architecture is shrunk from its own config "
           "(`tools/zoo/shrink.py`), built by effcompile's `hf:` spec code, and run through each check; the "
           "judges of a silently wrong result are: trainable parameters without a gradient (where the original's "
           "have one), tensors aliasing the original model's, and — for exact passes that keep the trainable set — "
           "each parameter's gradient against the original model's (relative 1e-4 of its scale) and the loss over "
           "5 AdamW steps against the original's (relative 1e-4); the ONNX check trains 3 steps in "
           "ONNX Runtime against PyTorch (relative 1e-3).", "",
           f"Options used: {', '.join(f'`{p}.{k}={v}`' for p, o in OPTIONS.items() for k, v in o.items())}; "
           "otherwise every pass's defaults.", "", "Commands that made these results:", ""]
    out += [f"- `{r['command']}` ({r.get('started', '?')}; {r.get('versions', '')})" for r in runs] or ["- (none)"]
    out += ["", "## Summary", "", summary_markdown(builds, checks), "",
            f"Legend: {', '.join(f'{s} {o}' for o, s in SYMBOL.items())}; blank: not run. "
            "Build level: how far the config was shrunk (`tools/zoo/shrink.py` LEVELS).", "",
            "## Per architecture", "",
            "| architecture | class | build | " + " | ".join(f"`{c}`" for c in names) + " | s |",
            "|---|---|---|" + "---|" * len(names) + "---|"]
    for arch in sorted(builds):
        build = builds[arch]
        level = "not built" if "error" in build else build.get("level", "?")
        seconds = build.get("seconds", 0) + sum(checks.get((arch, c), {}).get("seconds", 0) for c in names)
        cells = " | ".join(_cell(checks.get((arch, c))) for c in names)
        out.append(f"| `{arch}` | {build.get('class_name', '')} | {level} | {cells} | {seconds:.0f} |")
    specialised = sorted({(arch, branch) for (arch, _), row in checks.items() if row["outcome"] == "verified"
                          for branch in row.get("details", {}).get("data_branches", ())})
    out += ["", "## Captured specialised on the example's data", "",
            "Verified with a Python branch on a tensor's value taken as the example takes it, held by a runtime "
            "check in the graph (other inputs raise; ONNX export is refused):", ""]
    out += [f"- `{arch}`: {branch}" for arch, branch in specialised] or ["(none)"]
    for outcome, title in (("wrong", "Silently wrong"), ("failed", "Failures"), ("refused", "Refusals")):
        bullets = grouped_messages(checks, outcome)
        out += ["", f"## {title}", ""] + (bullets or ["(none)"])
    unbuilt = [f"- `{a}`: {_short(b['error'], 300)}" for a, b in sorted(builds.items()) if "error" in b]
    out += ["", "## Not built", "", *(unbuilt or ["(none)"]), ""]
    return "\n".join(out)


def write_table(results: Path, out: Path, readme: Path | None) -> None:
    """Write ``out`` from ``results``; replace the summary between the README's zoo markers."""
    rows = load_results(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(conformance_markdown(rows))
    if readme is None or not readme.exists():
        return
    text = readme.read_text()
    if README_BEGIN in text and README_END in text:
        builds, checks = latest(rows)
        head, _, rest = text.partition(README_BEGIN)
        _, _, tail = rest.partition(README_END)
        block = f"{README_BEGIN}\n{summary_markdown(builds, checks)}\n{README_END}"
        readme.write_text(head + block + tail)


__all__ = ["OUTCOMES", "conformance_markdown", "default_config_broken", "grouped_messages", "summarise", "summary_markdown", "write_table"]
