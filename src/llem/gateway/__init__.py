"""The ledger gateway, ``llem serve``: ``llem-acct`` from any login node, private by default.

A small read-only service on the ledger host, as slurmdbd is for Slurm's accounting: it
alone reads the ledger (mode 0640 to its group); clients send structured queries (the options
of ``llem-acct``, never SQL) and get ``llem.acct/1`` documents that they render as they render
a local ledger. Who asks comes from the kernel on the local socket (``SO_PEERCRED``) and from
a MUNGE credential over TCP; what they may see is Slurm's ``PrivateData=jobs,usage``.

* :mod:`~llem.gateway.wire`: the request and answer formats, and their strict parser;
* :mod:`~llem.gateway.privacy`: roles (admin, coordinator, user) and what each sees;
* :mod:`~llem.gateway.server`: the service (sockets, limits, identity, queries);
* :mod:`~llem.gateway.client`: what ``llem-acct`` and ``llem doctor`` use to ask it.
"""
