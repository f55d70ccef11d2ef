"""`python -m radixserve.launch_server [flags]`: `radixserve serve [flags]`, so that scripts written for
`python -m sglang.launch_server` work by renaming the package."""

import sys

from radixserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
