"""Datasets without a server: the URL policy (normalising, whole-segment prefixes, the setting) and the upgrade
of a database made before datasets existed, on SQLite and PostgreSQL. The service itself: test_datasets_api.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Column, MetaData, Table, inspect

from api.datasets.policy import DatasetURLError, allowed_root, normalize_url, within
from api.db import init_db, make_engine
from api.jobs.models import Job
from api.settings import Settings, SettingsError, normalize_database_url
from tests.test_api_db import database_url  # noqa: F401  (the fixture)


def test_policy_normalises_and_compares_whole_segments(tmp_path: Path):
    assert normalize_url("S3://Bucket/imagenet/") == "s3://bucket/imagenet"
    assert normalize_url("file:///srv/data/") == "file:///srv/data" and normalize_url("file:///") == "file:///"
    assert within("s3://bucket/imagenet/train", "s3://bucket/imagenet")
    assert within("s3://bucket/imagenet", "s3://bucket/imagenet")
    assert not within("s3://bucket/imagenet2", "s3://bucket/imagenet")
    assert within("file:///anything", "file:///")
    for bad in ("s3://bucket/a/../b", "s3://bucket/a/%2E%2E/b", "s3://bucket/a//b", "s3://user:pw@bucket/a",
                "s3://bucket/a?versionId=1", "s3://bucket/a#x", "s3:///a", "file:relative", "bucket/a", "",
                "s3://bucket/a\\b", "s3://bucket/a%2fb"):
        with pytest.raises(DatasetURLError):
            normalize_url(bad)
    with pytest.raises(DatasetURLError, match="SLIM_DATASET_URL_PREFIXES"):
        allowed_root("s3://bucket/a", ())
    assert allowed_root("s3://bucket/imagenet/train/", ("s3://bucket/imagenet",)) == (
        "s3://bucket/imagenet/train", "s3://bucket/imagenet")
    settings = Settings.from_env({"SLIM_DATA_DIR": str(tmp_path),
                                  "SLIM_DATASET_URL_PREFIXES": "s3://Bucket/imagenet/, file:///srv/data/"})
    assert settings.dataset_url_prefixes == ("s3://bucket/imagenet", "file:///srv/data")
    assert Settings.from_env({"SLIM_DATA_DIR": str(tmp_path)}).dataset_url_prefixes == ()
    with pytest.raises(SettingsError, match="SLIM_DATASET_URL_PREFIXES"):
        Settings.from_env({"SLIM_DATA_DIR": str(tmp_path), "SLIM_DATASET_URL_PREFIXES": "s3://b/../x"})


def test_an_older_database_gets_the_dataset_id_column(database_url: str):  # noqa: F811
    """A jobs table made before datasets existed: starting the service adds the column and its index."""
    engine = make_engine(normalize_database_url(database_url))
    old = MetaData()
    Table("jobs", old, *(Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                         for c in Job.__table__.columns if c.name != "dataset_id"))
    old.create_all(engine)
    assert "dataset_id" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    init_db(engine)
    init_db(engine)  # again, as every API and worker start does
    assert "dataset_id" in {c["name"] for c in inspect(engine).get_columns("jobs")}
    assert "ix_jobs_dataset_id" in {i["name"] for i in inspect(engine).get_indexes("jobs")}
    assert "datasets" in inspect(engine).get_table_names()
    engine.dispose()
