"""The pure schedule: round queues, checkpoint clocks, what is left after a regroup."""

import collections
import random

import numpy as np
import pytest

from daskdl import schedule
from daskdl.plan import make_plan, plan_from_segments

ARGS = schedule.PlanArgs(chunks=(100,) * 10, batch_size=8, every=2, seed=3)


def entries(n_workers=2, epochs=3, args=ARGS):
    return schedule.fresh_entries(args, n_workers, 0, epochs, 0)


# -- round queues: the hang of a rank left with nothing in flight ---------------------
class Cluster:
    """Bulk-synchronous rounds on a simulated cluster: rank ``r``'s round ``c`` can
    finish once it is the oldest round ``r`` has in flight and every rank has either
    finished round ``c`` or has it in flight (a barrier waits for every rank)."""

    def __init__(self, n_workers):
        self.phys = {r: [] for r in range(n_workers)}  # submitted, not finished
        self.fin = {r: 0 for r in range(n_workers)}  # rounds finished per rank

    def submit(self, q):
        for rank, rounds in q.take():  # one round per task here
            self.phys[rank].append(rounds[0][2])

    def ready(self):
        return [r for r, cs in self.phys.items() if cs and all(
            cs[0] in self.phys[o] or self.fin[o] > cs[0] for o in self.phys)]

    def run_a_while(self, rng, steps):
        """Rounds finish while the client is busy; returns them in finishing order."""
        done = []
        for _ in range(steps):
            ready = self.ready()
            if not ready:
                break
            for r in rng.sample(ready, rng.randint(1, len(ready))):
                done.append((r, self.phys[r].pop(0)))
                self.fin[r] += 1
        return done


def simulate_bsp(n_workers, ahead, rounds, rule, seed):
    """Run a schedule pass by pass, as the fit loop does: between two passes several
    rounds finish; ``rule`` accounts for them and tops up.  Returns the number of
    passes that ended with a rank starved, and whether the run finished."""
    rng = random.Random(seed)
    en = schedule.fresh_entries(schedule.PlanArgs((8 * rounds * n_workers,), 8, 1, 0),
                                n_workers, 0, 1, 0)
    q = schedule.RoundQueues(en, n_workers, ahead)
    cluster = Cluster(n_workers)
    cluster.submit(q)
    starved = 0
    for _ in range(100 * rounds):
        done = cluster.run_a_while(rng, rng.randint(1, 2 * ahead))
        if not done and q.empty() and not any(cluster.phys.values()):
            return starved, True
        rule(q, done, cluster)
        starved += bool(q.starved())
        if not done and not cluster.ready() and q.starved():
            return starved, False  # nobody can finish a round: the fit would hang
    return starved, False


def old_rule(q, done, cluster):
    """Top up at most once, as soon as the rank of the round just handled is down to
    half, before the pass's other finished rounds are accounted for."""
    topped = False
    for rank, _ in done:
        q.finished(rank, [0])
        if not topped and q.inflight[rank] <= q.low:
            cluster.submit(q)
            topped = True


def new_rule(q, done, cluster):
    """Account for every finished round, then top up if any rank is due."""
    for rank, _ in done:
        q.finished(rank, [0])
    if done and q.due():
        cluster.submit(q)


@pytest.mark.parametrize("n_workers", [2, 4, 8])
def test_topping_up_after_the_whole_pass_never_leaves_a_rank_without_a_round(n_workers):
    for seed in range(20):
        starved, finished = simulate_bsp(n_workers, 4, 60, new_rule, seed)
        assert finished and starved == 0, (n_workers, seed)


def test_the_old_rule_starves_a_rank_and_hangs():
    """The cause of the hang seen with fast rounds: some rank ends a pass with nothing
    in flight while the others wait for it, and no later pass queues again."""
    outcomes = [simulate_bsp(4, 4, 60, old_rule, seed) for seed in range(20)]
    assert any(not finished for _, finished in outcomes)


def test_round_queues_take_in_clock_order_and_count_outstanding_rounds():
    en = entries(2, 2)
    q = schedule.RoundQueues(en, 2, ahead=3)
    total = sum(e.plan.rounds for e in en) * 2
    assert q.queued == total and q.outstanding[0] == en[0].plan.rounds * 2
    got = q.take()
    assert [rounds[0][2] for r, rounds in got if r == 0] == [0, 1, 2]
    assert q.take() == []  # the window is full
    q.finished(0, [0])
    assert not q.due()  # 2 in flight > 3 // 2
    q.finished(0, [0])
    assert q.due() and [rounds[0][2] for r, rounds in q.take()] == [3, 4]


def test_tasks_of_several_rounds_span_epoch_boundaries():
    en = entries(2, 2)
    R = en[0].plan.rounds
    q = schedule.RoundQueues(en, 2, ahead=2, per_task=R - 1)
    first, second = [rounds for r, rounds in q.take() if r == 0]
    assert [c for _, _, c in first] == list(range(R - 1))
    assert [c for _, _, c in second] == list(range(R - 1, 2 * R - 2))  # epoch 0 -> 1
    assert {en[i].label for i, _, _ in second} == {0, 1}
    q.finished(0, [en[i].label for i, _, _ in first])
    q.finished(1, [0] * (R - 1))
    assert q.outstanding[0] == 2 and q.due()


# -- checkpoint clocks and data positions ---------------------------------------------
def test_checkpoint_clocks_every_n_and_at_epoch_ends():
    en = entries(2, 3)
    ends = [e.end for e in en]
    assert sorted(schedule.checkpoint_clocks(en, None)) == ends
    every = schedule.checkpoint_clocks(en, 5)
    assert all(K % 5 == 0 for K in every if K != ends[-1]) and ends[-1] in every
    i, k = every[5]
    assert en[i].start + k == 5


def test_data_position_inside_and_at_the_end_of_an_epoch():
    en = entries(2, 2)
    mid = schedule.data_position(en, (0, 2))
    assert mid["epoch"] == 0 and mid["round"] == 2 and mid["pieces"] is not None
    end = schedule.data_position(en, (0, en[0].plan.rounds))
    assert end == {"epoch": 1, "round": 0, "plan_epoch": 1, "pieces": None}


def test_resumed_entries_continue_the_plan_or_recut_it():
    en = entries(2, 3)
    pos = schedule.data_position(en, (0, 3))
    meta = dict(pos, clock=en[0].start + 3)
    same = schedule.resumed_entries(ARGS, meta, 2, 3)
    assert same[0].first == 3 and same[0].start == 0 and same[0].plan.pieces == en[0].plan.pieces
    assert [e.label for e in same] == [0, 1, 2]
    recut = schedule.resumed_entries(ARGS, meta, 3, 3)
    assert recut[0].plan.n_workers == 3 and recut[0].start == meta["clock"]
    assert not recut[0].fresh and recut[1].start == recut[0].end


# -- what is left after a regroup ------------------------------------------------------
def test_leftover_pools_the_unmerged_samples_of_the_epoch_under_way():
    en = entries(2, 3)
    R = en[0].plan.rounds
    done = {0: 3, 1: 5}  # rank 0 had 3 rounds merged, rank 1 had 5
    left = schedule.leftover(en, done, 0, 3)
    expect = sum(len(s) for r, d in done.items() for s in en[0].plan.remaining(r, d))
    assert sum(len(s) for s in left.pool) == expect
    assert left.label == 0 and left.next_label == 1 and left.clock == 5
    nothing = schedule.leftover(en, {0: R, 1: R}, 0, 3)  # epoch 0 over, epoch 1 unstarted
    assert nothing.pool == [] and nothing.label is None and nothing.next_label == 1


def test_replan_recuts_the_rest_for_the_new_workers_and_then_fresh_epochs():
    en = entries(2, 3)
    new, left = schedule.replan(en, {0: 3, 1: 3}, ARGS, 3, 0, 3)
    assert new[0].plan.n_workers == 3 and not new[0].fresh and new[0].start == 3
    assert [e.label for e in new] == [0, 1, 2]
    assert all(b.start == a.end for a, b in zip(new, new[1:]))
    merged = list(schedule.merged_rounds(en, {0: 3, 1: 3}))
    assert sorted((r, k) for r, _, k in merged) == [(r, k) for r in (0, 1) for k in range(3)]


def test_plan_from_segments_cuts_equal_pieces_and_uses_each_sample_once():
    plan = make_plan((100,) * 10, 2, 8, 2, 3, 0)
    pool = [s for r in range(2) for s in plan.remaining(r, 2)]
    rest = plan_from_segments(pool, 3, 8, 2, 3, 0, (100,) * 10)
    n = sum(len(s) for s in pool)
    per_rank = [sum(len(s) for s in p) for p in rest.pieces]
    assert len(set(per_rank)) == 1 and n - sum(per_rank) < 3 * 8
    used = collections.Counter()
    for p in rest.pieces:
        for s in p:
            for i in range(s.start, s.stop):
                used[(s.chunk, s.epoch, i)] += 1
    assert max(used.values()) == 1
    avail = {(s.chunk, s.epoch, i) for s in pool for i in range(s.start, s.stop)}
    assert set(used) <= avail
    assert np.all(np.array(per_rank) % 8 == 0)
