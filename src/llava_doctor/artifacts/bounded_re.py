"""Regular expressions taken from artifacts, evaluated with a time bound.

peft reads several `adapter_config.json` fields as Python `re` patterns: a string
`target_modules` or `exclude_modules` (`re.fullmatch` on every module name), each
`modules_to_save` entry, `layers_pattern`, and the keys of `rank_pattern` / `alpha_pattern`
(`artifacts.peft_match` has the exact templates). A catastrophic pattern such as
`^(a+)+$|(.*)*x(.*)*y(.*)*z` backtracks for hours on ordinary module names: peft would hang on
it, and so would a check that evaluated it in-process.

So every such pattern is evaluated here with the very `re` engine peft uses (same Python, same
templates, so a pattern that finishes gives exactly peft's answer), in a child interpreter that
is killed once one pattern has run longer than its budget over all module names. The answer is
a table of results per (use, pattern) that `peft_match` consults through its ``matcher``
argument; a pattern over budget raises `PatternTimeout` when consulted, an invalid one the
`re.error` peft would get.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

#: Seconds one pattern may take over all module names (compilation included). A pattern peft
#: could use finishes in well under a millisecond on a 7B model's ~1,000 names.
PATTERN_BUDGET_S = 1.0
#: After this many patterns over budget, the remaining ones are not evaluated (reported too):
#: a config with thousands of hostile keys must not buy thousands of budgets.
MAX_OVER_BUDGET = 2
#: All the patterns of one config together, however fast each is: a million cheap
#: `rank_pattern` keys cost peft a million regex scans per module just the same.
TOTAL_BUDGET_S = 3.0
#: More patterns than this in one config are not evaluated at all (a finding, not work).
MAX_PATTERNS = 1000
#: Longest pattern text a message quotes.
SHOW_CHARS = 80

# use -> (prefix, suffix, re function, group whose value is the answer). The pattern is put
# between prefix and suffix by concatenation, as peft's f-strings do.
USES: dict[str, tuple[str, str, str, str | None]] = {
    "fullmatch": ("", "", "fullmatch", None),                  # str target/exclude_modules
    "saved": (r"(^|.*\.)", r"($|\..*)", "match", None),        # modules_to_save entries
    "layer": (r"(?:^|.*?\.)", r"\.(?P<idx>\d+)\.", "match", "idx"),  # layers_pattern
    "key_old": (r".*\.", "$", "match", None),                  # rank/alpha keys, peft < 0.15
    "key_new": (r"(.*\.)?(", ")$", "match", None),             # rank/alpha keys, peft >= 0.15
}

Matcher = Callable[[str, str, str], "str | None"]


def regex_for(use: str, pattern: str) -> str:
    """The full regular expression peft builds around ``pattern`` for ``use``."""
    prefix, suffix, _, _ = USES[use]
    return prefix + pattern + suffix


def direct(use: str, pattern: str, name: str) -> str | None:
    """Evaluate in-process, unbounded (trusted patterns: tests, our own fixtures).

    None when the pattern does not select ``name``; otherwise "" (or, for ``layer``, the
    captured layer index; "" when that group did not take part).
    """
    _, _, fn, group = USES[use]
    m = getattr(re, fn)(regex_for(use, pattern), name)
    if m is None:
        return None
    return (m.group(group) or "") if group else ""


def shorten(pattern: str) -> str:
    """A pattern as a message quotes it (long ones cut, with their length)."""
    text = json.dumps(pattern)
    if len(text) <= SHOW_CHARS:
        return text
    return f"{text[:SHOW_CHARS]}... ({len(pattern):,} characters)"


class PatternTimeout(Exception):
    """A pattern from an artifact did not finish within its budget (LD210)."""

    def __init__(self, verdict: Verdict):
        super().__init__(verdict.describe())
        self.verdict = verdict


@dataclass(frozen=True)
class PatternUse:
    """One pattern as peft uses it: the config field it comes from and its template."""

    field: str
    use: str
    pattern: str


@dataclass(frozen=True)
class Verdict:
    """What evaluating one pattern gave."""

    field: str
    use: str
    pattern: str
    status: Literal["ok", "invalid", "over-budget", "not-evaluated"]
    seconds: float = 0.0
    error: str | None = None
    names: int = 0
    budget: float = PATTERN_BUDGET_S

    def describe(self) -> str:
        if self.use == "all":
            return f"{self.error}: none was evaluated"
        if self.status == "over-budget":
            return (f"the {self.field} pattern {shorten(self.pattern)} did not finish within "
                    f"{self.budget:g} s over {self.names:,} module names ({self.error or 'killed'})"
                    "; peft evaluates it with Python's re on the same names and would hang on it "
                    "too")
        if self.status == "not-evaluated":
            return (f"the {self.field} pattern {shorten(self.pattern)} was not evaluated: "
                    f"{self.error or 'the budget of this config ran out'}")
        if self.status == "invalid":
            return f"the {self.field} pattern {shorten(self.pattern)} is invalid ({self.error})"
        return f"the {self.field} pattern {shorten(self.pattern)} took {self.seconds:.3f} s"


@dataclass
class Evaluation:
    """Results of every pattern of one config over one set of names; a `Matcher`."""

    names: frozenset[str]
    verdicts: dict[tuple[str, str], Verdict] = field(default_factory=dict)
    results: dict[tuple[str, str], dict[str, str | None]] = field(default_factory=dict)
    # Set when the config holds more than MAX_PATTERNS patterns: none was evaluated.
    everything: Verdict | None = None

    def __call__(self, use: str, pattern: str, name: str) -> str | None:
        if self.everything is not None:
            raise PatternTimeout(self.everything)
        key = (use, pattern)
        v = self.verdicts.get(key)
        if v is None:
            raise LookupError(f"pattern {shorten(pattern)} ({use}) was not evaluated")
        if v.status == "invalid":
            raise re.error(v.error or "invalid pattern")
        if v.status != "ok":
            raise PatternTimeout(v)
        if name not in self.names:
            raise LookupError(f"module name '{name}' was not among the evaluated names")
        return self.results[key].get(name)

    @property
    def over_budget(self) -> list[Verdict]:
        """Patterns that ran over budget or were not evaluated, in config order."""
        if self.everything is not None:
            return [self.everything]
        return [v for v in self.verdicts.values() if v.status in ("over-budget", "not-evaluated")]

    def blocked(self, fields: Iterable[str]) -> Verdict | None:
        """The first over-budget verdict among ``fields``, if any."""
        wanted = set(fields)
        if self.everything is not None:
            return self.everything
        return next((v for v in self.over_budget if v.field in wanted), None)


def with_ancestors(names: Iterable[str]) -> set[str]:
    """The names and every dotted prefix of them (peft walks every module, containers too)."""
    out: set[str] = set()
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts) + 1):
            out.add(".".join(parts[:i]))
    return out


def _field(cfg: Any, name: str) -> Any:
    return cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)


def config_patterns(cfg: Any, peft_version: tuple[int, int, int] | None = None
                    ) -> list[PatternUse]:
    """Every pattern of an adapter config that peft evaluates as a regex, with its template.

    ``peft_version`` selects the rank/alpha key template (None: the newest rules).
    """
    uses: list[PatternUse] = []
    target = _field(cfg, "target_modules")
    if isinstance(target, str) and target.lower() != "all-linear":
        uses.append(PatternUse("target_modules", "fullmatch", target))
    exclude = _field(cfg, "exclude_modules")
    if isinstance(exclude, str) and exclude:
        uses.append(PatternUse("exclude_modules", "fullmatch", exclude))
    for m in _field(cfg, "modules_to_save") or []:
        if isinstance(m, str):
            uses.append(PatternUse("modules_to_save", "saved", m))
    layers = _field(cfg, "layers_to_transform")
    lp = _field(cfg, "layers_pattern")
    if layers not in (None, []) and not isinstance(target, str) and lp:
        for p in [lp] if isinstance(lp, str) else lp:
            if isinstance(p, str):
                uses.append(PatternUse("layers_pattern", "layer", p))
    if peft_version is None or peft_version >= (0, 6, 0):
        key_use = "key_old" if peft_version is not None and peft_version < (0, 15, 0) \
            else "key_new"
        for fname in ("rank_pattern", "alpha_pattern"):
            for k in _field(cfg, fname) or {}:
                if isinstance(k, str):
                    uses.append(PatternUse(fname, key_use, k))
    seen: set[tuple[str, str]] = set()
    out = []
    for u in uses:
        if (u.use, u.pattern) not in seen:
            seen.add((u.use, u.pattern))
            out.append(u)
    return out


# The child: reads every job first, answers one JSON line per job as soon as it is done.
_WORKER = r"""
import json, re, sys
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
except Exception:
    pass
job = json.load(sys.stdin)
names = job["names"]
sys.stdout.write("ready\n"); sys.stdout.flush()
for regex, fn, group in job["jobs"]:
    try:
        f = getattr(re.compile(regex), fn)
        hits = {}
        for i, n in enumerate(names):
            m = f(n)
            if m is not None:
                hits[i] = (m.group(group) or "") if group else ""
        out = {"hits": hits}
    except re.error as e:
        out = {"error": str(e)}
    except Exception as e:
        out = {"error": type(e).__name__ + ": " + str(e)}
    sys.stdout.write(json.dumps(out) + "\n"); sys.stdout.flush()
"""

_START_TIMEOUT_S = 30.0  # starting an interpreter on a loaded machine


class _Worker:
    def __init__(self, names: list[str], jobs: list[list[Any]]):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WORKER], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        payload = json.dumps({"names": names, "jobs": jobs}).encode()
        writer = threading.Thread(target=self._write, args=(payload,), daemon=True)
        writer.start()

    def _write(self, payload: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(payload)
            self.proc.stdin.close()
        except OSError:  # the child died (killed at the budget): nothing more to send
            pass

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")  # EOF

    def next(self, timeout: float) -> bytes | None:
        """The next line, b"" at EOF, None when ``timeout`` passed first."""
        try:
            return self.lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


def evaluate(uses: list[PatternUse], names: Iterable[str], *,
             budget: float = PATTERN_BUDGET_S, total: float = TOTAL_BUDGET_S) -> Evaluation:
    """Evaluate every pattern over ``names`` with ``budget`` seconds each (see module doc)."""
    order = sorted(set(names))
    ev = Evaluation(names=frozenset(order))
    todo = list(uses)
    timeouts = 0
    deadline = time.monotonic() + max(total, budget)

    def give_up(why: str) -> None:
        for u in todo:
            ev.verdicts[(u.use, u.pattern)] = Verdict(u.field, u.use, u.pattern, "not-evaluated",
                                                      error=why, names=len(order), budget=budget)

    while todo:
        if timeouts >= MAX_OVER_BUDGET:
            give_up(f"{MAX_OVER_BUDGET} earlier patterns of this config already ran over budget")
            break
        if time.monotonic() >= deadline:
            give_up(f"the patterns of this config together ran past {max(total, budget):g} s")
            break
        jobs = [[regex_for(u.use, u.pattern), USES[u.use][2], USES[u.use][3]] for u in todo]
        worker = _Worker(order, jobs)
        try:
            first = worker.next(_START_TIMEOUT_S)
            if first != b"ready\n":
                raise RuntimeError("the pattern worker (a child Python) did not start")
            done = 0
            for u in todo:
                t0 = time.monotonic()
                wait = min(budget, deadline - t0)
                line = worker.next(wait)
                took = time.monotonic() - t0
                key = (u.use, u.pattern)
                if line is None and wait < budget:
                    break  # the config's total ran out, not this pattern's budget
                if not line:
                    why = "killed at the budget" if line is None else \
                        "the matcher ran out of memory or crashed"
                    ev.verdicts[key] = Verdict(u.field, u.use, u.pattern, "over-budget",
                                               seconds=took, error=why, names=len(order),
                                               budget=budget)
                    timeouts += 1
                    done += 1
                    break
                out = json.loads(line)
                if "error" in out:
                    ev.verdicts[key] = Verdict(u.field, u.use, u.pattern, "invalid",
                                               seconds=took, error=out["error"],
                                               names=len(order), budget=budget)
                else:
                    ev.results[key] = {order[int(i)]: v for i, v in out["hits"].items()}
                    ev.verdicts[key] = Verdict(u.field, u.use, u.pattern, "ok", seconds=took,
                                               names=len(order), budget=budget)
                done += 1
            todo = todo[done:]
        finally:
            worker.kill()
    return ev


def evaluate_config(cfg: Any, names: Iterable[str], *, peft_version: tuple[int, int, int] | None
                    = None, budget: float = PATTERN_BUDGET_S) -> Evaluation:
    """`evaluate` for every pattern of an adapter config (no child when there is none)."""
    count = pattern_count(cfg)
    if count > MAX_PATTERNS:
        ev = Evaluation(names=frozenset(names))
        ev.everything = Verdict(
            "adapter_config.json", "all", f"{count:,} patterns", "not-evaluated",
            error=f"the config holds {count:,} patterns (more than {MAX_PATTERNS:,}); peft "
                  "scans every module name with each of them", budget=budget)
        return ev
    uses = config_patterns(cfg, peft_version)
    if not uses:
        return Evaluation(names=frozenset(names))
    return evaluate(uses, names, budget=budget)


def pattern_count(cfg: Any) -> int:
    """How many patterns `config_patterns` would list, counted without building them."""
    n = 0
    for name in ("target_modules", "exclude_modules", "layers_pattern"):
        n += isinstance(_field(cfg, name), str)
    for name in ("modules_to_save", "layers_pattern", "rank_pattern", "alpha_pattern"):
        value = _field(cfg, name)
        if isinstance(value, (list, dict)):
            n += len(value)
    return n


__all__ = ["PATTERN_BUDGET_S", "MAX_OVER_BUDGET", "USES", "Matcher", "regex_for", "direct",
           "shorten", "PatternTimeout", "PatternUse", "Verdict", "Evaluation", "with_ancestors",
           "config_patterns", "evaluate", "evaluate_config"]
