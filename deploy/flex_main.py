"""Flex-template entry point: `vlp-data build-retrieval` with the template's parameters.

The launcher runs this file with the parameters as --name=value. The job is submitted and this
process returns without waiting (Dataflow's flex launch requires it): the pipeline checks and
publishes its own output as its last step. The runner is Dataflow unless a parameter says otherwise.
"""
import sys


def launcher_args(params: list[str]) -> list[str]:
    runner = any(p == "--runner" or p.startswith("--runner=") for p in params)
    return ["build-retrieval", "--no-wait", *params, *([] if runner else ["--runner=DataflowRunner"])]


if __name__ == "__main__":
    from pipelines.cli import main
    sys.exit(main(launcher_args(sys.argv[1:]), prog_name="vlp-data"))
