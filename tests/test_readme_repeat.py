"""The README's "repeat a run from its config.yaml" (issue 17.7), executed: with a new --output it gives the same
weights; into its own directory it is refused, changing nothing."""

from test_faults import PRETRAIN, one_line_error, snapshot
from test_pretrain import assert_same_weights, final_weights

from simmim.cli import main


def test_a_runs_config_yaml_repeats_it_in_a_new_output(tmp_path, capsys):
    first, again = tmp_path / "b100", tmp_path / "b100-again"
    assert main([*PRETRAIN, "schedule.max_steps=3", "--output", str(first)]) == 0
    before = snapshot(first)
    assert main(["pretrain", str(first / "config.yaml")]) == 2  # run.output in it names the run's own directory
    assert "already holds a run" in one_line_error(capsys)
    assert snapshot(first) == before
    assert main(["pretrain", str(first / "config.yaml"), "--output", str(again)]) == 0
    assert_same_weights(final_weights(first), final_weights(again))
