"""``autoshard bench --zoo``: the third-party model zoo against ``jax.jit``.

The zoo's models and their partition rules live with the tests (``tests/zoo``: the libraries are
test dependencies, installed by ``pip install -e '.[test]'``), so this runs from a checkout of
the repository. Its table is one section of ``benchmarks/RESULTS.md``, between the markers of
``SECTION``; a run of the other benchmarks keeps it, and a zoo run replaces only it.
"""
from __future__ import annotations

import importlib
import os
import re
import sys

from ..errors import ShardingError

SECTION = ("<!-- zoo table: autoshard bench --zoo -->", "<!-- end of zoo table -->")


def zoo_dir() -> str:
    """``tests/zoo`` of the checkout this package was installed from."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(os.path.dirname(os.path.dirname(here)), "tests", "zoo")
    if not os.path.isdir(path):
        raise ShardingError(f"the zoo lives in the repository's tests/zoo, not found at {path}: run "
                            f"'autoshard bench --zoo' from an editable install of a checkout "
                            f"(pip install -e '.[test]')")
    return path


def zoo_table(progress=None) -> tuple[str, list[dict], list]:
    """(markdown table, records, checks) for every zoo model x strategy; the checks are the three
    yardsticks against jax.jit (``measure.yardstick_checks``)."""
    if zoo_dir() not in sys.path:
        sys.path.insert(0, zoo_dir())
    bench_table = importlib.import_module("bench_table")
    rows = bench_table.zoo_rows(progress=progress)
    return bench_table.zoo_markdown(rows), bench_table.zoo_records(rows), bench_table.zoo_checks(rows)


def zoo_section(table: str, command: str, checks=()) -> str:
    """The RESULTS.md section around ``table``, with the command that wrote it."""
    return "\n".join([
        SECTION[0], "", "## Third-party model zoo", "",
        f"Written by `{command}`. Every model of `tests/zoo` (tiny configs, random init) under dp, "
        "fsdp and Megatron tp written as path-pattern rules; one train step (value_and_grad + adamw) "
        "compiled through autoshard and through `jax.jit` with the same annotations as "
        "`NamedSharding`s. Per device and step: wire bytes from the compiled HLO, flops from "
        "`cost_analysis()`, memory from `memory_analysis()` (arguments + outputs + temporaries - "
        "aliased); ratios are autoshard / jit.", "", table, "",
        *[f"- **{'PASS' if c.passed else 'FAIL'}** zoo: {c.name}: {c.detail}" for c in checks],
        "", SECTION[1]])


def existing_section(markdown: str) -> str | None:
    """The zoo section of a RESULTS.md text, or None."""
    m = re.search(re.escape(SECTION[0]) + ".*?" + re.escape(SECTION[1]), markdown, re.S)
    return m.group(0) if m else None


def with_section(markdown: str, section: str | None) -> str:
    """``markdown`` with its zoo section replaced by ``section`` (appended if it had none)."""
    if section is None:
        return markdown
    old = existing_section(markdown)
    if old is not None:
        return markdown.replace(old, section)
    return markdown.rstrip("\n") + "\n\n" + section + "\n"
