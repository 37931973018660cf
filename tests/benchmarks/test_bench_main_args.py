"""bench_main refuses bad arguments with a message naming the limit, before starting anything."""
from __future__ import annotations

import pytest

from benchmarks import bench_main


@pytest.mark.parametrize(("argv", "message"), [
    (["--clients", "0"], "--clients must be from 1 to 512, got 0"),
    (["--clients", "8", "513"], "--clients must be from 1 to 512, got 513"),
    (["--clients", "eight"], "--clients takes whole numbers, got 'eight'"),
    (["--seconds", "0"], "--seconds must be above 0, got 0"),
    (["--seconds", "soon"], "--seconds takes a number, got 'soon'"),
    (["--brokers", "kafka"], "invalid choice: 'kafka'"),
])
def test_it_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
