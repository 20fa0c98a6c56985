"""choose_victims: the pure eviction decision."""

from __future__ import annotations

from lemonade_grpc.pool.policy import EvictionPlan, NoRoom, Resident, choose_victims


def r(name: str, last_used: float, *, pinned: bool = False, in_flight: int = 0) -> Resident:
    return Resident(name, pinned, in_flight, last_used)


def test_free_slot_means_no_victims() -> None:
    assert choose_victims([r("a", 1)], max_loaded=2) == EvictionPlan(())
    assert choose_victims([], max_loaded=1) == EvictionPlan(())


def test_least_recently_used_goes_first() -> None:
    assert choose_victims([r("a", 3), r("b", 1), r("c", 2)], max_loaded=3) == EvictionPlan(("b",))


def test_idle_models_go_before_busy_ones() -> None:
    plan = choose_victims([r("old-busy", 1, in_flight=2), r("new-idle", 5)], max_loaded=2)
    assert plan == EvictionPlan(("new-idle",))


def test_pinned_models_are_never_chosen() -> None:
    plan = choose_victims([r("a", 1, pinned=True), r("b", 9)], max_loaded=2)
    assert plan == EvictionPlan(("b",))


def test_all_pinned_is_no_room_and_evicts_nothing() -> None:
    assert choose_victims([r("b", 2, pinned=True), r("a", 1, pinned=True)], max_loaded=2) == NoRoom(
        ("a", "b")
    )


def test_over_full_pool_evicts_enough_for_one_more() -> None:
    # After max_loaded was lowered: three loaded, one slot.
    plan = choose_victims([r("a", 1), r("b", 2), r("c", 3, pinned=True)], max_loaded=1)
    assert plan == NoRoom(("c",))
    plan = choose_victims([r("a", 1), r("b", 2), r("c", 3)], max_loaded=1)
    assert plan == EvictionPlan(("a", "b", "c"))
