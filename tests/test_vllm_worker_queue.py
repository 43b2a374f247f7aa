"""The vLLM plugin's worker queue keeps at most KEEP_UNTAKEN requests' results: the jobs of the
requests it drops go with them (before, _trim dropped the request first, so _release found no
key and the job stayed in ``jobs`` for good)."""

from concurrent.futures import Future

from videoanchor.integrations.vllm.worker_queue import KEEP_UNTAKEN, WorkerQueue


def test_trim_drops_the_oldest_requests_jobs():
    forgotten = []
    q = WorkerQueue(nice=0, workers=1, forgotten=forgotten.append)
    try:
        for i in range(KEEP_UNTAKEN + 5):
            key = f"key{i}"
            assert q.note(f"req{i}", key)
            with q.lock:  # a finished job, as start() leaves it once run
                done = Future()
                done.set_result(None)
                q.jobs[key] = done
        q.note("last", None)
        assert len(q.by_req) == KEEP_UNTAKEN
        assert forgotten == [f"req{i}" for i in range(6)]
        assert "key0" not in q.jobs and "key5" not in q.jobs
        assert f"key{KEEP_UNTAKEN + 4}" in q.jobs
        assert len(q.jobs) == KEEP_UNTAKEN - 1  # the kept requests' keys ("last" has none)
    finally:
        q.close()


def test_a_key_shared_by_a_kept_request_keeps_its_job():
    q = WorkerQueue(nice=0, workers=1)
    try:
        q.note("old", "shared")
        q.jobs["shared"] = Future()
        for i in range(KEEP_UNTAKEN - 1):
            q.note(f"req{i}", None)
        q.note("new", "shared")  # "old" goes; "new" still wants the same scores
        assert "old" not in q.by_req and "shared" in q.jobs
    finally:
        q.close()
