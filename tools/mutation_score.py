"""Mutation score per file from mutmut 3's results (`make mutation`).

mutmut 3 keeps each mutated file's verdicts in mutants/<path>.meta (JSON: mutant name -> the exit code of its test
run); `mutmut results` lists them one by one but gives no per-file total. The score here is killed / total: a mutant
that survived, timed out, had no test, or is equivalent counts against it. With --equivalent (a file of mutant
names judged behaviour-identical, one per line, `#` comments allowed) a second, clearly labelled score
killed / (total - equivalent) is shown beside it.

    python tools/mutation_score.py [--mutants mutants] [--equivalent FILE] [--list survived]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

try:  # the exit-code meanings of the installed mutmut, when it is importable
    from mutmut.stats import status_by_exit_code as _STATUS
except ImportError:  # pragma: no cover - the same table as mutmut 3.8's
    _STATUS = None

_FALLBACK = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 2: "check was interrupted by user",
             None: "not checked", 33: "no tests", 34: "skipped", 35: "suspicious", 36: "timeout",
             37: "caught by type check", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
             -11: "segfault", -9: "segfault"}


def status(exit_code: int | None) -> str:
    """mutmut's name for a mutant's exit code ("suspicious" for any code it does not know)."""
    if _STATUS is not None:
        return _STATUS[exit_code]
    return _FALLBACK.get(exit_code, "suspicious")


def read_results(mutants: Path) -> dict[str, dict[str, str]]:
    """Source file (as mutmut names it, e.g. progfl/server/pace.py) -> mutant name -> status."""
    out: dict[str, dict[str, str]] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        source = meta.relative_to(mutants).as_posix()[: -len(".meta")]
        out[source] = {name: status(code) for name, code in data["exit_code_by_key"].items()}
    return out


def read_equivalent(path: Path | None) -> set[str]:
    """Mutant names listed in `path` (first word of each line; blank lines and # comments skipped)."""
    if path is None:
        return set()
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line.split()[0])
    return names


def table(results: dict[str, dict[str, str]], equivalent: set[str]) -> list[dict[str, object]]:
    """One row per file plus a total row: counts by status and the scores."""
    rows = []
    for source, by_name in [*results.items(), ("TOTAL", {k: v for r in results.values() for k, v in r.items()})]:
        counts = Counter(by_name.values())
        total = len(by_name)
        killed = counts["killed"]
        eq = sum(1 for k, v in by_name.items() if k in equivalent and v != "killed")
        rows.append({
            "file": source, "mutants": total, "killed": killed, "survived": counts["survived"],
            "equivalent": eq, "timeout": counts["timeout"], "suspicious": counts["suspicious"] + counts["segfault"],
            "no tests": counts["no tests"], "not checked": counts["not checked"],
            "score": killed / total if total else float("nan"),
            "score_eq": killed / (total - eq) if total - eq else float("nan"),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's folder (default: mutants)")
    ap.add_argument("--equivalent", type=Path, help="mutant names judged equivalent, one a line")
    ap.add_argument("--list", choices=["survived", "all-not-killed"], help="also list these mutants by file")
    ap.add_argument("--markdown", action="store_true", help="a markdown table")
    args = ap.parse_args(argv)
    results = read_results(args.mutants)
    if not results:
        print(f"no mutmut results under {args.mutants}/ (run `make mutation` first)", file=sys.stderr)
        return 1
    equivalent = read_equivalent(args.equivalent)
    rows = table(results, equivalent)
    cols = ["file", "mutants", "killed", "survived", "timeout", "suspicious", "no tests", "not checked"]
    if equivalent:
        cols.insert(4, "equivalent")
    head = cols + ["score"] + (["score excl. equivalent"] if equivalent else [])

    def cells(r: dict[str, object]) -> list[str]:
        c = [str(r[k]) for k in cols] + [f"{100 * float(r['score']):.1f} %"]  # type: ignore[arg-type]
        return c + ([f"{100 * float(r['score_eq']):.1f} %"] if equivalent else [])  # type: ignore[arg-type]

    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for r in rows:
            print("| " + " | ".join(cells(r)) + " |")
    else:
        widths = [max(len(h), *(len(cells(r)[i]) for r in rows)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(cells(r), widths)))
        print("score = killed / mutants (survived, timeout, suspicious, no tests and equivalent all count against it)"
              + ("; score excl. equivalent = killed / (mutants - equivalent)" if equivalent else ""))
    if args.list:
        for source, by_name in results.items():
            for name, st in by_name.items():
                if st == "survived" if args.list == "survived" else st != "killed":
                    tag = " (equivalent)" if name in equivalent else ""
                    print(f"{source}: {name}: {st}{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
