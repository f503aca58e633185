"""Where a worker may reply: only to ``.../{node}/reply`` of the node that asked."""

from __future__ import annotations

import functools

from schemas import ContractError, validate_topic


@functools.lru_cache(maxsize=4096)
def is_reply_topic(topic: str, node: str) -> bool:
    """A worker replies only to ``.../{node}/reply`` of the node that asked: an escalation cannot
    make it publish anywhere else on the cloud broker. (Asked twice per message, for the same
    few nodes: remembered.)"""
    try:
        validate_topic(topic)
    except ContractError:
        return False
    return topic.endswith(f"/{node}/reply")
