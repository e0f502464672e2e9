"""The token self-check: its verdict, the prompts it paints with, its file, the report and the evaluate path."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from helpers import write_run

from defectfill.data import load_rgb
from defectfill.outputs.run_folder import TOKEN_CHECK_NAME, read_run_split, read_token_check
from defectfill.run.token_check import (
    LORA_PAINTS,
    NOTHING_LEARNED,
    TOKEN_CARRIES,
    check_token,
    token_verdict,
    without_token,
)


def test_verdict_of_crafted_distances():
    # (with the token, without it, the untouched surface)
    assert token_verdict(0.05, 0.20, 0.30) == TOKEN_CARRIES
    assert token_verdict(0.05, 0.06, 0.30) == LORA_PAINTS  # the prompt without the token paints it as well
    assert token_verdict(0.28, 0.40, 0.30) == NOTHING_LEARNED  # no closer to the defects than the bare surface
    assert token_verdict(0.4, 0.5, 0.5) == TOKEN_CARRIES  # both boundaries at 0.8 x, inclusive
    assert token_verdict(0.40001, 0.5, 0.5) == NOTHING_LEARNED
    assert token_verdict(0.2, 0.25, 0.5) == TOKEN_CARRIES
    assert token_verdict(0.2, 0.25001, 0.5) == TOKEN_CARRIES and token_verdict(0.2, 0.2499, 0.5) == LORA_PAINTS


def test_without_token_takes_out_every_occurrence():
    assert without_token("A disc with sks", "sks") == "A disc with"
    assert without_token("A photo of <hole> and <hole>", "<hole>") == "A photo of and"


class RealDefectPainter:
    """Paints the i-th held-out real defect (call seed i) when `paints(prompt)`, else returns the source as is."""

    def __init__(self, run, paints):
        self.prompt, self.token, self.guidance = "A disc with sks", "sks", 5.0
        self.defects = [load_rgb(s.image) for s in read_run_split(run).held_out]
        self.paints, self.calls = paints, []

    def __call__(self, image, mask, seed=0):
        self.calls.append((self.prompt, self.guidance))
        return SimpleNamespace(image=self.defects[seed] if self.paints(self.prompt, self.token) else image)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, demo_root):
    return write_run(tmp_path_factory.mktemp("tc") / "disc-scratch", tiny_model_dir, demo_root)


@pytest.mark.parametrize("paints, verdict", [
    (lambda prompt, token: token in prompt, TOKEN_CARRIES),
    (lambda prompt, token: True, LORA_PAINTS),
    (lambda prompt, token: False, NOTHING_LEARNED),
])
def test_probe_verdicts_from_what_is_painted(run, paints, verdict):
    """A token that paints the defect only when it is in the prompt is found carrying it; a model that paints
    it whatever the prompt, or never, is named so. With the prompts swapped between the rows (a bug), the first
    case would read as the second."""
    painter = RealDefectPainter(run, paints)
    record = check_token(run, masks=3, steps=2, painter=painter)
    assert record["verdict"] == verdict
    rows = {(r["prompt"], r["guidance"]): r for r in record["distances"]}
    assert set(g for _, g in rows) == {5.0, 1.0, 3.0}
    for (name, _), row in rows.items():
        assert ("without the token" in name) == ("sks" not in row["text"])
    assert rows[("run prompt", 5.0)]["distance"] == record["with_token"]
    assert rows[("run prompt without the token", 5.0)]["distance"] == record["without_token"]
    if verdict == TOKEN_CARRIES:
        assert record["with_token"] == 0.0 and record["without_token"] == record["untouched"] > 0
    assert len(painter.calls) == 3 * len(rows)  # each row paints every mask once
    assert (painter.prompt, painter.guidance) == ("A disc with sks", 5.0), "the painter's settings restored"
    assert read_token_check(run) == json.loads((run / TOKEN_CHECK_NAME).read_text()) == record
    assert record["masks"] == 3 and record["origin"].startswith("held-out")


def test_check_token_on_the_tiny_model_writes_its_file(run):
    """The real probe (DefectGenerator on the tiny pipeline): every prompt x guidance row, a verdict, the file."""
    record = check_token(run, masks=2, steps=2)
    assert record["verdict"] in (TOKEN_CARRIES, LORA_PAINTS, NOTHING_LEARNED)
    assert {r["guidance"] for r in record["distances"]} == {record["guidance"], 1.0, 3.0}
    assert any("without the token" in r["prompt"] for r in record["distances"])
    assert json.loads((run / TOKEN_CHECK_NAME).read_text())["verdict"] == record["verdict"]


def test_the_report_and_evaluate_show_the_check(run, tmp_path):
    """evaluate keeps a token probe's record as metrics.json's token_check, and report.html says the verdict."""
    from defectfill.outputs.report import token_check_summary, write_report

    record = check_token(run, masks=2, steps=2, painter=RealDefectPainter(run, lambda p, t: t in p))
    write_report(tmp_path, {"token_check": record, "settings": {}}, {})
    html = (tmp_path / "report.html").read_text()
    assert TOKEN_CARRIES in html and "Token self-check" in html
    assert token_check_summary(record).startswith(TOKEN_CARRIES)
