"""`make mutation`: mutmut over the pure core, checked against tests/mutation-equivalents.txt.

mutmut 3 imports the mutated code from `mutants/src` (or `mutants/.`), and names mutants after the
file's path, so it cannot mutate our `operator/workorder_operator` in place (`operator` is also a
stdlib module). It runs instead in a staging directory, `.mutation/` (not in git), holding a copy
of the package as `src/workorder_operator` and of the tests; mutmut's cache lives there too, so a
second run only re-tests what changed. Each module has a staging directory of its own
(`.mutation/lifecycle/`, ...): mutmut's cache assumes the set of mutated files never changes.

Exit status 0 only when every mutant is killed or listed as equivalent, with a reason, in
tests/mutation-equivalents.txt (one `mutant-name  reason` a line; `#` starts a comment). The
listed names must still exist and still survive, so the file never goes stale.

Usage: python tools/mutation.py [MODULE ...]   (default: all of CORE; MODULE as `lifecycle`)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".mutation"
EQUIVALENTS = ROOT / "tests" / "mutation-equivalents.txt"
PACKAGE = "workorder_operator"
# The pure core: no I/O, so every mutant can be judged by unit tests alone.
CORE = ("lifecycle", "backoff", "targeting", "model", "build", "seed", "fleet", "offer")
# A mutant that makes the tests hang is as caught as one that makes them fail.
DETECTED = ("killed", "timeout")

# The scheduler is not pure core: its tests judge none of these mutants, so they are not run.
PYPROJECT = """\
[tool.pytest.ini_options]
testpaths = ["tests/unit"]
timeout = 300

[tool.mutmut]
source_paths = ["src"]
only_mutate = [{only}]
pytest_add_cli_args_test_selection = ["tests/unit", "--ignore=tests/unit/test_scheduler.py"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
use_git_change_detection = false
also_copy = ["crds"]
"""


def stage(module: str) -> Path:
    """The module's staging directory with a fresh copy of the package and the tests (mtimes
    kept, so mutmut's cache sees what changed)."""
    where = STAGE / module
    staged, source = where / "src" / PACKAGE / f"{module}.py", ROOT / "operator" / PACKAGE / f"{module}.py"
    if not staged.exists() or staged.read_bytes() != source.read_bytes():
        # mutmut maps a new function only to new tests: after a source change, collect from all.
        (where / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    copies = (
        (ROOT / "operator" / PACKAGE, where / "src" / PACKAGE),
        (ROOT / "tests", where / "tests"),
        (ROOT / "crds", where / "crds"),
    )  # the schema test reads the CRD
    for origin, copy in copies:
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(origin, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (where / "pyproject.toml").write_text(PYPROJECT.format(only=f'"src/{PACKAGE}/{module}.py"'))
    return where


def mutate(module: str) -> dict[str, str]:
    """Run mutmut on one module; mutant name -> status."""
    where = stage(module)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", WORKORDER_HYPOTHESIS_PROFILE="mutation")
    # One child, lowest priority: the machine is shared, and mutation testing is never urgent.
    run = subprocess.run(["nice", "-n", "19", "mutmut", "run", "--max-children", "1"], cwd=where, env=env)
    if run.returncode != 0:
        sys.exit(f"mutmut failed on {module} (exit {run.returncode})")
    found = {n: s for n, s in results(where).items() if n.startswith(f"{PACKAGE}.{module}.")}
    # mutmut keeps a verdict until the mutated function changes; a new test may have killed a
    # survivor since, so survivors are always tried again (they are few).
    alive = sorted(n for n, s in found.items() if s not in DETECTED)
    if alive:
        again = ["nice", "-n", "19", "mutmut", "run", "--max-children", "1", *alive]
        subprocess.run(again, cwd=where, env=env, stdout=subprocess.DEVNULL, check=False)
        found = {n: s for n, s in results(where).items() if n.startswith(f"{PACKAGE}.{module}.")}
    return found


def equivalents() -> dict[str, str]:
    """The checked-in list: mutant name -> why it cannot be killed."""
    listed: dict[str, str] = {}
    for number, line in enumerate(EQUIVALENTS.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, reason = line.partition(" ")
        if not reason.strip():
            sys.exit(f"{EQUIVALENTS.name}:{number}: {name} has no reason")
        listed[name] = reason.strip()
    return listed


def results(where: Path) -> dict[str, str]:
    """mutant name -> status (killed, survived, no tests, timeout, ...), from `mutmut results --all`."""
    out = subprocess.run(
        ["mutmut", "results", "--all", "true"], cwd=where, capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        match = re.fullmatch(r"\s*(\S+__mutmut_\d+): (.+)", line)
        if match:
            found[match[1]] = match[2].strip()
    return found


def main(argv: list[str]) -> int:
    modules = argv or list(CORE)
    unknown = [m for m in modules if m not in CORE]
    if unknown:
        sys.exit(f"not in the pure core {CORE}: {unknown}")
    found: dict[str, str] = {}
    for module in modules:
        found.update(mutate(module))
    listed = {n: r for n, r in equivalents().items() if any(n.startswith(f"{PACKAGE}.{m}.") for m in modules)}
    alive = {n for n, s in found.items() if s not in DETECTED}
    unexplained = sorted(alive - listed.keys())
    stale = sorted(n for n in listed if found.get(n) in (None, *DETECTED))
    killed = sum(1 for s in found.values() if s in DETECTED)
    equivalent = len(alive & listed.keys())
    print(
        f"\nmutation score ({', '.join(modules)}): {killed} of {len(found)} mutants killed, "
        f"{equivalent} equivalent (tests/mutation-equivalents.txt), {len(unexplained)} unexplained"
    )
    for name in unexplained:
        print(f"  unexplained {found[name]}: {name}   (mutmut show {name}, in .mutation/{name.split('.')[1]}/)")
    for name in stale:
        print(f"  stale entry in {EQUIVALENTS.name}: {name} is {found.get(name, 'gone')}")
    return 1 if unexplained or stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
