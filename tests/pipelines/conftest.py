import json

import pytest
from apache_beam.testing.test_pipeline import TestPipeline

RUNNER = "FnApiRunner"  # the default DirectRunner downloads Prism first, which fails offline


@pytest.fixture
def pipeline():
    return TestPipeline(runner=RUNNER)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


SOFA_SENTENCES = [
    "A woman sits on a red sofa in the living room.",
    "The stock market fell sharply after the bank raised interest rates.",
    "Shares of technology companies rose on Wall Street today.",
    "A cat sleeps on the kitchen floor next to its bowl.",
    "A man rides a motorcycle down a country road.",
    "Investors sold bonds as inflation worries grew.",
]
