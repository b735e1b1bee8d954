"""Jobs for different tenants' LoRA fine-tunes of one base, and for the base,
run in one batch on the worker (in this process, on SQLite): each job's output
is that of the same job alone on its adapter, and a fine-tune stays its
tenant's own (a row naming another tenant's fine-tune fails)."""
from __future__ import annotations

import os
import random
import secrets
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from genq import catalog
from genq import jobs as joblib
from genq.db import make_engine, make_sessionmaker
from genq.keys import get_or_create_tenant
from genq.migrate import upgrade
from genq.schema import Job, ModelVersion
from genq.settings import Settings
from genq.storage import make_storage
from models.demo import ensure_checkpoint
from tests.models.test_text_adapters import make_adapter
from worker.build import build_runner


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    root = Path(os.environ.get("GENQ_TEST_MODEL_DIR") or tmp_path_factory.mktemp("models"))
    ensure_checkpoint("demo:text", root)
    return root


@pytest.fixture(scope="module")
def adapter_dirs(text_dir, tmp_path_factory) -> list[str]:
    """Three LoRA adapters of the demo base, two ranks."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(str(text_dir / "demo-text"), root / f"a{i}", rank, "all-linear", seed=i)
            for i, rank in enumerate([4, 8, 4])]


@pytest.fixture(params=[("continuous", False), ("static", False), ("continuous", True)],
                ids=["continuous", "static", "continuous-engine-process"])
def settings(request, tmp_path, text_dir) -> Settings:
    batching, engine_process = request.param
    url = f"sqlite:///{tmp_path / 'adapters.db'}"
    upgrade(url)
    pool = f"lora-{secrets.token_hex(3)}"
    entry = {"family": "text-generation", "checkpoint": "demo:text", "pool": pool, "max_batch_size": 16,
             "batching": batching, "limits": {"max_new_tokens": 64}}
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": {"demo-text": entry}}))
    return Settings.from_env({}, home=tmp_path / "home", registry_path=registry, database_url=url, device="cpu",
                             model_dir=text_dir, storage_url=(tmp_path / "storage").as_uri(), lease_seconds=30,
                             max_adapters=2, engine_process=engine_process)


def publish_version(sessions, settings, tenant_id: str, adapter_dir: str, tag: str) -> str:
    """A LoRA fine-tune of demo-text owned by `tenant_id`, its adapter in storage (as a fine-tune leaves it)."""
    storage = make_storage(settings)
    prefix = f"models/{tenant_id}/{tag}"
    for f in Path(adapter_dir).iterdir():
        storage.put(f"{prefix}/{f.name}", f.read_bytes(), "application/octet-stream")
    name = catalog.version_name("demo-text", tag, secrets.token_hex(8))
    with sessions.begin() as session:
        session.add(ModelVersion(tenant_id=tenant_id, name=name, base_model="demo-text", family="text-generation",
                                 method="lora", storage_prefix=prefix, job_id=secrets.token_hex(8)))
    return name


def test_jobs_of_several_adapters_and_the_base_share_a_batch(settings, text_dir, adapter_dirs):
    from models import text
    from models.registry import Registry
    from models.text_adapters import AdapterRef

    sessions = make_sessionmaker(make_engine(settings.database_url))
    registry = Registry.load(settings.registry_path)
    checkpoint = str(text_dir / "demo-text")
    with sessions.begin() as session:
        tenants = [get_or_create_tenant(session, f"lora-{secrets.token_hex(3)}").id for _ in range(2)]
    # Three adapters, of two tenants (more than max_adapters=2: the LRU evicts none in use).
    dirs = adapter_dirs
    owners = [tenants[0], tenants[0], tenants[1]]
    names = [publish_version(sessions, settings, owner, d, f"t{i}") for i, (owner, d) in enumerate(zip(owners, dirs))]

    rng = random.Random(3)
    plan = []  # (tenant, model, adapter dir or None, input)
    for i in range(12):
        which = i % 4
        model, owner, d = ("demo-text", tenants[i % 2], None) if which == 3 else (names[which], owners[which],
                                                                                  dirs[which])
        inp = {"prompt": f"job {i} the quick fox", "max_new_tokens": rng.randint(4, 12),
               "temperature": rng.choice([0.0, 1.0]), "seed": rng.randrange(2**32)}
        plan.append((owner, model, d, inp))
    rng.shuffle(plan)
    # A row naming another tenant's fine-tune (the API refuses it; here it is forged): it fails alone.
    plan.append((tenants[1], names[0], None, {"prompt": "not yours", "max_new_tokens": 4}))

    ids = []
    with sessions.begin() as session:
        for owner, model, _, inp in plan:
            spec = catalog.resolve(session, registry, model)
            assert spec.batch_model == "demo-text"
            ids.append(joblib.submit(session, tenant_id=owner, type_="text-generation", model=model, pool=spec.pool,
                                     batch_key=spec.batch_key(spec.validate(inp)), input_=inp,
                                     batch_model=spec.batch_model).id)

    assert build_runner(settings).on_doorbell(ids[0]) == len(ids)
    with sessions() as session:
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}

    alone = text.load(checkpoint, "cpu", "float32")
    alone.serve_adapters(8)
    for job_id, (owner, model, d, inp) in zip(ids[:-1], plan[:-1]):
        job = jobs[job_id]
        assert job.status == "succeeded", job.error
        ref = AdapterRef(model, d) if d else None
        engine = alone.engine(1)
        updates = engine.add([alone.sequence("k", text.Input(**inp), ref)])
        while len(engine):
            updates = engine.step()
        expected = updates[-1].output
        assert {k: job.output[k] for k in expected} == expected, (model, inp)
    # They ran together: every job (but the forged one) shared its batch with all the others.
    assert {jobs[i].metrics["batch_size"] for i in ids[:-1]} == {len(ids) - 1}
    forged = jobs[ids[-1]]
    assert forged.status == "failed" and forged.error["code"] == "unknown_model", forged.error


def test_a_deleted_fine_tune_fails_its_own_jobs_only(settings, adapter_dirs):
    """The pool's head is a job of a fine-tune deleted since: its jobs fail
    `unknown_model`, the base's jobs (same batch model) run."""
    from sqlalchemy import delete

    from models.registry import Registry

    sessions = make_sessionmaker(make_engine(settings.database_url))
    registry = Registry.load(settings.registry_path)
    with sessions.begin() as session:
        tenant = get_or_create_tenant(session, f"lora-{secrets.token_hex(3)}").id
    name = publish_version(sessions, settings, tenant, adapter_dirs[0], "gone")
    ids = []
    with sessions.begin() as session:
        for model in (name, "demo-text", name):
            spec = catalog.resolve(session, registry, model)
            inp = {"prompt": "a", "max_new_tokens": 2}
            ids.append(joblib.submit(session, tenant_id=tenant, type_="text-generation", model=model, pool=spec.pool,
                                     batch_key=spec.batch_key(spec.validate(inp)), input_=inp,
                                     batch_model=spec.batch_model).id)
        session.execute(delete(ModelVersion).where(ModelVersion.name == name))
    build_runner(settings).on_doorbell(ids[0])
    with sessions() as session:
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}
    assert [jobs[i].status for i in ids] == ["failed", "succeeded", "failed"]
    assert {jobs[i].error["code"] for i in (ids[0], ids[2])} == {"unknown_model"}
