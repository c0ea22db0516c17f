"""A pytest plugin (loaded by conftest.py): with GGUF_EXPERTS_REQUIRE_ALL=1 (set by .ci/run) every skip is a
failure, collection-time skips (a module-level ``pytest.importorskip``) included.

Why: a suite whose key tests (live llama.cpp, llama.cpp's programs, Chromium, libggml) skip on a machine that
lacks them is green and proves nothing; CI must be red then. The one exception is a test marked
``@pytest.mark.platform_skip("why")``: a skip about the platform (not x86-64, an older Python), which no
installation on the machine can fix. Never use it for a missing dependency.
"""
from __future__ import annotations

import os
from collections.abc import Generator

import pytest

ENV = "GGUF_EXPERTS_REQUIRE_ALL"
MARKER = "platform_skip"


def required() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(reason): this test may skip under {ENV}=1; only for a skip "
                                       "about the platform (e.g. non-x86-64), never for a missing dependency")


def _allowed(item: pytest.Item) -> bool:
    mark = item.get_closest_marker(MARKER)
    if mark is None:
        return False
    reason = mark.args[0] if mark.args else mark.kwargs.get("reason", "")
    if not isinstance(reason, str) or not reason.strip():
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER} needs a stated reason")
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    rep: pytest.TestReport = outcome.get_result()
    if not required() or not rep.skipped or hasattr(rep, "wasxfail") or _allowed(item):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    rep.outcome = "failed"
    rep.longrepr = f"skipped under {ENV}=1, which makes every skip a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, None, None]:
    outcome = yield
    rep: pytest.CollectReport = outcome.get_result()
    if not required() or not rep.skipped:
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    rep.outcome = "failed"
    rep.longrepr = (f"{collector.nodeid}: skipped at collection under {ENV}=1, which makes every skip a failure: "
                    f"{reason}")
