"""``python -m difnumpy ...`` runs the command line (:func:`difnumpy.cli.main`)."""
import sys

from difnumpy.cli import main

if __name__ == "__main__":
    sys.exit(main())
