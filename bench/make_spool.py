#!/usr/bin/env python3
"""Generate a spool of realistic slices (``tests/helpers/make_spool.py`` has the generator).

Usage: python bench/make_spool.py --nodes N --jobs M --out DIR [--seed S]
       (M jobs per node on average: N*M/avg_nodes_per_job jobs, ~N*M job slices)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers
from tests.helpers.make_spool import make_spool  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=100, help="job slices per node")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(make_spool(args.out, args.nodes, args.jobs, args.seed))


if __name__ == "__main__":
    main()
