"""One command-line convention for both trainers (--out-dir, --resume [auto|PATH], --overwrite), logging
flags limited to arbooth's loggers, progress bars fit for a log file, `arbooth --help` without torch,
and one-line errors for bad values on the subject toy/tiny presets."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from arbooth import cli
from arbooth.commands.train_subject import build_config
from arbooth.progress import NON_TTY_INTERVAL, progress

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = ROOT / "subjects" / "toy_star"


def _run(code: str, **env) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, check=False)


def test_top_level_help_does_not_import_torch():
    r = _run("import sys\nfrom arbooth.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('TORCH', 'torch' in sys.modules)")
    assert "train-subject" in r.stdout and "TORCH False" in r.stdout, r.stdout + r.stderr


def test_verbose_is_arbooth_only_and_quiet_and_log_level():
    code = ("import logging\nfrom arbooth.cli import build_parser, setup_logging\n"
            "setup_logging(build_parser().parse_args({argv}))\n"
            "print(logging.getLogger('arbooth.x').getEffectiveLevel(), logging.getLogger('PIL').getEffectiveLevel())")
    for argv, want in ((["-v"], "10 30"), (["-q"], "30 30"), ([], "20 30"), (["--log-level", "error"], "40 30")):
        r = _run(code.format(argv=argv))
        assert r.stdout.split() == want.split(), (argv, r.stdout, r.stderr)
    # also after the command
    args = cli.build_parser(only="train-subject").parse_args(["train-subject", "-v"])
    assert args.verbose and args.command == "train-subject"


def test_progress_off_a_tty_and_tqdm_disable(monkeypatch):
    bar = progress(range(3), total=3)  # pytest captures stderr: not a tty
    assert bar.mininterval == NON_TTY_INTERVAL and not bar.disable
    bar.close()
    assert progress(range(3), main=False).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress(range(3)).disable


def _args(*argv: str):
    return cli.build_parser(only="train-subject").parse_args(["train-subject", *argv])


def test_train_subject_flags_match_train_class(tmp_path):
    cfg = build_config(_args("--tiny", "--out-dir", str(tmp_path / "a"), "--overwrite"))
    assert cfg.out_dir == str(tmp_path / "a") and cfg.overwrite and not cfg.resume
    cfg = build_config(_args("--tiny", "--out", str(tmp_path / "a"), "--resume"))
    assert cfg.resume and cfg.out_dir == str(tmp_path / "a")
    cfg = build_config(_args("--tiny", "--resume", str(tmp_path / "b" / "train_state.pt")))
    assert cfg.resume and cfg.out_dir == str(tmp_path / "b")
    cfg = build_config(_args("--tiny", "--out-dir", str(tmp_path / "a"), "--resume", "steps=7"))
    assert cfg.resume and cfg.steps == 7  # an override after a bare --resume stays an override
    cfg = build_config(_args("--tiny", f"out_dir={tmp_path / 'c'}", "resume=true", "overwrite=false"))
    assert cfg.resume and cfg.out_dir == str(tmp_path / "c")  # the key=value forms still work
    from arbooth.errors import ConfigError
    with pytest.raises(ConfigError, match="two run folders"):
        build_config(_args("--tiny", "--resume", str(tmp_path / "b"), "--out-dir", str(tmp_path / "a")))


def test_train_subject_resume_and_refusal_through_the_cli(tmp_path, capsys):
    out, tiny = tmp_path / "run", ["train-subject", "--tiny", "--subject", str(SUBJECT), "--class-noun", "star"]
    assert cli.main([*tiny, "--out-dir", str(out), "steps=1", "validate_every=0"]) == 0
    capsys.readouterr()
    assert cli.main([*tiny, "--out-dir", str(out), "steps=1", "validate_every=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume auto" in err[0] and "--overwrite" in err[0]
    assert cli.main([*tiny, "--resume", str(out), "steps=2", "validate_every=0"]) == 0
    assert [line.count('"step"') for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 1]


@pytest.mark.parametrize("preset", [[], ["--tiny"]])
@pytest.mark.parametrize("bad", ["tuning.method=dora", "teacher.mode=fast", "log.report_to=mlflow",
                                 "steps=-1", "model.preset=huge", "log.sample_every=3"])
def test_bad_values_on_the_subject_toy_and_tiny_presets_are_one_line(preset, bad, tmp_path, capsys):
    subject = ["--subject", str(SUBJECT), "--class-noun", "star"] if preset else []
    rc = cli.main(["train-subject", *preset, *subject, bad, f"out_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("arbooth train-subject: error:"), err
    assert not (tmp_path / "o").exists()


def test_a_log_file_gets_few_bar_lines_and_whole_log_lines():
    """200 steps with a log line every 50 into a file: a handful of bar writes, every log line on its own."""
    code = ("import logging\nfrom arbooth.cli import _through_tqdm, build_parser, setup_logging\n"
            "from arbooth.progress import progress\n"
            "setup_logging(build_parser().parse_args([]))\nlog = logging.getLogger('arbooth.t')\n"
            "with _through_tqdm():\n    bar = progress(range(200), desc='steps')\n    for i in bar:\n"
            "        bar.set_postfix(loss=i, refresh=False)\n        if i % 50 == 0:\n            log.info('step %d', i)\n")
    r = _run(code)
    chunks = r.stderr.replace("\r", "\n").splitlines()
    logs = [c for c in chunks if "arbooth.t: step" in c]
    assert len(logs) == 4 and all(c.split(" ", 1)[1].startswith("INFO arbooth.t: step") for c in logs), chunks
    # the first and last state, and one redraw after each log line (tqdm.write clears the bar and redraws it)
    assert sum("steps:" in c for c in chunks) <= 2 + len(logs), chunks
