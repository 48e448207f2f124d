"""The queue's fair order: restarted jobs first, then callers take turns (token, then user), FIFO within one."""

from __future__ import annotations

from atelier.jobs.limits import Caller
from atelier.jobs.queue import FairOrder


def drain(order: FairOrder) -> list[str]:
    taken = []
    while (id := order.pop()) is not None:
        taken.append(id)
    return taken


def test_callers_take_turns_and_each_callers_jobs_stay_in_order() -> None:
    order = FairOrder()
    for i in range(4):
        order.push(f"a{i}", Caller("a", None))
    order.push("b0", Caller("b", None))
    order.push("b1", Caller("b", None))
    order.push("c0", Caller("c", None))
    assert drain(order) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]


def test_a_newcomer_goes_before_callers_already_served_this_round() -> None:
    order = FairOrder()
    order.push("a0", Caller("a", None))
    assert order.pop() == "a0"  # a's only job is taken: a's lane is empty, but a was just served
    for i in range(1, 10):
        order.push(f"a{i}", Caller("a", None))
    order.push("b0", Caller("b", None))
    assert drain(order)[:2] == ["b0", "a1"]


def test_users_of_one_token_take_turns_within_the_tokens_turn() -> None:
    order = FairOrder()
    for i in range(3):
        order.push(f"u{i}", Caller("a", "u"))
    order.push("v0", Caller("a", "v"))
    order.push("b0", Caller("b", "u"))  # token b's "u" is another user: b has its own turn
    # a and b alternate; within a, users u and v alternate, so v is not behind all of u's jobs.
    assert drain(order) == ["u0", "b0", "v0", "u1", "u2"]


def test_many_user_ids_do_not_earn_a_token_more_turns() -> None:
    order = FairOrder()
    for i in range(4):
        order.push(f"a{i}", Caller("a", f"user-{i}"))
    for i in range(2):
        order.push(f"b{i}", Caller("b", None))
    assert drain(order) == ["a0", "b0", "a1", "b1", "a2", "a3"]


def test_jobs_requeued_after_a_restart_come_first_in_their_order() -> None:
    order = FairOrder()
    order.push("new-b", Caller("b", None))
    order.push("old-1", Caller("a", None), first=True)
    order.push("old-2", Caller("a", None), first=True)
    assert drain(order) == ["old-1", "old-2", "new-b"]


def test_pop_with_a_filter_looks_at_each_fifos_head_only() -> None:
    order = FairOrder()
    order.push("a-big", Caller("a", None))
    order.push("a-small", Caller("a", None))
    order.push("b-small", Caller("b", None))
    small = order.pop(lambda id: id.endswith("small"))
    assert small == "b-small"  # a's small job waits behind a's own earlier job
    assert order.pop(lambda id: id.endswith("small")) is None
    assert drain(order) == ["a-big", "a-small"]


def test_remove_and_membership() -> None:
    order = FairOrder()
    order.push("a0", Caller("a", None))
    order.push("a1", Caller("a", None))
    order.push("r", Caller(None, None), first=True)
    assert order.remove("a0") and order.remove("r") and not order.remove("a0")
    assert "a1" in order and "a0" not in order and len(order) == 1
    assert order.ids() == ["a1"]
    assert drain(order) == ["a1"]
