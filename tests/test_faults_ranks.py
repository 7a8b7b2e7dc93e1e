"""Fault injection, ranks: one rank killed, hung or raising; the whole job must end, non-zero, by itself.

Guarantee 3: one rank SIGKILLed mid-step -> the other rank and the launcher exit non-zero within
the collective timeout; no process of the job remains (DataLoader workers included).
Guarantee 4: one rank hung (SIGSTOP) -> the job ends non-zero within the timeout (plus DeepSpeed's
launcher grace: it SIGTERMs the survivors, waits 30 s, then SIGKILLs, and a stopped process only
dies on SIGKILL) and the surviving rank names the rank that did not arrive, and where it was.
Guarantee 5: a Python exception on one rank only (under torchrun) -> the job ends non-zero at
once; nobody waits in the next collective; the survivor's message carries the failed rank's error.

Each job runs with collective_timeout_s=15 and 1 DataLoader worker per rank, in its own process
group; `launch_job` waits for the launcher, then checks that nothing of the group is left. No
timing is asserted beyond "it ended by itself" (the launch timeout is generous: the machine is
shared); the seconds are printed.

Cost: 3 launches (one of them ~60 s: timeout + the launcher's 30 s grace), plus a few pure unit tests.
"""

from __future__ import annotations

import pytest
from ds_scripts.fault_jobs import TIMEOUT_S, fault_args, launch_job

pytestmark = pytest.mark.slow

WORKERS = ["--set", "data.num_workers=1"]


def _args(small_tokenizer, small_shards, tmp_path):
    return fault_args(small_tokenizer, small_shards, tmp_path / "run", steps=6, extra=WORKERS)


def test_killed_rank_ends_the_job(small_tokenizer, small_shards, tmp_path):
    job = launch_job(_args(small_tokenizer, small_shards, tmp_path), faults="kill@loss:step=2,rank=1")
    print(f"job ended {job.seconds:.1f}s after its start")
    assert job.returncode not in (None, 0), job.tail()
    assert "[fault] rank 1: kill at loss step 2" in job.output
    # The survivor's collective broke as soon as its peer was gone (no waiting for the timeout), and it
    # names the dead rank by its silent heartbeat (the progress marks cannot: both were in one phase).
    line = next((x for x in job.output.splitlines() if "[roberta-ds] rank 0: collective failed" in x), "")
    assert "no heartbeat (process dead or frozen) from rank 1" in line and "Timed out" not in line, job.tail()
    assert job.orphans == [], job.orphans


def test_hung_rank_is_named_and_the_job_ends(small_tokenizer, small_shards, tmp_path):
    job = launch_job(_args(small_tokenizer, small_shards, tmp_path), faults="stop@step:step=2,rank=1")
    print(f"job ended {job.seconds:.1f}s after its start (timeout {TIMEOUT_S}s + launcher grace 30s)")
    assert job.returncode == 4, job.tail()  # EXIT_COLLECTIVE_FAILURE, passed on by the launcher
    assert "[fault] rank 1: stop at step step 2" in job.output
    line = next((x for x in job.output.splitlines() if "[roberta-ds] rank 0: collective failed" in x), "")
    # Rank 1 stopped at the start of step index 2; its last mark was the checkpoint after 2 steps.
    assert "ranks that did not arrive at step 2" in line, job.tail()
    assert "rank 1 (last at step 2 save (interval))" in line
    assert "Timed out" in line and "no heartbeat (process dead or frozen) from rank 1" in line
    assert f"collective_timeout_s={TIMEOUT_S}" in line
    assert job.orphans == [], job.orphans


def test_exception_on_one_rank_ends_the_job_promptly(small_tokenizer, small_shards, tmp_path):
    job = launch_job(_args(small_tokenizer, small_shards, tmp_path), launcher="torchrun",
                     faults="raise@step:step=2,rank=1")
    print(f"job ended {job.seconds:.1f}s after its start")
    assert job.returncode not in (None, 0), job.tail()
    assert "roberta_ds.launch.faults.InjectedFault: injected exception at step (step 2)" in job.output, job.tail()
    # Rank 0 did not sit out the timeout: its collective broke when rank 1 exited, and it reports why.
    line = next((x for x in job.output.splitlines() if "[roberta-ds] rank 0: collective failed" in x), "")
    failure = "rank 1 failed: fatal error: InjectedFault: injected exception at step (step 2)"
    assert failure in line, job.tail()
    assert "Timed out" not in line and "timed out" not in line
    assert job.orphans == [], job.orphans


# ----------------------------------------------------------------------------------------------
# The pure pieces behind those messages (no launch)


@pytest.mark.parametrize("spec, error", [
    ("kill", "lacks '@point'"), ("explode@step", "unknown action"), ("kill@step:when=3", "unknown filter"),
    ("sleep@step", "sleep needs seconds"), ("sleep=soon@step", "sleep needs seconds"),
    ("unlink@step", "unlink needs a path"),
])
def test_fault_spec_errors(spec, error):
    from roberta_ds.errors import ConfigError
    from roberta_ds.launch.faults import parse

    with pytest.raises(ConfigError, match=error):
        parse(spec)


def test_fault_spec_filters_and_value_actions():
    from roberta_ds.launch.faults import Faults

    f = Faults("nan@loss:step=2,rank=1; inf@grad:step=3,times=2; unlink=/x/y.bin@step:step=9", rank=1)
    assert [(x.action, x.point, x.arg, x.step, x.rank, x.times) for x in f.faults] == [
        ("nan", "loss", "", 2, 1, 1), ("inf", "grad", "", 3, None, 2),
        ("unlink", "step", "/x/y.bin", 9, None, 1)]
    assert f.at("loss", 1) is None and f.at("loss", 2) == "nan" and f.at("loss", 2) is None  # fires once
    assert f.at("grad", 3) == "inf" and f.at("grad", 3) == "inf" and f.at("grad", 3) is None
    assert Faults("nan@loss:rank=0", rank=1).at("loss", 0) is None
    assert not Faults("", rank=0).active


def test_diagnosis_names_who_is_behind_silent_or_failed():
    from roberta_ds.launch.watchdog import describe

    seen = {0: (12, "step 3 optimizer step"), 1: (9, "step 2 save (interval)"),
            2: (12, "step 3 optimizer step")}
    text = describe(seen, {}, [1])
    assert text == ("ranks that did not arrive at step 3 optimizer step: rank 1 (last at step 2 save "
                    "(interval)); no heartbeat (process dead or frozen) from rank 1")
    same = {0: (5, "step 2 micro-batch 0"), 1: (5, "step 2 micro-batch 0")}
    assert describe(same, {1: "fatal error: ValueError: x"}) == (
        "every rank reached step 2 micro-batch 0; the failure happened inside that phase; "
        "rank 1 failed: fatal error: ValueError: x")


def test_diagnosis_names_the_host_of_each_rank_across_nodes():
    from roberta_ds.launch.watchdog import describe

    seen = {0: (12, "step 7 micro-batch 0"), 1: (12, "step 7 micro-batch 0"),
            2: (9, "step 6 optimizer step"), 3: (9, "step 6 optimizer step")}
    hosts = {0: "node1", 1: "node1", 2: "node2", 3: "node2"}
    assert describe(seen, {}, [2, 3], hosts) == (
        "ranks that did not arrive at step 7 micro-batch 0: rank 2 on node2 (last at step 6 optimizer "
        "step), rank 3 on node2 (last at step 6 optimizer step); no heartbeat (process dead or frozen) "
        "from rank 2 on node2, rank 3 on node2")
    # All on one host: the host says nothing.
    assert describe(seen, {}, [2], dict.fromkeys(range(4), "vm")).endswith("from rank 2")


def test_collective_failure_is_found_behind_a_later_error():
    """The launcher's SIGTERM kills our DataLoader worker while a broken collective unwinds; torch then
    raises "DataLoader worker ... killed" during its handling: the collective failure must still be seen."""
    from roberta_ds.launch.watchdog import collective_failure_in

    broken = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    try:
        try:
            raise broken
        except RuntimeError:
            raise RuntimeError("DataLoader worker (pid 3889) is killed by signal: Terminated.")  # noqa: B904
    except RuntimeError as later:
        assert collective_failure_in(later) is broken
    assert collective_failure_in(ValueError("bad value")) is None
