"""`python -m hpcforge ...`: the same command as the `hpcforge` entry point."""
import sys

from hpcforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
