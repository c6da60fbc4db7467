"""Flex-template entry point: `vlp-data build-retrieval` with the template's parameters."""
import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-retrieval", *sys.argv[1:]]))
