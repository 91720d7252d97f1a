import sys

from risloc.cli import main

sys.exit(main())
