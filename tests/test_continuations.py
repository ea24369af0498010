"""The continuations command: its table holds what private models write."""

import os
import stat

import fedqsn_flwr.experiments.continuations as continuations


def test_the_out_file_is_the_owners_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(continuations, "table", lambda runs, attacks: "| model | text |\n")
    out = tmp_path / "continuations.md"
    before = os.umask(0o022)  # the usual umask: a plain write would be world-readable
    try:
        assert continuations.main(["--runs", str(tmp_path), "--out", str(out)]) == 0
        out.write_text("stale")
        out.chmod(0o644)
        assert continuations.main(["--runs", str(tmp_path), "--out", str(out)]) == 0
    finally:
        os.umask(before)
    assert out.read_text() == "| model | text |\n"
    assert capsys.readouterr().out == 2 * "| model | text |\n"  # printed too
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
