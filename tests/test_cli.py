import json

from frugallm.cli import main


def test_info_builds_and_runs_tiny(capsys):
    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "forward pass: input (1, 16) -> logits (1, 16, 4096), finite=True" in out
    assert "total" in out and "active" in out and "mtp" in out


def test_info_counts_v3_without_building(capsys):
    assert main(["info", "--preset", "v3"]) == 0
    out = capsys.readouterr().out
    assert "671,026,419,200" in out and "not built" in out


def test_info_reads_a_config_file(tmp_path, capsys):
    from frugallm import get_preset

    get_preset("tiny", n_layers=2).to_json(tmp_path / "c.json")
    assert main(["info", "--config", str(tmp_path / "c.json")]) == 0
    assert "layers.1.ffn" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["info", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'; choose one of: tiny, small, v2-lite, v3" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"dims": 3}))
    assert main(["info", "--config", str(tmp_path / "bad.json")]) == 2
    assert "unknown ModelConfig key(s) ['dims']" in capsys.readouterr().err
