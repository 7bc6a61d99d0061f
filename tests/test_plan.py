import numpy as np
import pytest

from daskdl.errors import DatasetError
from daskdl.plan import chunk_permutation, make_plan


def used_samples(plan):
    """Global sample indices used in each round of each rank, following the plan."""
    offsets = np.concatenate([[0], np.cumsum(plan.chunk_sizes)])
    per_rank = []
    for rank in range(plan.n_workers):
        idx = []
        for r in range(plan.rounds):
            for seg in plan.round_segments(rank, r):
                perm = chunk_permutation(plan.seed, plan.epoch, seg.chunk,
                                         plan.chunk_sizes[seg.chunk])
                idx.extend(offsets[seg.chunk] + perm[seg.start:seg.stop])
        per_rank.append(np.array(idx))
    return per_rank


@pytest.mark.parametrize("sizes,workers,batch,every", [
    ([100] * 10, 2, 32, 4),
    ([37, 100, 5, 64, 99, 1], 3, 7, 3),
    ([1000], 2, 64, 16),
    ([13] * 50, 4, 10, 1),
])
def test_each_sample_at_most_once_and_remainder_below_one_batch_per_worker(
        sizes, workers, batch, every):
    plan = make_plan(sizes, workers, batch, every, seed=3, epoch=1)
    per_rank = used_samples(plan)
    allidx = np.concatenate(per_rank)
    assert len(allidx) == len(set(allidx.tolist()))  # at most once
    assert all(len(p) == plan.steps * batch for p in per_rank)  # same steps everywhere
    unused = sum(sizes) - len(allidx)
    assert 0 <= unused < workers * batch
    assert plan.samples == len(allidx)
    assert sum(plan.round_steps(r) for r in range(plan.rounds)) == plan.steps


def test_plan_is_deterministic_and_reshuffles_each_epoch():
    a = make_plan([50] * 8, 2, 10, 2, seed=0, epoch=0)
    b = make_plan([50] * 8, 2, 10, 2, seed=0, epoch=0)
    c = make_plan([50] * 8, 2, 10, 2, seed=0, epoch=1)
    d = make_plan([50] * 8, 2, 10, 2, seed=1, epoch=0)
    assert a.pieces == b.pieces
    assert a.pieces != c.pieces
    assert a.pieces != d.pieces
    ua, uc = used_samples(a), used_samples(c)
    assert not np.array_equal(ua[0], uc[0])


def test_locality_first_keeps_owned_chunks_on_their_worker():
    owners = [0, 1] * 4
    for epoch in range(3):
        plan = make_plan([50] * 8, 2, 10, 5, seed=0, epoch=epoch, owners=owners)
        for rank, piece in enumerate(plan.pieces):
            assert {s.chunk for s in piece} == {c for c, o in enumerate(owners) if o == rank}


def test_plan_errors_name_the_problem():
    with pytest.raises(DatasetError, match="batch_size=600 is larger than each worker's share"):
        make_plan([500, 500], 2, 600, 1, seed=0, epoch=0)
    with pytest.raises(DatasetError, match="zero samples"):
        make_plan([0], 1, 1, 1, seed=0, epoch=0)
