"""The scheduler with no model. A fake engine keeps a paged "cache" of token ids in (page, offset) slots, wipes the
slots of free pages before every step, and samples each next token as a function of the context it reads back
through the block table -- so a wrong block table, a page shared by two sequences or a recompute that skips tokens
changes the outputs, which must equal a reference computed without any cache. Every step checks the invariants:
the token budget, decodes before prefills, max_running, first-come-first-served admission from the head of the
queue, block tables sized exactly to the tokens, no page leaked or shared, preemption of the most recently
admitted sequence back to the front of the queue; and at the end every page is back in the pool."""

import random

import pytest

from serve.block_allocator import BlockAllocator
from serve.request import RequestState
from serve.scheduler import ScheduledChunk, Scheduler, SchedulerConfig


def next_token(context):
    """The fake model: the next token depends on every token of the context, in order."""
    return sum((i + 1) * t for i, t in enumerate(context)) % 997


def reference_outputs(prompt, max_new):
    context = list(prompt)
    for _ in range(max_new):
        context.append(next_token(context))
    return context[len(prompt):]


def check_invariants(scheduler, schedule, waiting_before, newest_before):
    cfg, pool = scheduler.cfg, scheduler.allocator
    assert schedule.num_tokens <= cfg.token_budget
    kinds = [c.is_decode for c in schedule.chunks]
    assert kinds == sorted(kinds, reverse=True), "decodes come first"
    assert scheduler.num_running == len(scheduler.running) <= cfg.max_running
    scheduled = {id(c.seq): c for c in schedule.chunks}
    assert len(scheduled) == len(schedule.chunks), "a sequence scheduled twice"
    for seq in scheduler.running:  # block tables hold exactly the pages for the tokens computed by this step
        chunk = scheduled.get(id(seq))
        end = seq.num_computed + (chunk.length if chunk else 0)
        assert len(seq.block_table) == scheduler.pages_needed(end)
        if chunk:
            assert chunk.start == seq.num_computed and chunk.length >= 1
    assert all(c.seq.status == "running" for c in schedule.chunks)
    pages = [p for s in scheduler.running for p in s.block_table]
    assert len(pages) == len(set(pages)) == pool.num_used and 0 not in pages, "a page shared, leaked or null"
    assert all(not s.block_table and s.num_computed == 0 for s in scheduler.waiting)
    # Preemption: newest first, each newer than everything still running, requeued at the front, not scheduled.
    victims = [s.admitted_at for s in schedule.preempted]
    assert victims == sorted(victims, reverse=True)
    assert all(v > s.admitted_at for v in victims for s in scheduler.running)
    assert scheduler.waiting[:len(victims)] == tuple(reversed(schedule.preempted))
    # Admission: only without preemption, strictly from the head of the queue, in order.
    admitted = sorted((s for s in scheduler.running if s.admitted_at > newest_before), key=lambda s: s.admitted_at)
    assert not (admitted and schedule.preempted)
    assert tuple(admitted) == waiting_before[:len(admitted)]


def run(scheduler, seqs, max_steps=10_000):
    """Drive `scheduler` over `seqs` to the end with the fake engine; returns the schedules."""
    for seq in seqs:
        scheduler.add(seq)
    slots, schedules = {}, []
    page_size = scheduler.cfg.page_size

    def slot(seq, pos):
        return seq.block_table[pos // page_size], pos % page_size

    while scheduler.has_unfinished:
        assert len(schedules) < max_steps, "did not finish"
        for key in [k for k in slots if scheduler.allocator.refcount(k[0]) == 0]:
            del slots[key]  # a free page's contents must never be read again
        waiting_before = scheduler.waiting
        newest_before = max((s.admitted_at for s in seqs), default=-1)
        schedule = scheduler.schedule()
        check_invariants(scheduler, schedule, waiting_before, newest_before)
        schedules.append(schedule)
        for chunk in schedule.chunks:
            seq = chunk.seq
            for pos in range(chunk.start, chunk.start + chunk.length):
                slots[slot(seq, pos)] = seq.all_ids[pos]
            scheduler.after_step(chunk)
            if seq.num_computed == seq.num_tokens:
                context = [slots.get(slot(seq, pos), -1) for pos in range(seq.num_tokens)]
                append(scheduler, seq, next_token(context))
                if len(seq.output_ids) == seq.max_new_tokens:
                    scheduler.finish(seq, "length")
    return schedules


def append(scheduler, seq, token):
    """The engine's two reports for one sampled token: its place held at launch, then the token read back."""
    scheduler.sampled(seq)
    scheduler.update_from_output([(seq, token)], now=0.0)


def scheduler_with(num_pages, seqs, **cfg):
    """A scheduler over `num_pages` pages (page 0 is the null page) with `seqs` added in order."""
    scheduler = Scheduler(SchedulerConfig(**cfg), BlockAllocator(num_pages))
    for seq in seqs:
        scheduler.add(seq)
    return scheduler


def step_all(scheduler, token):
    """One step of everything `scheduler` schedules, every sequence then sampling `token`."""
    for chunk in scheduler.schedule().chunks:
        scheduler.after_step(chunk)
        append(scheduler, chunk.seq, token)


def make_seqs(lengths, max_new, rng=None):
    rng = rng or random.Random(0)
    return [RequestState(f"s{i}", [rng.randrange(997) for _ in range(n)], m)
            for i, (n, m) in enumerate(zip(lengths, max_new, strict=True))]


def assert_all_served(scheduler, seqs):
    for seq in seqs:
        assert seq.status == "finished" and seq.finish_reason == "length"
        assert seq.output_ids == reference_outputs(seq.prompt_ids, seq.max_new_tokens), seq.request_id
        assert seq.block_table == []
    assert scheduler.allocator.num_free == scheduler.allocator.num_usable
    assert not scheduler.has_unfinished and scheduler.kv_utilisation() == 1.0


@pytest.mark.parametrize("page_size, max_running, token_budget, max_prefill_chunk, num_pages, tight", [
    (4, 3, 10, None, 200, False), (2, 6, 24, 3, 200, False), (1, 1, 1, None, 100, False),  # plenty of pages
    (2, 6, 16, None, 12, True), (4, 8, 24, 4, 7, True), (1, 4, 6, 2, 20, True),  # preemption
])
def test_random_workloads_keep_the_invariants_and_match_the_reference(page_size, max_running, token_budget,
                                                                       max_prefill_chunk, num_pages, tight):
    cfg = SchedulerConfig(page_size, max_running, token_budget, max_prefill_chunk)
    scheduler = Scheduler(cfg, BlockAllocator(num_pages))
    rng = random.Random(num_pages)
    fits = (num_pages - 1) * page_size
    lengths = [rng.randint(1, min(30, fits - 8)) for _ in range(12)]
    seqs = make_seqs(lengths, [rng.randint(1, 8) for _ in lengths], rng)
    run(scheduler, seqs)
    assert_all_served(scheduler, seqs)
    assert (sum(s.num_preemptions for s in seqs) > 0) == tight


def test_fcfs_with_room_never_preempts_and_mixes_decodes_with_prefills():
    cfg = SchedulerConfig(page_size=4, max_running=3, token_budget=10)
    scheduler = Scheduler(cfg, BlockAllocator(40))
    seqs = make_seqs([3, 12, 1, 7, 25, 4], [5, 2, 8, 3, 4, 6])
    schedules = run(scheduler, seqs)
    assert_all_served(scheduler, seqs)
    assert [s.admitted_at for s in seqs] == list(range(6)) and not any(s.num_preemptions for s in seqs)
    assert max(len(s.chunks) for s in schedules) == 3  # max_running bound
    assert any(s.decodes and s.prefills for s in schedules)


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks():
    scheduler = Scheduler(SchedulerConfig(page_size=4, token_budget=8), BlockAllocator(20))
    seq = make_seqs([30], [2])[0]
    schedules = run(scheduler, [seq])
    assert [[(c.start, c.length, c.is_decode) for c in s.chunks] for s in schedules] == [
        [(0, 8, False)], [(8, 8, False)], [(16, 8, False)], [(24, 6, False)], [(30, 1, True)]]
    assert_all_served(scheduler, [seq])


def test_max_prefill_chunk_caps_a_chunk_and_leaves_budget_for_others():
    scheduler = scheduler_with(20, make_seqs([12, 3], [1, 1]), page_size=4, token_budget=64, max_prefill_chunk=5)
    assert [(c.seq.request_id, c.length) for c in scheduler.schedule().chunks] == [("s0", 5), ("s1", 3)]


def test_max_running_holds_the_rest_in_the_queue():
    scheduler = Scheduler(SchedulerConfig(page_size=4, max_running=2, token_budget=64), BlockAllocator(20))
    seqs = make_seqs([2, 2, 2], [2, 3, 1])
    schedules = run(scheduler, seqs)
    assert [c.seq for c in schedules[0].chunks] == seqs[:2]
    assert [len(s.chunks) for s in schedules] == [2, 2, 2]
    assert [(c.seq, c.is_decode) for c in schedules[2].chunks] == [(seqs[1], True), (seqs[2], False)]  # s0 is done
    assert_all_served(scheduler, seqs)


def test_admission_is_strictly_first_come_first_served():
    a, b, c = make_seqs([8, 12, 2], [4, 4, 4])
    scheduler = scheduler_with(5, (a, b, c), page_size=4, token_budget=64)  # 4 usable pages
    # a takes 2 pages; b needs 3 for its prompt, so it waits, and c (1 page would do) must not overtake it.
    assert [ch.seq for ch in scheduler.schedule().chunks] == [a]
    assert scheduler.waiting == (b, c) and scheduler.allocator.num_free == 2


def test_running_out_of_pages_preempts_the_newest_and_recomputes_its_outputs():
    a, b = make_seqs([3, 3], [3, 3])
    scheduler = scheduler_with(5, (a, b), page_size=2, token_budget=16)  # 4 usable pages
    for _ in range(2):  # prefill both (2 pages each, the pool is full), then one decode each
        step_all(scheduler, 7)
    schedule = scheduler.schedule()  # a's decode at position 4 needs a third page: b, the newest, makes way
    assert schedule.preempted == (b,) and [(c.seq, c.is_decode) for c in schedule.chunks] == [(a, True)]
    assert scheduler.waiting == (b,) and b.block_table == [] and b.num_computed == 0 and b.num_preemptions == 1
    assert b.output_ids == [7, 7] and len(a.block_table) == 3
    scheduler.after_step(schedule.chunks[0])
    append(scheduler, a, 7)
    scheduler.finish(a, "length")
    [chunk] = scheduler.schedule().chunks  # b comes back and re-prefills prompt + outputs so far
    assert (chunk.seq, chunk.start, chunk.length, chunk.is_decode) == (b, 0, 5, False)


def test_the_newest_sequence_preempts_itself_when_it_is_the_one_short_of_pages():
    a, b = make_seqs([3, 2], [3, 3])
    scheduler = scheduler_with(4, (a, b), page_size=2, token_budget=16)  # 3 usable pages
    step_all(scheduler, 7)  # a: 2 pages, b: 1 page
    schedule = scheduler.schedule()  # a's decode fits its pages; b's needs a second page and b is the newest
    assert schedule.preempted == (b,) and [c.seq for c in schedule.chunks] == [a]
    assert len(a.block_table) == 2 and scheduler.allocator.num_free == 1 and scheduler.waiting == (b,)


def test_requests_are_checked_on_arrival_by_name():
    scheduler = Scheduler(SchedulerConfig(page_size=4), BlockAllocator(5))
    with pytest.raises(ValueError, match="request 'big' needs 5 pages but the pool has 4"):
        scheduler.add(RequestState("big", list(range(10)), 10))
    with pytest.raises(ValueError, match="request 'empty': the prompt is empty"):
        scheduler.add(RequestState("empty", [], 1))
    with pytest.raises(ValueError, match="request 'none': max_new_tokens must be >= 1, got 0"):
        scheduler.add(RequestState("none", [1], 0))
    scheduler.add(RequestState("a", [1], 1))
    with pytest.raises(ValueError, match="request 'a' is already queued or running"):
        scheduler.add(RequestState("a", [2], 1))
    assert scheduler.num_waiting == 1


def test_abort_frees_pages_of_running_and_waiting_requests():
    a, b = make_seqs([6, 2], [3, 3])
    scheduler = scheduler_with(5, (a, b), page_size=4, max_running=1)
    scheduler.schedule()
    assert scheduler.allocator.num_used == 2 and scheduler.num_running == 1 and scheduler.num_waiting == 1
    scheduler.abort("s0")
    scheduler.abort("s1")
    scheduler.abort("unknown")  # ignored
    assert scheduler.allocator.num_free == scheduler.allocator.num_usable and not scheduler.has_unfinished
    assert (a.status, a.finish_reason, a.block_table, b.status) == ("finished", "aborted", [], "finished")


def test_kv_utilisation_by_hand():
    scheduler = Scheduler(SchedulerConfig(page_size=4, token_budget=64), BlockAllocator(10))
    assert scheduler.kv_utilisation() == 1.0  # nothing allocated
    for seq in make_seqs([5, 8], [3, 3]):
        scheduler.add(seq)
    step_all(scheduler, 1)
    assert scheduler.kv_utilisation() == (5 + 8) / ((2 + 2) * 4)
    for chunk in scheduler.schedule().chunks:  # decodes: 6 tokens in 2 pages, 9 tokens in 3 pages
        scheduler.after_step(chunk)
    assert scheduler.kv_utilisation() == (6 + 9) / ((2 + 3) * 4)


def test_engine_misuse_is_caught():
    scheduler = Scheduler(SchedulerConfig(page_size=4), BlockAllocator(5))
    seq = RequestState("a", [1], 2)
    scheduler.add(seq)
    [chunk] = scheduler.schedule().chunks
    assert not chunk.is_decode  # a one-token prompt is a prefill
    with pytest.raises(ValueError, match="request 'a': a token was sampled after 0 of 1 tokens were computed"):
        scheduler.sampled(seq)
    scheduler.after_step(chunk)
    with pytest.raises(ValueError, match="request 'a': chunk starts at 0 but 1 tokens are computed"):
        scheduler.after_step(chunk)
    with pytest.raises(ValueError, match="bad chunk"):
        ScheduledChunk(seq, 0, 0)


@pytest.mark.parametrize("field, value", [("page_size", 0), ("max_running", -1), ("token_budget", 0),
                                          ("max_prefill_chunk", 0), ("token_budget", 2.5)])
def test_config_errors_name_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=f"scheduler.{field} must be a positive integer, got {value}"):
        SchedulerConfig(**{field: value})
