"""What runs on the admin node (and, for ``header``, on the Slurm controller).

``header`` (EpilogSlurmctld's job facts) -> ``readers`` (read and check spool slices, in
processes of their own) -> ``aggregate`` (one pass: merge, archive, quarantine) -> ``ledger``
(every ledger write) -> ``acct_queries`` and ``report_queries`` (every ledger read).
"""
