"""``qkit.frames`` (named by the product contract and users' notebooks) is the public entry point to
qkit.analysis.frames: every public name there is reachable, as the same object, both ways of importing."""
from __future__ import annotations

import pytest

pytest.importorskip("pandas")


def test_qkit_frames_re_exports_the_analysis_frames():
    import qkit.analysis.frames as real
    import qkit.frames as entry
    from qkit import frames

    public = [n for n in dir(real) if not n.startswith("_")]
    assert {"jobs", "attempts", "runs", "retry_distribution", "dlq_groups", "as_utc"} <= set(public)
    assert [n for n in public if getattr(entry, n, None) is not getattr(real, n)] == []
    assert frames is entry
