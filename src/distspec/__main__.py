import sys

from distspec.cli import main

sys.exit(main())
