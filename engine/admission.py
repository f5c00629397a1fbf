"""New admissions of one scheduler step: the order between projects, and making room.

Split out of ``engine.scheduler`` (plain Python, no torch). Projects take turns
(round-robin, FCFS inside each); projects within their share go first.

SHARES (``BlockManager.share``): project P owns ``share(P)`` of the blocks and of
the ``max_num_seqs`` slots. P is *within its share* when it uses fewer blocks
than its block share and one more sequence would not take it over its slot
share. Only such a project preempts to admit a request: victims of projects
strictly over their share of the missing resource, only when that makes the
request fit, and only if P stays within its share after, counting all the
request's tokens (not just its first chunk).

FAIRNESS BOUND. Let B = max_num_batched_tokens, S = max_num_seqs (capped at
B - 1), b = B - S + 1, L = the most tokens of any sequence, K = the number of
projects. A new prefill starts only in a step where no chunk is left partial,
so at most one prefill is partial at any time, and it advances >= b tokens a
step. Hence: if project P stays within its share, and P's unused block share
holds all the tokens of its head request R (and no block is shared across
projects), R is scheduled within K * (ceil(L / b) + 1) steps of reaching the
head of P's queue, whatever the other projects submit.
(tests/test_scheduler_properties.py floods and checks it.)

No ping-pong: a request admitted by preemption fits its project's share, so it
is no victim of the project it took from before it decodes past that share;
and then, being over its share, it can come back only into idle blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.scheduler import ScheduledBatch, Scheduler
    from engine.sequence import Sequence


def admit(sched: Scheduler, batch: ScheduledBatch) -> None:
    """Admit waiting sequences while the step has budget left (chunking the last one)."""
    skipped: set[str] = set()
    while True:
        # Projects that just lost blocks do not come back this step (no churn).
        skipped.update(s.project for s in batch.preempted)
        budget = sched.max_num_batched_tokens - batch.num_tokens
        order = [p for p in sched.project_order() if p not in skipped]
        if budget <= 0 or not order or not _prefills_complete(sched, batch):
            return
        favoured = [p for p in order if sched.within_share(p)]
        project = (favoured or order)[0]
        seq = sched.waiting[project][0]
        n = _make_room(sched, seq, budget, batch)
        if n is None:
            if seq not in batch.failed:
                skipped.add(project)  # FCFS: its later requests wait behind this one
            continue
        sched.pop_waiting(project)
        batch.add(seq, n, prefill=True)


def _prefills_complete(sched: Scheduler, batch: ScheduledBatch) -> bool:
    """Every running sequence is in the step and no chunk is partial: then a new
    admission may start a prefill. So at most one prefill is ever left partial."""
    return len(batch) == sched.num_running and all(batch.produces_token)


def _make_room(sched: Scheduler, seq: Sequence, budget: int, batch: ScheduledBatch) -> int | None:
    """Slot and blocks for the first chunk of ``seq`` (its size), or None: not this step."""
    bm = sched.block_manager
    if bm.blocks_for(seq.num_tokens) > bm.num_blocks:
        sched.fail(seq, batch)
        return None
    victims: list[Sequence] = []
    if sched.num_running >= sched.max_num_seqs:
        if sched.slots_over_share(seq.project) + 1 > 0:
            return None  # a slot only for a project that stays within its slot share
        pool = [s for s in sched.running if sched.slots_over_share(s.project) > 0]
        if not pool:
            return None
        victims.append(
            max(pool, key=lambda s: (sched.slots_over_share(s.project), s.arrival_time, s.seq_id))
        )
    bm.reuse_prefix(seq)
    n = min(seq.num_uncomputed_tokens, budget)
    need = bm.num_blocks_needed(seq, n)
    if need > bm.num_free_blocks + bm.freeable_blocks(victims) and not _block_victims(
        sched, seq, need, victims
    ):
        bm.free(seq)
        return None
    for victim in victims:
        sched.preempt(victim, batch)
    if not bm.allocate_slots(seq, n):  # only if victims shared blocks with seq's prefix
        bm.free(seq)
        return None
    return n


def _block_victims(sched: Scheduler, seq: Sequence, need: int, victims: list[Sequence]) -> bool:
    """Add to ``victims`` (most over share first, latest arrival first) until ``need``
    blocks would be free; False when not allowed or not possible."""
    bm = sched.block_manager
    # The whole request (not just this chunk) must fit in the project's unused share:
    # else it would outgrow its share mid-prefill and be preempted back (a livelock).
    rest = bm.blocks_for(seq.num_tokens) - len(seq.block_table)
    if bm.usage(seq.project) + rest > bm.share_blocks(seq.project):
        return False
    pool = [s for s in sched.running if s not in victims]
    while need > bm.num_free_blocks + bm.freeable_blocks(victims):
        over = {p: _blocks_over_without(sched, p, victims) for p in {s.project for s in pool}}
        candidates = [s for s in pool if over[s.project] > 0]
        if not candidates:
            return False
        victim = max(candidates, key=lambda s: (over[s.project], s.arrival_time, s.seq_id))
        pool.remove(victim)
        victims.append(victim)
    return True


def _blocks_over_without(sched: Scheduler, project: str, victims: list[Sequence]) -> int:
    """The project's blocks over its share once ``victims`` are gone (shared blocks once)."""
    kept = {
        b for s in sched.running if s.project == project and s not in victims for b in s.block_table
    }
    return len(kept) - sched.block_manager.share_blocks(project)
