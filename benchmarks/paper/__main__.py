import sys

from benchmarks.paper.run import main

sys.exit(main())
