"""The human `env` report, `flutter doctor` style: one line per component, its findings under it."""

from __future__ import annotations

import textwrap

from llava_doctor.models import EnvReport, Finding
from llava_doctor.report.text import _COLOR, _MARK, _c, _rel

_OK = ("✓", "32")
_ABSENT = ("-", "2")
# Which component line an environment finding belongs under.
_COMPONENT = {"LD901": "llava", "LD902": "llava", "LD904": "torch", "LD905": "peft"}
# Optional packages: absent is not a problem in itself (LD903 says when a run needs one).
_WHY = {"bitsandbytes": "needed only to load QLoRA (4/8-bit) configs",
        "llava": "needed only for LLaVA's own scripts; `llava-doctor merge` does not use it",
        "accelerate": "needed by LLaVA's builder (low_cpu_mem_usage)",
        "peft": "needed by LLaVA's merge; `llava-doctor merge` does not use it",
        "transformers": "needed by LLaVA's merge; `llava-doctor merge` does not use it",
        "tokenizers": "needed to load the tokenizer", "sentencepiece": "needed by LLaVA's "
        "slow Llama tokenizer (use_fast=False)"}


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:,.1f} GB"


def _mark(findings: list[Finding], color: bool, absent: bool = False) -> str:
    worst = max((f.severity for f in findings), key=lambda s: s.rank, default=None)
    sym, code = (_MARK[worst], _COLOR[worst]) if worst else (_ABSENT if absent else _OK)
    return "[" + _c(sym, code, color) + "]"


def _finding_lines(findings: list[Finding], color: bool, indent: str = "    ") -> list[str]:
    out = []
    for f in findings:
        out.append(f"{indent}{_c(_MARK[f.severity], _COLOR[f.severity], color)} "
                   f"{_c(f.code, _COLOR[f.severity], color)} {f.name}")
        out += [f"{indent}    {ln}" for ln in textwrap.wrap(f.message, 94 - len(indent))]
    return out


def render_env_text(env: EnvReport, *, color: bool = False, **_: object) -> str:
    """Plain text (ANSI colours when `color`)."""
    env_level = [f for f in env.findings if f.target == "environment"]
    by_comp: dict[str, list[Finding]] = {}
    for f in env_level:
        by_comp.setdefault(_COMPONENT.get(f.code, "other"), []).append(f)
    lines = [f"{_mark([], color)} Python {env.python} ({env.python_executable})",
             f"    {env.platform}"]
    t = env.torch
    torch_f = by_comp.get("torch", [])
    if t.version is None:
        lines.append(f"{_mark(torch_f, color, absent=True)} torch not installed")
    else:
        lines.append(f"{_mark(torch_f, color)} torch {t.version} ({t.build} build)")
    g = env.gpus
    if g.error:
        lines.append(f"    GPUs: unknown ({g.error})")
    elif g.gpus is None:
        lines.append("    GPUs: not queried" + (" (CPU build)" if t.build == "cpu" else ""))
    elif not g.gpus:
        lines.append(f"    GPUs: none visible ({g.method})")
    else:
        for gpu in g.gpus:
            lines.append(f"    GPU {gpu.index}: {gpu.name}, {_gb(gpu.memory_free_bytes)} free of "
                         f"{_gb(gpu.memory_total_bytes)} ({g.method})")
    lines += _finding_lines(torch_f, color)
    for pkg in env.packages:
        if pkg.name == "torch":
            continue
        found = by_comp.get(pkg.name, [])
        if pkg.name == "llava":
            lines += _llava_lines(env, found, color)
            continue
        if pkg.version is None:
            why = f" ({_WHY[pkg.name]})" if pkg.name in _WHY else ""
            lines.append(f"{_mark(found, color, absent=True)} {pkg.name} not installed{why}")
        else:
            src = (f" (from {pkg.source}; installed: {pkg.installed or 'none'})"
                   if pkg.source.startswith("--") else "")
            lines.append(f"{_mark(found, color)} {pkg.name} {pkg.version}{src}")
        lines += _finding_lines(found, color)
    lines.append(f"{_mark([], color)} RAM {_gb(env.ram_total_bytes)} total, "
                 f"{_gb(env.ram_available_bytes)} available")
    for d in env.disks:
        lines.append(f"{_mark([], color)} Disk {_rel(d.path) or '.'}: {_gb(d.free_bytes)} free of "
                     f"{_gb(d.total_bytes)}")
    other = by_comp.get("other", [])
    if other:
        lines.append(f"{_mark(other, color)} Probes and other findings")
        lines += _finding_lines(other, color)
    for run in env.runs:
        found = [f for f in env.findings if f.target == run.path]
        lines.append("")
        lines.append(f"{_mark(found, color)} Run {_c(run.path, '1', color)} ({run.kind})")
        tv = env.package("transformers")
        pv = env.package("peft")
        here_t = tv.version if tv and tv.version else "not installed"
        here_p = pv.version if pv and pv.version else "not installed"
        lines.append(f"    transformers: {_written(run.transformers_version, 'config.json')}, "
                     f"here {here_t}")
        lines.append(f"    peft: {_written(run.peft_version, 'adapter_config.json')}, "
                     f"here {here_p}")
        lines.append(f"    adapter key layout: {run.key_layout or 'no adapter'}")
        if run.quantization:
            lines.append(f"    quantization: {run.quantization}")
        lines += _finding_lines(found, color)
    lines.append("")
    lines.append(_c(f"severities for: {env.consumer.label}", "2", color))
    c = env.counts
    if env.findings:
        lines.append(f"Found {c['error']} error(s), {c['warning']} warning(s), {c['info']} info "
                     "in the environment.")
    else:
        lines.append("No issues found in the environment.")
    return "\n".join(lines) + "\n"


def _written(version: str | None, where: str) -> str:
    return f"written with {version} ({where})" if version else f"not recorded in {where}"


def _llava_lines(env: EnvReport, found: list[Finding], color: bool) -> list[str]:
    llava = env.llava
    pkg = env.package("llava")
    if llava.location is None:
        return [f"{_mark(found, color, absent=True)} llava not installed ({_WHY['llava']})"]
    version = pkg.version if pkg and pkg.version else "(no metadata: a checkout on the path)"
    if llava.ok:
        state = f"`from llava.model import LlavaLlamaForCausalLM` works ({llava.seconds} s)"
    elif llava.ok is None:
        state = "import not checked"
    else:
        state = "`from llava.model import LlavaLlamaForCausalLM` fails"
    out = [f"{_mark(found, color)} llava {version} at {_rel(llava.location)}: {state}"]
    return out + _finding_lines(found, color)

