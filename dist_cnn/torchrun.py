"""`python -m dist_cnn.torchrun`: the torchrun wrapper under its first name (dist_cnn.distributed.torchrun)."""

import sys

from dist_cnn.distributed.torchrun import main

if __name__ == "__main__":
    sys.exit(main())
