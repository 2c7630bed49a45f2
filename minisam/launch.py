"""``python -m minisam.launch --nproc N -- <minisam args>``: see ``minisam.distributed.launch``."""
import sys

from .distributed.launch import main

if __name__ == "__main__":
    sys.exit(main())
