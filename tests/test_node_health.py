"""What the node says about its own health: session recycling, latency SLO, telemetry."""

from __future__ import annotations

import asyncio

from edgewise.frames import load_holdout
from local_broker import BrokerInfo
from schemas import decode_results
from tests.nodeharness import Harness, frame_bytes, running_node

HOLDOUT = load_holdout()


def _answered(h: Harness) -> set[int]:
    return {r.frame_seq for m in h.messages("results") for r in decode_results(m.payload).results}


def test_the_inference_session_is_recycled_while_frames_keep_being_served(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> None:
        # Once a second (1/3600 h), while 20 frames go in every 50 ms.
        async with running_node(mosquitto, model={"recycle_session_h": 1 / 3600}) as h:
            sent = 0
            first_model = h.node.model
            while h.node.stats.session_recycles < 2:
                for _ in range(20):
                    await h.send(frame_bytes(sent, HOLDOUT.images[sent % len(HOLDOUT.images)]))
                    sent += 1
                await asyncio.sleep(0.05)
                assert sent < 20 * 200, "no recycle in 10 s of traffic"
            await h.seen.wait_for(lambda: len(_answered(h)) >= sent, 20)
            assert _answered(h) == set(range(sent))
            assert h.node.stats.inference_errors == 0
            assert h.node.stats.rejected == 0
            assert h.node.model is not first_model  # a fresh session serves now

    asyncio.run(scenario())
