"""Merging slices into a ledger as ``llem aggregate`` does (digest of the slice's bytes)."""

import json

from llem.cluster.ledger import digest
from tests.helpers.nodes import T0, S

NOW = T0 + 10 * 3600 * S
GRACE_S = 3600.0


def merge(ledger, items, now_ns=NOW, grace_s=GRACE_S):
    return ledger.merge(
        [(d, digest(json.dumps(d, sort_keys=True).encode())) for d in items],
        now_ns=now_ns,
        grace_s=grace_s,
    )
