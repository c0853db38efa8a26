"""What tools/chart/check.py and check_deploy.py share: the repository's paths, the report of passed and failed
checks, and the `afnext` command lines checked against `$AFNEXT_BIN <subcommand> --help`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHART = ROOT / "helm" / "afnext"
DEPLOY = ROOT / "deploy"
AFNEXT_BIN = os.environ.get("AFNEXT_BIN", str(ROOT / "target" / "debug" / "afnext"))


class Report:
    """Counts passed checks and keeps the failures (printed as they happen and at the end)."""
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failures.append(f"{what}{': ' + detail if detail else ''}")
            print(f"  FAIL {what}{': ' + detail if detail else ''}")
        return ok

    def section(self, title: str) -> None:
        print(f"== {title}")


R = Report()


# --------------------------------------------------------------------------------------------------------------
# afnext --help: the flags of each subcommand
# --------------------------------------------------------------------------------------------------------------

_HELP: dict[str, set[str]] = {}


def flags_of(sub: str) -> set[str] | None:
    if sub not in _HELP:
        try:
            out = subprocess.run(
                [AFNEXT_BIN, sub, "--help"], capture_output=True, text=True, timeout=60, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            R.check(False, f"`{AFNEXT_BIN} {sub} --help` runs", str(e))
            _HELP[sub] = set()
            return None
        _HELP[sub] = set(re.findall(r"(?m)^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", out))
    return _HELP[sub]


def check_afnext_argv(argv: list[str], where: str) -> None:
    """argv starts with "afnext": its subcommand and every --flag must be in that subcommand's --help."""
    if not R.check(len(argv) >= 2 and argv[0] == "afnext", f"{where}: runs afnext SUBCOMMAND", str(argv[:2])):
        return
    sub = argv[1]
    known = flags_of(sub)
    if known is None:
        return
    R.check(bool(known), f"{where}: `afnext {sub}` is a subcommand", f"no flags in `afnext {sub} --help`")
    used = [a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")]
    unknown = sorted(set(used) - known)
    R.check(not unknown, f"{where}: flags of `afnext {sub}` exist", f"unknown {unknown}")


def shell_commands(script: str) -> list[list[str]]:
    """The `afnext ...` command lines of a shell script (continuations joined, `&` and quotes handled)."""
    joined = script.replace("\\\n", " ")
    cmds = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("afnext "):
            argv = shlex.split(line.rstrip("&").strip())
            cmds.append(argv)
    return cmds


def flag_values(argv: list[str], flag: str) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith(flag + "="):
            out.append(a.split("=", 1)[1])
    return out
