"""Which data-parallel group a new request goes to (engine.parallel_loop.DPBalancer): the
least loaded, unless a group recently took the same leading prompt blocks and is not much
busier. No tensors, no processes."""

from __future__ import annotations

from engine.core import EngineStats
from engine.parallel_loop import DPBalancer, DPReport
from engine.request import EngineRequest, RequestOutput
from engine.sampling_params import SamplingParams

BLOCK = 4


def request(rid: str, prompt: list[int], n: int = 1) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(n=n))


def test_new_requests_spread_over_the_groups_by_load():
    b = DPBalancer(3, BLOCK)
    groups = [b.assign(request(f"r{i}", [100 + i] * 9)) for i in range(6)]
    assert sorted(groups) == [0, 0, 1, 1, 2, 2]


def test_reported_load_and_free_blocks_decide():
    b = DPBalancer(2, BLOCK)
    b.update([DPReport(stats=EngineStats(waiting=3, running=5, used_blocks=10), free_blocks=6),
              DPReport(stats=EngineStats(waiting=0, running=8, used_blocks=2), free_blocks=14)])
    assert b.assign(request("a", [1, 2, 3])) == 1  # equal load (8 each): more free blocks wins
    assert b.assign(request("b", [4, 5, 6])) == 0  # now group 1 has one more


def test_a_shared_prefix_goes_back_to_the_group_that_has_it_while_not_much_busier():
    b = DPBalancer(2, BLOCK)
    system = list(range(10, 22))  # three full blocks shared by every request below
    first = b.assign(request("a", system + [1, 2]))
    for i in range(DPBalancer.SLACK):
        assert b.assign(request(f"s{i}", system + [3 + i])) == first
    assert b.assign(request("over", system + [9])) != first  # SLACK more than the other: spread


def test_an_n_request_counts_n_sequences_and_aborts_find_their_group():
    b = DPBalancer(2, BLOCK)
    assert b.assign(request("big", [7] * 5, n=4)) == 0
    assert [b.assign(request(f"x{i}", [50 + i] * 3)) for i in range(3)] == [1, 1, 1]
    assert b.owner["big"] == 0
    b.update([DPReport([RequestOutput("big", [], finished=True)]), DPReport()])
    assert "big" not in b.owner
