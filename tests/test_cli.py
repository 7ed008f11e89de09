"""The `refdpo` command itself: help, unknown commands, errors as one line."""


from __future__ import annotations

import pytest

# --- help and errors ----------------------------------------------------------------------------------------


def test_cli_help_and_errors(capsys):
    from refdpo.cli import main

    for command in ("demo", "train", "score", "evaluate"):  # every help text formats (a bare % once broke it)
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--betas_dpo", "1,x"])
    assert exit_info.value.code == 2
    assert "refdpo demo: error: --betas_dpo: expected comma-separated numbers" in capsys.readouterr().err
