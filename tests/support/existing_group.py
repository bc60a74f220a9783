"""A user's own launcher: init_process_group first, then fit() twice in the same process (run under
torchrun). Each fit() must use that group and leave it in place; the script destroys it at the end.

    torchrun --nproc_per_node=N tests/support/existing_group.py OUT_BASE
"""

import json
import sys

import torch.distributed as dist

from dist_cnn import fit

OPTIONS = dict(
    synthetic_train_size=1024,
    synthetic_test_size=256,
    batch_size=64,
    max_steps=6,
    eval_every=0,
    precision="fp32",
    wandb="disabled",
    progress=False,
)

dist.init_process_group("gloo")
group = dist.group.WORLD
for run in ("first", "second"):
    summary = fit("seed", train="synthetic", out=f"{sys.argv[1]}/{run}", **OPTIONS)
    assert dist.is_initialized() and dist.group.WORLD is group, "fit() replaced or destroyed the caller's group"
    if dist.get_rank() == 0:
        print(json.dumps({"run": run, "world_size": summary["world_size"], "backend": summary["backend"]}))
dist.barrier()
dist.destroy_process_group()
