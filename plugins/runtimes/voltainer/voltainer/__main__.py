import sys

from voltainer.cli import main

sys.exit(main())
