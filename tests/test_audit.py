"""Tests of rapid_async.audit on hand-written records: lineages, duplicates, losses."""

from __future__ import annotations

from rapid_async.audit import audit, lineage


def step(version, trained, dropped=(), grants=None, unverified=0):
    rec = {"role": "learner", "version": version, "step": version,
           "trained/prompts": [str(p) for p in trained], "dropped/prompts": [str(p) for p in dropped],
           "trained/unverified": unverified}
    if grants is not None:
        rec["trained/grants"] = grants
    return rec


def test_a_resume_discards_the_abandoned_lineage():
    records = [step(1, [0, 1]), step(2, [2, 3]), step(3, [4, 5]),  # killed after 3, checkpoint 2
               {"role": "learner", "event": "resume", "version": 2},
               {"role": "actor", "version": 3},
               step(3, [4, 6]), step(4, [5, 7])]
    steps, resumes = lineage(records)
    assert [s["version"] for s in steps] == [1, 2, 3, 4] and resumes == 1
    report = audit(records, {"version": 4, "data_position": 9, "pending": [8]})
    assert report.problems == [] and report.twice == [] and report.lost == []


def test_duplicates_losses_and_unverified_groups_are_reported():
    records = [step(1, [0, 1], grants=[10, 11]), step(2, [1, 2], dropped=[3], grants=[11, 12],
                                                      unverified=1)]
    report = audit(records, {"version": 2, "data_position": 6, "pending": [2, 5]})
    text = " | ".join(report.problems)
    assert report.twice == [1] and "prompts trained twice: [1]" in text
    assert "(prompt, grant) pairs trained twice: [(1, 11)]" in text
    assert "trained prompts still pending: [2]" in text
    assert report.lost == [4] and "neither trained, dropped as stale, skipped nor pending" in text
    assert "1 trained group(s) came from weights" in text


def test_a_version_missing_or_repeated_in_the_lineage_is_reported():
    records = [step(1, [0]), step(3, [1])]
    assert any("not each trained once" in p for p in audit(
        records, {"version": 3, "data_position": 2}).problems)
    records = [step(1, [0]), step(1, [1])]
    assert any("not each trained once" in p for p in audit(
        records, {"version": 1, "data_position": 2}).problems)


def test_prompts_dropped_stale_by_the_last_wait_count_from_the_end_record():
    # The last take() dropped 4 and 5 as stale and no step followed; the end
    # record lists them (issue 16.7). An end record of an abandoned lineage
    # (before a resume to an earlier version) does not count.
    records = [step(1, [0, 1]), step(2, [2, 3]),
               {"role": "learner", "event": "end", "version": 2, "step": 2,
                "dropped/prompts": ["4", "5"]}]
    meta = {"version": 2, "data_position": 6, "pending": []}
    report = audit(records, meta)
    assert report.problems == [] and report.dropped == {4, 5}
    assert audit(records[:2], meta).lost == [4, 5], "without the end record they are lost"
    abandoned = [step(1, [0, 1]), step(2, [2, 3]),
                 {"role": "learner", "event": "end", "version": 2, "dropped/prompts": ["4"]},
                 {"role": "learner", "event": "resume", "version": 1}, step(2, [2, 3])]
    assert audit(abandoned, {"version": 2, "data_position": 5, "pending": []}).lost == [4]
