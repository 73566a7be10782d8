"""The one Hydra entry point every stage is built from (``elm.utils.cli.hydra_command``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from elm.utils.cli import _module_name

SCRIPT = textwrap.dedent('''
    import sys
    from elm.utils.cli import hydra_command

    def run(cfg, run_dir):
        if cfg.seed < 0:
            raise ValueError(f"seed={cfg.seed} is negative")
        return {"seed": cfg.seed, "run_dir": run_dir}

    def report(result, run_dir):
        yield f"[elm.compare] ran with seed {result['seed']} in {result['run_dir'] == run_dir}"

    hydra_command("compare", __name__, run, report)()
''')


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    script = tmp_path / "my_stage.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), *overrides], capture_output=True, text=True, timeout=300)


def test_the_module_name_hydra_names_the_job_after(monkeypatch) -> None:
    assert _module_name("elm.causal.evaluate") == "elm.causal.evaluate"  # elm-causal-evaluate: evaluate.log
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(
        __file__="/x/elm/causal/minillm.py", __spec__=types.SimpleNamespace(name="elm.causal.minillm")))  # fmt: skip
    assert _module_name("__main__") == "elm.causal.minillm"  # python -m elm.causal.minillm: minillm.log
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__="/x/run_it.py", __spec__=None))
    assert _module_name("__main__") == "run_it"  # python run_it.py: run_it.log


def test_hydra_command_runs_the_stage_and_says_its_report_in_the_run_dirs_log(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = _cli(tmp_path, f"hydra.run.dir={run_dir}", "seed=5")
    assert done.returncode == 0, done.stderr
    said = "[elm.compare] ran with seed 5 in True"
    assert said in done.stdout + done.stderr
    assert said in (run_dir / "my_stage.log").read_text()  # the job is named after the calling file


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["seed=-1"], "[elm.compare] error: seed=-1 is negative"),  # the stage's ValueError: one line
     (["sed=1"], "[elm.compare] error: Could not override 'sed'")],  # a typo, before Hydra writes anything
)  # fmt: skip
def test_hydra_command_errors_are_one_line_and_exit_2(tmp_path: Path, overrides: list[str], message: str) -> None:
    done = _cli(tmp_path, f"hydra.run.dir={tmp_path / 'run'}", *overrides)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), done.stderr


def test_hydra_command_leaves_hydras_own_flags_working(tmp_path: Path) -> None:
    """``--cfg job`` after the overrides (what tests/test_scripts.py runs): Hydra prints the config
    and runs nothing."""
    done = _cli(tmp_path, "seed=3", "--cfg", "job")
    assert done.returncode == 0, done.stderr
    assert "seed: 3" in done.stdout and "ran with seed" not in done.stdout
