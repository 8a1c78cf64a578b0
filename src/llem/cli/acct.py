"""``llem-acct``: sacct-style energy and emissions accounting over the cluster ledger.

Not built yet: it needs the cluster ledger (issue "The cluster ledger") and is the subject of
the ``llem-acct`` issue. Until then the command says so plainly and exits 1.
"""

from __future__ import annotations

import sys


def main() -> None:
    print(
        "Error: llem-acct is not available yet: the cluster ledger it reads is not built in "
        "this version of llem. Use 'llem wrap -- CMD' to measure a command.",
        file=sys.stderr,
    )
    sys.exit(1)
