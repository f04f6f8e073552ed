import sys

from pipeline.study.cli import main

sys.exit(main())
