"""LD000: a check crashed. Registered so that the report, SARIF and `explain` can describe it."""

from __future__ import annotations

from collections.abc import Iterable

from llava_doctor.checks.base import BOTH, Hit, check
from llava_doctor.models import Severity


@check("LD000", "internal-error", Severity.error, needs_lora=False, families=BOTH)
def internal_error(ctx: object) -> Iterable[Hit]:
    """A check crashed: a bug in llava-doctor, not necessarily in your files.

    ## What it does
    Records that one check raised an unexpected exception. The other checks still ran and their
    findings are in the same report.

    ## Why is this bad?
    The crashed check could not tell you whether its failure mode is present, so the run is not
    a clean bill of health.

    ## Example
    `LD000 internal-error: check LD203 (adapter-shape-mismatch) crashed on runs/x: KeyError ...`

    ## Fix
    None: report the crash with the output of `llava-doctor inspect` for the files involved, and
    use `--ignore CODE` to skip the crashing check meanwhile.
    """
    return ()
