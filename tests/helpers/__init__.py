"""Builders shared by the tests (and the benchmarks): plain modules, no tests, no fixtures.

Pytest fixtures live in ``tests/conftest.py``; a test module never imports another test
module. What is here:

* ``nodes``: node stores filled through the Prolog's and sampler's own code, and the job and
  node slices exported from them (``build_store``, ``job_slices``, ``node_config``...);
* ``ledger``: merging slices into a ledger as ``llem aggregate`` does;
* ``report_data``: the month of jobs behind the ``llem report`` tests;
* ``acct``: the ``llem-acct`` tests' jobs, configuration and in-process runner;
* ``make_ledger``, ``make_spool``: fast generators of large ledgers and spools, shared with
  ``bench/``;
* ``nobody``: an interpreter that uid 65534 can run llem with.

Fakes of hardware interfaces stay beside them: ``tests.fakes``, ``tests.powercap``,
``tests.fakenvml``.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root folder."""
