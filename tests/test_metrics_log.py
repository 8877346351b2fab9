"""metrics.csv: readable at every moment a run can be stopped, repaired on resume."""
from diagssm.train.metrics import FIELDS, MetricsLog, read_rows

HEADER = ",".join(FIELDS) + "\n"
ROWS = "25,0,train,2.3,0.1,0.001,9.9\n50,0,train,2.2,0.2,0.002,19.8\n75,0,train,2.1,0.3,0.003,29.7\n"


def test_header_is_on_disk_before_the_first_row(tmp_path):
    log = MetricsLog(tmp_path)
    assert (tmp_path / "metrics.csv").read_text() == HEADER  # no row yet, file not closed
    assert read_rows(tmp_path / "metrics.csv") == []
    log.log(25, 0, "train", 2.5, 0.25, 1e-3, 1.5)
    log.close()
    assert read_rows(tmp_path / "metrics.csv")[0]["step"] == 25


def test_resume_keeps_rows_up_to_the_checkpoint(tmp_path):
    (tmp_path / "metrics.csv").write_text(HEADER + ROWS)
    MetricsLog(tmp_path, resume_step=50).close()
    assert [r["step"] for r in read_rows(tmp_path / "metrics.csv")] == [25, 50]


def test_resume_repairs_a_file_without_its_header(tmp_path):
    """Written by a version that flushed the header only with the first row: a run stopped early
    left an empty file, which a later resume appended rows to."""
    (tmp_path / "metrics.csv").write_text(ROWS)
    MetricsLog(tmp_path, resume_step=50).close()
    assert (tmp_path / "metrics.csv").read_text().startswith(HEADER)
    assert [r["step"] for r in read_rows(tmp_path / "metrics.csv")] == [25, 50]


def test_an_empty_file_gets_its_header(tmp_path):
    for resume_step in (None, 0):
        (tmp_path / "metrics.csv").write_text("")
        log = MetricsLog(tmp_path, resume_step=resume_step)
        log.log(25, 0, "train", 2.5, 0.25, 1e-3, 1.5)
        log.close()
        assert [r["step"] for r in read_rows(tmp_path / "metrics.csv")] == [25]
