"""The human report: one block per target, one line per finding, the remedy under it."""

from __future__ import annotations

import os
import textwrap

from llava_doctor.models import CheckOutcome, CheckStatus, Finding, Report, Severity

_MARK = {Severity.error: "✗", Severity.warning: "!", Severity.info: "•"}
_COLOR = {Severity.error: "31", Severity.warning: "33", Severity.info: "36"}


_SOURCE = {"--base": "--base", "--projector": "--projector",
           "adapter_config.json": "recorded in adapter_config.json",
           "hf-cache": "from the local Hugging Face cache",
           "sibling *-pretrain": "found beside the run"}


def _c(text: str, code: str, color: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if color else text


def _rel(p: str | None) -> str:
    if p is None:
        return ""
    try:
        r = os.path.relpath(p)
        return p if r.startswith("..") else r
    except ValueError:
        return p


def _outcomes(checks: list[CheckOutcome], found: list[Finding]) -> str:
    """'33 checks passed, 1 with warnings, 1 with info only, 3 skipped': a check whose only
    findings are info did not fail, so it is not counted as failed."""
    worst: dict[str, Severity] = {}
    for f in found:
        if f.code not in worst or f.severity.rank > worst[f.code].rank:
            worst[f.code] = f.severity
    by = {s: 0 for s in CheckStatus}
    graded = {s: 0 for s in Severity}
    for o in checks:
        if o.status == CheckStatus.failed and o.code in worst:
            graded[worst[o.code]] += 1
        else:
            by[o.status] += 1
    parts = [f"{by[CheckStatus.passed]} checks passed"]
    failed = by[CheckStatus.failed] + graded[Severity.error]
    if failed:
        parts.append(f"{failed} failed")
    if graded[Severity.warning]:
        parts.append(f"{graded[Severity.warning]} with warnings")
    if graded[Severity.info]:
        parts.append(f"{graded[Severity.info]} with info only")
    if not failed and not graded[Severity.warning] and not graded[Severity.info]:
        parts.append("0 failed")
    parts.append(f"{by[CheckStatus.skipped]} skipped")
    if by[CheckStatus.crashed]:
        parts.append(f"{by[CheckStatus.crashed]} crashed")
    return ", ".join(parts)


def render_text(report: Report, *, color: bool = False, verbose: bool = False,
                **_: object) -> str:
    """Plain text (ANSI colours when `color`), grouped by target."""
    lines: list[str] = [_c(f"severities for: {report.consumer_label()}", "2", color)]
    width = 100
    for target in report.targets:
        found = [f for f in report.findings if f.target == target.path]
        what = f"{target.kind}, {target.family}" if target.family else target.kind
        lines.append(_c(f"{target.path}", "1", color) + f"  ({what})")
        if report.consumer is None:  # targets of different consumers: each says its own
            lines.append("  " + _c(f"severities for: {target.consumer.label}", "2", color))
        used = [f"{i.role}: {_rel(i.path)} ({_SOURCE.get(i.source, i.source)})"
                if i.path is not None else
                f"{i.role}: several *-pretrain/mm_projector.bin beside the run, none used "
                "(pass --projector)"
                for i in target.inputs if i.path is not None or i.source == "ambiguous"]
        if used:
            lines.append("  " + _c("; ".join(used), "2", color))
        for f in found:
            mark = _c(_MARK[f.severity], _COLOR[f.severity], color)
            where = _rel(f.path)
            lines.append(f"  {mark} {_c(f.code, _COLOR[f.severity], color)} {f.name}  {where}")
            for ln in textwrap.wrap(f.message, width - 6):
                lines.append(f"      {ln}")
            if f.fix.value != "none":
                cmd = "llava-doctor fix --unsafe" if f.fix.value == "unsafe" else "llava-doctor fix"
                lines.append(f"      fix ({f.fix.value}): `{cmd}`")
        lines.append(f"  {_c('✓', '32', color)} " + _outcomes(target.checks, found))
        if verbose:
            for o in target.checks:
                if o.status == CheckStatus.skipped:
                    lines.append(f"      - {o.code} {o.name} skipped: {o.reason}")
        lines.append("")
    c = report.counts
    if report.findings:
        lines.append(f"Found {c['error']} error(s), {c['warning']} warning(s), {c['info']} info "
                     f"in {len(report.targets)} target(s).")
    else:
        lines.append(f"No issues found in {len(report.targets)} target(s).")
    if report.env is not None:
        from llava_doctor.report.env_text import render_env_text

        lines += ["", _c("Environment", "1", color), render_env_text(report.env, color=color)]
        return "\n".join(lines)
    return "\n".join(lines) + "\n"
