"""The pure decisions: which models to evict (slots, memory), which pins fit, when to restart."""

from __future__ import annotations

from typing import Any

from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.pool.policy import (
    EvictionPlan,
    FailedLoadPlan,
    MemoryPlan,
    NoRoom,
    NotEnoughMemory,
    Placement,
    PressurePlan,
    Resident,
    after_failed_load,
    changes_nothing,
    choose_victims,
    fit_pins,
    place_load,
    plan_memory,
    relieve_pressure,
    restart_delay,
    reuses_process,
)


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


def rss(name: str, last_used: float, size: int, *, pinned: bool = False, in_flight: int = 0) -> Resident:
    return Resident(name, pinned, in_flight, last_used, size)


def test_memory_that_fits_evicts_nothing() -> None:
    assert plan_memory(10, available=100, reserve=50, candidates=[rss("a", 1, 40)]) == MemoryPlan(())


def test_memory_evicts_least_recently_used_until_it_fits_never_pinned() -> None:
    residents = [rss("old", 1, 30, pinned=True), rss("a", 2, 20), rss("b", 3, 20), rss("c", 4, 20)]
    # room 100 - 90 = 10; a need of 45 takes a and b (10 + 20 + 20 = 50).
    assert plan_memory(45, available=100, reserve=90, candidates=residents) == MemoryPlan(("a", "b"))


def test_memory_counts_what_planned_evictions_free() -> None:
    assert plan_memory(30, available=10, reserve=0, candidates=[rss("a", 1, 99)], freed=20) == MemoryPlan(())


def test_memory_that_cannot_fit_reports_the_figures() -> None:
    residents = [rss("p", 1, 500, pinned=True), rss("a", 2, 20)]
    assert plan_memory(100, available=60, reserve=50, candidates=residents) == NotEnoughMemory(
        need=100, available=60, reserve=50, freeable=20
    )


def test_pressure_with_need_zero_restores_the_reserve_idle_models_first() -> None:
    residents = [rss("busy", 1, 50, in_flight=2), rss("idle", 5, 50)]
    assert plan_memory(0, available=40, reserve=80, candidates=residents) == MemoryPlan(("idle",))


def test_pins_fit_in_the_order_they_were_pinned() -> None:
    pins = [("a", "llm"), ("e", "embedding"), ("b", "llm"), ("c", "llm")]
    assert fit_pins(pins, {"llm": 2, "embedding": 1}) == (["a", "e", "b"], ["c"])
    assert fit_pins([], {"llm": 1}) == ([], [])


def test_restart_delay_doubles_up_to_the_cap_then_gives_up() -> None:
    def delay(crashes: list[float], now: float) -> float | None:
        return restart_delay(crashes, now, base=1.0, cap=5.0, max_restarts=4, window=100.0)

    assert delay([0], 0) == 1.0
    assert delay([0, 1], 1) == 2.0
    assert delay([0, 1, 2], 2) == 4.0
    assert delay([0, 1, 2, 3], 3) == 5.0  # capped
    assert delay([0, 1, 2, 3, 4], 4) is None  # a fifth crash within the window: give up
    assert delay([0, 1, 2, 3, 200], 200) == 1.0  # old crashes are forgiven


def typed(name: str, last_used: float, size: int = 10, *, type_: str = "llm", **kw: Any) -> Resident:
    return Resident(name, kw.get("pinned", False), kw.get("in_flight", 0), last_used, size, type_)


def test_plan_load_takes_slot_and_memory_victims_in_one_decision() -> None:
    residents = [typed("a", 1), typed("b", 2), typed("e", 3, type_="embedding")]
    plan = place_load("c", "llm", 15, residents, 2, available=10, reserve=0)
    # A slot: a (least recent); memory: 10 + a's 10 = 20 >= 15, nothing more.
    assert plan == Placement(reload=False, slot_victims=("a",), memory_victims=())
    plan = place_load("c", "llm", 35, residents, 2, available=10, reserve=0)
    assert plan == Placement(reload=False, slot_victims=("a",), memory_victims=("b", "e"))


def test_a_reload_that_cannot_fit_stops_nothing_issue_9_finding_17() -> None:
    # The model runs with other options: its own memory counts as freed, but
    # when even that is not enough the plan fails and nothing is stopped.
    residents = [typed("m", 1, 100), typed("p", 2, 500, pinned=True)]
    assert place_load("m", "llm", 150, residents, 2, available=60, reserve=0) == Placement(
        reload=True, slot_victims=(), memory_victims=()
    )
    assert isinstance(place_load("m", "llm", 150, residents, 2, available=10, reserve=0), NotEnoughMemory)


def test_plan_load_never_chooses_pinned_or_busy_models_for_memory() -> None:
    residents = [typed("p", 1, 50, pinned=True), typed("busy", 2, 50, in_flight=1)]
    plan = place_load("c", "llm", 60, residents, 3, available=20, reserve=0)
    assert plan == NotEnoughMemory(need=60, available=20, reserve=0, freeable=0)
    assert place_load("c", "llm", 1, [typed("p", 1, pinned=True)], 1, available=9, reserve=0) == NoRoom(
        ("p",)
    )


def test_pressure_evicts_everything_unpinned_when_even_that_is_short() -> None:
    residents = [typed("p", 1, 50, pinned=True), typed("busy", 2, 10, in_flight=3), typed("idle", 3, 10)]
    plan = relieve_pressure(available=0, reserve=100, residents=residents)
    assert plan.victims == ("idle", "busy")
    assert plan.short == NotEnoughMemory(need=0, available=0, reserve=100, freeable=20)
    assert relieve_pressure(available=95, reserve=100, residents=residents) == PressurePlan(("idle",), None)


def test_reuse_and_no_op_rules() -> None:
    running = EffectiveOptions(512, None, ("--threads", "2"))
    assert reuses_process(running, EffectiveOptions(512, 60, ("--threads", "2")))
    assert not reuses_process(running, EffectiveOptions(1024, None, ("--threads", "2")))
    assert changes_nothing(running, True, running, None)
    assert changes_nothing(running, True, running, True)
    assert not changes_nothing(running, True, running, False)
    assert not changes_nothing(running, False, EffectiveOptions(512, 60, ("--threads", "2")), None)


def test_a_failed_load_drops_only_the_pin_it_brought() -> None:
    def plan(**changed: bool) -> FailedLoadPlan:
        facts = {"cancelled": False, "ready": False, "pinned": True, "pin_in_force": False}
        return after_failed_load(**(facts | {"restart_pending": False, "restart": False} | changed))

    assert plan() is FailedLoadPlan.UNPIN  # Load pinned=true, or a restored pin, that failed
    assert plan(pinned=False) is FailedLoadPlan.UNPIN
    assert plan(cancelled=True) is FailedLoadPlan.KEEP
    assert plan(ready=True) is FailedLoadPlan.KEEP
    # Issue 18 finding 2: the pin of a crashed model held before the load; any origin.
    assert plan(pin_in_force=True) is FailedLoadPlan.RESTART
    assert plan(restart=True) is FailedLoadPlan.RESTART
    assert plan(pin_in_force=True, restart_pending=True) is FailedLoadPlan.KEEP
    assert plan(pin_in_force=True, pinned=False) is FailedLoadPlan.UNPIN  # the load said pinned=false


def test_pressure_counts_what_models_being_stopped_will_free() -> None:
    residents = [typed("a", 1, 10), typed("b", 2, 10)]
    # 95 available, 10 on its way out of a model already stopping: enough.
    assert relieve_pressure(available=95, reserve=100, residents=residents, freeing=10) == PressurePlan(
        (), None
    )
    # 3 on its way out: one more must go, not two.
    assert relieve_pressure(available=95, reserve=100, residents=residents, freeing=3).victims == ("a",)
