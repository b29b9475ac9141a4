"""Who may do what. Pure.

ingest   source systems: may only post messages, each token for its own sources only
viewer   reads everything
operator reads, and acts: resolves, resets, replays, runs jobs; may post messages from any
         source (a correction by hand, named in the audit log)
admin    everything, and configures: systems, entity types, tokens"""

from __future__ import annotations

ROLES = ("ingest", "viewer", "operator", "admin")

# The roles each required role admits.
ADMITS: dict[str, frozenset[str]] = {
    "ingest": frozenset({"ingest", "operator", "admin"}),
    "viewer": frozenset({"viewer", "operator", "admin"}),
    "operator": frozenset({"operator", "admin"}),
    "admin": frozenset({"admin"}),
}


def allows(role: str, required: str) -> bool:
    return role in ADMITS[required]
