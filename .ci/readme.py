"""Prints the README's first ```bash block: the two commands a new user runs on a fresh machine.

``.ci/run`` executes exactly what this prints, so CI and the README cannot drift apart; ``tests/test_build.py``
checks that the block holds the install-and-run command and the test command.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def first_bash_block(text: str) -> str:
    m = re.search(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    if m is None:
        sys.exit("README.md has no ```bash block")
    return m.group(1)


if __name__ == "__main__":
    print(first_bash_block(README.read_text()), end="")
