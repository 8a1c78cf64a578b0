"""Storage: the node-local store (and, later, the cluster ledger)."""
