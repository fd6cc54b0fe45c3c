"""Accounting checks against counts taken outside the node's books (bench runs).

The node's ``in_flight`` is ``received - published - dropped``, so ``received = published +
dropped`` at the end holds by construction for any frame the node counted. These checks use
counts the node's accounting does not produce: what the source emitted (its own counter, in the
``stopped`` line) and what the publisher numbered and the subscriber process received (seq).
"""

from __future__ import annotations


def assert_counted_from_outside(final: dict) -> None:
    """``final``: a bench run's node ``stopped`` line with the bench subscriber's counters."""
    assert final["in_flight"] == 0, final
    # every frame the source emitted entered the books (a frame lost before it is counted shows here)
    assert final["source_emitted"] == final["received"], final
    sub = final["subscriber"]
    # the subscriber was listening before the first frame, and saw every message the publisher
    # numbered up to the last one, received or counted lost (a seq gap)
    assert sub["first_seq"] == 0, sub
    assert sub["received"] + sub["lost"] == sub["last_seq"] + 1, sub
    # ... and the last message it saw is the node's last publish: published = messages numbered
    assert sub["last_seq"] + 1 == final["published"], (sub, final["published"])
