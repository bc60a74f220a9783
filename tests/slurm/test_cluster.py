"""The local SLURM cluster itself works: a 2-task job runs and completes."""

import pytest

from tests.slurm.helpers import sbatch, wait_job


@pytest.mark.slurm
def test_two_task_job_completes(slurm_cluster, tmp_path):
    job = sbatch(
        [
            "--gpus-per-node=0",
            "--ntasks=2",
            "--output=out-%j.txt",
            "--wrap",
            "srun bash -c 'echo task=$SLURM_PROCID host=$(hostname)'",
        ],
        cwd=tmp_path,
    )
    info = wait_job(job, timeout=60)
    out = (tmp_path / f"out-{job}.txt").read_text()
    assert info["JobState"] == "COMPLETED", (info, out)
    assert info["ExitCode"] == "0:0", (info, out)
    assert info["NumTasks"] == "2"
    assert sorted(line.split()[0] for line in out.splitlines() if line.startswith("task=")) == ["task=0", "task=1"]
