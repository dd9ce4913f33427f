"""Inspecting attention: the interactive HTML report, its JSON export and animations.

    import showattend
    from showattend.report import Report
    soft, hard = showattend.load("runs/a/best.pt"), showattend.load("runs/b/best.pt")
    rep = Report.build({"soft": soft, "hard": hard}, ["photos/"], beam=3)
    rep.save("report.html"); rep.save_json("report.json"); rep.save_animations("anim/")
    rep            # in Jupyter: the interactive view inline

The page (``assets/report.html``, ``report.js``, ``report.css``) is package data, inlined into
every report so that the file works from disk with no network; ``showattend serve`` serves the
same page with an upload box.
"""

from showattend.report.build import Entry, ModelInfo, Report, decode_maps, encode_maps, name_models
from showattend.report.references import read_references

__all__ = ["Entry", "ModelInfo", "Report", "decode_maps", "encode_maps", "name_models",
           "read_references"]
