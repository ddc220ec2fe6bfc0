#!/usr/bin/env python
"""The long version of tests/test_fuzz.py: tens of thousands of mutated C-STORE data sets
and STOW-RS bodies at one archive.

    .venv/bin/python bench/fuzz.py              # 20,000 of each (about half an hour)
    .venv/bin/python bench/fuzz.py --examples 5000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    args = parser.parse_args(argv)
    env = dict(os.environ, POCKETPACS_FUZZ_EXAMPLES=str(args.examples))
    # No per-test timeout: the suite's 300 s is for the short version.
    command = [sys.executable, "-m", "pytest", "-q", "--timeout=0", "tests/test_fuzz.py"]
    return subprocess.run(command, cwd=REPO, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
