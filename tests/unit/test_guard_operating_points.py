"""tools/guard_operating_points: policy thresholds map to raw ones, and each column counts the right rows."""

from __future__ import annotations

import numpy as np
import pytest

from tools.guard_data import Example
from tools.guard_operating_points import raw_threshold, table


@pytest.mark.parametrize("chosen", [0.2, 0.555, 0.9])
def test_policy_threshold_half_is_the_chosen_raw_threshold(chosen: float) -> None:
    assert raw_threshold(0.5, chosen) == pytest.approx(chosen)
    assert raw_threshold(0.3, chosen) < chosen < raw_threshold(0.7, chosen)


def test_table_counts_each_column_on_its_rows() -> None:
    measure = [Example("a", False, source="alpaca"), Example("b", False, source="alpaca"),
               Example("m", True, source="malicious_instruct")]
    dev = [Example("o", False, source="self_instruct"), Example("w", False, source="wildguard_benign"),
           Example("w2", False, source="wildguard_benign"), Example("h", True, source="harmbench"),
           Example("r", True, source="responses", role="Agent"),
           Example("s", False, source="responses", role="Agent")]
    out = table(measure, np.array([0.6, 0.1, 0.45]), dev, np.array([0.1, 0.7, 0.2, 0.9, 0.8, 0.3]), 0.5,
                thresholds=(0.5, 0.4))
    rows = out.splitlines()[2:]
    # at 0.5: one of two Alpaca rows flagged, MaliciousInstruct missed, 1/2 wildguard, harmful caught,
    # responses 1 recall / 0 FPR
    assert rows[0] == ("| **0.5 (default)** | 0.500 / 0.500 | 0.500 | 0.000 | 0.000 | 0.500 (wildguard_benign) "
                       "| 1.000 | 1.000 / 0.000 |")
    assert "| 0.4 | 0.400 / 0.400 | 0.500 | 1.000 |" in rows[1]
    # a head with its own output threshold: the responses (Agent) column reads it, the prompt columns do not
    staged = table(measure, np.array([0.6, 0.1, 0.45]), dev, np.array([0.1, 0.7, 0.2, 0.9, 0.8, 0.3]), 0.5,
                   thresholds=(0.5,), chosen_output=0.85).splitlines()[2]
    assert staged == ("| **0.5 (default)** | 0.500 / 0.850 | 0.500 | 0.000 | 0.000 | 0.500 (wildguard_benign) "
                      "| 1.000 | 0.000 / 0.000 |")
