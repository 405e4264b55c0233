import re

import pytest

from jkd import cli


@pytest.mark.slow
def test_demo_has_a_pulse(capsys):
    assert cli.main(["demo", "--epochs", "2", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("teacher", "student alone", "soft KD, T=8"):
        row = re.search(rf"^{re.escape(name)}\s+(\d+\.\d+)", out, re.M)
        assert row, f"no result row for {name!r} in:\n{out}"
        assert 10.0 < float(row.group(1)) <= 100.0  # better than chance after 2 epochs


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--temperature", "0"])
    assert "--temperature > 0" in capsys.readouterr().err
