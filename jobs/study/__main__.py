import sys

from jobs.study.cli import main

sys.exit(main())
