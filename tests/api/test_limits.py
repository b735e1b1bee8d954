"""The rate limiter's token leases on real Redis: a process counts tokens in
the shared budget in batches and spends them locally, within the bound
api/limits.py states, and a small limit is still counted one request at a time."""
from __future__ import annotations

import secrets

from limits import parse

from api.limits import LEASE_SECONDS, MAX_LEASE, Limiter
from tests.conftest import REDIS_URL


class Clock:
    """A clock the test moves: leases lapse only when it says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting(limiter: Limiter) -> list[int]:
    """The cost of every round trip the limiter makes to the shared budget."""
    costs: list[int] = []
    original = limiter.shared.hit

    def hit(item, *identifiers, cost=1):
        costs.append(cost)
        return original(item, *identifiers, cost=cost)

    limiter.shared.hit = hit
    return costs


def key() -> str:
    return f"tenant:test-{secrets.token_hex(6)}"


def test_a_busy_caller_leases_tokens_in_batches_up_to_the_cap():
    limiter = Limiter(parse("1000000/minute"), REDIS_URL, clock=Clock())
    costs = counting(limiter)
    who = key()
    assert all(limiter.hit(who) for _ in range(300))
    # One token, then twice as many each time a lease is spent before it lapses, up to the cap.
    assert costs[:7] == [1, 2, 4, 8, 16, 32, MAX_LEASE]
    assert set(costs[7:]) == {MAX_LEASE} and sum(costs) >= 300 > sum(costs) - MAX_LEASE
    assert len(costs) < 300 / 20


def test_a_small_limit_is_counted_one_request_at_a_time_across_processes():
    first, second = (Limiter(parse("50/minute"), REDIS_URL, clock=Clock()) for _ in range(2))
    assert first.lease_cap == 1
    costs = counting(first)
    who = key()
    admitted = [limiter.hit(who) for _ in range(30) for limiter in (first, second)]
    assert admitted == [True] * 50 + [False] * 10
    assert costs == [1] * 30  # no lease: one request, one round trip, admitted or not


def test_processes_together_stay_within_the_limit_less_their_unspent_leases():
    clock = Clock()
    limiters = [Limiter(parse("2000/minute"), REDIS_URL, clock=clock) for _ in range(3)]
    cap = limiters[0].lease_cap
    assert cap == 20
    who = key()
    admitted = 0
    for _ in range(1000):
        admitted += sum(limiter.hit(who) for limiter in limiters)
    # Nothing past the limit within a window; what is short of it sits in leases not yet spent.
    assert 2000 - len(limiters) * cap <= admitted <= 2000
    assert not any(limiter.hit(who) for limiter in limiters for _ in range(cap))


def test_unspent_tokens_lapse_and_the_next_lease_is_smaller():
    clock = Clock()
    limiter = Limiter(parse("1000000/minute"), REDIS_URL, clock=clock)
    costs = counting(limiter)
    who = key()
    for _ in range(1 + 2 + 4):
        assert limiter.hit(who)
    assert costs == [1, 2, 4]
    assert limiter.hit(who) and costs[-1] == 8  # seven of these eight are left
    clock.now += LEASE_SECONDS + 0.01
    # They lapsed: counted against the caller, never spent late. The next lease asks for half.
    assert limiter.hit(who) and costs[-1] == 4
    for _ in range(3):
        assert limiter.hit(who)
    assert len(costs) == 5


def test_refused_when_the_shared_budget_is_spent_by_another_process():
    clock = Clock()
    busy, idle = (Limiter(parse("200/minute"), REDIS_URL, clock=clock) for _ in range(2))
    who = key()
    while busy.hit(who):
        pass
    assert not idle.hit(who)
    assert 1 <= idle.retry_after(who) <= 60
