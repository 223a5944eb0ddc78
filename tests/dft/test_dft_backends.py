"""Execution backends: FireWorks rapidfire on the embedded server, jobflow-remote config."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from jobflow import Flow, JobStore

from crystaloop.dft.backends import (
    job_store,
    launch_rapidfire,
    launchpad,
    remote_project_config,
    submit_fireworks,
    submit_remote,
    write_remote_project,
)
from crystaloop.dft.espresso.jobs import QERelaxMaker
from crystaloop.dft.references import bulk_structure
from crystaloop.errors import UserError


def test_job_store_lives_in_the_crystaloop_database(fake_settings):
    store = job_store()
    assert isinstance(store, JobStore)
    assert store.docs_store.database == fake_settings.database
    assert set(store.additional_stores) == {"data"}


def test_fireworks_rapidfire_runs_the_flow(fake_pw, fake_settings, database, tmp_path):
    fake = fake_pw({"qe relax": "si_relax"})
    relax = QERelaxMaker().make(bulk_structure("Si", "diamond", 5.431))
    lpad = launchpad()
    lpad.reset("", require_password=False)
    ids = submit_fireworks(Flow([relax]), lpad=lpad)
    assert len(ids) == 1
    launch_rapidfire(lpad=lpad, launch_dir=tmp_path)
    assert lpad.get_fw_by_id(ids[0]).state == "COMPLETED"
    assert len(fake.calls) == 1
    store = job_store()
    store.connect()
    output = store.query_one({"uuid": relax.uuid}, load=True)["output"]
    assert output["state"] == "successful" and output["engine"] == "espresso"
    assert len(output["forces"]) == 2
    assert database["dft_tasks"].find_one({"task_id": relax.uuid})["state"] == "successful"


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_remote_project_config_points_at_the_same_database(fake_settings, tmp_path, scheduler):
    config = remote_project_config(
        "cl",
        scheduler=scheduler,
        host="login.cluster",
        partition="short",
        account="mat123",
        walltime="02:00:00",
        resources={"nodes": 1},
    )
    worker = config["workers"][scheduler]  # the name configs/heusler_magnets.yaml uses
    assert worker["scheduler_type"] == scheduler and worker["type"] == "remote"
    assert worker["host"] == "login.cluster"
    assert worker["resources"]["partition" if scheduler == "slurm" else "queue"] == "short"
    assert worker["resources"]["account"] == "mat123"
    assert worker["resources"]["time" if scheduler == "slurm" else "walltime"] == "02:00:00"
    assert worker["pre_run"].startswith("source ") and worker["pre_run"].endswith("/bin/activate")
    assert config["queue"]["store"]["database"] == fake_settings.database
    assert config["jobstore"]["docs_store"]["collection_name"] == "jobflow_outputs"
    assert config["jobstore"]["additional_stores"]["data"]["collection_name"] == "jobflow_data"
    path = write_remote_project(config, tmp_path)
    assert yaml.safe_load(path.read_text()) == config


@pytest.mark.skipif(importlib.util.find_spec("jobflow_remote") is None, reason="needs jobflow-remote")
def test_remote_project_config_validates_with_jobflow_remote(fake_settings):
    from jobflow_remote.config.base import Project

    project = Project.model_validate(remote_project_config("cl", scheduler="slurm"))
    assert "slurm" in project.workers


@pytest.mark.skipif(importlib.util.find_spec("jobflow_remote") is not None, reason="installed")
def test_submit_remote_without_jobflow_remote_is_a_user_error(fake_settings):
    with pytest.raises(UserError, match="jobflow-remote is not installed"):
        submit_remote(Flow([]), project="cl", worker="slurm_worker")


def _in_job_folder() -> str:
    import os

    return os.getcwd()


def test_run_local_keeps_jobflow_folder_warnings_out_of_the_log(settings, tmp_path):
    import warnings

    from jobflow import job

    from crystaloop.dft.backends import run_local

    step = job(_in_job_folder)()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecated folder change of each job used to warn
        responses = run_local(Flow([step]), root_dir=tmp_path)
    folder = responses[step.uuid][1].output
    assert folder == str(tmp_path)
