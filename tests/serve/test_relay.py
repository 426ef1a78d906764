"""The worker's relay: one engine step's events leave as one reply per request, before the
request's task hears of its end; requests come off LitServe's queue in bursts."""

from __future__ import annotations

import asyncio
import pickle

from litserve.utils import LitAPIStatus

from astrai.core.engine import END, EngineError, StreamEvent
from astrai.serve.relay import EVENT_FIELDS, RelayedRequest, StepRelay, as_event_dict, event_to_tuple


def _event(index: int, text: str, finish: str | None = None) -> StreamEvent:
    return StreamEvent("req", index, text, [7], None, finish, None, 3, 1)


def test_a_step_becomes_one_reply_per_streamed_request_sent_before_any_end_is_announced():
    sent, order = [], []

    async def main():
        loop = asyncio.get_running_loop()
        relay = StepRelay(lambda item, consumer: (sent.append((item, consumer)), order.append("sent")), worker_id=2)
        a = RelayedRequest("uid-a", 1, True, loop.create_future())
        b = RelayedRequest("uid-b", 0, False, loop.create_future())
        a.done.add_done_callback(lambda _: order.append("a ended"))
        relay.deliver(
            [
                (a, _event(0, "he")),
                (b, _event(0, "x")),
                (a, _event(0, "llo", "stop")),
                (a, END),
                (b, EngineError("boom")),
            ]
        )
        await asyncio.sleep(0)
        return a, b

    a, b = asyncio.run(main())
    assert order == ["sent", "a ended"]
    assert len(sent) == 1  # b is not streamed: held until its end
    (uid, (payload, status, _, worker)), consumer = sent[0]
    assert (uid, status, worker, consumer) == ("uid-a", LitAPIStatus.OK, 2, 1)
    texts = [as_event_dict(e)["text"] for e in payload["events"]]
    assert texts == ["he", "llo"] and as_event_dict(payload["events"][1])["finish_reason"] == "stop"
    assert a.done.result() is None
    assert isinstance(b.done.result(), EngineError) and [e["text"] for e in b.held] == ["x"]


def test_a_stream_event_survives_the_wire_field_for_field():
    event = StreamEvent("req", 1, "t", [5, 6], None, "length", None, 4, 2, weights_version=3)
    back = as_event_dict(pickle.loads(pickle.dumps(event_to_tuple(event))))
    assert back == {
        "index": 1,
        "text": "t",
        "token_ids": [5, 6],
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
        "prompt_tokens": 4,
        "completion_tokens": 2,
        "prompt_logprobs": None,
        "weights_version": 3,
    }
    assert set(back) == set(EVENT_FIELDS)
    assert as_event_dict(back) is back  # a full answer's events arrive as dicts already
