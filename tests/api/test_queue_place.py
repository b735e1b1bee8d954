"""A queued job's GET shows its place in line and an ETA (genq.position);
a job that is not queued shows none; lists show none."""
from __future__ import annotations

from sqlalchemy import update

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.schema import Job, utcnow
from tests.helpers import make_key

TEXT_JOB = {"model": "demo-text", "input": {"prompt": "hello", "max_new_tokens": 4}}


def test_queued_jobs_show_their_place_and_others_none(embedded_settings):
    client = create_app(embedded_settings).test_client()
    alice, bob = make_key(embedded_settings, "alice"), make_key(embedded_settings, "bob")
    a1, a2 = (client.post("/v1/jobs", json=TEXT_JOB, headers=alice).get_json()["id"] for _ in range(2))
    b1 = client.post("/v1/jobs", json=TEXT_JOB, headers=bob).get_json()["id"]
    place = {j: client.get(f"/v1/jobs/{j}", headers=h).get_json()["queue"] for j, h in
             ((a1, alice), (a2, alice), (b1, bob))}
    # Round robin: alice's first, bob's first, then alice's second.
    assert [place[j]["position"] for j in (a1, b1, a2)] == [0, 1, 2]
    assert all(p["eta_seconds"] is None and p["position_is_lower_bound"] is False for p in place.values())
    assert all(j["queue"] is None for j in client.get("/v1/jobs", headers=alice).get_json()["data"])
    with make_sessionmaker(make_engine(embedded_settings.database_url)).begin() as session:
        session.execute(update(Job).where(Job.id == a1).values(status="running", started_at=utcnow()))
    # alice has just started a job, bob has not: bob's goes next.
    fresh = create_app(embedded_settings).test_client()
    assert fresh.get(f"/v1/jobs/{a1}", headers=alice).get_json()["queue"] is None
    assert fresh.get(f"/v1/jobs/{a2}", headers=alice).get_json()["queue"]["position"] == 1


def test_a_queued_jobs_event_stream_tells_its_place(embedded_settings):
    """The embedded stream (no stream server): `event: queue`, no id, then
    the job's own events as before."""
    client = create_app(embedded_settings).test_client()
    alice = make_key(embedded_settings, "alice")
    job_id = client.post("/v1/jobs", json=TEXT_JOB, headers=alice).get_json()["id"]
    resp = client.get(f"/v1/jobs/{job_id}/events", headers={**alice, "Accept": "text/event-stream"}, buffered=False)
    try:
        blocks, buf = [], ""
        for chunk in resp.response:
            buf += chunk.decode() if isinstance(chunk, bytes) else chunk
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                blocks.append(block)
            if any(b.startswith("event: queue") for b in blocks):
                break
    finally:
        resp.close()
    kinds = [line[7:] for b in blocks for line in b.split("\n") if line.startswith("event: ")]
    assert kinds == ["queued", "queue"]
    place = next(b for b in blocks if b.startswith("event: queue"))
    assert "id:" not in place and '"position": 0' in place
