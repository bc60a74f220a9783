"""A Ray Train driver for the tests: a local Ray of 2 CPUs, dist_cnn.ray.train on 2 workers, then
Ray shut down. Prints the result as one JSON line.

    python tests/support/ray_driver.py STORAGE MAX_FAILURES [train.py flags]

STEP_SLEEP (seconds) slows every optimizer step of the workers and PID_DIR makes each worker write
its PID there as rank<R>-<PID> (tests/support/ray_worker_setup.py), so a test can kill one mid-run.
"""

import json
import os
import sys

import ray

from dist_cnn import ray as dist_cnn_ray

storage, max_failures, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runtime_env = {}
if os.environ.get("STEP_SLEEP") or os.environ.get("PID_DIR"):
    runtime_env["worker_process_setup_hook"] = "tests.support.ray_worker_setup.setup"
# RAY_TMPDIR (Ray reads it too): this run's own temp directory, so a test can find its processes.
ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env or None, _temp_dir=os.environ.get("RAY_TMPDIR"))
try:
    result = dist_cnn_ray.train(flags, num_workers=2, storage_path=storage, max_failures=max_failures)
    print(
        json.dumps(
            {
                "metrics": result.metrics,
                "checkpoint": result.checkpoint.path if result.checkpoint else None,
                "error": repr(result.error) if result.error else None,
            }
        )
    )
finally:
    ray.shutdown()
