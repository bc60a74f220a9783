"""Train a CNN: `python train.py`, `torchrun --nproc_per_node N train.py`, `srun python train.py`,
`accelerate launch train.py`. Every option: `python train.py --help`."""

from dist_cnn.commands import entry

if __name__ == "__main__":
    entry()
